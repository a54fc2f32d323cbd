"""Shared fixtures: a real Mosquitto broker on a free loopback port, started and stopped by PID."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, make_client

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One private Mosquitto for the test session; asserts at the end that it dropped no message."""
    with MosquittoBroker(data_dir=tmp_path_factory.mktemp("mosquitto")) as running:
        yield running
        assert dropped_messages(running.address) == 0, "mosquitto dropped QoS 1 messages"


def dropped_messages(address: BrokerAddress, timeout: float = 5.0) -> int:
    """Mosquitto's own count of messages it dropped ($SYS/broker/publish/messages/dropped)."""
    value: list[int] = []
    got = threading.Event()

    def on_message(_c: object, _u: object, message: object) -> None:
        value.append(int(message.payload))  # type: ignore[attr-defined]
        got.set()

    client = make_client(client_id=f"sys-probe-{os.getpid()}")
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/publish/messages/dropped", qos=0)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        if not got.wait(timeout):
            raise TimeoutError("mosquitto published no $SYS dropped-message count")
        return value[-1]
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
