"""Set-up never touches the user's own broker, and the server says clearly when its port is taken."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedwire.mosquitto import MosquittoBroker, PortInUseError, check_port_free

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PORT = 1883
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def _can_install_packages() -> str | None:
    """Why apt-get cannot be run here, or None."""
    if shutil.which("apt-get") is None:
        return "not a Debian system (no apt-get)"
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        return "not root and no passwordless sudo"
    return None


@pytest.fixture
def users_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto on 1883 standing in for the user's system broker (skipped when 1883 is already taken)."""
    try:
        check_port_free("127.0.0.1", SYSTEM_PORT)
    except PortInUseError as exc:
        pytest.skip(f"cannot stand in for the user's broker: {exc}")
    with MosquittoBroker(data_dir=tmp_path / "users-mosquitto", port=SYSTEM_PORT, persistence=False) as broker:
        yield broker


def _serves(broker: MosquittoBroker) -> bool:
    """The broker's own process is alive and takes connections on its port."""
    assert broker.process is not None
    if broker.process.poll() is not None:
        return False
    with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
        return True


@pytest.mark.skipif((reason := _can_install_packages()) is not None, reason=f"cannot install packages: {reason}")
def test_setup_leaves_a_running_system_mosquitto_alone(users_broker: MosquittoBroker) -> None:
    """The script takes its install path (mosquitto reinstalled: its maintainer scripts run) and the user's
    broker on 1883 is still the same process, still serving, afterwards; no policy-rc.d of ours is left."""
    policy_before = POLICY_RC.exists()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup-system.sh")],
        env={**os.environ, "FEDCACHE_SETUP_REINSTALL": "mosquitto"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "installing system packages (demo): mosquitto" in done.stdout
    assert _serves(users_broker)
    assert POLICY_RC.exists() == policy_before


def test_server_says_in_one_line_that_its_default_port_is_taken(users_broker: MosquittoBroker, tmp_path: Path) -> None:
    """`python broker_server/main.py` on embedded defaults, 1883 held by another Mosquitto: one clear line naming
    the holder and both ways on, a non-zero exit, no traceback, and the other broker untouched."""
    assert users_broker.process is not None
    done = subprocess.run(
        [sys.executable, str(REPO / "broker_server" / "main.py"), "--metrics-port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    holder = f"mosquitto (pid {users_broker.process.pid})"
    assert f"port {SYSTEM_PORT} on 127.0.0.1 is already in use by {holder}" in lines[0]
    assert "--listen-port" in lines[0] and f"--broker mqtt://127.0.0.1:{SYSTEM_PORT}" in lines[0]
    assert _serves(users_broker)


def test_private_broker_never_mistakes_another_listener_for_itself(tmp_path: Path) -> None:
    """Whatever holds the port (here a plain socket), starting a private broker on it fails with PortInUseError
    instead of reporting success because a connection to that port succeeded."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError) as raised:
            MosquittoBroker(data_dir=tmp_path / "b", port=port).start()
        assert raised.value.port == port
        assert f"(pid {os.getpid()})" in str(raised.value)
