"""ONNX export of zoo models for inference: dynamic batch, initializers named exactly as the model's state dict.

Named initializers let ONNX Runtime evaluate a device's personalised weights without re-exporting:
`SessionOptions.add_initializer(name, value)` overrides them (edge/et_trainer.py does). The TorchScript
exporter deduplicates equal-valued initializers (all fresh BatchNorm weights are ones), which would merge
names, so the graph is traced from a copy holding distinct random values and the real weights are written
into the initializers by name afterwards.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.files import write_atomic

ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _distinct_copy(model: nn.Module) -> nn.Module:
    """A copy whose float tensors all hold distinct values, so the exporter keeps one initializer per name."""
    twin = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for tensor in list(twin.parameters()) + [b for b in twin.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return twin


def model_to_onnx_bytes(model: nn.Module, *, input_shape: tuple[int, int, int], opset: int = ONNX_OPSET) -> bytes:
    """Serialise the eval-mode model to ONNX bytes ("images" (N, C, H, W) -> "logits" (N, classes))."""
    import onnx
    from onnx import numpy_helper

    twin = _distinct_copy(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            twin,
            (torch.zeros(2, *input_shape),),
            buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for initializer in proto.graph.initializer:
        if initializer.name not in state:
            raise RuntimeError(f"ONNX initializer {initializer.name!r} has no state-dict counterpart")
        value = np.ascontiguousarray(state[initializer.name], dtype=numpy_helper.to_array(initializer).dtype)
        initializer.CopyFrom(numpy_helper.from_array(value, initializer.name))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_model_onnx(
    model: nn.Module, path: Path, *, input_shape: tuple[int, int, int], opset: int = ONNX_OPSET
) -> Path:
    """Export a zoo model to an ONNX file (see model_to_onnx_bytes)."""
    return write_atomic(path, model_to_onnx_bytes(model, input_shape=input_shape, opset=opset))


__all__ = ["INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "export_model_onnx", "model_to_onnx_bytes"]
