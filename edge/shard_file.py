"""A device's shard as one .npz file, so a flashed device needs neither the whole dataset nor scikit-learn.

The harness cuts the shard on the workstation with the same `device_shard` a device would run and writes it
here; `[data] shard = "data/shard.npz"` makes the device read it instead of deriving it. The file records
which split it came from, and loading checks that against the config, so a shard flashed to the wrong
device id fails at start instead of training on another device's samples.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edge.data import Shard
from models.files import write_atomic

SHARD_FORMAT = 1
_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "train_indices", "test_indices")


class ShardMismatchError(ValueError):
    """The shard file belongs to another dataset, split or device index than the config says."""


def save_shard(path: Path, shard: Shard) -> Path:
    """Write `shard` (arrays plus where it came from) as a compressed .npz, atomically.

    Compressed because the images' flat backgrounds shrink a FashionMNIST shard fivefold (9.1 to 1.8 MiB).
    """
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        format=np.int64(SHARD_FORMAT),
        name=np.str_(shard.name),
        index=np.int64(shard.index),
        num_devices=np.int64(shard.num_devices),
        classes=np.int64(shard.classes),
        input_shape=np.asarray(shard.input_shape, dtype=np.int64),
        **{key: getattr(shard, key) for key in _ARRAYS},
    )
    return write_atomic(Path(path), buffer.getvalue())


def load_shard(path: Path, *, dataset: str, index: int, num_devices: int) -> Shard:
    """Read a shard written by `save_shard`, checking it is this device's (dataset, index, num_devices)."""
    with np.load(Path(path), allow_pickle=False) as archive:
        if int(archive["format"]) != SHARD_FORMAT:
            raise ValueError(f"{path}: shard format {int(archive['format'])}, this runtime reads {SHARD_FORMAT}")
        found = (str(archive["name"]), int(archive["index"]), int(archive["num_devices"]))
        if found != (dataset, index, num_devices):
            raise ShardMismatchError(
                f"{path} holds {found[0]} shard {found[1]} of {found[2]}, "
                f"but the config asks for {dataset} shard {index} of {num_devices}"
            )
        arrays = {key: np.asarray(archive[key]) for key in _ARRAYS}
        return Shard(
            name=found[0],
            index=found[1],
            num_devices=found[2],
            classes=int(archive["classes"]),
            input_shape=tuple(int(n) for n in archive["input_shape"]),  # type: ignore[arg-type]
            **arrays,
        )


__all__ = ["SHARD_FORMAT", "ShardMismatchError", "load_shard", "save_shard"]
