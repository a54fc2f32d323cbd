"""The one interface to the server's FedCache state that handlers use, with what every backend must guarantee."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from broker_server.records import (
    Admission,
    CacheStats,
    DeviceKnowledge,
    DeviceRecord,
    Registration,
    Rejected,
    Teachers,
)
from fedwire.constants import ErrorCode, HashKind


class KnowledgeState(ABC):
    """Registry, hashes, relations and versioned knowledge of one deployment, behind one interface.

    Mutating methods validate the whole request first and raise `Rejected` before changing anything;
    what they change is visible to later calls at once and made durable together by `commit()`.
    Rows are the backend's dense handles for registered samples (int64), valid for the lifetime of
    the state they came from. Not thread-safe: the caller serialises calls.

    A backend passes tests/test_state_contract.py, which pins the Constraints below.
    """

    @property
    @abstractmethod
    def neighbours(self) -> int:
        """R: how many neighbours each sample's relation holds."""

    @property
    @abstractmethod
    def classes(self) -> int:
        """Classes of the deployment, 0 until the first accepted hello fixes them."""

    @abstractmethod
    def hello(
        self,
        *,
        device: str,
        model: str,
        classes: int,
        samples: int,
        hash_kind: HashKind,
        hash_dim: int,
    ) -> Admission:
        """Admit or re-admit a device; returns its record, whether it changed, and its registered sample count.

        Constraints
        -----------
        The first accepted hello fixes classes and hash layout (unless the state was opened with a
        configuration): a later hello that differs is `class_mismatch` or `hash_mismatch`. A hello
        declaring fewer samples than the device has registered is `bad_shape`. Repeating a hello is
        idempotent: the device keeps its record index and `changed` is False. A rejected hello changes
        nothing.
        """

    @abstractmethod
    def register(self, *, device: str, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> Registration:
        """Add a chunk of a device's samples (local ids, labels, hash bytes); returns what it added.

        Constraints
        -----------
        The device must have said hello (`unknown_device`). Ids already registered with the same label
        and hash are accepted again without change (redelivery is harmless); with another label or hash
        the chunk is `hash_mismatch`. Shapes, hash width, label range, repeated ids, finite float16
        hashes and the sample count declared in hello are checked; any violation rejects the whole
        chunk and changes nothing. New samples join their classes' relations before their next fetch.
        """

    @abstractmethod
    def record(self, device: str) -> DeviceRecord:
        """The device's record as its last accepted hello left it.

        Constraints
        -----------
        An unknown device is `unknown_device`. Reading changes nothing.
        """

    @abstractmethod
    def rows(self, device: str, ids: np.ndarray) -> np.ndarray:
        """Rows of a device's local sample ids, in the order given.

        Constraints
        -----------
        Unknown device: `unknown_device`; any id the device has not registered: `unknown_sample`
        (another device's ids never resolve). Reading changes nothing.
        """

    @abstractmethod
    def apply_update(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> np.ndarray:
        """Store `logits` (rows x classes) for `rows` where `version` is newer; returns the applied mask.

        Constraints
        -----------
        Version-guarded and idempotent by (sample, version): a row takes the logits only when `version`
        is strictly greater than the version it holds, so a redelivered or duplicated update applies
        nothing and an older version never overwrites a newer one, before or after a restart. Logits
        of another width (`class_mismatch`), another row count (`bad_shape`), a negative version
        (`bad_schema`) or non-finite values (`non_finite`) reject the update and change nothing.
        """

    @property
    def batchable(self) -> bool:
        """Whether requests may be answered together: one rows_many, one apply_updates and one fetch for many.

        True when that gives each request what it would get alone, in the batch's serial order (the batched
        request path relies on it); a backend whose answers depend on which requests share a call says False,
        and the server then answers its requests one by one.
        """
        return True

    def rows_many(self, devices: Sequence[str], ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of several messages' ids at once: `ids` concatenated, `counts[i]` of them sent by `devices[i]`.

        Returns one int64 row per id and, per message, whether rows() would answer it; the rows of an
        unresolved message mean nothing (rows() says why it is rejected).

        Constraints
        -----------
        Per message, exactly what rows() answers. Reading changes nothing. This default asks rows() message
        by message; a backend may do it in one search.
        """
        out = np.zeros(np.asarray(ids).size, np.int64)
        resolved = np.zeros(len(devices), bool)
        start = 0
        for message, (device, count) in enumerate(zip(devices, np.asarray(counts).tolist(), strict=True)):
            try:
                out[start : start + count] = self.rows(device, ids[start : start + count])
                resolved[message] = True
            except Rejected:
                pass
            start += count
        return out, resolved

    def apply_updates(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Several updates at once, entry by entry in order: rows[i] takes logits[i] if versions[i] is newer.

        Constraints
        -----------
        Exactly apply_update() for each entry, in order (a row twice: the later entry is compared with what
        the earlier left), except that the whole batch is validated first and a rejection changes nothing.
        This default applies entry by entry; a backend may do it at once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        logits = np.asarray(logits, dtype=np.float32)
        versions = np.asarray(versions, dtype=np.int64)
        if logits.ndim != 2 or logits.shape[1] != self.classes:
            raise Rejected(ErrorCode.CLASS_MISMATCH, f"logits have shape {logits.shape}, the server {self.classes}")
        if logits.shape[0] != rows.size or versions.shape != rows.shape:
            raise Rejected(ErrorCode.BAD_SHAPE, f"{rows.size} rows, {logits.shape[0]} logit rows, {versions.size}")
        if versions.size and versions.min() < 0:
            raise Rejected(ErrorCode.BAD_SCHEMA, "a version is negative")
        if not np.isfinite(logits).all():
            raise Rejected(ErrorCode.NON_FINITE, "logits hold NaN or infinite values")
        applied = np.zeros(rows.size, bool)
        for entry in range(rows.size):
            one = self.apply_update(
                rows=rows[entry : entry + 1], logits=logits[entry : entry + 1], version=int(versions[entry])
            )
            applied[entry] = bool(one[0])
        return applied

    @abstractmethod
    def fetch(self, rows: np.ndarray, *, raw: bool = False) -> Teachers:
        """Teachers of `rows`: per row, how many neighbours hold knowledge and the mean of their latest logits.

        Constraints
        -----------
        A neighbour contributes when it holds knowledge (any applied version); a row whose neighbours
        hold none gets count 0 and no teacher row (never a zero vector). Mean logits come one row per
        row with count > 0, in request order; with `raw`, every contributing neighbour's logits come
        instead, `counts[i]` of them per row in neighbour order. Reflects every update applied before
        the call, committed or not. Changes no knowledge (relations may be brought up to date).
        """

    @abstractmethod
    def held(self, device: str) -> DeviceKnowledge:
        """What the state holds for a device's samples: its registered count and each id's version and logits.

        Constraints
        -----------
        Unknown device: `unknown_device`. Lists exactly the device's ids that hold knowledge, ascending.
        Reading changes nothing.
        """

    @abstractmethod
    def devices(self) -> tuple[DeviceRecord, ...]:
        """Every admitted device's record, by record index."""

    @abstractmethod
    def commit(self) -> None:
        """Make every change since the last commit durable at once.

        Constraints
        -----------
        After commit() returns, a restart (even after kill -9) restores every hello, registration and
        applied update up to that commit, and the relations built so far where they still fit; changes
        made after the last commit are gone after a restart (their requests were never acknowledged).
        A state that is not durable (in memory only) keeps the same rules for as long as it lives.
        """

    @abstractmethod
    def stats(self) -> CacheStats:
        """Devices, samples, samples holding knowledge and classes waiting for a relation rebuild."""

    @abstractmethod
    def close(self) -> None:
        """Release resources; changes not committed are discarded. Closing twice is harmless."""

    def __enter__(self) -> KnowledgeState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
