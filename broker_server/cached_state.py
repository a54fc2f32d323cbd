"""The default knowledge state: served from an in-memory KnowledgeCache, made durable through a StateStore."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from broker_server.cache import CacheConfig, KnowledgeCache
from broker_server.records import Admission, CacheStats, DeviceKnowledge, DeviceRecord, Registration, Teachers
from broker_server.relations import EXACT_SEARCH_LIMIT
from broker_server.state import KnowledgeState
from broker_server.store import StateStore
from fedwire.constants import DEFAULT_NEIGHBOURS, HashKind


class ReadOnlyState(RuntimeError):
    """A change asked of a state opened for reading only."""


class CachedState(KnowledgeState):
    """Every read from memory (the vectorised fetch), every change staged in the store and committed together.

    The cache validates a request fully before changing memory, and the store is written only after
    the cache accepted it, so a rejection touches neither.
    """

    def __init__(self, *, cache: KnowledgeCache, store: StateStore, read_only: bool = False) -> None:
        self.cache = cache
        self.store = store
        self.read_only = read_only

    @classmethod
    def open(
        cls,
        store: StateStore,
        *,
        config: CacheConfig | None = None,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
        read_only: bool = False,
    ) -> CachedState:
        """Load what `store` committed; unless `read_only`, build every class's relations and store them.

        Relations the store kept for exactly a class's current rows are reused instead of rebuilt. The
        state owns `store` from here on: closing the state closes it, also when opening fails.
        """
        try:
            cache = KnowledgeCache.from_state(
                store.load(), config=config, neighbours=neighbours, exact_limit=exact_limit
            )
            state = cls(cache=cache, store=store, read_only=read_only)
            if not read_only:
                cache.restore_relations(store.load_relations())
                cache.refresh_relations()
                state.commit()
        except BaseException:
            store.close()
            raise
        return state

    @property
    def neighbours(self) -> int:
        return self.cache.neighbours

    @property
    def classes(self) -> int:
        return self.cache.classes

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
        self._check_writable()
        admission = self.cache.hello(
            device=device, model=model, classes=classes, samples=samples, hash_kind=hash_kind, hash_dim=hash_dim
        )
        if admission.changed:
            self.store.save_device(admission.record)
        return admission

    def register(self, *, device: str, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> Registration:
        self._check_writable()
        registration = self.cache.register(device=device, ids=ids, labels=labels, hashes=hashes)
        if registration.new_rows.size:
            fresh = registration.fresh
            self.store.save_samples(
                rows=registration.new_rows,
                device=self.cache.record(device).index,
                ids=np.asarray(ids)[fresh],
                labels=np.asarray(labels)[fresh],
                hashes=np.asarray(hashes)[fresh],
            )
        return registration

    def record(self, device: str) -> DeviceRecord:
        return self.cache.record(device)

    def rows(self, device: str, ids: np.ndarray) -> np.ndarray:
        return self.cache.rows_of(device, ids)

    def apply_update(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> np.ndarray:
        self._check_writable()
        rows = np.asarray(rows, dtype=np.int64)
        applied = self.cache.apply_update(rows=rows, logits=logits, version=version)
        count = int(np.count_nonzero(applied))
        if count:
            self.store.save_knowledge(
                rows=rows[applied],
                logits=np.asarray(logits, dtype=np.float32)[applied],
                versions=np.full(count, version, np.int64),
            )
        return applied

    @property
    def batchable(self) -> bool:
        """Always: with defences on, a batch's updates give their trust evidence once the batch is applied."""
        return True

    def rows_many(self, devices: Sequence[str], ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.cache.rows_many(devices, ids, counts)

    def apply_updates(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> np.ndarray:
        self._check_writable()
        rows = np.asarray(rows, dtype=np.int64)
        versions = np.asarray(versions, dtype=np.int64)
        applied = self.cache.apply_updates(rows=rows, logits=logits, versions=versions)
        if applied.any():
            self.store.save_knowledge(
                rows=rows[applied], logits=np.asarray(logits, dtype=np.float32)[applied], versions=versions[applied]
            )
        return applied

    def fetch(self, rows: np.ndarray, *, raw: bool = False) -> Teachers:
        return self.cache.fetch(rows, raw=raw)

    def held(self, device: str) -> DeviceKnowledge:
        ids, rows = self.cache.samples_of(device)
        versions = self.cache.versions[rows]
        holding = versions >= 0
        return DeviceKnowledge(
            registered=int(ids.size),
            ids=ids[holding],
            versions=versions[holding].copy(),
            logits=self.cache.knowledge[rows[holding]].copy(),
        )

    def devices(self) -> tuple[DeviceRecord, ...]:
        return tuple(sorted(self.cache.devices.values(), key=lambda record: record.index))

    def commit(self) -> None:
        """Stage the relations rebuilt since the last commit (a restart reuses them), then commit the store.

        A read-only state has nothing to commit: its relations are rebuilt in memory only.
        """
        if self.read_only:
            return
        for label, (rows, neighbour_rows) in self.cache.take_rebuilt_relations().items():
            self.store.save_relation(label=label, rows=rows, neighbour_rows=neighbour_rows)
        self.store.commit()

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def close(self) -> None:
        self.store.close()

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyState("this knowledge state was opened read-only")
