"""PyTorch training backend: one SGD step per batch on FedCache's distillation loss (models.loss)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models.loss import LossSettings, fedcache_loss


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
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

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
        self.optimizer.zero_grad(set_to_none=True)
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


__all__ = ["TorchTrainer"]
