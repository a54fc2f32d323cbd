"""The harness's side of the native device (edge_native/): where its binaries are, and the files it reads.

The C++ device has no NumPy or pickle reader, so the harness hands it plain files: FCW1 named tensors
(initial weights, edge_native/src/weights.h), .npy arrays (its data shard) and a names file listing the
training program's parameters and buffers (from the export manifest).
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NATIVE_DIR = ROOT / "edge_native"
BUILD_DIR = NATIVE_DIR / "build"
DEVICE_BINARY = BUILD_DIR / "fedcache-device"
TRAIN_CHECK_BINARY = BUILD_DIR / "fedcache-train-check"
WIRE_CHECK_BINARY = BUILD_DIR / "fedcache-wire-check"
_MAGIC = b"FCW1"
_DTYPES = {np.dtype("<f4"): 0, np.dtype("<i8"): 1}


class NativeBuildError(RuntimeError):
    """The native device is not built and `make native` failed (its output is in the message)."""


def ensure_built() -> Path:
    """Build edge_native (incrementally, quick when up to date) and return its build directory."""
    result = subprocess.run(
        ["make", "-C", str(NATIVE_DIR), "-j2", "--no-print-directory"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise NativeBuildError(f"make -C edge_native failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return BUILD_DIR


def write_weights(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write named float32/int64 tensors as FCW1 (sorted by name, as the C++ side writes them)."""
    out = bytearray(_MAGIC + struct.pack("<I", len(tensors)))
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype("<i8") if array.dtype.kind in "iu" else array.astype("<f4")
        encoded = name.encode()
        out += struct.pack("<H", len(encoded)) + encoded
        out += struct.pack("<BB", _DTYPES[array.dtype], array.ndim)
        out += struct.pack(f"<{array.ndim}q", *array.shape) + array.tobytes()
    path.write_bytes(bytes(out))
    return path


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Read an FCW1 file (a native device's checkpoint or a check tool's output)."""
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not an FCW1 weights file")
    (count,) = struct.unpack_from("<I", data, 4)
    at = 8
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, at)
        name = data[at + 2 : at + 2 + length].decode()
        at += 2 + length
        dtype_code, rank = struct.unpack_from("<BB", data, at)
        at += 2
        shape = struct.unpack_from(f"<{rank}q", data, at)
        at += 8 * rank
        dtype = np.dtype("<f4") if dtype_code == 0 else np.dtype("<i8")
        size = int(np.prod(shape)) * dtype.itemsize
        tensors[name] = np.frombuffer(data[at : at + size], dtype=dtype).reshape(shape).copy()
        at += size
    return tensors


def training_record(artifacts_dir: Path, program: Path) -> dict[str, Any]:
    """The manifest record of a training program (names and bounds the device needs)."""
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    for record in manifest["artifacts"]:
        if record["path"] == program.name:
            return dict(record)
    raise FileNotFoundError(f"{program.name} is not in {artifacts_dir / 'manifest.json'}")


def write_names(path: Path, metadata: Mapping[str, Any]) -> Path:
    """The names file of fedcache-train-check: 'param NAME', 'buffer NAME', 'stat NAME' lines."""
    lines = [f"param {n}" for n in metadata["parameter_names"]]
    lines += [f"buffer {n}" for n in metadata["buffer_names"]]
    lines += [f"stat {n}" for n in metadata["running_stat_names"]]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_batches(directory: Path, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """Batches (images, labels, teacher, mask) as the .npy files fedcache-train-check reads."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "x.npy", np.concatenate([b[0] for b in batches]).astype("<f4"))
    np.save(directory / "y.npy", np.concatenate([b[1] for b in batches]).astype("<i8"))
    np.save(directory / "teacher.npy", np.concatenate([b[2] for b in batches]).astype("<f4"))
    np.save(directory / "mask.npy", np.concatenate([b[3] for b in batches]).astype("<f4"))
    np.save(directory / "sizes.npy", np.asarray([len(b[1]) for b in batches], dtype="<i8"))
    return directory


__all__ = [
    "BUILD_DIR",
    "DEVICE_BINARY",
    "NATIVE_DIR",
    "TRAIN_CHECK_BINARY",
    "WIRE_CHECK_BINARY",
    "NativeBuildError",
    "ensure_built",
    "read_weights",
    "training_record",
    "write_batches",
    "write_names",
    "write_weights",
]
