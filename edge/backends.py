"""Training backends per device: `make_trainer` builds a PyTorch or an ExecuTorch trainer from the same settings.

Both start from `build_model(arch, seed=seed)`'s weights, so for one seed the backends begin identically;
an ExecuTorch device loads its training program from `artifacts_dir` (found through manifest.json,
checksum verified) and, where the exporter is installed, exports a missing one on first use.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from edge.trainer import LossSettings, TorchTrainer
from export.zoo import build_model

BACKENDS = ("torch", "executorch")


class Trainer(Protocol):
    """What the device runtime uses of a training backend."""

    def step(self, x: np.ndarray, y: np.ndarray, teacher: np.ndarray, teacher_mask: np.ndarray) -> np.ndarray: ...

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray: ...

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None: ...


class TorchBackendTrainer(TorchTrainer):
    """TorchTrainer plus `state_dict()` in numpy, so both backends hand personalised weights back alike."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().copy() for name, t in self.model.state_dict().items()}


class ArtifactNotFoundError(FileNotFoundError):
    """No training program for these settings in artifacts_dir, and no exporter to make one."""


def _exporter_available() -> bool:
    return importlib.util.find_spec("executorch.exir") is not None


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
):  # -> ArtifactRecord | None
    from export.manifest import read_manifest

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
    query = {"arch": arch, "classes": classes, "in_channels": input_shape[0], "input_shape": input_shape}
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
    query = {"arch": arch, "classes": classes, "in_channels": in_channels, "input_shape": input_shape}
    record = _find(artifacts_dir, kind="executorch-training", loss=loss, batch_size=batch_size, **query)
    needs_onnx = eval_backend == "onnxruntime"
    onnx_record = _find(artifacts_dir, kind="onnx", **query) if needs_onnx else None
    if record is None or (needs_onnx and onnx_record is None):
        if input_shape is None or not _exporter_available():
            raise ArtifactNotFoundError(
                f"no ExecuTorch training program for {arch} ({classes} classes, {in_channels} channels, loss {loss},"
                f" batch {batch_size}) in {artifacts_dir}; run `python -m export --arch {arch} ...` there"
            )
        from export.artifacts import ModelSpec, export_model_artifacts

        spec = ModelSpec(arch=arch, classes=classes, input_shape=input_shape)
        export_model_artifacts(spec, artifacts_dir, loss=loss, max_batch=max(batch_size, 8), inference=needs_onnx)
        record = _find(artifacts_dir, kind="executorch-training", loss=loss, batch_size=batch_size, **query)
        onnx_record = _find(artifacts_dir, kind="onnx", **query) if needs_onnx else None
        if record is None:
            raise ArtifactNotFoundError(f"export into {artifacts_dir} did not produce a program for {arch}")

    from export.manifest import verify

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
