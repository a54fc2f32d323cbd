"""FedCache's distillation loss (cross-entropy plus temperature-scaled KL to cached teachers) and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch.nn import functional as F


class TeacherGate(StrEnum):
    """Which samples with a teacher distil from it.

    NONE is the paper's: every one. LABEL keeps the KL term only where the teacher's top class is the sample's own
    label. Why: the device knows its labels, and a teacher that ranks a wrong class first on one of them can only pull
    the student away from what its cross-entropy teaches (issue 17: some devices end below local training). Softer
    wrong-class mass of a teacher that is right on top, the "dark knowledge", is kept. Measured neutral, so off by
    default: by the end 98 % of teachers rank the label first (docs/benchmarks.md §4).
    """

    NONE = "none"
    LABEL = "label"


@dataclass(frozen=True)
class LossSettings:
    """CE(y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)); defaults from the public demo."""

    kd_alpha: float = 1.5
    temperature: float = 3.0
    teacher_gate: TeacherGate = TeacherGate.NONE


def fedcache_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    teacher_mask: torch.Tensor,
    settings: LossSettings,
) -> torch.Tensor:
    """FedCache's device loss.

    Samples without a teacher (mask 0: none of their neighbours has knowledge yet) contribute
    cross-entropy only; the KL term is summed over samples with a teacher and divided by the
    batch size, so a batch where every sample has a teacher matches `batchmean` KL. With
    `TeacherGate.LABEL`, samples whose teacher's top class is not their label count as without a teacher.
    """
    if settings.teacher_gate is TeacherGate.LABEL:
        teacher_mask = teacher_mask * (teacher.argmax(dim=1) == labels).to(teacher_mask.dtype)
    ce = F.cross_entropy(student, labels)
    t = settings.temperature
    log_student = F.log_softmax(student / t, dim=1)
    log_teacher = F.log_softmax(teacher / t, dim=1)
    kl_per_sample = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    kl = (kl_per_sample * teacher_mask).sum() / student.shape[0]
    return ce + settings.kd_alpha * t * t * kl


__all__ = ["LossSettings", "TeacherGate", "fedcache_loss"]
