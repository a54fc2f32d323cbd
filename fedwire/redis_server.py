"""Start and stop a private redis-server by PID (a port and a directory of its own), durable on every write."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

from fedwire import child_process
from fedwire.mosquitto import LOOPBACK, check_port_free, free_port

log = logging.getLogger(__name__)

REDIS_BINARIES = ("redis-server", "/usr/bin/redis-server")
START_TIMEOUT_S = 10.0
LISTEN_CHECK_S = 0.05
CONFIG_FILENAME = "redis.conf"


def redis_binary() -> str:
    """Path of the redis-server executable, or a clear error saying how to install it."""
    for name in REDIS_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "redis-server is not installed: run `make setup-test` (scripts/setup-system.sh --test installs Debian's "
        "redis-server)"
    )


def render_config(*, port: int, bind: str, data_dir: Path, fsync: str) -> str:
    """A redis.conf for one private server: its own port and directory, the append-only file on, no RDB dumps.

    `fsync` is appendfsync: "always" makes an acknowledged write survive kill -9 of redis-server (and of
    the machine), "everysec" only kill -9 of redis-server. Redis fsyncs once per event-loop turn, so the
    writes pipelined in one turn share one fsync.
    """
    if fsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, not {fsync!r}")
    lines = [
        f"port {port}",
        f"bind {bind}",
        "protected-mode yes",
        f'dir "{data_dir.resolve()}"',
        "daemonize no",
        'save ""',  # no RDB snapshots: the AOF is the durable copy
        "appendonly yes",
        f"appendfsync {fsync}",
        'appendfilename "appendonly.aof"',
        "aof-use-rdb-preamble yes",
        "loglevel warning",
        'logfile ""',
        "tcp-keepalive 60",
    ]
    return "\n".join(lines) + "\n"


class RedisServer:
    """A redis-server of our own, started on `port` (0: a free one) with its data in `data_dir`, stopped by PID.

    Refuses a port someone else holds instead of talking to their Redis. `kill()` is what a crash looks
    like; `start()` after it reopens the same directory, so what Redis acknowledged with appendfsync
    always is there again.
    """

    def __init__(self, *, data_dir: Path, port: int = 0, bind: str = LOOPBACK, fsync: str = "always") -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port(bind)
        self.bind = bind
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://host:port, as `--replicate` takes it."""
        return f"redis://{self.bind}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILENAME

    def start(self) -> RedisServer:
        """Write the config, start redis-server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        check_port_free(self.bind, self.port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(port=self.port, bind=self.bind, data_dir=self.data_dir, fsync=self.fsync)
        )
        self.process = subprocess.Popen(
            [redis_binary(), str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._answers():
                log.info("redis-server pid %d on %s (appendfsync %s)", self.process.pid, self.url, self.fsync)
                return self
            try:
                self.process.wait(timeout=LISTEN_CHECK_S)
            except subprocess.TimeoutExpired:
                continue
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err.strip()}")
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S} s")

    def _answers(self) -> bool:
        """Whether a PING on the port gets +PONG (redis-server loads its AOF before it answers)."""
        try:
            with socket.create_connection((self.bind, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis-server flushes its append-only file before it exits."""
        child_process.terminate(self.process, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash of the store looks like to its clients."""
        child_process.kill(self.process)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
