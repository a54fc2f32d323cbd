"""Training backends per device: `make_trainer` builds a PyTorch or an ExecuTorch trainer from the same settings.

Both start from `build_model(arch, seed=seed)`'s weights, so for one seed the backends begin identically;
an ExecuTorch device loads its training program from `artifacts_dir` (found through manifest.json,
checksum verified) and, where the exporter is installed, exports a missing one on first use by running
`python -m export` (a workstation tool edge never imports; a device's wheel does not carry it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np
import torch

from edge.trainer import TorchTrainer
from models.loss import LossSettings
from models.manifest import ArtifactRecord, read_manifest, verify
from models.zoo import build_model

BACKENDS = ("torch", "executorch")


class Trainer(Protocol):
    """What the device runtime uses of a training backend."""

    def step(self, x: np.ndarray, y: np.ndarray, teacher: np.ndarray, teacher_mask: np.ndarray) -> np.ndarray: ...

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray: ...

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float: ...

    def recalibrate_batchnorm(self, x: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None: ...


class TorchBackendTrainer(TorchTrainer):
    """TorchTrainer plus `state_dict()` in numpy, so both backends hand personalised weights back alike."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().copy() for name, t in self.model.state_dict().items()}


class ArtifactNotFoundError(FileNotFoundError):
    """No training program for these settings in artifacts_dir, and no exporter to make one."""


def _exporter_root() -> Path | None:
    """The directory holding the `export` tool's package where it and ExecuTorch's compiler are installed, else None."""
    if importlib.util.find_spec("executorch.exir") is None:
        return None
    spec = importlib.util.find_spec("export")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "artifacts.py").is_file():
        return None
    return Path(spec.origin).parent.parent


def _export_missing(
    artifacts_dir: Path,
    *,
    exporter_root: Path,
    arch: str,
    classes: int,
    input_shape: tuple[int, int, int],
    loss: LossSettings,
    max_batch: int,
    inference: bool,
) -> None:
    """Run `python -m export` for one model's training program (and its ONNX/.pte when `inference`)."""
    command = [
        sys.executable, "-m", "export", "--arch", arch, "--classes", str(classes),
        "--input-shape", ",".join(str(n) for n in input_shape), "--out", str(artifacts_dir),
        "--kd-alpha", repr(loss.kd_alpha), "--temperature", repr(loss.temperature), "--batch", str(max_batch),
    ]  # fmt: skip
    if not inference:
        command.append("--no-inference")
    path = os.pathsep.join(p for p in (str(exporter_root), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": path})
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


class _ModelQuery(TypedDict):
    """Which model an artifact must be for (the part of `_find`'s query every lookup shares)."""

    arch: str
    classes: int
    in_channels: int
    input_shape: tuple[int, int, int] | None


def _find(
    artifacts_dir: Path,
    *,
    kind: str,
    arch: str,
    classes: int,
    in_channels: int,
    input_shape: tuple[int, int, int] | None,
    loss: LossSettings | None = None,
    batch_size: int | None = None,
) -> ArtifactRecord | None:
    matches = []
    for record in read_manifest(artifacts_dir):
        if record.kind != kind or record.architecture != arch or record.classes != classes:
            continue
        if record.input_shape[0] != in_channels or (input_shape is not None and record.input_shape != input_shape):
            continue
        if loss is not None:
            baked = record.metadata.get("loss", {})
            if (baked.get("kd_alpha"), baked.get("temperature")) != (loss.kd_alpha, loss.temperature):
                continue
        if batch_size is not None and int(record.metadata.get("max_batch", 0)) < batch_size:
            continue
        matches.append(record)
    shapes = {m.input_shape for m in matches}
    if len(shapes) > 1:
        raise ValueError(f"several input shapes for {arch} in {artifacts_dir}: {sorted(shapes)}; pass input_shape")
    return min(matches, key=lambda m: int(m.metadata.get("max_batch", 0)), default=None)


def has_training_program(
    artifacts_dir: Path,
    *,
    arch: str,
    classes: int,
    input_shape: tuple[int, int, int],
    loss: LossSettings,
    batch_size: int,
) -> bool:
    """True when `artifacts_dir` already holds an ExecuTorch training program these settings can run (so a trial
    or a flash need not export one again: exporting with its parity checks takes tens of seconds)."""
    query: _ModelQuery = {"arch": arch, "classes": classes, "in_channels": input_shape[0], "input_shape": input_shape}
    return _find(Path(artifacts_dir), kind="executorch-training", loss=loss, batch_size=batch_size, **query) is not None


def make_trainer(
    *,
    backend: str,
    arch: str,
    classes: int,
    in_channels: int,
    seed: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    loss: LossSettings,
    artifacts_dir: Path,
    input_shape: tuple[int, int, int] | None = None,
    batch_size: int = 8,
    eval_backend: str = "executorch",
    threads: int = 1,
) -> Trainer:
    """The trainer a device config asks for; `input_shape` is needed only to export a missing program."""
    if backend not in BACKENDS:
        raise ValueError(f"train backend must be one of {BACKENDS}, got {backend!r}")
    model = build_model(arch, classes=classes, in_channels=in_channels, seed=seed)
    if backend == "torch":
        return TorchBackendTrainer(model=model, lr=lr, momentum=momentum, weight_decay=weight_decay, loss=loss)

    from edge.et_trainer import ExecuTorchTrainer

    artifacts_dir = Path(artifacts_dir)
    query: _ModelQuery = {"arch": arch, "classes": classes, "in_channels": in_channels, "input_shape": input_shape}
    record = _find(artifacts_dir, kind="executorch-training", loss=loss, batch_size=batch_size, **query)
    needs_onnx = eval_backend == "onnxruntime"
    onnx_record = _find(artifacts_dir, kind="onnx", **query) if needs_onnx else None
    if record is None or (needs_onnx and onnx_record is None):
        exporter_root = _exporter_root()
        if input_shape is None or exporter_root is None:
            raise ArtifactNotFoundError(
                f"no ExecuTorch training program for {arch} ({classes} classes, {in_channels} channels, loss {loss},"
                f" batch {batch_size}) in {artifacts_dir}; run `python -m export --arch {arch} ...` there"
            )
        _export_missing(
            artifacts_dir,
            exporter_root=exporter_root,
            arch=arch,
            classes=classes,
            input_shape=input_shape,
            loss=loss,
            max_batch=max(batch_size, 8),
            inference=needs_onnx,
        )
        record = _find(artifacts_dir, kind="executorch-training", loss=loss, batch_size=batch_size, **query)
        onnx_record = _find(artifacts_dir, kind="onnx", **query) if needs_onnx else None
        if record is None:
            raise ArtifactNotFoundError(f"export into {artifacts_dir} did not produce a program for {arch}")

    program = verify(artifacts_dir, record)
    onnx_path = verify(artifacts_dir, onnx_record) if onnx_record is not None else None
    initial = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    with torch.no_grad():
        return ExecuTorchTrainer(
            program=program,
            metadata=record.metadata,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            initial_state=initial,
            eval_backend=eval_backend,
            onnx_path=onnx_path,
            threads=threads,
        )


__all__ = [
    "BACKENDS",
    "ArtifactNotFoundError",
    "TorchBackendTrainer",
    "Trainer",
    "has_training_program",
    "make_trainer",
]
