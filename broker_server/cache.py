"""In-memory FedCache state: devices, samples as global rows, the knowledge matrix and neighbour averages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from broker_server.defences import DefenceConfig, Defences
from broker_server.records import Admission, CacheStats, DeviceRecord, Registration, Rejected, Teachers
from broker_server.relations import EXACT_SEARCH_LIMIT, RelationTable, hash_bytes_of
from broker_server.store import StoredState
from fedwire.constants import DEFAULT_NEIGHBOURS, ErrorCode, HashKind

# A fetch gathers (rows, R, classes) floats; above this many it is done in slices to bound memory.
FETCH_GATHER_LIMIT = 1 << 22
_MIN_CAPACITY = 1024
_SHOWN_IDS = 8


@dataclass(frozen=True)
class CacheConfig:
    """What every device of one server must agree on: number of classes and the hash layout."""

    classes: int
    hash_kind: HashKind
    hash_dim: int

    @property
    def hash_bytes(self) -> int:
        """Bytes of one hash on the wire and in memory."""
        return hash_bytes_of(self.hash_kind, self.hash_dim)


class _Growable:
    """A numpy array appended to with amortised doubling; `view` is the filled prefix and writes through."""

    def __init__(self, dtype: np.dtype | type, *, width: int | None = None, fill: float = 0) -> None:
        self._tail: tuple[int, ...] = () if width is None else (width,)
        self._fill = fill
        self._data = np.full((0, *self._tail), fill, dtype=dtype)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def view(self) -> np.ndarray:
        return self._data[: self._size]

    def extend(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        needed = self._size + len(values)
        if needed > self._data.shape[0]:
            capacity = max(needed, 2 * self._data.shape[0], _MIN_CAPACITY)
            grown = np.full((capacity, *self._tail), self._fill, dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = values
        self._size = needed


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


_NO_DEVICE = np.uint64(0xFFFFFFFF)  # the device index of an unknown device in a key: no sample has it


def _sample_keys(devices: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(device index << 32) | local id, the key a sample is found by."""
    return (np.asarray(devices, dtype=np.uint64) << np.uint64(32)) | np.asarray(ids, dtype=np.uint64)


def _shown(ids: np.ndarray) -> str:
    text = ", ".join(str(int(i)) for i in ids[:_SHOWN_IDS])
    return text + (", ..." if ids.size > _SHOWN_IDS else "")


class KnowledgeCache:
    """All server state in memory; every mutating method validates fully first and raises `Rejected`.

    Samples get dense global rows in registration order, so knowledge, versions and the neighbour
    table are plain arrays and a fetch is one gather. Not thread-safe: the caller serialises calls.
    """

    def __init__(
        self,
        *,
        config: CacheConfig | None = None,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
    ) -> None:
        self.neighbours = neighbours
        self.exact_limit = exact_limit
        self._config: CacheConfig | None = None
        self._relations: RelationTable | None = None
        self._rebuilt_unsaved: set[int] = set()
        # Set by defend(): robust teachers, capped relations, trust (broker_server/defences.py); None: plain.
        self.defences: Defences | None = None
        self._devices: dict[str, DeviceRecord] = {}
        self._records: list[DeviceRecord] = []
        # Per device index: its local ids sorted, and the global row of each.
        self._lookup: list[tuple[np.ndarray, np.ndarray]] = []
        # Every sample's (device index << 32 | local id), sorted, and its global row: one search for a batch.
        self._keys = np.zeros(0, np.uint64)
        self._key_rows = np.zeros(0, np.int64)
        self._sample_devices = _Growable(np.int32)
        self._sample_ids = _Growable(np.uint32)
        self._labels = _Growable(np.uint16)
        self._hashes = _Growable(np.uint8, width=0)
        self._knowledge = _Growable(np.float32, width=0)
        self._versions = _Growable(np.int64, fill=-1)
        if config is not None:
            self._configure(config)

    # ------------------------------------------------------------ construction

    def _configure(self, config: CacheConfig) -> None:
        """Fix classes and hash layout; only possible while no sample exists."""
        self._config = config
        self._hashes = _Growable(np.uint8, width=config.hash_bytes)
        self._knowledge = _Growable(np.float32, width=config.classes)
        self._relations = RelationTable(kind=config.hash_kind, neighbours=self.neighbours, exact_limit=self.exact_limit)
        self._relations.policy = self.defences

    @classmethod
    def from_state(
        cls,
        state: StoredState,
        *,
        config: CacheConfig | None = None,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
    ) -> KnowledgeCache:
        """Rebuild memory from a store's state; relations are marked dirty, not built yet."""
        cache = cls(config=config, neighbours=neighbours, exact_limit=exact_limit)
        devices = state.devices
        if devices:
            configs = {CacheConfig(d.classes, d.hash_kind, d.hash_dim) for d in devices}
            if len(configs) != 1:
                raise ValueError(f"stored devices disagree on classes or hash layout: {configs}")
            stored = configs.pop()
            if config is not None and config != stored:
                raise ValueError(f"stored state has {stored}, the server was started with {config}")
            if config is None:
                cache._configure(stored)
            if [d.index for d in devices] != list(range(len(devices))):
                raise ValueError("stored device indices are not dense")
        count = state.rows.size
        if count:
            if cache._config is None or not np.array_equal(state.rows, np.arange(count)):
                raise ValueError("stored samples do not form dense rows of known devices")
            if state.hashes.shape != (count, cache._config.hash_bytes) or state.sample_devices.max() >= len(devices):
                raise ValueError("stored samples do not match the stored devices")
        cache._records = list(devices)
        cache._devices = {d.device: d for d in devices}
        cache._append_samples(
            devices=state.sample_devices, ids=state.sample_ids, labels=state.labels, hashes=state.hashes
        )
        order = np.lexsort((state.sample_ids, state.sample_devices))
        bounds = np.cumsum(np.bincount(state.sample_devices, minlength=len(devices)))[:-1]
        cache._lookup = (
            [(state.sample_ids[part], part.astype(np.int64)) for part in np.split(order, bounds)] if devices else []
        )
        cache._keys = _sample_keys(state.sample_devices[order], state.sample_ids[order])
        cache._key_rows = order.astype(np.int64)
        if state.knowledge_rows.size:
            rows = state.knowledge_rows
            if rows.max() >= count or state.knowledge_logits.shape != (rows.size, cache.classes):
                raise ValueError("stored knowledge does not match the stored samples")
            cache._knowledge.view[rows] = state.knowledge_logits
            cache._versions.view[rows] = state.knowledge_versions
        if cache._relations is not None:
            cache._relations.mark_dirty(cache._labels.view)
        return cache

    def defend(self, config: DefenceConfig | None = None) -> Defences:
        """Serve with defences from now on: every class related again under their policy, evidence taken
        from the knowledge held. Relations built under the policy are not handed to the store (it keeps
        plain relations, which a restart without defences may reuse), and stored ones are not restored.
        """
        self.defences = Defences(config)
        if self._relations is not None:
            self._relations.policy = self.defences
            self._relations.mark_dirty(self._labels.view)
            self.refresh_relations()
        return self.defences

    def _observe(self, rows: np.ndarray, logits: np.ndarray, *, every_row: bool = False) -> None:
        """Hand freshly applied knowledge to the defences' trust evidence (`every_row`: see Defences.observe)."""
        if self.defences is not None and self._relations is not None:
            self.refresh_relations(rows)  # the consensus needs the rows' neighbours, as their next fetch would
            self.defences.observe(
                rows=rows, logits=logits, labels=self._labels.view, owners=self._sample_devices.view,
                knowledge=self._knowledge.view, table=self._relations.table, versions=self._versions.view,
                devices=len(self._records), every_row=every_row,
            )  # fmt: skip

    # ------------------------------------------------------------ read access

    @property
    def config(self) -> CacheConfig | None:
        """Classes and hash layout, None until the first hello fixes them."""
        return self._config

    @property
    def classes(self) -> int:
        return self._config.classes if self._config else 0

    @property
    def size(self) -> int:
        """Number of registered samples (global rows)."""
        return len(self._labels)

    @property
    def devices(self) -> Mapping[str, DeviceRecord]:
        return MappingProxyType(self._devices)

    @property
    def relations(self) -> RelationTable | None:
        return self._relations

    @property
    def sample_devices(self) -> np.ndarray:
        return _readonly(self._sample_devices.view)

    @property
    def sample_ids(self) -> np.ndarray:
        return _readonly(self._sample_ids.view)

    @property
    def labels(self) -> np.ndarray:
        return _readonly(self._labels.view)

    @property
    def hashes(self) -> np.ndarray:
        return _readonly(self._hashes.view)

    @property
    def knowledge(self) -> np.ndarray:
        return _readonly(self._knowledge.view)

    @property
    def versions(self) -> np.ndarray:
        return _readonly(self._versions.view)

    def registered(self, device: str) -> int:
        """How many samples a device has registered (0 for an unknown device)."""
        record = self._devices.get(device)
        return 0 if record is None else int(self._lookup[record.index][0].size)

    def stats(self) -> CacheStats:
        return CacheStats(
            devices=len(self._records),
            samples=self.size,
            with_knowledge=int(np.count_nonzero(self._versions.view >= 0)),
            dirty_classes=len(self._relations.dirty) if self._relations else 0,
        )

    # ------------------------------------------------------------ devices and samples

    def record(self, device: str) -> DeviceRecord:
        """The device's record; a device must say hello before anything else."""
        record = self._devices.get(device)
        if record is None:
            raise Rejected(ErrorCode.UNKNOWN_DEVICE, f"device '{device}' has not said hello")
        return record

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
        """Admit or re-admit a device; the first hello fixes the server's classes and hash layout."""
        config = self._config or CacheConfig(classes=classes, hash_kind=hash_kind, hash_dim=hash_dim)
        if classes != config.classes:
            raise Rejected(ErrorCode.CLASS_MISMATCH, f"device has {classes} classes, the server {config.classes}")
        if hash_kind is not config.hash_kind or hash_dim != config.hash_dim:
            raise Rejected(
                ErrorCode.HASH_MISMATCH,
                f"device hashes are {hash_kind.value}/{hash_dim}, "
                f"the server's {config.hash_kind.value}/{config.hash_dim}",
            )
        registered = self.registered(device)
        if samples < registered:
            raise Rejected(ErrorCode.BAD_SHAPE, f"device declares {samples} samples but has registered {registered}")
        existing = self._devices.get(device)
        record = DeviceRecord(
            index=existing.index if existing else len(self._records),
            device=device,
            model=model,
            classes=classes,
            samples=samples,
            hash_kind=hash_kind,
            hash_dim=hash_dim,
        )
        if self._config is None:
            self._configure(config)
        if existing is None:
            self._records.append(record)
            self._lookup.append((np.zeros(0, np.uint32), np.zeros(0, np.int64)))
        elif record != existing:
            self._records[record.index] = record
        self._devices[device] = record
        return Admission(record=record, changed=record != existing, registered=registered)

    def register(
        self,
        *,
        device: str,
        ids: np.ndarray,
        labels: np.ndarray,
        hashes: np.ndarray,
    ) -> Registration:
        """Add a device's samples; repeating an identical registration is a no-op that still counts as accepted."""
        record = self.record(device)
        config = self._config
        assert config is not None  # a known device implies a configured server
        ids = np.asarray(ids, dtype=np.uint32)
        labels = np.asarray(labels)
        hashes = np.asarray(hashes, dtype=np.uint8)
        self._check_samples(config, ids=ids, labels=labels, hashes=hashes)
        rows, known = self._find(record.index, ids)
        if known.any():
            old = rows[known]
            changed = (self._labels.view[old] != labels[known]) | np.any(
                self._hashes.view[old] != hashes[known], axis=1
            )
            if changed.any():
                raise Rejected(
                    ErrorCode.HASH_MISMATCH,
                    f"sample ids already registered with another label or hash: {_shown(ids[known][changed])}",
                )
        fresh = ~known
        added = int(np.count_nonzero(fresh))
        registered = int(self._lookup[record.index][0].size)
        if registered + added > record.samples:
            raise Rejected(
                ErrorCode.BAD_SHAPE,
                f"registering {added} more samples exceeds the {record.samples} declared in hello ({registered} held)",
            )
        new_rows = np.arange(self.size, self.size + added, dtype=np.int64)
        self._append_samples(
            devices=np.full(added, record.index, np.int32), ids=ids[fresh], labels=labels[fresh], hashes=hashes[fresh]
        )
        old_ids, old_rows = self._lookup[record.index]
        merged_ids = np.concatenate([old_ids, ids[fresh]])
        order = np.argsort(merged_ids, kind="stable")
        self._lookup[record.index] = (merged_ids[order], np.concatenate([old_rows, new_rows])[order])
        if added:
            keys = _sample_keys(np.full(added, record.index), ids[fresh])
            by_key = np.argsort(keys)
            at = np.searchsorted(self._keys, keys[by_key])
            self._keys = np.insert(self._keys, at, keys[by_key])
            self._key_rows = np.insert(self._key_rows, at, new_rows[by_key])
        if self._relations is not None:
            self._relations.mark_dirty(labels[fresh])
        return Registration(accepted=int(ids.size), registered=registered + added, fresh=fresh, new_rows=new_rows)

    def _check_samples(self, config: CacheConfig, *, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> None:
        if ids.ndim != 1 or labels.shape != ids.shape or hashes.ndim != 2 or hashes.shape[0] != ids.size:
            raise Rejected(ErrorCode.BAD_SHAPE, "ids, labels and hashes must have one entry per sample")
        if hashes.shape[1] != config.hash_bytes:
            raise Rejected(
                ErrorCode.HASH_MISMATCH, f"hashes have {hashes.shape[1]} bytes, the server expects {config.hash_bytes}"
            )
        if np.unique(ids).size != ids.size:
            raise Rejected(ErrorCode.BAD_SHAPE, "a sample id is repeated")
        if labels.size and (labels.min() < 0 or labels.max() >= config.classes):
            raise Rejected(ErrorCode.BAD_SHAPE, f"labels must lie in [0, {config.classes})")
        if config.hash_kind is HashKind.FLOAT16 and not np.all(np.isfinite(np.ascontiguousarray(hashes).view("<f2"))):
            raise Rejected(ErrorCode.NON_FINITE, "float16 hashes hold NaN or infinite values")

    def _append_samples(self, *, devices: np.ndarray, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> None:
        count = len(ids)
        self._sample_devices.extend(devices)
        self._sample_ids.extend(ids)
        self._labels.extend(labels)
        self._hashes.extend(hashes)
        self._knowledge.extend(np.zeros((count, self.classes), np.float32))
        self._versions.extend(np.full(count, -1, np.int64))

    def _find(self, index: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows of a device's local ids and which of them are known (rows of unknown ones are junk)."""
        sorted_ids, sorted_rows = self._lookup[index]
        if sorted_ids.size == 0:
            return np.zeros(ids.size, np.int64), np.zeros(ids.size, bool)
        at = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
        return sorted_rows[at], sorted_ids[at] == ids

    def rows_of(self, device: str, ids: np.ndarray) -> np.ndarray:
        """Global rows of a device's local sample ids; every id must be registered."""
        record = self.record(device)
        ids = np.asarray(ids, dtype=np.uint32)
        rows, known = self._find(record.index, ids)
        if not known.all():
            raise Rejected(ErrorCode.UNKNOWN_SAMPLE, f"sample ids not registered: {_shown(ids[~known])}")
        return rows

    def rows_many(self, devices: Sequence[str], ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of several messages' ids in one search: `counts[i]` of `ids` belong to `devices[i]`.

        Returns one row per id and, per message, whether rows_of() would answer it (device known, every id
        registered); an unresolved message's rows are junk.
        """
        indices = np.fromiter(
            (record.index if (record := self._devices.get(device)) else _NO_DEVICE for device in devices),
            np.uint64,
            len(devices),
        )
        ids = np.asarray(ids, dtype=np.uint32)
        counts = np.asarray(counts, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(0, np.int64), indices != _NO_DEVICE
        if self._keys.size == 0:
            return np.zeros(ids.size, np.int64), (indices != _NO_DEVICE) & (counts == 0)
        keys = (np.repeat(indices, counts) << np.uint64(32)) | ids
        at = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        found = self._keys[at] == keys
        if found.all():  # the usual batch: every id registered (a known device's; only one without ids may not be)
            return self._key_rows[at], indices != _NO_DEVICE
        missing = np.bincount(np.repeat(np.arange(len(devices)), counts)[~found], minlength=len(devices))
        return self._key_rows[at], (indices != _NO_DEVICE) & (missing == 0)

    def samples_of(self, device: str) -> tuple[np.ndarray, np.ndarray]:
        """A device's registered sample ids, ascending, and the global row of each (copies)."""
        sorted_ids, sorted_rows = self._lookup[self.record(device).index]
        return sorted_ids.copy(), sorted_rows.copy()

    # ------------------------------------------------------------ knowledge

    def check_update(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> None:
        """Validate an update without applying it (so a combined request can be checked as a whole)."""
        if logits.ndim != 2 or logits.shape[1] != self.classes:
            raise Rejected(
                ErrorCode.CLASS_MISMATCH, f"logits have shape {logits.shape}, the server has {self.classes} classes"
            )
        if logits.shape[0] != rows.size:
            raise Rejected(ErrorCode.BAD_SHAPE, f"{rows.size} ids but {logits.shape[0]} logit rows")
        if version < 0:
            raise Rejected(ErrorCode.BAD_SCHEMA, f"version {version} is negative")
        if not np.all(np.isfinite(logits)):
            raise Rejected(ErrorCode.NON_FINITE, "logits hold NaN or infinite values")

    def apply_update(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> np.ndarray:
        """Store logits where `version` is newer than what a row holds; returns the applied mask.

        Equal versions are ignored, so redelivered or duplicated updates change nothing, and an
        older version never overwrites a newer one.
        """
        rows = np.asarray(rows, dtype=np.int64)
        logits = np.asarray(logits, dtype=np.float32)
        self.check_update(rows=rows, logits=logits, version=version)
        newer: np.ndarray = version > self._versions.view[rows]
        chosen = rows[newer]
        self._knowledge.view[chosen] = logits[newer]
        self._versions.view[chosen] = version
        self._observe(chosen, logits[newer])
        return newer

    def apply_updates(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Several updates at once, entry by entry in order: row i takes logits[i] when versions[i] is newer.

        A row that appears twice is compared the second time with what the first entry left, exactly as
        separate apply_update() calls would; the whole batch is validated before anything changes. With
        defences on, the rows the batch changed then give their evidence once, from what they hold now, each
        compared with its consensus (as the requests' own updates of up to consensus_rows rows would be).
        """
        rows = np.asarray(rows, dtype=np.int64)
        logits = np.asarray(logits, dtype=np.float32)
        versions = np.asarray(versions, dtype=np.int64)
        if versions.shape != rows.shape:
            raise Rejected(ErrorCode.BAD_SHAPE, f"{rows.size} rows but {versions.size} versions")
        self.check_update(rows=rows, logits=logits, version=int(versions.min()) if versions.size else 0)
        applied = self._apply_entries(rows=rows, logits=logits, versions=versions)
        if self.defences is not None and applied.any():
            changed = np.unique(rows[applied])
            self._observe(changed, self._knowledge.view[changed], every_row=True)
        return applied

    def _apply_entries(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """apply_updates' version-guarded writes, entry by entry in order (validated by the caller)."""
        held = self._versions.view
        ordered = np.sort(rows)
        if not (ordered[1:] == ordered[:-1]).any():  # no row twice: all at once
            newer: np.ndarray = versions > held[rows]
            chosen = rows[newer]
            self._knowledge.view[chosen] = logits[newer]
            held[chosen] = versions[newer]
            return newer
        knowledge = self._knowledge.view
        applied = np.zeros(rows.size, bool)
        for entry, (row, version) in enumerate(zip(rows.tolist(), versions.tolist(), strict=True)):
            if version > held[row]:
                knowledge[row] = logits[entry]
                held[row] = version
                applied[entry] = True
        return applied

    def refresh_relations(self, rows: np.ndarray | None = None) -> tuple[int, ...]:
        """Rebuild dirty classes (only those of `rows` when given); returns the classes rebuilt."""
        if self._relations is None or not self._relations.dirty:
            return ()
        labels = self._labels.view
        classes = None if rows is None else np.unique(labels[rows]).tolist()
        owners = self._sample_devices.view if self.defences is not None else None
        rebuilt = self._relations.refresh(labels=labels, hashes=self._hashes.view, classes=classes, owners=owners)
        if self.defences is None:
            self._rebuilt_unsaved.update(rebuilt)
        elif rows is None:
            self.defences.settle(
                labels=labels, owners=self._sample_devices.view, knowledge=self._knowledge.view,
                table=self._relations.table, versions=self._versions.view, devices=len(self._records),
            )  # fmt: skip
        return rebuilt

    def take_rebuilt_relations(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Classes rebuilt since the last call, as (rows, neighbour rows), for the store to keep."""
        if self._relations is None:
            return {}
        labels = self._labels.view
        # A class that gained rows since its rebuild is dirty again: it is saved after its next rebuild.
        current = self._rebuilt_unsaved - self._relations.dirty
        taken = {label: self._relations.relation_of(label=label, labels=labels) for label in sorted(current)}
        self._rebuilt_unsaved.clear()
        return taken

    def restore_relations(self, stored: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[int, ...]:
        """Take the stored relations that still match their classes' rows; returns the classes restored."""
        if self._relations is None or self.defences is not None:
            return ()
        labels = self._labels.view
        restored = [
            label
            for label, (rows, table) in sorted(stored.items())
            if label in self._relations.dirty
            and self._relations.restore(label=label, rows=rows, labels=labels, table=table)
        ]
        return tuple(restored)

    def fetch(self, rows: np.ndarray, *, raw: bool = False) -> Teachers:
        """Mean latest logits of each row's neighbours that hold knowledge, plus how many contributed.

        One gather over the neighbour table and a masked mean; rows whose classes gained samples are
        re-related first. `raw` skips the mean and returns each contributing neighbour's logits.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0 or self._relations is None:
            return Teachers(counts=np.zeros(rows.size, np.uint16), logits=np.zeros((0, self.classes), np.float32))
        self.refresh_relations(rows)
        neighbours = self._relations.neighbours_of(rows)
        present = neighbours >= 0
        safe = np.where(present, neighbours, 0)
        contributing = present & (self._versions.view[safe] >= 0)
        if self.defences is not None:
            return self.defences.teachers(
                knowledge=self._knowledge.view, owners=self._sample_devices.view, neighbours=safe,
                contributing=contributing, devices=len(self._records), raw=raw, gather_limit=FETCH_GATHER_LIMIT,
            )  # fmt: skip
        counts = contributing.sum(axis=1)
        if raw:  # boolean indexing walks row by row: each row's contributors, in neighbour order
            return Teachers(counts=counts.astype(np.uint16), logits=self._knowledge.view[safe[contributing]].copy())
        teach = np.flatnonzero(counts)
        return Teachers(
            counts=counts.astype(np.uint16),
            logits=self._masked_mean(safe[teach], contributing[teach].astype(np.float32), counts[teach]),
        )

    def _masked_mean(self, neighbours: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Weighted mean of gathered knowledge rows, sliced only when the gather would be huge."""
        knowledge = self._knowledge.view
        out = np.empty((neighbours.shape[0], self.classes), np.float32)
        step = max(1, FETCH_GATHER_LIMIT // max(1, neighbours.shape[1] * self.classes))
        for start in range(0, neighbours.shape[0], step):
            stop = start + step
            sums = np.einsum("nr,nrc->nc", weights[start:stop], knowledge[neighbours[start:stop]])
            out[start:stop] = sums / counts[start:stop, None]
        return out
