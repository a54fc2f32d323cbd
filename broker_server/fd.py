"""Federated distillation (FD) baseline on the server: per-class mean logits per device, and their global mean.

Each device uploads, per class, the mean of its logits over the samples of that class it trained
since its last upload, with the sample counts. The server keeps, per device and class, the newest window
that saw the class (a window that did not see a class leaves its previous mean) and answers with the
leave-one-out global: for device d, class c,
`sum_{e != d} counts_e[c] * mean_e[c] / sum_{e != d} counts_e[c]`, so a device never distils from
its own knowledge (as in Jeong et al., 2018). Running sums make that one subtraction, not a loop.
State is in memory only: after a restart devices repopulate it with their next uploads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker_server.records import Rejected
from fedwire.constants import ErrorCode


@dataclass(frozen=True, eq=False)
class _Window:
    """One device's latest upload: counts-weighted logit sums (float64, so removal cancels exactly enough)."""

    version: int
    sums: np.ndarray  # float64 (classes, classes)
    counts: np.ndarray  # int64 (classes,)


@dataclass(frozen=True, eq=False)
class ClassTeacher:
    """The global per-class teacher for one device: rows with count 0 are zero and mean "no teacher"."""

    logits: np.ndarray  # float32 (classes, classes)
    counts: np.ndarray  # uint32 (classes,)


class FdAggregate:
    """Per-device per-class windows and their running totals; not thread-safe (the service serialises calls)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._sums: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    @property
    def devices(self) -> int:
        """Devices that have uploaded at least one window."""
        return len(self._windows)

    def update(self, *, device: str, classes: int, logits: np.ndarray, counts: np.ndarray, version: int) -> bool:
        """Replace the device's window when `version` is newer; True when it was applied.

        `classes` is the deployment's class count (fixed by the first hello): a table of another
        width is `class_mismatch`; shape and finiteness were checked by the decoder.
        """
        if logits.shape != (classes, classes) or counts.shape != (classes,):
            raise Rejected(
                ErrorCode.CLASS_MISMATCH, f"per-class table is {logits.shape[0]} classes wide, the server has {classes}"
            )
        if self._sums is None or self._counts is None:
            self._sums = np.zeros((classes, classes), np.float64)
            self._counts = np.zeros(classes, np.int64)
        old = self._windows.get(device)
        if old is not None and version <= old.version:
            return False
        weights = counts.astype(np.int64)
        sums = logits.astype(np.float64) * weights[:, None]
        if old is not None:
            # Per class, the newest window that saw the class replaces the older one; a class this window did
            # not see keeps the device's previous mean (an end-of-epoch window may hold few classes, or none).
            seen = weights > 0
            sums = np.where(seen[:, None], sums, old.sums)
            weights = np.where(seen, weights, old.counts)
            self._sums -= old.sums
            self._counts -= old.counts
        window = _Window(version=version, sums=sums, counts=weights)
        self._sums += window.sums
        self._counts += window.counts
        self._windows[device] = window
        return True

    def teacher_for(self, *, device: str, classes: int) -> ClassTeacher:
        """Leave-one-out global per-class mean for `device` (zero rows where nobody else has samples)."""
        if self._sums is None or self._counts is None:
            return ClassTeacher(logits=np.zeros((classes, classes), np.float32), counts=np.zeros(classes, np.uint32))
        sums, counts = self._sums, self._counts
        own = self._windows.get(device)
        if own is not None:
            sums, counts = sums - own.sums, counts - own.counts
        means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
        return ClassTeacher(logits=means.astype(np.float32), counts=np.minimum(counts, 2**32 - 1).astype(np.uint32))
