"""Flash a bundle over real ssh (a private sshd on loopback) into a fresh venv, start the device there, see it train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from android_harness.bundle import build_bundle
from android_harness.targets import InstallOptions, SshTarget, make_target
from broker_server.mqtt_server import CacheServer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig
from fedwire.mosquitto import MosquittoBroker, free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not (Path(SSHD).is_file() and shutil.which("ssh") and shutil.which("scp")),
    reason="openssh-server/openssh-client missing: run `make setup-test`",
)


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Path
    user: str


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, f"sshd exited: {log.read_text()}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on {port}: {log.read_text()}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd on a free loopback port with its own host key and authorized key (nothing in /etc/ssh, ~/.ssh)."""
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    shutil.copy(home / "client_key.pub", home / "authorized_keys")
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile {home / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    except PermissionError:
        pytest.skip("sshd needs /run/sshd, which only root can create here")
    log = home / "sshd.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=stderr)
    try:
        _wait_for_port(port, process, log)
        yield Sshd(port=port, key=home / "client_key", user=os.environ.get("USER") or "root")
    finally:
        process.terminate()
        process.wait(timeout=10)


SSH_OPTIONS = ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR")
EPOCHS = 2
WHERE_IS_EDGE = (
    "import edge, fedwire, models, json; print(json.dumps([edge.__file__, fedwire.__file__, models.__file__]))"
)


def _device_config(broker: MosquittoBroker) -> DeviceConfig:
    return DeviceConfig(
        id="pi-ssh",
        broker=broker.address.url,
        data=DataConfig(dataset="digits", num_devices=2, alpha=1.0, index=0),
        train=TrainConfig(arch="cnn", backend="torch", epochs=EPOCHS),
        hash=HashConfig(dim=64),
    )


def _target(sshd: Sshd, root: Path, install: InstallOptions) -> SshTarget:
    """The device venv imports torch & co. from this venv's site-packages but gets the bundle's wheel itself."""
    target = make_target(
        f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{root}", key=sshd.key, ssh_options=SSH_OPTIONS, install=install
    )
    assert isinstance(target, SshTarget)
    return target


def test_device_flashed_over_ssh_trains_from_its_bundle_alone(
    tmp_path: Path, sshd: Sshd, broker: MosquittoBroker, server: CacheServer, reuse_install: InstallOptions
) -> None:
    flashed = build_bundle(_device_config(broker), tmp_path / "bundle")
    root = tmp_path / "pi-home" / "fedcache"  # a fresh directory outside the repository
    target = _target(sshd, root, reuse_install)
    assert not target.status().installed

    target.flash(flashed)
    status = target.status()
    assert status.installed and not status.running
    assert (root / "bundle" / "bundle.json").is_file()

    # The device's interpreter finds `edge` in its own venv (the wheel), never in /work/main.
    where = json.loads(target.run_in_venv(WHERE_IS_EDGE))
    for path in where:
        assert Path(path).is_relative_to(root / "venv"), where
    missing = target.run_in_venv(
        "import importlib.util as u; print([m for m in ('broker_server','android_harness','bench','export')"
        " if u.find_spec(m) is not None])"
    )
    assert missing.strip() == "[]"

    pid = target.start()
    proc = Path(f"/proc/{pid}")  # same machine: look at the running device from outside
    assert Path(os.readlink(proc / "cwd")) == root / "bundle"
    assert b"PYTHONPATH=" not in (proc / "environ").read_bytes()
    assert Path(os.readlink(proc / "exe")).resolve() == (root / "venv" / "bin" / "python").resolve()

    deadline = time.monotonic() + 120
    while target.status().running:
        assert time.monotonic() < deadline, target.logs(tail=30)
        time.sleep(0.5)
    final = target.status()
    log = target.logs()
    assert final.exit_code == 0, log
    summary = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert summary["epoch"] == EPOCHS and summary["done"], summary
    assert summary["accuracy"] > 0.3, summary  # chance is 0.1 on ten digit classes
    assert summary["bytes"]["up"] > 0 and summary["teachers_received"] > 0, summary
    assert server.service.cache.registered("pi-ssh") == summary["train_samples"]
    assert f"epoch {EPOCHS} accuracy" in log
    print(f"device summary: {json.dumps(summary)}")
