"""Parity checks run on every export: runtimes against PyTorch, and ExecuTorch training steps against eager ones.

Inference: ONNX Runtime and the ExecuTorch program on the same random batch as the eval-mode model,
max abs difference reported. Training: N SGD steps of the training program (ExecuTorchTrainer) and of
TorchTrainer from the same weights on the same batches (one of them smaller, to exercise the dynamic
batch); parameters, BatchNorm statistics, logits and the predict method must agree within tolerance,
errors scaled by max(1, max|reference|) per tensor (running variances reach tens). The tolerance is 1e-4,
or 4x the distance between float32 and float64 PyTorch over the same steps where that is larger.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from models.loss import LossSettings

INFERENCE_TOLERANCE = 1e-4
TRAINING_TOLERANCE = 1e-4
NOISE_FACTOR = 4.0
DEFAULT_TRAINING_STEPS = 5
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


class ParityError(AssertionError):
    """An exported artifact disagrees with PyTorch beyond the stated tolerance."""


def _batch(rng: np.random.Generator, size: int, input_shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal((size, *input_shape), dtype=np.float32)


def onnx_parity(
    module: nn.Module, onnx_bytes: bytes, *, input_shape: tuple[int, int, int], batch: int = 5, seed: int = 0
) -> float:
    """Max |ONNX Runtime - PyTorch| on a random batch (batch differs from the export's 2: dynamic axis)."""
    import onnxruntime as ort

    x = _batch(np.random.default_rng(seed), batch, input_shape)
    with torch.no_grad():
        expected = copy.deepcopy(module).eval()(torch.from_numpy(x)).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.abs(got - expected).max())


def executorch_inference_parity(
    module: nn.Module, program: bytes, *, input_shape: tuple[int, int, int], batch: int = 5, seed: int = 0
) -> float:
    """Max |ExecuTorch (XNNPACK) - PyTorch| on a random batch."""
    from edge.et_trainer import executorch_runtime

    x = _batch(np.random.default_rng(seed), batch, input_shape)
    with torch.no_grad():
        expected = copy.deepcopy(module).eval()(torch.from_numpy(x)).numpy()
    loaded = executorch_runtime().pybindings._load_for_executorch_from_buffer(program)
    got = loaded.forward([torch.from_numpy(x)])[0].numpy()
    return float(np.abs(got - expected).max())


def training_parity(
    model: nn.Module,
    *,
    program: bytes,
    metadata: dict[str, Any],
    input_shape: tuple[int, int, int],
    classes: int,
    loss: LossSettings,
    steps: int = DEFAULT_TRAINING_STEPS,
    seed: int = 0,
) -> dict[str, Any]:
    """N steps in ExecuTorch vs N in PyTorch from `model`'s weights; worst differences and the distance moved."""
    from edge.et_trainer import ExecuTorchTrainer
    from edge.trainer import TorchTrainer

    start = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    reference = TorchTrainer(model=copy.deepcopy(model), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, loss=loss)
    exact = TorchTrainer(
        model=copy.deepcopy(model).double(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, loss=loss
    )
    device = ExecuTorchTrainer(
        program=program, metadata=metadata, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, initial_state=start
    )
    rng = np.random.default_rng(seed)
    full = int(metadata["max_batch"])
    logit_error = noise_logits = 0.0
    for step in range(steps):
        size = full if step != steps // 2 or full < 3 else full - 2
        x = _batch(rng, size, input_shape)
        y = rng.integers(0, classes, size)
        teacher = rng.standard_normal((size, classes), dtype=np.float32)
        mask = rng.random(size) < 0.7
        got = device.step(x, y, teacher, mask)
        expected = reference.step(x, y, teacher, mask)
        logit_error = max(logit_error, _scaled_error(got, expected))
        in_float64 = exact.step(x.astype(np.float64), y, teacher.astype(np.float64), mask)
        noise_logits = max(noise_logits, _scaled_error(expected, in_float64))
    trained = device.state_dict()
    expected_state = {k: v.detach().numpy() for k, v in reference.model.state_dict().items()}
    params = {name for name, _ in model.named_parameters()}
    floats = [k for k in expected_state if expected_state[k].dtype.kind == "f"]
    param_error = max(_scaled_error(trained[k], expected_state[k]) for k in floats if k in params)
    stats = [k for k in floats if k not in params]
    stat_error = max((_scaled_error(trained[k], expected_state[k]) for k in stats), default=0.0)
    moved = max(float(np.abs(expected_state[k] - start[k]).max()) for k in floats if k in params)
    counters = all(np.array_equal(trained[k], expected_state[k]) for k in expected_state if k not in floats)
    # Float32 PyTorch's own distance from float64 PyTorch on the same steps: deep nets on random batches
    # drift by ~2e-4 (resnet20, 28x28), so the bound is the larger of 1e-4 and NOISE_FACTOR times that.
    exact_state = {k: v.detach().numpy() for k, v in exact.model.state_dict().items()}
    noise = max([noise_logits] + [_scaled_error(expected_state[k], exact_state[k]) for k in floats])
    tolerance = max(TRAINING_TOLERANCE, NOISE_FACTOR * noise)
    probe = _batch(rng, 7, input_shape)
    reference_probe = reference.predict(probe)
    return {
        "steps": steps,
        "max_param_diff": param_error,
        "max_running_stat_diff": stat_error,
        "max_logit_diff": logit_error,
        "max_predict_diff": _scaled_error(device.predict(probe), reference_probe),
        "max_param_change": moved,
        "counters_equal": counters,
        "float32_noise": noise,
        "tolerance": tolerance,
        "error_measure": "max|executorch - torch| / max(1, max|torch|) per tensor",
    }


def _scaled_error(got: np.ndarray, expected: np.ndarray) -> float:
    """Max abs error relative to the tensor's scale, floored at 1 (absolute for small tensors).

    BatchNorm running variances of random batches reach tens; float32 rounding there is 1e-5 absolute.
    """
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def check(figures: dict[str, Any], *, what: str) -> None:
    """Raise ParityError if any reported difference exceeds its tolerance."""
    tolerance = figures.get("tolerance", INFERENCE_TOLERANCE)
    bad = {k: v for k, v in figures.items() if k.startswith("max_") and k.endswith("_diff") and not v <= tolerance}
    if bad or figures.get("counters_equal") is False:
        raise ParityError(f"{what}: parity outside {tolerance}: {figures}")


__all__ = [
    "DEFAULT_TRAINING_STEPS",
    "INFERENCE_TOLERANCE",
    "NOISE_FACTOR",
    "TRAINING_TOLERANCE",
    "ParityError",
    "check",
    "executorch_inference_parity",
    "onnx_parity",
    "training_parity",
]
