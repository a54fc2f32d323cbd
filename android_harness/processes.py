"""The project's processes (cache server, devices) started through their CLIs, awaited and stopped by PID, once."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from fedwire.mqtt import BrokerAddress, Credentials, apply_credentials, make_client
from fedwire.topics import SERVER_STATUS

SERVER_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def server_main() -> Path:
    """`broker_server/main.py`, found without importing the server package (and faiss with it)."""
    spec = importlib.util.find_spec("broker_server")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("broker_server is not importable: install the project (make setup)")
    return Path(spec.origin).parent / "main.py"


def server_command(
    *,
    broker: BrokerAddress,
    data_dir: Path,
    client_id: str | None = None,
    options: Sequence[str] = (),
    interpreter: Sequence[str] = (),
) -> list[str]:
    """`python broker_server/main.py` serving through `broker`, state in `data_dir`, no metrics endpoint.

    `interpreter` replaces plain `python` (e.g. `python -m cProfile -o FILE`).
    """
    return [
        *(interpreter or (sys.executable,)),
        str(server_main()),
        "--broker", broker.url,
        "--data-dir", str(data_dir),
        "--metrics-port", "0",
        *(["--client-id", client_id] if client_id else []),
        *options,
    ]  # fmt: skip


def device_command(config: Path) -> list[str]:
    """`python -m edge --config FILE`: one device process."""
    return [sys.executable, "-m", "edge", "--config", str(config)]


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (a server finishes its batch, answers what reached it and closes its store), SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap: what a crash looks like to everyone else."""
    if process.poll() is None:
        process.kill()
    process.wait()


def wait_server_online(
    address: BrokerAddress,
    process: subprocess.Popen[bytes],
    *,
    timeout: float = SERVER_START_TIMEOUT_S,
    credentials: Credentials | None = None,
) -> None:
    """Block until the server's retained status says 'online' (published once it is subscribed, so requests sent
    from then on reach it); fail at once if it exits first, or if the broker refuses the probe's `credentials`
    (a secure broker: an observer identity of its own, since one username holds one connection)."""
    online = threading.Event()
    refused: list[str] = []

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.payload == b"online":
            online.set()

    def on_connect(c: mqtt.Client, _u: object, _flags: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
            online.set()
            return
        c.subscribe(SERVER_STATUS, qos=1)

    client = make_client(client_id=f"fedcache-status-probe-{os.getpid()}-{time.monotonic_ns()}")
    client.on_message = on_message
    client.on_connect = on_connect
    apply_credentials(client, address, credentials)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not online.wait(0.2):
            if process.poll() is not None:
                raise RuntimeError(f"the cache server exited with {process.returncode} before going online")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cache server was not online within {timeout:.0f} s")
        if refused:
            who = f" as {credentials.username}" if credentials is not None and credentials.username else ""
            raise RuntimeError(f"the broker at {address.url} refused the status probe{who}: {refused[0]}")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class ServerProcess:
    """The cache server as a child process, its output appended to `log`.

    `credentials`: the identity the online probe connects with (a secure broker's observer, not the server's own).
    """

    command: list[str]
    broker: BrokerAddress
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    credentials: Credentials | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, *, timeout: float = SERVER_START_TIMEOUT_S) -> ServerProcess:
        """Start it and return once it is online."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        wait_server_online(self.broker, self.process, timeout=timeout, credentials=self.credentials)
        return self

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def stop(self, *, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=timeout)

    def kill(self) -> None:
        kill_process(self._running())

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError("the server process was not started")
        return self.process

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
