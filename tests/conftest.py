"""Shared fixtures: a real Mosquitto broker on a free loopback port, started and stopped by PID."""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from android_harness.targets import InstallOptions
from broker_server.handlers import CacheService
from broker_server.mqtt_server import CacheServer
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, make_client

DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One private Mosquitto for the test session; asserts at the end that it dropped no message."""
    with MosquittoBroker(data_dir=tmp_path_factory.mktemp("mosquitto")) as running, DropWatch(running.address) as drops:
        yield running
        assert drops.counts, "mosquitto published no $SYS dropped-message count"
        assert max(drops.counts) == 0, f"mosquitto dropped {max(drops.counts)} QoS 1 messages"


class DropWatch:
    """Follows Mosquitto's own count of dropped messages ($SYS/broker/publish/messages/dropped) from the start.

    Mosquitto publishes that count retained with a message expiry of about a minute and again only when it
    changes, so a probe that subscribes late may find nothing: watch from the broker's first second instead.
    """

    def __init__(self, address: BrokerAddress, timeout: float = 5.0) -> None:
        self.counts: list[int] = []
        self._first = threading.Event()
        self._client = make_client(client_id=f"sys-drop-watch-{os.getpid()}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(DROPPED_TOPIC, qos=0)
        self._client.connect(address.host, address.port)
        self._timeout = timeout

    def _on_message(self, _c: object, _u: object, message: object) -> None:
        self.counts.append(int(message.payload))  # type: ignore[attr-defined]
        self._first.set()

    def __enter__(self) -> DropWatch:
        self._client.loop_start()
        if not self._first.wait(self._timeout):
            raise TimeoutError("mosquitto published no $SYS dropped-message count")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def server(broker: MosquittoBroker) -> Iterator[CacheServer]:
    """A cache server with in-memory state on the session's broker; stopping it leaves the share group."""
    service = CacheService.open(None)
    running = CacheServer(service=service, address=broker.address, client_id=f"test-server-{time.time_ns()}")
    running.start()
    yield running
    running.stop()
    service.close()


@pytest.fixture
def reuse_install() -> InstallOptions:
    """How target tests make a device venv: fresh, with the bundle's wheel installed --no-deps into it, and torch
    & co. borrowed from this venv's site-packages (a .pth after the venv's own), so no test downloads wheels."""
    return InstallOptions(python=sys.executable, reuse_site_packages=sysconfig.get_paths()["purelib"], no_deps=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def native_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native tests' artifacts (the cnn training program at 8x8, exported once) and the native device built."""
    from android_harness.native import ensure_built
    from edge.backends import make_trainer
    from models.loss import LossSettings

    ensure_built()
    path = tmp_path_factory.getbasetemp() / "artifacts"
    make_trainer(backend="executorch", arch="cnn", classes=10, in_channels=1, seed=0, lr=0.01, momentum=0.9,
                 weight_decay=5e-4, loss=LossSettings(), artifacts_dir=path, input_shape=(1, 8, 8))  # fmt: skip
    return path
