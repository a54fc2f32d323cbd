"""Start and stop a private Mosquitto broker by PID, configured so request/reply is fast and nothing drops silently."""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from fedwire import child_process
from fedwire.constants import MAX_PAYLOAD_BYTES
from fedwire.mqtt import BrokerAddress

if TYPE_CHECKING:
    from psutil._ntuples import pconn, sconn

log = logging.getLogger(__name__)

MOSQUITTO_BINARIES = ("mosquitto", "/usr/sbin/mosquitto")
# The largest packet the broker takes: a payload at the wire's limit plus topic and properties. Bigger packets
# are refused by the broker (DISCONNECT 0x95) and never reach the server. (`message_size_limit` would answer
# with a PUBACK code that paho treats as a malformed packet.)
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
LOOPBACK = "127.0.0.1"
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


@dataclass(frozen=True)
class BrokerSecurity:
    """What makes a private broker secure: every client authenticated, ACLs per device, TLS off loopback.

    Listeners: plaintext on loopback only (for the server on the same machine; authenticated all the same),
    TLS with passwords on `tls_port`, and TLS with client certificates on `cert_port` (identity = the
    certificate's CN, checked against `crl_file`). Every listener binds the client id to the authenticated
    username, so no client can take over another's session. `run_file` tells tools which process to signal.
    """

    dynsec_config: Path
    dynsec_plugin: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    run_file: Path
    tls_port: int = 0  # 0: a free port; -1: no password listener over TLS
    cert_port: int = 0  # 0: a free port; -1: no certificate listener


def _listener_lines(port: int, address: str, *tls_lines: str) -> list[str]:
    # `use_username_as_clientid` is a listener option in 2.0.11 even with per_listener_settings false: it has
    # to follow every listener line (before the first one it silently creates a default listener on 1883).
    return [f"listener {port} {address}", *tls_lines, "use_username_as_clientid true"]


def _security_lines(security: BrokerSecurity, *, port: int, binds: tuple[str, ...]) -> list[str]:
    server_tls = [
        f"certfile {security.cert_file}",
        f"keyfile {security.key_file}",
        f"cafile {security.ca_file}",
        "tls_version tlsv1.2",
    ]
    lines = [
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {security.dynsec_plugin}",
        f"plugin_opt_config_file {security.dynsec_config}",
        *_listener_lines(port, LOOPBACK),
    ]
    for address in binds:
        if security.tls_port > 0:
            lines += _listener_lines(security.tls_port, address, *server_tls)
        if security.cert_port > 0:
            lines += _listener_lines(
                security.cert_port,
                address,
                *server_tls,
                f"crlfile {security.crl_file}",
                "require_certificate true",
                "use_identity_as_username true",
            )
    return lines


def render_config(
    *,
    port: int,
    bind: str,
    data_dir: Path,
    persistence: bool,
    extra_binds: tuple[str, ...] = (),
    security: BrokerSecurity | None = None,
) -> str:
    """mosquitto.conf text.

    - set_tcp_nodelay: without it request/reply runs at 12/s instead of ~2000/s.
    - max_queued_messages 0: the default of 1000 silently drops QoS 1 messages for a slow subscriber.
    - persistence + a user that can write the data dir: sessions and queued messages survive a restart.
    - max_packet_size: oversized packets are refused at the broker.
    """
    lines = [
        "set_tcp_nodelay true",
        f"max_packet_size {MAX_PACKET_BYTES}",
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
    if security is None:
        lines += ["allow_anonymous true", f"listener {port} {bind}", *(f"listener {port} {a}" for a in extra_binds)]
    else:
        lines += _security_lines(security, port=port, binds=(bind, *extra_binds))
    return "\n".join(lines) + "\n"


def is_mosquitto(pid: int) -> bool:
    """Whether `pid` is a live Mosquitto process (a stale run file's pid may belong to anything by now)."""
    try:
        return psutil.Process(pid).name() == "mosquitto"
    except psutil.Error:
        return False


def _check_no_other_broker(run_file: Path) -> None:
    """Two brokers on one security directory would overwrite each other's plugin config: refuse the second."""
    try:
        pid = int(json.loads(run_file.read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return
    if is_mosquitto(pid):
        raise RuntimeError(f"another broker (pid {pid}) serves this security directory ({run_file.parent})")


def _with_free_ports(security: BrokerSecurity) -> BrokerSecurity:
    return replace(
        security,
        tls_port=security.tls_port or free_port(),
        cert_port=security.cert_port or free_port(),
    )


def _tls_ports(security: BrokerSecurity) -> list[int]:
    """The TLS listeners' ports (a port of -1 means that listener is off)."""
    return [p for p in (security.tls_port, security.cert_port) if p > 0]


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
        security: BrokerSecurity | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.bind = bind
        self.persistence = persistence
        self.extra_binds = extra_binds
        self.security = security
        plain_bind = LOOPBACK if security is not None else bind
        self.port = port or free_port(plain_bind if plain_bind != "0.0.0.0" else LOOPBACK)
        if security is not None:
            self.security = security = _with_free_ports(security)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        """The plaintext listener: the broker's only one in an insecure set-up, loopback only in a secure one."""
        host = LOOPBACK if self.bind in ("0.0.0.0", "") or self.security is not None else self.bind
        return BrokerAddress(host=host, port=self.port)

    @property
    def tls_address(self) -> BrokerAddress:
        """The TLS listener for password clients (a secure broker only)."""
        return BrokerAddress(host=self._tls_host, port=self._security().tls_port, tls=True)

    @property
    def cert_address(self) -> BrokerAddress:
        """The TLS listener for certificate clients (a secure broker only)."""
        return BrokerAddress(host=self._tls_host, port=self._security().cert_port, tls=True)

    @property
    def _tls_host(self) -> str:
        return LOOPBACK if self.bind in ("0.0.0.0", "") else self.bind

    def _security(self) -> BrokerSecurity:
        if self.security is None:
            raise RuntimeError("this broker was started without security: it has no TLS listener")
        return self.security

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    def start(self) -> MosquittoBroker:
        """Write the config, start the broker and wait until it listens.

        Raises PortInUseError when another process holds the port: a client probe would otherwise find
        that process listening and take it for ours.
        """
        if self.security is not None:
            _check_no_other_broker(self.security.run_file)
        for host, port in self._listeners():
            check_port_free(host, port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(
                port=self.port,
                bind=self.bind,
                data_dir=self.data_dir,
                persistence=self.persistence,
                extra_binds=self.extra_binds,
                security=self.security,
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
                if self.security is not None:
                    self._write_run_file()
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

    def _listeners(self) -> list[tuple[str, int]]:
        if self.security is None:
            return [(host, self.port) for host in (self.bind, *self.extra_binds)]
        tls_ports = _tls_ports(self.security)
        return [(LOOPBACK, self.port)] + [(h, p) for h in (self.bind, *self.extra_binds) for p in tls_ports]

    def _write_run_file(self) -> None:
        """Where tools find this broker: its pid (to reload certificates and the CRL) and its loopback port."""
        assert self.process is not None and self.security is not None
        info = {"pid": self.process.pid, "port": self.port, "config": str(self.config_path)}
        temporary = self.security.run_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(info))
        os.replace(temporary, self.security.run_file)

    def reload(self) -> None:
        """SIGHUP: Mosquitto rereads certificates and the CRL (not listeners, not plugins), keeping every session."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("the broker is not running")
        os.kill(self.process.pid, signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto writes its persistence file before it exits."""
        if self.security is not None:
            self.security.run_file.unlink(missing_ok=True)
        child_process.terminate(self.process, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to clients."""
        child_process.kill(self.process)

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
