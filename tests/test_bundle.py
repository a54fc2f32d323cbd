"""Device bundles: checksums that verify and catch tampering, a wheel of only device modules, a rewritten config."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from android_harness.bundle import CHECKSUMS_NAME, MANIFEST_NAME, Bundle, BundleError, build_bundle
from android_harness.device_wheel import device_modules
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, load_config
from edge.data import device_shard, load_dataset
from edge.shard_file import ShardMismatchError, load_shard
from models.manifest import read_manifest, verify

CONFIG = DeviceConfig(
    id="pi-unit",
    broker="mqtt://10.0.0.5:1883",
    data=DataConfig(dataset="digits", num_devices=3, alpha=1.0, index=2),
    train=TrainConfig(arch="cnn", backend="torch", epochs=2),
    hash=HashConfig(dim=64),
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_bundle(CONFIG, tmp_path_factory.mktemp("bundles") / "pi-unit")


def test_manifest_hashes_verify_with_python_and_sha256sum(bundle: Bundle) -> None:
    bundle.verify()
    manifest = json.loads((bundle.root / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {
        "device.toml",
        "data/shard.npz",
        "models/manifest.json",
        "models/cnn-c10-1x8x8.onnx",
        "models/encoder-conv-1x8x8-d64-s0.onnx",
        "models/initial-cnn-s2.npz",
        manifest["wheel"],
    }
    done = subprocess.run(["sha256sum", "-c", CHECKSUMS_NAME], cwd=bundle.root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == len(manifest["files"])


def test_tampered_or_extra_files_fail_verification(bundle: Bundle, tmp_path: Path) -> None:
    copy = Bundle.open(Path(shutil.copytree(bundle.root, tmp_path / "copy")))
    copy.verify()
    onnx = copy.root / "models" / "cnn-c10-1x8x8.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        copy.verify()
    shutil.copy(bundle.root / "models" / "cnn-c10-1x8x8.onnx", onnx)
    (copy.root / "models" / "stray.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"stray\.bin"):
        copy.verify()


def test_wheel_holds_edge_and_fedwire_but_not_server_harness_or_bench(bundle: Bundle) -> None:
    names = zipfile.ZipFile(bundle.root / bundle.wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"edge", "fedwire", "models"}
    assert {"edge/runtime.py", "edge/__main__.py", "fedwire/codec.py", "models/encoder.py", "models/zoo.py"} <= set(
        names
    )
    assert "export/artifacts.py" not in names and "export/executorch_export.py" not in names
    assert not [n for n in names if n.startswith(("export/", "broker_server/", "android_harness/", "bench/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(": ", 1)[1]
        for line in zipfile.ZipFile(bundle.root / bundle.wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist")
    ]
    assert "torch==2.13.0" in requires and not any(r.startswith("executorch") for r in requires)
    assert not any(r.startswith(("faiss", "matplotlib", "scikit-learn", "onnx>", "onnx=")) for r in requires)


def test_device_modules_are_edge_fedwire_and_models_whole() -> None:
    modules = set(device_modules())
    assert {"edge.runtime", "edge.shard_file", "models.encoder", "models.manifest", "models.zoo"} <= modules
    assert {"models", "models.files", "models.loss", "fedwire.codec", "edge.backends"} <= modules
    assert {m.split(".")[0] for m in modules} == {"edge", "fedwire", "models"}
    assert not {m for m in modules if m.split(".")[0] in ("broker_server", "android_harness", "bench", "export")}
    assert "export.artifacts" not in modules


def test_config_points_inside_the_bundle(bundle: Bundle) -> None:
    config = load_config(bundle.config_path)
    assert config.id == CONFIG.id and config.broker == CONFIG.broker
    assert config.state_dir == "state" and config.train.artifacts_dir == "models"
    for relative in (config.data.shard, config.hash.encoder):
        assert not Path(relative).is_absolute() and (bundle.root / relative).is_file()
    records = read_manifest(bundle.root / "models")
    assert [r.kind for r in records] == ["onnx"]
    verify(bundle.root / "models", records[0])


def test_shard_is_the_one_the_device_would_derive(bundle: Bundle) -> None:
    expected = device_shard(load_dataset("digits"), num_devices=3, alpha=1.0, seed=0, index=2)
    shard = load_shard(bundle.root / "data" / "shard.npz", dataset="digits", index=2, num_devices=3)
    np.testing.assert_array_equal(shard.x_train, expected.x_train)
    np.testing.assert_array_equal(shard.y_test, expected.y_test)
    np.testing.assert_array_equal(shard.train_indices, expected.train_indices)
    assert shard.input_shape == (1, 8, 8) and shard.classes == 10
    with pytest.raises(ShardMismatchError, match="shard 2 of 3"):
        load_shard(bundle.root / "data" / "shard.npz", dataset="digits", index=1, num_devices=3)


def test_build_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        build_bundle(CONFIG, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
