"""Write one model's (or the hash encoder's) artifacts, check their parity and record them in the manifest."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.et_graph import TrainingGraphOptions
from export.onnx_export import ONNX_OPSET, model_to_onnx_bytes
from export.parity import DEFAULT_TRAINING_STEPS, INFERENCE_TOLERANCE, check
from models.files import write_atomic
from models.loss import LossSettings
from models.manifest import ArtifactRecord, locked, record_for, write_manifest
from models.zoo import build_model


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model's artifacts: architecture, classes, input shape."""

    arch: str
    classes: int
    input_shape: tuple[int, int, int]

    @property
    def stem(self) -> str:
        shape = "x".join(str(n) for n in self.input_shape)
        return f"{self.arch}-c{self.classes}-{shape}"


def training_stem(spec: ModelSpec, *, loss: LossSettings, max_batch: int) -> str:
    """Training programs bake the loss settings and the batch bound in, so both are in the name."""
    return f"{spec.stem}-kd{loss.kd_alpha:g}-t{loss.temperature:g}-b{max_batch}"


def environment() -> dict[str, str]:
    """Versions that produced the artifacts (recorded in the manifest)."""
    versions = {"torch": torch.__version__, "onnx_opset": str(ONNX_OPSET)}
    for package in ("executorch", "onnx", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def export_model_artifacts(
    spec: ModelSpec,
    out: Path,
    *,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    loss: LossSettings | None = None,
    max_batch: int = 8,
    parity_steps: int = DEFAULT_TRAINING_STEPS,
    training: bool = True,
    inference: bool = True,
    options: TrainingGraphOptions | None = None,
) -> list[ArtifactRecord]:
    """ONNX + ExecuTorch inference + ExecuTorch training for one zoo model; every file parity-checked.

    `weights` (a device's trained state dict) replaces the seeded initial weights: that is how
    personalised weights are exported again. A parity failure raises before the manifest is touched.
    """
    from export.executorch_export import (
        EXECUTORCH_VERSION,
        export_inference_program,
        export_training_program,
    )
    from export.parity import executorch_inference_parity, onnx_parity, training_parity
    from export.weights import apply_weights

    loss = loss or LossSettings()
    out = Path(out)
    model = build_model(spec.arch, classes=spec.classes, in_channels=spec.input_shape[0], seed=seed)
    if weights is not None:
        apply_weights(model, weights)
    model.eval()
    written: list[tuple[Path, dict]] = []
    if inference:
        onnx_bytes = model_to_onnx_bytes(model, input_shape=spec.input_shape)
        onnx_fig = {"max_abs_diff": onnx_parity(model, onnx_bytes, input_shape=spec.input_shape)}
        onnx_fig["tolerance"] = INFERENCE_TOLERANCE
        check({"max_onnx_diff": onnx_fig["max_abs_diff"]}, what=f"{spec.stem}.onnx")
        pte = export_inference_program(model, input_shape=spec.input_shape)
        pte_fig = {"max_abs_diff": executorch_inference_parity(model, pte, input_shape=spec.input_shape)}
        pte_fig["tolerance"] = INFERENCE_TOLERANCE
        check({"max_pte_diff": pte_fig["max_abs_diff"]}, what=f"{spec.stem}.pte")
        written.append((write_atomic(out / f"{spec.stem}.onnx", onnx_bytes), {"kind": "onnx", "parity": onnx_fig}))
        written.append(
            (write_atomic(out / f"{spec.stem}.pte", pte), {"kind": "executorch-inference", "parity": pte_fig})
        )
    if training:
        program = export_training_program(
            model, input_shape=spec.input_shape, classes=spec.classes, loss=loss, max_batch=max_batch, options=options
        )
        meta = program.metadata() | {"loss": {"kd_alpha": loss.kd_alpha, "temperature": loss.temperature}}
        figures = training_parity(
            model,
            program=program.buffer,
            metadata=meta,
            input_shape=spec.input_shape,
            classes=spec.classes,
            loss=loss,
            steps=parity_steps,
        )
        check(figures, what=f"{spec.stem} training program")
        path = write_atomic(out / f"{training_stem(spec, loss=loss, max_batch=max_batch)}.train.pte", program.buffer)
        written.append((path, {"kind": "executorch-training", "parity": figures, "metadata": meta}))
    records = []
    for path, info in written:
        version = str(ONNX_OPSET) if info["kind"] == "onnx" else EXECUTORCH_VERSION
        records.append(
            record_for(
                path,
                root=out,
                kind=info["kind"],
                architecture=spec.arch,
                input_shape=spec.input_shape,
                classes=spec.classes,
                version=version,
                parity=info["parity"],
                metadata=info.get("metadata"),
            )
        )
    with locked(out):
        write_manifest(out, records, environment=environment())
    return records


def export_encoder_artifacts(
    out: Path, *, input_shape: tuple[int, int, int], kind: str = "conv", dim: int = 256, seed: int = 0
) -> list[ArtifactRecord]:
    """The hash encoder as ONNX (models/encoder.py's exporter) and an XNNPACK ExecuTorch program.

    The encoder is frozen (buffers only, nothing to train), so it has no training program.
    """
    from export.executorch_export import EXECUTORCH_VERSION, export_inference_program
    from export.parity import executorch_inference_parity, onnx_parity
    from models.encoder import build_encoder, export_encoder_onnx

    out = Path(out)
    shape = "x".join(str(n) for n in input_shape)
    stem = f"encoder-{kind}-{shape}-d{dim}-s{seed}"
    encoder: nn.Module = build_encoder(kind, input_shape=input_shape, dim=dim, seed=seed)
    onnx_path = export_encoder_onnx(out / f"{stem}.onnx", input_shape=input_shape, dim=dim, seed=seed, kind=kind)
    onnx_fig = {"max_abs_diff": onnx_parity(encoder, onnx_path.read_bytes(), input_shape=input_shape)}
    check({"max_onnx_diff": onnx_fig["max_abs_diff"]}, what=f"{stem}.onnx")
    pte = export_inference_program(encoder, input_shape=input_shape)
    pte_fig = {"max_abs_diff": executorch_inference_parity(encoder, pte, input_shape=input_shape)}
    check({"max_pte_diff": pte_fig["max_abs_diff"]}, what=f"{stem}.pte")
    pte_path = write_atomic(out / f"{stem}.pte", pte)
    meta = {"encoder_kind": kind, "dim": dim, "seed": seed}
    records = [
        record_for(
            onnx_path,
            root=out,
            kind="onnx",
            architecture="encoder",
            input_shape=input_shape,
            classes=dim,
            version=str(ONNX_OPSET),
            parity=onnx_fig | {"tolerance": INFERENCE_TOLERANCE},
            metadata=meta,
        ),
        record_for(
            pte_path,
            root=out,
            kind="executorch-inference",
            architecture="encoder",
            input_shape=input_shape,
            classes=dim,
            version=EXECUTORCH_VERSION,
            parity=pte_fig | {"tolerance": INFERENCE_TOLERANCE},
            metadata=meta,
        ),
    ]
    with locked(out):
        write_manifest(out, records, environment=environment())
    return records


def summary(records: list[ArtifactRecord]) -> str:
    """One line per artifact for the command's output."""
    lines = []
    for r in records:
        figures = {k: v for k, v in r.parity.items() if k.startswith("max_")}
        lines.append(f"{r.kind:22s} {r.path:48s} {r.size_bytes / 1024:9.1f} KiB  {json.dumps(figures)}")
    return "\n".join(lines)


__all__ = ["ModelSpec", "environment", "export_encoder_artifacts", "export_model_artifacts", "summary", "training_stem"]
