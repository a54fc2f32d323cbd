"""Personalised weights coming back from devices: a plain .npz of the zoo state dict, readable without torch.

Both backends produce the same names (TorchTrainer.model.state_dict(), ExecuTorchTrainer.state_dict()), so
weights a device trained load straight back into `build_model(...)` and can be exported again.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.files import write_atomic
from models.zoo import build_model


def state_to_numpy(state: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """Detach and copy every tensor to numpy."""
    return {
        name: value.detach().cpu().numpy().copy() if isinstance(value, torch.Tensor) else np.array(value)
        for name, value in state.items()
    }


def save_weights(path: Path, state: Mapping[str, np.ndarray | torch.Tensor]) -> Path:
    """Write a state dict as .npz (atomically)."""
    buffer = io.BytesIO()
    np.savez(buffer, **state_to_numpy(state))
    return write_atomic(Path(path), buffer.getvalue())


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Read a state dict written by save_weights."""
    with np.load(Path(path)) as archive:
        return {name: archive[name] for name in archive.files}


def apply_weights(model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> nn.Module:
    """Load a (numpy or torch) state dict into a model strictly: every name and shape must match."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    tensors = {name: torch.as_tensor(np.asarray(value)).to(expected[name].dtype) for name, value in state.items()}
    model.load_state_dict(tensors, strict=True)
    return model


def model_from_weights(
    arch: str, *, classes: int, in_channels: int, state: Mapping[str, np.ndarray | torch.Tensor]
) -> nn.Module:
    """A zoo model holding a device's trained weights, ready to evaluate or export again."""
    return apply_weights(build_model(arch, classes=classes, in_channels=in_channels, seed=0), state)


__all__ = ["apply_weights", "load_weights", "model_from_weights", "save_weights", "state_to_numpy"]
