"""`flash --native`: a self-contained native bundle (binary, libraries, programs, shard) installs and trains."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from android_harness.bundle import Bundle
from android_harness.targets import make_target
from broker_server.mqtt_server import CacheServer
from fedwire.mosquitto import MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_LIMIT_BYTES = 25 * 1024 * 1024  # the target for an installed native device


def test_flash_native_builds_installs_and_runs(
    tmp_path: Path, native_artifacts: Path, broker: MosquittoBroker, server: CacheServer
) -> None:
    config = tmp_path / "device.toml"
    config.write_text(
        f'[device]\nid = "flashed-native"\nbroker = "{broker.address.url}"\n\n[data]\ndataset = "digits"\n'
        'num_devices = 2\nindex = 1\n\n[train]\narch = "cnn"\nbackend = "executorch"\nepochs = 2\n'
    )
    out, root = tmp_path / "bundle", tmp_path / "installed"
    result = subprocess.run(
        [sys.executable, "-m", "android_harness", "flash", "--native", "--target", f"local:{root}", "--device-config",
         str(config), "--out", str(out), "--artifacts", str(native_artifacts), "--start"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = Bundle.open(out)
    bundle.verify()
    assert bundle.backend == "native" and bundle.wheel == ""
    assert {"bin/fedcache-device", "lib/libexecutorch.so", "lib/libfedcache_native.so"} <= set(bundle.files)
    assert not any(name.endswith((".whl", ".onnx", ".npz")) for name in bundle.files)  # no Python parts at all
    assert bundle.total_bytes < INSTALLED_LIMIT_BYTES
    target = make_target(f"local:{root}")
    deadline = time.monotonic() + 240
    while (status := target.status()).exit_code is None:
        assert time.monotonic() < deadline, target.logs(tail=40)
        time.sleep(0.2)
    assert status.exit_code == 0, target.logs(tail=40)
    report = json.loads((root / "bundle" / "state" / "last_report.json").read_text())
    assert report["backend"] == "native" and report["done"] is True and report["outbox"] == 0
    assert server.service.cache.registered("flashed-native") == report["train_samples"]
