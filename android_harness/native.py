"""The harness's side of the native device (edge_native/): where its binaries are, and the files it reads.

The C++ device has no NumPy or pickle reader, so the harness hands it plain files: FCW1 named tensors
(initial weights, edge_native/src/weights.h), .npy arrays (its data shard) and a names file listing the
training program's parameters and buffers (from the export manifest).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import DeviceConfig, config_to_toml, torch_only_settings_on

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
        array = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make scalars 1-D)
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


def device_command(config: Path) -> list[str]:
    """`fedcache-device --config FILE`: one native device process (the counterpart of `python -m edge`)."""
    return [str(DEVICE_BINARY), "--config", str(config)]


def find_training_program(
    artifacts: Path,
    *,
    arch: str,
    classes: int,
    input_shape: tuple[int, ...],
    kd_alpha: float,
    temperature: float,
    batch_size: int,
) -> tuple[Path, dict[str, Any]]:
    """The exported training program (and its manifest record) a native device of these settings runs."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    for record in manifest["artifacts"]:
        meta = record.get("metadata") or {}
        loss = meta.get("loss", {})
        if (
            record["kind"] == "executorch-training"
            and record["architecture"] == arch
            and record["classes"] == classes
            and tuple(record["input_shape"]) == tuple(input_shape)
            and (loss.get("kd_alpha"), loss.get("temperature")) == (kd_alpha, temperature)
            and int(meta.get("max_batch", 0)) >= batch_size
        ):
            return artifacts / record["path"], dict(record)
    raise FileNotFoundError(f"no training program for {arch} {input_shape} in {artifacts}: run python -m export")


def ensure_training_program(config: DeviceConfig, *, artifacts: Path) -> None:
    """Export the training program a native device of `config` runs into `artifacts` unless it is there already."""
    from edge.backends import has_training_program
    from edge.data import load_dataset
    from models.loss import LossSettings

    dataset = load_dataset(config.data.dataset)
    train = config.train
    loss = LossSettings(kd_alpha=train.kd_alpha, temperature=train.temperature)
    if has_training_program(
        artifacts, arch=train.arch, classes=dataset.classes, input_shape=dataset.input_shape, loss=loss,
        batch_size=train.batch_size,
    ):  # fmt: skip
        return
    subprocess.run(
        [sys.executable, "-m", "export", "--arch", train.arch, "--classes", str(dataset.classes), "--input-shape",
         ",".join(str(n) for n in dataset.input_shape), "--out", str(artifacts), "--kd-alpha", str(loss.kd_alpha),
         "--temperature", str(loss.temperature), "--batch", str(max(train.batch_size, 8)), "--no-inference"],
        check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


def encoder_program(artifacts: Path, *, kind: str, input_shape: tuple[int, ...], dim: int, seed: int) -> Path:
    """The hash encoder as an ExecuTorch program (the native device runs no ONNX Runtime); exported when missing."""
    shape = "x".join(str(n) for n in input_shape)
    path = artifacts / f"encoder-{kind}-{shape}-d{dim}-s{seed}.pte"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "export", "--encoder", "--encoder-kind", kind, "--encoder-dim", str(dim),
             "--encoder-seed", str(seed), "--input-shape", ",".join(str(n) for n in input_shape),
             "--out", str(artifacts)],
            check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
    return path


def write_shard(directory: Path, *, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray) -> Path:  # fmt: skip
    """A device's data as the four .npy files the native device reads."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "x_train.npy", np.ascontiguousarray(x_train, dtype="<f4"))
    np.save(directory / "y_train.npy", np.ascontiguousarray(y_train, dtype="<i8"))
    np.save(directory / "x_test.npy", np.ascontiguousarray(x_test, dtype="<f4"))
    np.save(directory / "y_test.npy", np.ascontiguousarray(y_test, dtype="<i8"))
    return directory


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare_native_device(config: DeviceConfig, *, artifacts: Path, encoder_kind: str = "conv") -> Path:
    """Write what a native device needs into its state directory and return its TOML file.

    The file is the Python device's (config_to_toml, `backend = "native"`) plus a [native] section naming
    the training program, the encoder program, the shard written as .npy and the initial weights, which are
    the zoo's for the device's seed, so a native device starts exactly where a Python one would.
    """
    from edge.algorithms import model_seed
    from edge.runtime import _device_shard
    from models.zoo import build_model

    torch_only = torch_only_settings_on(vars(config.train))
    if torch_only:
        # The C++ trainer runs the program's baked loss and keeps its running statistics; its config reader
        # rejects these keys, so refuse here with the reason rather than let a trial fail in every device.
        raise ValueError(
            f"{config.id}: train.{', train.'.join(torch_only)} is implemented for the torch backend only, not for "
            "the native device (edge_native); turn it off"
        )
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    shard = _device_shard(config.data, max_samples=config.train.max_samples)
    shard_dir = write_shard(
        state / "native-shard", x_train=shard.x_train, y_train=shard.y_train, x_test=shard.x_test, y_test=shard.y_test
    )
    train = config.train
    program, record = find_training_program(
        artifacts, arch=train.arch, classes=shard.classes, input_shape=shard.input_shape, kd_alpha=train.kd_alpha,
        temperature=train.temperature, batch_size=train.batch_size,
    )  # fmt: skip
    encoder = encoder_program(
        artifacts, kind=encoder_kind, input_shape=shard.input_shape, dim=config.hash.dim, seed=config.hash.seed
    )
    model = build_model(train.arch, classes=shard.classes, in_channels=shard.input_shape[0], seed=model_seed(config))
    weights = write_weights(state / "initial.fcw", {name: t.detach().numpy() for name, t in model.state_dict().items()})
    meta = record["metadata"]
    text = config_to_toml(replace(config, train=replace(train, backend="executorch")))
    text = text.replace('backend = "executorch"', 'backend = "native"', 1)
    text += (
        "\n[native]\n"
        f"program = {json.dumps(str(program))}\n"
        f"encoder = {json.dumps(str(encoder))}\n"
        f"shard = {json.dumps(str(shard_dir))}\n"
        f"initial_weights = {json.dumps(str(weights))}\n"
        f"parameter_names = {_toml_list(meta['parameter_names'])}\n"
        f"buffer_names = {_toml_list(meta['buffer_names'])}\n"
        f"running_stat_names = {_toml_list(meta['running_stat_names'])}\n"
    )
    path = state / "device.toml"
    path.write_text(text)
    return path


__all__ = [
    "BUILD_DIR",
    "DEVICE_BINARY",
    "NATIVE_DIR",
    "TRAIN_CHECK_BINARY",
    "WIRE_CHECK_BINARY",
    "NativeBuildError",
    "device_command",
    "encoder_program",
    "ensure_built",
    "ensure_training_program",
    "find_training_program",
    "prepare_native_device",
    "read_weights",
    "training_record",
    "write_batches",
    "write_names",
    "write_shard",
    "write_weights",
]
