"""A device killed with SIGKILL and started again resumes registration, outbox and training where it was."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from android_harness.processes import device_command
from broker_server.mqtt_server import CacheServer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_to_toml
from edge.state import DeviceState
from fedwire.mosquitto import MosquittoBroker


def _start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        device_command(config_path),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        env=env,
    )


def test_killed_device_resumes_where_it_was(tmp_path: Path, broker: MosquittoBroker, server: CacheServer) -> None:
    state_dir = tmp_path / "dev"
    config = DeviceConfig(
        id="phoenix",
        broker=broker.address.url,
        state_dir=str(state_dir),
        data=DataConfig(dataset="digits", num_devices=2, alpha=1.0, index=0),
        train=TrainConfig(arch="cnn", epochs=8),
        hash=HashConfig(dim=64),
    )
    config_path = tmp_path / "device.toml"
    config_path.write_text(config_to_toml(config))
    log = tmp_path / "device.log"
    process = _start(config_path, log)
    deadline = time.monotonic() + 120
    while not (state_dir / "checkpoint.pt").exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_life = log.read_text()
    assert "registered" in first_life

    process = _start(config_path, log)
    assert process.wait(timeout=180) == 0, log.read_text()
    second_life = log.read_text()[len(first_life) :]
    resumed = [line for line in second_life.splitlines() if "resuming at batch" in line]
    assert resumed and int(resumed[0].split("resuming at batch ")[1].split()[0]) > 0
    assert "already holds" in second_life and "registered " not in second_life.replace("already", "")
    assert "epoch 8 accuracy" in second_life
    state = DeviceState(state_dir, classes=10)
    try:
        assert state.outbox_size() == 0  # everything it trained on reached the server
        ids, _, _ = state.acked()
        assert ids.size == server.service.cache.registered("phoenix")
    finally:
        state.close()
