"""Client-side security settings: mqtts:// URLs, credential files, and a device config's [security] section."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge.config import config_from_dict, config_to_toml
from fedwire.mqtt import BrokerAddress, Credentials


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://h:1884", BrokerAddress("h", 1884, tls=False)),
        ("mqtts://h", BrokerAddress("h", 8883, tls=True)),
        ("mqtts://10.0.0.5:8884", BrokerAddress("10.0.0.5", 8884, tls=True)),
        ("h", BrokerAddress("h", 1883, tls=False)),
    ],
)
def test_broker_urls_name_their_transport(url: str, expected: BrokerAddress) -> None:
    assert BrokerAddress.parse(url) == expected
    assert BrokerAddress.parse(expected.url) == expected


def test_a_url_never_carries_a_password() -> None:
    with pytest.raises(ValueError, match="credentials"):
        BrokerAddress.parse("mqtts://pi-07:secret@h:8883")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"cert_file": "d.pem"}, "cert_file and key_file"),
        ({"key_file": "d.key"}, "cert_file and key_file"),
        ({"password_file": "pw"}, "without a username"),
    ],
)
def test_incomplete_credentials_are_refused(fields: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Credentials(**fields)


def test_the_password_is_read_from_its_file_at_connect_time(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("first\n")
    credentials = Credentials(username="pi-07", password_file=str(secret))
    assert credentials.password() == "first"
    secret.write_text("rotated\n")
    assert credentials.password() == "rotated"
    assert "rotated" not in repr(credentials)


def test_a_device_config_carries_its_security_section() -> None:
    raw = {
        "device": {"id": "pi-07", "broker": "mqtts://broker.lan:8884"},
        "security": {"ca_file": "credentials/ca.pem", "cert_file": "credentials/device.pem", "key_file": "k.key"},
    }
    config = config_from_dict(raw)
    assert config.security.cert_file == "credentials/device.pem"
    again = config_from_dict(tomllib.loads(config_to_toml(config)))
    assert again == config


def test_a_client_certificate_needs_a_tls_broker() -> None:
    raw = {
        "device": {"id": "pi-07", "broker": "mqtt://broker.lan:1883"},
        "security": {"cert_file": "a", "key_file": "b"},
    }
    with pytest.raises(ValueError, match="mqtts://"):
        config_from_dict(raw)


def test_unknown_security_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown keys in \[security\]"):
        config_from_dict({"device": {"id": "pi-07"}, "security": {"pasword_file": "pw"}})
