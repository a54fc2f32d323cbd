"""Secure trials, provisioning and revocation from the harness, against real Mosquitto and real TLS.

The shipped secure scenario runs end to end (mixed password and certificate devices, broker restart, server
kill) and leaks no secret; `provision` writes each device's own files with the right modes and keeps one CA;
`revoke` drops and refuses devices of a running `broker_server/main.py --secure` within seconds, sparing others.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509

from android_harness import __main__ as cli
from android_harness.bundle import Bundle
from android_harness.processes import server_main, stop_process
from android_harness.spec import SpecError, parse_spec
from android_harness.trial import TrialSettings, _security_dir
from edge.config import DeviceConfig, SecurityConfig, load_config
from fedwire.fleet import SecurityDir
from fedwire.mosquitto import free_port
from fedwire.mqtt import BrokerAddress, Credentials, apply_credentials, make_client
from fedwire.pki import certificate_common_name, certificate_serial
from fedwire.topics import metrics_topic

REVOKE_WITHIN_S = 5.0
PASSWORD_FILES = {"ca.pem", "password"}
CERTIFICATE_FILES = {"ca.pem", "device.pem", "device.key"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secrets(*roots: Path) -> list[str]:
    """Every password and every private key's base64 lines under `roots`: what must never leave its file."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            if path.name == "password" or path.suffix == ".password":
                found.append(path.read_text().strip())
            elif path.suffix == ".key":
                found += [line for line in path.read_text().splitlines() if len(line) >= 20 and "-----" not in line]
    return found


def _leaks(secrets: list[str], texts: dict[str, bytes]) -> list[str]:
    """Names of the texts that contain a secret (the secret itself is never put in a message)."""
    return sorted({name for name, text in texts.items() for secret in secrets if secret.encode() in text})


# ---------------------------------------------------------------- the secure scenario, end to end


@pytest.fixture(scope="module")
def secure_trial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("secure") / "out"
    done = subprocess.run(
        [sys.executable, "-m", "android_harness", "scenario", "secure_mixed", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), done


def test_secure_scenario_trains_every_device_through_tls_restarts_and_kills(secure_trial: tuple) -> None:
    _, report, done = secure_trial
    assert report["settings"]["security"] == "tls" and report["settings"]["auth"] == "mixed"
    devices = report["security"]["devices"]
    assert [devices[d]["auth"] for d in sorted(devices)] == ["password", "certificate", "password"]
    assert all(d["broker"].startswith("mqtts://") for d in devices.values())
    assert devices["dev000"]["broker"] != devices["dev001"]["broker"]  # password and certificate listeners
    assert {d["id"] for d in report["devices"]} == set(devices)
    assert all(d["epochs"] == 12 for d in report["devices"]), report["devices"]
    assert set(report["exit_status"].values()) == {0}
    assert report["maua"] > 0.5, report["maua"]  # ten classes: chance is 0.1
    events = [e["event"] for e in report["faults"]["events"]]
    assert "broker restarted" in events and "server kill -9" in events and "server restarted" in events
    assert all(r["ok"] for r in report["invariants"].values()), report["invariants"]
    assert re.search(r"^PASS: (\d+) of \1 invariants hold$", done.stdout, re.MULTILINE), done.stdout


def test_each_device_connected_as_itself_on_its_tls_listener_only(secure_trial: tuple) -> None:
    out, report, _ = secure_trial
    log = (out / "broker" / "mosquitto.log").read_text()
    ports = dict(re.findall(r"New connection from (\S+) on port (\d+)\.", log))
    used: dict[str, set[int]] = {}
    for peer, name in re.findall(r"New client connected from (\S+) as (\S+) \(", log):
        used.setdefault(name, set()).add(int(ports[peer]))
    for device, entry in report["security"]["devices"].items():
        assert used[device] == {BrokerAddress.parse(entry["broker"]).port}, (device, used)
    assert {"fedcache-server-0", "fedcache-observer-watch", "fedcache-observer-probe"} <= used.keys()
    assert len(used["fedcache-server-0"]) == 1 and used["fedcache-server-0"].isdisjoint(
        {BrokerAddress.parse(e["broker"]).port for e in report["security"]["devices"].values()}
    )  # the server stays on the loopback listener


def test_credentials_dirs_hold_only_the_devices_own_files(secure_trial: tuple) -> None:
    out, report, _ = secure_trial
    for device, entry in report["security"]["devices"].items():
        directory = out / "credentials" / device
        names = {p.name for p in directory.iterdir()}
        assert names == (PASSWORD_FILES if entry["auth"] == "password" else CERTIFICATE_FILES), (device, names)
        assert _mode(directory) == 0o700
        assert all(_mode(directory / n) == 0o600 for n in names & {"password", "device.key"})
        config = load_config(out / "devices" / device / "device.toml")
        assert config.broker == entry["broker"]
        files = [config.security.password_file, config.security.ca_file, config.security.cert_file]
        assert all(Path(f).parent == directory for f in [*files, config.security.key_file] if f)
        if entry["auth"] == "password":
            assert config.security.username == device and not config.security.key_file
        else:
            assert certificate_common_name(directory / "device.pem") == device and not config.security.password_file


def test_no_password_or_key_appears_in_reports_logs_or_the_summary(secure_trial: tuple) -> None:
    out, _, done = secure_trial
    secrets = _secrets(out / "credentials", out / "security")
    assert len([s for s in secrets if len(s) < 40]) >= 2 + 4  # dev000, dev002; server, two observers, admin
    assert len(secrets) > 10  # and the key lines of dev001, the CA and the broker
    kept = (out / "credentials", out / "security")
    texts = {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not any(p.is_relative_to(k) for k in kept)
    }
    assert {"report.json", "report.html", "logs/server.log", "logs/dev001.log", "broker/mosquitto.log"} <= set(texts)
    texts |= {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    leaks = _leaks(secrets, texts)
    assert not leaks, f"a password or key is written in {leaks}"


# ---------------------------------------------------------------- specs and settings


def test_secure_spec_keys_map_onto_settings_and_refuse_what_cannot_run(tmp_path: Path) -> None:
    base = {"trial": {"dataset": "digits"}, "devices": [{"count": 4}]}
    settings = parse_spec(base | {"broker": {"security": "tls", "auth": "mixed"}}, out=tmp_path).settings
    assert (settings.security, settings.auth) == ("tls", "mixed")
    assert [settings.device_auth(i) for i in range(4)] == ["password", "certificate"] * 2
    assert parse_spec(base, out=tmp_path).settings.security == "none"
    bad = [
        ({"security": "tls", "url": "mqtt://10.0.0.5:1883"}, "external broker"),
        ({"auth": "certificate"}, '[broker].auth: devices authenticate only in a secure trial; add security = "tls"'),
        ({"security": "ssl"}, "[broker].security: 'ssl' is not one of"),
        ({"security": "tls", "auth": "token"}, "[broker].auth: 'token' is not one of"),
    ]
    for broker, message in bad:
        with pytest.raises(SpecError) as caught:
            parse_spec(base | {"broker": broker}, out=tmp_path)
        assert message in str(caught.value)
    with pytest.raises(ValueError, match="credentials for an external broker"):
        TrialSettings(out=tmp_path, security="tls", broker_url="mqtt://h:1").check()
    with pytest.raises(SystemExit, match="--auth: devices authenticate only in a secure trial"):
        cli.main(["trial", "--out", str(tmp_path), "--auth", "certificate"])


def test_a_labs_bridge_address_is_named_in_the_broker_certificate(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path, security="tls", netns=True)
    security_dir = _security_dir(settings, SimpleNamespace(bridge_address="10.203.0.1"))  # type: ignore[arg-type]
    cert = x509.load_pem_x509_certificate(security_dir.broker_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    addresses = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    assert {"10.203.0.1", "127.0.0.1"} <= addresses  # netns devices reach the broker at the bridge, over TLS
    assert _mode(security_dir.root) == 0o700 and security_dir.root == tmp_path / "security"


# ---------------------------------------------------------------- provision


def test_provision_writes_each_devices_own_files_and_keeps_one_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    first = subprocess.run(
        [sys.executable, "-m", "android_harness", "provision", "--data-dir", str(data), "--devices", "d00,d01",
         "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == ["d00", "d01"]
    security = data / "security"
    assert _mode(security) == 0o700 and _mode(security / "ca.key") == 0o600 and _mode(security / "broker.key") == 0o600
    ca, ca_key = (security / "ca.pem").read_bytes(), hashlib.sha256((security / "ca.key").read_bytes()).digest()
    for device in ("d00", "d01"):
        assert {p.name for p in (out / device).iterdir()} == PASSWORD_FILES | {"security.toml"}
        assert _mode(out / device / "password") == 0o600 and _mode(out / device) == 0o700
        snippet = tomllib.loads((out / device / "security.toml").read_text())
        assert snippet["device"]["broker"] == "mqtts://127.0.0.1:8883"
        assert snippet["security"] == {"username": device, "password_file": "password", "ca_file": "ca.pem"}
    passwords = {d: (out / d / "password").read_text() for d in ("d00", "d01")}
    assert passwords["d00"] != passwords["d01"]

    # Again, for d00 (now with a certificate) and a new d02, on a named host: one CA, d01 untouched.
    url = "mqtts://fedcache.example:9884"
    argv = ["provision", "--data-dir", str(data), "--devices", "d00,d02", "--auth", "certificate", "--broker-url", url]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (security / "ca.pem").read_bytes() == ca
    assert hashlib.sha256((security / "ca.key").read_bytes()).digest() == ca_key
    for device in ("d00", "d02"):
        assert {p.name for p in (out / device).iterdir()} == CERTIFICATE_FILES | {"security.toml"}
        assert _mode(out / device / "device.key") == 0o600
        assert certificate_common_name(out / device / "device.pem") == device
        snippet = tomllib.loads((out / device / "security.toml").read_text())
        assert snippet["device"]["broker"] == url and snippet["security"]["key_file"] == "device.key"
        assert (out / device / "ca.pem").read_bytes() == ca
    assert (out / "d01" / "password").read_text() == passwords["d01"]
    broker_cert = x509.load_pem_x509_certificate((security / "broker.pem").read_bytes())
    names = broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fedcache.example" in names.get_values_for_type(x509.DNSName)
    assert "its earlier credentials no longer work" in printed.splitlines()[-2]  # d00's line
    leaks = _leaks([*passwords.values(), *_secrets(out, security)], {"output": (first.stdout + printed).encode()})
    assert not leaks, "provision printed a password or key"

    # Offline revocation (no broker runs): the plugin forgets the password device, the CRL lists the certificate.
    assert cli.main(["revoke", "--data-dir", str(data), "d01", "d02"]) == 0
    registry = SecurityDir(security).devices()
    assert registry["d01"]["revoked"] and registry["d02"]["revoked"] and not registry["d00"]["revoked"]
    clients = {c["username"] for c in json.loads((security / "dynamic-security.json").read_text())["clients"]}
    assert "d01" not in clients and "d00" in clients
    crl = x509.load_pem_x509_crl((security / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(certificate_serial(out / "d02" / "device.pem")) is not None
    assert crl.get_revoked_certificate_by_serial_number(certificate_serial(out / "d00" / "device.pem")) is None
    with pytest.raises(SystemExit, match="never provisioned here: nosuch"):
        cli.main(["revoke", "--data-dir", str(data), "nosuch"])


def test_flash_provision_puts_only_the_devices_credentials_into_its_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "device.toml"
    config.write_text(
        '[device]\nid = "pi-sec"\nbroker = "mqtt://10.0.0.5:1883"\n[data]\ndataset = "digits"\nnum_devices = 3\n'
        'index = 1\n[train]\narch = "cnn"\nepochs = 1\n[hash]\ndim = 64\n'
    )
    data, root = tmp_path / "data", tmp_path / "bundle"
    argv = ["flash", "--target", "local", "--device-config", str(config), "--out", str(root), "--build-only"]
    assert cli.main([*argv, "--provision", "password", "--data-dir", str(data)]) == 0
    bundle = Bundle.open(root)
    bundle.verify()
    assert {"credentials/ca.pem", "credentials/password"} <= set(bundle.files)
    assert {p.name for p in (root / "credentials").iterdir()} == PASSWORD_FILES
    assert _mode(root / "credentials" / "password") == 0o600 and _mode(root / "credentials") == 0o700
    device = load_config(bundle.config_path)
    assert device.broker == "mqtts://10.0.0.5:8883"  # the config's host, the server's TLS port
    assert (device.security.username, device.security.password_file) == ("pi-sec", "credentials/password")
    assert device.security.ca_file == "credentials/ca.pem"
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and "credentials/password: OK" in done.stdout
    password = (root / "credentials" / "password").read_text().strip()
    assert password not in capsys.readouterr().out and password not in (root / "bundle.json").read_text()
    assert SecurityDir(data / "security").devices()["pi-sec"]["auth"] == "password"


# ---------------------------------------------------------------- revoke against a running server


class _Device:
    """A paho client standing in for a device: every connect, refusal and disconnect, timed."""

    def __init__(self, name: str, address: BrokerAddress, credentials: Credentials) -> None:
        self.name = name
        self.events: list[tuple[float, str, str]] = []  # (monotonic time, kind, reason)
        self.changed = threading.Condition()
        self.client = make_client(client_id=name)
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self._add(
            "refused" if reason.is_failure else "up", reason
        )
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self._add("down", reason)
        self.client.on_connect_fail = lambda _c, _u: self._add("refused", "TLS handshake or socket failed")
        self.client.on_publish = lambda _c, _u, _m, code, _p: self._add("denied" if code.is_failure else "puback", code)
        apply_credentials(self.client, address, credentials)
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def _add(self, kind: str, reason: object) -> None:
        with self.changed:
            self.events.append((time.monotonic(), kind, str(reason)))
            self.changed.notify_all()

    def wait(self, *kinds: str, after: float, deadline: float) -> float | None:
        """When the first event of `kinds` after `after` happened, waiting until `deadline` (monotonic) at most."""

        def first() -> float | None:
            return next((t for t, k, _ in self.events if k in kinds and t > after), None)

        with self.changed:
            self.changed.wait_for(lambda: first() is not None, timeout=max(0.0, deadline - time.monotonic()))
            return first()

    def kinds(self, *, after: float = 0.0) -> list[str]:
        with self.changed:
            return [k for t, k, _ in self.events if t >= after]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_for(condition: Callable[[], bool], *, timeout: float, what: str, alive: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive.poll() is None, f"the server exited with {alive.returncode} before {what}"
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.1)


@pytest.fixture
def secure_server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes], Path, dict[str, int]]]:
    """`broker_server/main.py --secure` on free ports, ready (its broker serves the data dir's security dir)."""
    data, log = tmp_path / "data", tmp_path / "server.log"
    ports = {"listen": free_port(), "tls": free_port(), "cert": free_port()}
    command = [
        sys.executable, str(server_main()), "--secure", "--data-dir", str(data), "--metrics-port", "0",
        "--listen-port", str(ports["listen"]), "--tls-port", str(ports["tls"]), "--cert-port", str(ports["cert"]),
    ]  # fmt: skip
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        security = SecurityDir(data / "security")
        _wait_for(
            lambda: "ready: devices connect to" in log.read_text() and security.running_broker() is not None,
            timeout=60,
            what="ready",
            alive=process,
        )
        yield data, process, log, ports
    finally:
        stop_process(process)


def test_revoke_drops_and_refuses_devices_of_a_running_server_and_spares_the_others(
    secure_server: tuple, tmp_path: Path
) -> None:
    data, server, _, ports = secure_server
    out = tmp_path / "credentials"
    tls, cert = f"mqtts://127.0.0.1:{ports['tls']}", f"mqtts://127.0.0.1:{ports['cert']}"
    provision = ["provision", "--data-dir", str(data), "--out", str(out)]
    assert cli.main([*provision, "--devices", "pw-gone,pw-stays", "--broker-url", tls]) == 0
    assert cli.main([*provision, "--devices", "cert-gone", "--auth", "certificate", "--broker-url", cert]) == 0
    devices = {}
    for name in ("pw-gone", "pw-stays", "cert-gone"):
        snippet = tomllib.loads((out / name / "security.toml").read_text())
        fields = {k: str(out / name / v) if v and k != "username" else v for k, v in snippet["security"].items()}
        config = DeviceConfig(id=name, broker=snippet["device"]["broker"], security=SecurityConfig(**fields))
        devices[name] = _Device(name, BrokerAddress.parse(config.broker), config.security)
    try:
        for device in devices.values():
            assert device.wait("up", after=0.0, deadline=time.monotonic() + 10), (device.name, device.events)

        broker_pid = SecurityDir(data / "security").running_broker()
        revoke = subprocess.Popen(
            [sys.executable, "-m", "android_harness", "revoke", "--data-dir", str(data), "pw-gone", "cert-gone"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert revoke.stdout is not None
        first = revoke.stdout.readline()  # printed once the tool found the broker, before it revokes anything
        started = time.monotonic()
        assert first.startswith("revoking pw-gone, cert-gone through the running broker (pid"), first
        rest, errors = revoke.communicate(timeout=60)
        assert revoke.returncode == 0, first + rest + errors
        assert [line.split(":")[0] for line in rest.splitlines()] == ["pw-gone", "cert-gone"]

        deadline = started + REVOKE_WITHIN_S
        for name in ("pw-gone", "cert-gone"):
            dropped = devices[name].wait("down", after=started, deadline=deadline)
            assert dropped is not None, f"{name} still connected {REVOKE_WITHIN_S} s after: {devices[name].events}"
            # paho retries after 1 s: the password device's CONNACK says not authorised; the certificate device's
            # TLS handshake fails (the broker checks the CRL) and the link closes before any CONNACK.
            again = devices[name].wait("refused", "down", after=dropped, deadline=deadline)
            assert again is not None, f"{name} made no refused reconnect in time: {devices[name].events}"
            assert "up" not in devices[name].kinds(after=started), devices[name].events
        broker_log = data / "mosquitto" / "mosquitto.log"
        _wait_for(
            lambda: "certificate verify failed" in broker_log.read_text(),
            timeout=max(0.0, deadline - time.monotonic()),
            what="the revoked certificate refused at the handshake",
            alive=server,
        )
        assert "refused" in devices["pw-gone"].kinds(after=started), devices["pw-gone"].events  # a CONNACK refusal
        assert SecurityDir(data / "security").running_broker() == broker_pid  # the same broker process throughout

        stays = devices["pw-stays"]
        info = stays.client.publish(metrics_topic("pw-stays"), b"{}", qos=1)
        assert info.rc == 0
        assert stays.wait("puback", after=started, deadline=time.monotonic() + 5) is not None
        assert stays.kinds() == ["up", "puback"], stays.events  # never dropped, its publish accepted (not 0x87)
    finally:
        for device in devices.values():
            device.close()
