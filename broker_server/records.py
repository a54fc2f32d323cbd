"""Values the server's knowledge state speaks in: device records, outcomes of its operations, stats, rejections."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedwire.constants import ErrorCode, HashKind


@dataclass(frozen=True)
class DeviceRecord:
    """What the server remembers of a device: its dense index, model and what its hello declared."""

    index: int
    device: str
    model: str
    classes: int
    samples: int
    hash_kind: HashKind
    hash_dim: int


class Rejected(Exception):
    """A request that breaks a rule of the server's state; raised before anything was changed."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Admission:
    """Outcome of a hello: the device's record, whether it changed, and how many samples it has."""

    record: DeviceRecord
    changed: bool
    registered: int


@dataclass(frozen=True, eq=False)
class Registration:
    """Outcome of a registration chunk; `fresh` marks the request's entries that became `new_rows`."""

    accepted: int
    registered: int
    fresh: np.ndarray  # bool (n,) over the request
    new_rows: np.ndarray  # int64 (fresh.sum(),)


@dataclass(frozen=True, eq=False)
class Teachers:
    """Neighbour knowledge of some rows: contributor counts and the mean logits of rows with count > 0.

    With `raw`, `logits` holds every contributing neighbour's row instead, `counts[i]` of them per row in order.
    """

    counts: np.ndarray  # uint16 (n,)
    logits: np.ndarray  # float32 (count_nonzero(counts), classes); raw: (counts.sum(), classes)


@dataclass(frozen=True, eq=False)
class DeviceKnowledge:
    """What the state holds for one device's samples: how many it registered, and those that hold knowledge."""

    registered: int
    ids: np.ndarray  # uint32 (k,), ascending: the device's sample ids that hold knowledge
    versions: np.ndarray  # int64 (k,)
    logits: np.ndarray  # float32 (k, classes)


@dataclass(frozen=True)
class CacheStats:
    """Numbers for a metrics endpoint."""

    devices: int
    samples: int
    with_knowledge: int
    dirty_classes: int

    @property
    def cache_fill(self) -> float:
        """Fraction of registered samples that hold knowledge."""
        return self.with_knowledge / self.samples if self.samples else 0.0

    def as_dict(self) -> dict[str, float]:
        """Flat numbers keyed by name, the shape a metrics exporter wants."""
        return {
            "devices": self.devices,
            "samples": self.samples,
            "with_knowledge": self.with_knowledge,
            "dirty_classes": self.dirty_classes,
            "cache_fill": self.cache_fill,
        }
