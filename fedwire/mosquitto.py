"""Start and stop a private Mosquitto broker by PID, configured so request/reply is fast and nothing drops silently."""

from __future__ import annotations

import errno
import getpass
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from fedwire.mqtt import BrokerAddress

if TYPE_CHECKING:
    from psutil._ntuples import pconn, sconn

log = logging.getLogger(__name__)

MOSQUITTO_BINARIES = ("mosquitto", "/usr/sbin/mosquitto")
START_TIMEOUT_S = 10.0
# How often start() looks whether the broker listens yet, while it waits on the process's exit.
LISTEN_CHECK_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortInUseError(RuntimeError):
    """The port a private broker should listen on is taken (often by a system Mosquitto)."""

    def __init__(self, *, host: str, port: int, holder: str | None) -> None:
        by = f" by {holder}" if holder else ""
        super().__init__(f"port {port} on {host} is already in use{by}")
        self.host = host
        self.port = port
        self.holder = holder


def port_holder(port: int) -> str | None:
    """'mosquitto (pid 1234)' for the process listening on TCP `port`, or None when this user cannot tell."""
    try:
        listeners = [c for c in psutil.net_connections(kind="tcp") if _listens_on(c, port)]
    except psutil.AccessDenied:
        return None
    for connection in listeners:
        if connection.pid is not None:
            try:
                return f"{psutil.Process(connection.pid).name()} (pid {connection.pid})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return None


def _listens_on(connection: sconn | pconn, port: int) -> bool:
    address = connection.laddr
    return connection.status == psutil.CONN_LISTEN and isinstance(address, tuple) and address[1:2] == (port,)


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError when something listens on (host, port), as Mosquitto would find when it binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(host=host, port=port, holder=port_holder(port)) from None
            raise


def mosquitto_binary() -> str:
    """Path of the mosquitto executable, or a clear error saying how to install it."""
    for name in MOSQUITTO_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("mosquitto is not installed: run `make setup` (apt-get install -y mosquitto)")


def render_config(*, port: int, bind: str, data_dir: Path, persistence: bool, extra_binds: tuple[str, ...] = ()) -> str:
    """mosquitto.conf text.

    - set_tcp_nodelay: without it request/reply runs at 12/s instead of ~2000/s.
    - max_queued_messages 0: the default of 1000 silently drops QoS 1 messages for a slow subscriber.
    - persistence + a user that can write the data dir: sessions and queued messages survive a restart.
    """
    lines = [
        f"listener {port} {bind}",
        *(f"listener {port} {address}" for address in extra_binds),
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        "max_inflight_messages 1000",
        "persistent_client_expiration 14d",
        "sys_interval 1",
        f"user {getpass.getuser()}",
        f"log_dest file {data_dir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if persistence:
        lines += ["persistence true", f"persistence_location {data_dir}/", "autosave_interval 5"]
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """A private Mosquitto process; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        bind: str = "127.0.0.1",
        persistence: bool = True,
        extra_binds: tuple[str, ...] = (),
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port(bind if bind != "0.0.0.0" else "127.0.0.1")
        self.bind = bind
        self.persistence = persistence
        self.extra_binds = extra_binds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        return BrokerAddress(host=host, port=self.port)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    def start(self) -> MosquittoBroker:
        """Write the config, start the broker and wait until it listens.

        Raises PortInUseError when another process holds the port: a client probe would otherwise find
        that process listening and take it for ours.
        """
        for host in (self.bind, *self.extra_binds):
            check_port_free(host, self.port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(
                port=self.port,
                bind=self.bind,
                data_dir=self.data_dir,
                persistence=self.persistence,
                extra_binds=self.extra_binds,
            )
        )
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._listening():
                log.info("mosquitto pid %d listening on %s", self.process.pid, self.address.url)
                return self
            # Mosquitto signals nothing when it listens; its exit is the event worth waking up for at once.
            try:
                self.process.wait(timeout=LISTEN_CHECK_S)
            except subprocess.TimeoutExpired:
                continue
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            if "Address already in use" in err:  # taken between our check and its bind
                raise PortInUseError(host=self.bind, port=self.port, holder=port_holder(self.port))
            raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {err.strip()}")
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S} s")

    def _listening(self) -> bool:
        """Whether our own process (not whoever else may hold the port) listens on the port yet."""
        assert self.process is not None
        try:
            connections = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return False
        return any(_listens_on(c, self.port) for c in connections)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto writes its persistence file before it exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
