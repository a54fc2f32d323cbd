"""The native device process: clear errors for bad files, and a reboot (kill -9) or a broker restart loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from android_harness.native import device_command, prepare_native_device
from broker_server.handlers import CacheService
from broker_server.mqtt_server import CacheServer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig
from edge.state import DeviceState
from fedwire.mosquitto import MosquittoBroker


def _config(tmp_path: Path, broker: str, *, epochs: int, device: str = "native-7") -> DeviceConfig:
    return DeviceConfig(
        id=device,
        broker=broker,
        state_dir=str(tmp_path / device),
        data=DataConfig(dataset="digits", num_devices=2, alpha=1.0, index=0),
        train=TrainConfig(arch="cnn", backend="executorch", epochs=epochs),
        hash=HashConfig(dim=256),
    )


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        device_command(config), stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_killed_native_device_resumes_where_it_was(
    tmp_path: Path, native_artifacts: Path, broker: MosquittoBroker, server: CacheServer
) -> None:
    config = _config(tmp_path, broker.address.url, epochs=12)
    path = prepare_native_device(config, artifacts=native_artifacts)
    state_dir = Path(config.state_dir)
    log = tmp_path / "device.log"
    process = _start(path, log)
    _wait_for(state_dir / "checkpoint.fcw", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_life = log.read_text()
    assert "registered " in first_life and "epoch 12 accuracy" not in first_life

    process = _start(path, log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    second_life = log.read_text()[len(first_life) :]
    resumed = [line for line in second_life.splitlines() if "resuming at batch" in line]
    assert resumed and int(resumed[0].split("resuming at batch ")[1].split()[0]) > 0
    assert "already holds all" in second_life and "registered " not in second_life
    assert "epoch 12 accuracy" in second_life
    report = json.loads((state_dir / "last_report.json").read_text())
    assert report["done"] is True and report["outbox"] == 0 and report["accuracy"] > 0.6
    state = DeviceState(state_dir, classes=10)  # the Python device's schema: the harness reads both alike
    try:
        assert state.outbox_size() == 0  # everything it trained on reached the server
        ids, _, _ = state.acked()
        assert ids.size == server.service.cache.registered(config.id) == report["train_samples"]
    finally:
        state.close()


def test_native_device_rides_out_a_broker_restart(tmp_path: Path, native_artifacts: Path) -> None:
    with MosquittoBroker(data_dir=tmp_path / "mosquitto") as broker:
        service = CacheService.open(None)
        server = CacheServer(service=service, address=broker.address, client_id=f"native-test-{time.time_ns()}")
        server.start()
        try:
            config = _config(tmp_path, broker.address.url, epochs=15, device="native-restart")
            path = prepare_native_device(config, artifacts=native_artifacts)
            log = tmp_path / "device.log"
            process = _start(path, log)
            _wait_for(Path(config.state_dir) / "checkpoint.fcw", process, log)  # registered and training
            broker.stop()
            time.sleep(2.0)  # the outage itself: the device keeps training offline meanwhile
            broker.start()
            assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            server.stop()
            service.close()
    report = json.loads((Path(config.state_dir) / "last_report.json").read_text())
    assert report["reconnects"] >= 1 and report["offline_s"] > 1.0
    assert report["done"] is True and report["outbox"] == 0 and report["teacher_coverage"] > 0.5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[native]", "[native]\nspeed = 3"), "unknown key 'speed' in [native]"),
        (lambda t: t.replace("\nprogram = ", "\nprogram_was = "), "unknown key 'program_was'"),
        (lambda t: t.replace('algorithm = "fedcache"', 'algorithm = "fd"'), 'fedcache" only'),
        (lambda t: t.replace("mqtt://", "mqtt://user:secret@"), "carries credentials"),
        (lambda t: t + "\n[extra]\n", "unknown config section [extra]"),
        (lambda t: t.replace("epochs = 1", "epochs = one"), "not a string, number, boolean or list"),
        (lambda t: t.replace("[native]", '[native]\nprogram = "x"'), "given twice"),
    ],
)
def test_a_bad_config_is_a_clear_error(tmp_path: Path, native_artifacts: Path, edit: object, message: str) -> None:
    path = prepare_native_device(_config(tmp_path, "mqtt://127.0.0.1:9", epochs=1), artifacts=native_artifacts)
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    result = subprocess.run(device_command(path), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


def test_a_missing_program_is_a_clear_error(tmp_path: Path, native_artifacts: Path) -> None:
    path = prepare_native_device(_config(tmp_path, "mqtt://127.0.0.1:9", epochs=1), artifacts=native_artifacts)
    text = path.read_text()
    program = next(line for line in text.splitlines() if line.startswith("program = "))
    path.write_text(text.replace(program, 'program = "/nonexistent/model.train.pte"'))
    result = subprocess.run(device_command(path), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "/nonexistent/model.train.pte: cannot load the program" in result.stderr
