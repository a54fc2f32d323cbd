"""A device reads its shard from `[data] shard` (a bundle's .npz) instead of deriving it; old configs still derive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.config import DataConfig, DeviceConfig, HashConfig, config_from_dict, config_to_toml, load_config
from edge.data import device_shard, load_dataset
from edge.runtime import DeviceRuntime
from edge.shard_file import ShardMismatchError, save_shard


def _config(tmp_path: Path, *, shard: str = "", index: int = 1) -> DeviceConfig:
    return DeviceConfig(
        id="shard-dev",
        broker="mqtt://127.0.0.1:1",  # never connected: only construction is exercised
        state_dir=str(tmp_path / "state"),
        data=DataConfig(dataset="digits", num_devices=4, index=index, shard=shard),
        hash=HashConfig(dim=64),
    )


def test_old_configs_without_shard_key_still_load() -> None:
    config = config_from_dict({"device": {"id": "d1"}, "data": {"dataset": "digits", "num_devices": 2}})
    assert config.data.shard == ""


def test_runtime_uses_the_shard_file(tmp_path: Path) -> None:
    full = device_shard(load_dataset("digits"), num_devices=4, alpha=1.0, seed=0, index=1)
    # A file with fewer samples than the derived shard proves the runtime read the file, not the dataset.
    small = type(full)(**{**full.__dict__, "x_train": full.x_train[:40], "y_train": full.y_train[:40],
                          "train_indices": full.train_indices[:40]})  # fmt: skip
    path = save_shard(tmp_path / "shard.npz", small)
    config_path = tmp_path / "device.toml"
    config_path.write_text(config_to_toml(_config(tmp_path, shard=str(path))))
    runtime = DeviceRuntime(load_config(config_path))
    try:
        assert len(runtime.shard.y_train) == 40
        np.testing.assert_array_equal(runtime.shard.x_train, full.x_train[:40])
        assert runtime.classes == 10 and runtime.input_shape == (1, 8, 8)
    finally:
        runtime.state.close()


def test_runtime_refuses_another_devices_shard(tmp_path: Path) -> None:
    other = device_shard(load_dataset("digits"), num_devices=4, alpha=1.0, seed=0, index=3)
    path = save_shard(tmp_path / "shard.npz", other)
    with pytest.raises(ShardMismatchError, match="shard 3 of 4"):
        DeviceRuntime(_config(tmp_path, shard=str(path), index=1))
