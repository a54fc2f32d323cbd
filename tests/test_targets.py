"""Target URLs, the local target end to end (flash into a fresh venv, start, stop by PID), and the adb refusal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from android_harness.adb import AdbTarget
from android_harness.bundle import Bundle, build_bundle
from android_harness.targets import InstallOptions, LocalProcessTarget, SshTarget, TargetUnavailable, make_target
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_to_toml, load_config


def test_factory_parses_every_kind_of_url(tmp_path: Path) -> None:
    local = make_target(f"local:{tmp_path / 'dev'}")
    assert isinstance(local, LocalProcessTarget) and local.root == str(tmp_path / "dev")
    ssh = make_target("ssh://pi@192.168.1.7:2222/srv/fedcache")
    assert isinstance(ssh, SshTarget) and ssh.root == "/srv/fedcache"
    assert ssh.shell.destination == "pi@192.168.1.7" and ssh.shell.port == 2222  # type: ignore[attr-defined]
    assert make_target("ssh://jetson").root == "fedcache-device"  # type: ignore[attr-defined]
    phone = make_target("adb://R58M12ABCDE")
    assert isinstance(phone, AdbTarget) and phone.serial == "R58M12ABCDE"
    with pytest.raises(ValueError, match="unknown target"):
        make_target("telnet://x")


@pytest.mark.skipif(shutil.which("adb") is not None, reason="a real adb is installed here")
def test_adb_target_refuses_and_says_what_it_would_run(tmp_path: Path) -> None:
    phone = AdbTarget(serial="R58M12ABCDE")
    with pytest.raises(TargetUnavailable, match="no adb device can exist on this machine") as raised:
        phone.start()
    assert "adb -s R58M12ABCDE shell" in str(raised.value) and "python -m edge" in str(raised.value)
    for call in (phone.status, phone.logs, phone.restore, lambda: phone.stop()):
        with pytest.raises(TargetUnavailable):
            call()
    with pytest.raises(NotImplementedError):
        phone.impair(loss=0.3)


def test_adb_flash_plan_pushes_verifies_and_maps_the_broker(tmp_path: Path) -> None:
    bundle = Bundle(root=tmp_path / "b", device_id="p", backend="torch", wheel="wheels/x.whl", dependencies=(),
                    files={})  # fmt: skip
    plan = [" ".join(step) for step in AdbTarget(serial="S1").plan_flash(bundle)]
    assert any(s.startswith(f"adb -s S1 push {tmp_path / 'b'} /data/local/tmp/fedcache/bundle") for s in plan)
    assert any("sha256sum -c SHA256SUMS" in s for s in plan)
    assert plan[-1] == "adb -s S1 reverse tcp:1883 tcp:1883"
    with pytest.raises(TargetUnavailable):
        AdbTarget(serial="S1").flash(bundle)


def test_local_target_installs_starts_and_stops_by_pid(tmp_path: Path, reuse_install: InstallOptions) -> None:
    config = DeviceConfig(
        id="local-dev",
        broker="mqtt://127.0.0.1:1",  # nothing listens: the device keeps retrying until stopped
        data=DataConfig(dataset="digits", num_devices=2, index=1),
        train=TrainConfig(arch="cnn", epochs=50),
        hash=HashConfig(dim=64),
    )
    bundle = build_bundle(config, tmp_path / "bundle")
    target = LocalProcessTarget(tmp_path / "device", install=reuse_install)
    target.flash(bundle)
    pid = target.start()
    assert target.status().running and target.status().pid == pid
    with pytest.raises(RuntimeError, match="already running"):
        target.start()
    time.sleep(2)
    status = target.stop(timeout_s=10)
    assert not status.running and status.exit_code not in (None, 0), target.logs()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with pytest.raises(NotImplementedError):
        target.impair(cut=True)


def test_flash_command_builds_and_installs(tmp_path: Path) -> None:
    config = DeviceConfig(
        id="cli-dev",
        data=DataConfig(dataset="digits", num_devices=2, index=0),
        train=TrainConfig(arch="cnn", epochs=1),
        hash=HashConfig(dim=64),
    )
    (tmp_path / "device.toml").write_text(config_to_toml(config))
    argv = [sys.executable, "-m", "android_harness", "flash", "--target", f"local:{tmp_path / 'dev'}"]
    argv += ["--device-config", str(tmp_path / "device.toml"), "--out", str(tmp_path / "bundle")]
    argv += ["--broker", "mqtt://10.203.0.1:1883", "--python", sys.executable, "--no-deps"]
    argv += ["--reuse-site-packages", sysconfig.get_paths()["purelib"]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed on local:" in done.stdout
    assert LocalProcessTarget(tmp_path / "dev").status().installed
    installed = Bundle.open(tmp_path / "dev" / "bundle")
    installed.verify()
    assert load_config(installed.config_path).broker == "mqtt://10.203.0.1:1883"
