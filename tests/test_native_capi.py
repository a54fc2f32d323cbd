"""The C API an app's JNI or Swift glue calls, driven from plain C through libfedcache_native.so."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from android_harness.native import BUILD_DIR, prepare_native_device
from broker_server.mqtt_server import CacheServer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig
from fedwire.mosquitto import MosquittoBroker

FC_OK, FC_DONE, FC_ERROR, FC_NOT_CONFIGURED, FC_BUFFER_TOO_SMALL = 0, 2, -1, -2, -3


def test_the_c_api_runs_a_device_life_and_reports_misuse(
    tmp_path: Path, native_artifacts: Path, broker: MosquittoBroker, server: CacheServer
) -> None:
    config = DeviceConfig(
        id="capi-device",
        broker=broker.address.url,
        state_dir=str(tmp_path / "state"),
        data=DataConfig(dataset="digits", num_devices=4, alpha=1.0, index=2),
        train=TrainConfig(arch="cnn", backend="executorch", epochs=1),
        hash=HashConfig(),
    )
    path = prepare_native_device(config, artifacts=native_artifacts)
    result = subprocess.run(
        [str(BUILD_DIR / "fedcache-capi-check"), str(path)], capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    assert calls["step_unconfigured"] == FC_NOT_CONFIGURED
    assert calls["bad_config"] == FC_ERROR and "[device] id must be a string" in calls["bad_error"]
    assert calls["null_config"] == FC_ERROR
    assert calls["configured"] == FC_OK and calls["small_status"] == FC_BUFFER_TOO_SMALL
    assert calls["final"] == FC_DONE and calls["calls"] > 1 and calls["owed"] == 0
    status = calls["status"]
    assert status["state"] == "done" and status["registered"] is True
    assert status["last_report"]["done"] is True and status["last_report"]["outbox"] == 0
    assert server.service.cache.registered("capi-device") == status["last_report"]["train_samples"]
