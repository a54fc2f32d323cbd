"""PyTorch training backend: one SGD step per batch on FedCache's distillation loss (models.loss)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.loss import LossSettings, fedcache_loss

# Samples per forward pass of a batch-norm recalibration: large enough that a demo device's 250 samples are one
# pass (so the recorded statistics are exactly the ones its training samples see in that pass), small enough
# that a whole shard of thousands does not hold every activation of every sample at once.
RECALIBRATION_CHUNK = 256


@dataclass
class _Moments:
    """Per-channel sums of one batch-norm layer's input over a recalibration's samples, in float64."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, channels: int) -> _Moments:
        return cls(torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))


class Sgd:
    """SGD with momentum and weight decay: torch.optim.SGD's arithmetic (its CPU path), without torch.optim.

    Every torch.optim optimiser imports torch._dynamo on construction and on each step (1.4 s of CPU per
    process here, 40 % of a device's start-up before it reaches the broker; twenty devices starting on two
    cores pay it twenty times). The update is the one torch applies per parameter, op for op, so the
    results are bit-identical (tests/test_device_parts.py), and `state_dict` keeps torch.optim's layout,
    so checkpoints written by either restore into the other.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float, weight_decay: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.buffers[index]
                if buffer is None:
                    buffer = self.buffers[index] = grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's layout: momentum buffers by parameter position, one parameter group."""
        group = {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": 0,
            "weight_decay": self.weight_decay,
            "nesterov": False,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
            "params": list(range(len(self.params))),
        }
        state = {i: {"momentum_buffer": b.clone()} for i, b in enumerate(self.buffers) if b is not None}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimiser state for {[len(g['params']) for g in groups]} parameters, not {len(self.params)}"
            )
        self.buffers = [None] * len(self.params)
        for position, entry in state["state"].items():
            buffer = entry.get("momentum_buffer")
            if buffer is not None:
                self.buffers[groups[0]["params"].index(int(position))] = buffer.detach().clone()


class TorchTrainer:
    """Eager PyTorch backend; the reference every other backend is checked against."""

    def __init__(
        self,
        *,
        model: nn.Module,
        lr: float,
        momentum: float,
        weight_decay: float,
        loss: LossSettings,
    ) -> None:
        self.model = model
        self.loss_settings = loss
        self.optimizer = Sgd(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def checkpoint_state(self) -> dict[str, Any]:
        """Weights and optimiser state, for checkpoints a restarted device resumes from."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def step(self, x: np.ndarray, y: np.ndarray, teacher: np.ndarray, teacher_mask: np.ndarray) -> np.ndarray:
        """One SGD step; returns the batch's logits (from the forward pass, before the update)."""
        self.model.train()
        student = self.model(torch.from_numpy(x))
        loss = fedcache_loss(
            student,
            torch.from_numpy(y),
            torch.from_numpy(teacher),
            torch.from_numpy(teacher_mask.astype(np.float32)),
            self.loss_settings,
        )
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        self.optimizer.step()
        return student.detach().numpy()

    @torch.no_grad()
    def recalibrate_batchnorm(self, x: np.ndarray, *, chunk: int = RECALIBRATION_CHUNK) -> None:
        """Replace every batch-norm layer's running mean and variance by its input's statistics over `x`.

        Why: during training the running statistics are an exponential average (momentum 0.1) over batches of
        a few samples taken while the weights move fast, and the last update of an epoch may come from a batch
        of two; evaluation then normalises with statistics no current weight produced (docs/benchmarks.md §6).
        Here the model runs train-mode forward passes without gradients over `x` in chunks of `chunk`, each
        layer normalising by its chunk's statistics as in training, and each layer's new running mean and
        (unbiased, as torch keeps it) variance are the exact sample-weighted statistics of its input over all
        of `x`: with one chunk, what `momentum=None` over one pass records. Parameters, the optimiser's state
        and `num_batches_tracked` stay as they were; the new buffers stay in the model, so checkpoints and
        handed-back weights carry them.
        """
        layers = [
            m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        if not layers or len(x) == 0:
            return
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        moments: dict[nn.Module, _Moments] = {}

        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            values = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # channel x rest
            seen = moments.setdefault(module, _Moments.empty(values.shape[0]))
            seen.total += values.sum(dim=1)
            seen.squares += (values * values).sum(dim=1)
            seen.count += values.shape[1]

        tracking = [layer.track_running_stats for layer in layers]
        was_training = self.model.training
        hooks = [layer.register_forward_pre_hook(record) for layer in layers]
        try:
            for layer in layers:
                layer.track_running_stats = False  # train-mode batch statistics, buffers left alone
            self.model.train()
            for start in range(0, len(x), chunk):
                self.model(torch.from_numpy(x[start : start + chunk]))
        finally:
            for hook in hooks:
                hook.remove()
            for layer, track in zip(layers, tracking, strict=True):
                layer.track_running_stats = track
            self.model.train(was_training)
        for layer in layers:
            seen = moments[layer]
            mean = seen.total / seen.count
            variance = ((seen.squares - seen.count * mean * mean) / max(seen.count - 1, 1)).clamp_min(0)
            assert layer.running_mean is not None and layer.running_var is not None  # tracking layers have them
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(variance)

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Logits for many samples, in eval mode."""
        self.model.eval()
        outputs = [self.model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy on a labelled set."""
        if len(x) == 0:
            return 0.0
        return float((self.predict(x).argmax(axis=1) == y).mean())


__all__ = ["RECALIBRATION_CHUNK", "Sgd", "TorchTrainer"]
