"""PyTorch training backend: one SGD step per batch on FedCache's distillation loss (models.loss)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from models.loss import LossSettings, fedcache_loss


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


__all__ = ["Sgd", "TorchTrainer"]
