"""Device-side knowledge state: the last teacher per local sample and the schedule of batches to prefetch for."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


class TeacherCache:
    """The last teacher received for each local sample, so training never waits for the network.

    A sample with no teacher yet (or whose neighbours had no knowledge) trains with CE only.
    """

    def __init__(self, *, samples: int, classes: int) -> None:
        self._logits = np.zeros((samples, classes), np.float32)
        self._has = np.zeros(samples, bool)
        self._lock = threading.Lock()
        self.received = 0

    def store(self, ids: np.ndarray, counts: np.ndarray, logits: np.ndarray) -> None:
        """Keep the teachers of a Knowledge reply (rows only for ids with counts > 0)."""
        with_teacher = ids[counts > 0].astype(np.int64)
        with self._lock:
            self._logits[with_teacher] = logits
            self._has[with_teacher] = True
            self.received += int(with_teacher.size)

    def store_all(self, ids: np.ndarray, logits: np.ndarray) -> None:
        """Restore teachers kept on disk (every row is a teacher)."""
        self.store(ids, np.ones(len(ids), np.uint16), logits)
        self.received = 0

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logits) of every sample that has a teacher, for saving to disk."""
        with self._lock:
            ids = np.flatnonzero(self._has)
            return ids, self._logits[ids].copy()

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(teacher logits, mask) for a batch; rows without a teacher are zero with mask False."""
        with self._lock:
            return self._logits[ids].copy(), self._has[ids].copy()

    def coverage(self) -> float:
        """Fraction of local samples that have a teacher."""
        with self._lock:
            return float(self._has.mean()) if self._has.size else 0.0


@dataclass(frozen=True)
class ExchangeEpochs:
    """Which epochs of a FedCache device exchange knowledge: every `every`-th, from epoch `warmup` (0-based) on.

    The `warmup` epochs before send nothing and train with cross-entropy only: knowledge from nearly untrained
    models costs as many bytes as any other and teaches little (TrainConfig.knowledge_warmup_epochs). Only the
    teachers prefetched for the first exchanging epoch's first batches arrive before the warm-up ends, and a
    warm-up batch holding one of those samples distils from it, as any batch does once a teacher is there. In the
    epochs between exchanges a device trains on the teachers its last exchanging epoch received (one per sample,
    as every sample is in every epoch) and uploads nothing: 1/`every` of the bytes.
    """

    every: int = 1
    warmup: int = 0

    def includes(self, epoch: int) -> bool:
        return epoch >= self.warmup and (epoch - self.warmup) % self.every == 0


class BatchSchedule:
    """Every batch of every epoch, known in advance so knowledge for the next batches can be prefetched."""

    def __init__(self, *, samples: int, batch_size: int, epochs: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.batches: list[np.ndarray] = []
        self.epoch_of: list[int] = []
        for epoch in range(epochs):
            order = rng.permutation(samples)
            for start in range(0, samples, batch_size):
                self.batches.append(order[start : start + batch_size])
                self.epoch_of.append(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def ids_between(self, start: int, stop: int, *, epochs: ExchangeEpochs = ExchangeEpochs()) -> np.ndarray:
        """Unique sample ids of batches [start, stop) (an epoch boundary can repeat an id), of those batches only
        whose epoch exchanges knowledge (`exchanges`)."""
        stop = min(stop, len(self.batches))
        batches = [self.batches[b] for b in range(start, stop) if self.exchanges(b, epochs)]
        if not batches:
            return np.zeros(0, np.uint32)
        return np.unique(np.concatenate(batches)).astype(np.uint32)

    def exchanges(self, position: int, epochs: ExchangeEpochs) -> bool:
        """Whether batch `position`'s epoch exchanges knowledge (`ExchangeEpochs`)."""
        return epochs.includes(self.epoch_of[position])
