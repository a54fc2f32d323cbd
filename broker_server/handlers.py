"""Turns validated FedCache requests into replies: mutates the cache, stages writes, knows nothing of MQTT."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np

from broker_server.cache import CacheConfig, KnowledgeCache, Rejected, Teachers
from broker_server.fd import FdAggregate
from broker_server.fedavg import DEFAULT_ROUND_TIMEOUT_S, FedAvgRounds
from broker_server.relations import EXACT_SEARCH_LIMIT
from broker_server.store import StateStore, open_store
from fedwire.codec import model_part_bounds, model_parts
from fedwire.constants import DEFAULT_NEIGHBOURS, MAX_PAYLOAD_BYTES, ErrorCode, TeacherForm
from fedwire.messages import (
    ErrorReply,
    FdGlobal,
    FdUpdate,
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
    ModelAck,
    ModelGet,
    ModelPut,
    ModelState,
    Register,
    RegisterAck,
    Reply,
    Request,
    Update,
    UpdateAck,
    UpdateFetch,
)

# A raw reply (every neighbour's row) must fit one message whatever the encoding: at most float32 values plus
# int8's per-row scale, for R rows per requested id, within half the payload limit (the rest is envelope).
RAW_REPLY_BUDGET_BYTES = MAX_PAYLOAD_BYTES // 2


class CacheService:
    """The cache server without transport: `handle()` answers one request, `commit()` makes answers durable.

    Replies may be published right away, but the glue must acknowledge the requests to the broker
    only after commit(): a crash in between then leads to redelivery, which is harmless because
    registration and updates are idempotent. A rejected request leaves memory and store untouched.
    Not thread-safe: the caller serialises handle() and commit().
    """

    def __init__(
        self,
        *,
        cache: KnowledgeCache,
        store: StateStore,
        round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
        min_participants: int = 0,
    ) -> None:
        self.cache = cache
        self.store = store
        # The comparison's baselines (docs/protocol.md §16) share hello and the deployment's class count.
        self.fd = FdAggregate()
        self.fedavg = FedAvgRounds(round_timeout_s=round_timeout_s, min_participants=min_participants)

    @classmethod
    def open(
        cls,
        data_dir: Path | None,
        *,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
        config: CacheConfig | None = None,
        round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
        min_participants: int = 0,
    ) -> CacheService:
        """Load what `data_dir` holds (in-memory when None) and build every class's relations."""
        store = open_store(data_dir)
        try:
            cache = KnowledgeCache.from_state(
                store.load(), config=config, neighbours=neighbours, exact_limit=exact_limit
            )
            cache.restore_relations(store.load_relations())
            cache.refresh_relations()
            _stage_relations(store, cache)
            store.commit()
        except BaseException:
            store.close()
            raise
        return cls(cache=cache, store=store, round_timeout_s=round_timeout_s, min_participants=min_participants)

    def __enter__(self) -> CacheService:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ API for the glue

    def handle(self, request: Request) -> Reply:
        """Answer one request; rule violations become an ErrorReply, anything else (a bug) propagates."""
        try:
            match request:
                case Hello():
                    return self._hello(request)
                case Register():
                    return self._register(request)
                case Fetch():
                    return self._fetch(request)
                case Update():
                    return self._update(request)
                case UpdateFetch():
                    return self._update_fetch(request)
                case FdUpdate():
                    return self._fd_update(request)
                case ModelPut():
                    return self._model_put(request)
                case ModelGet():
                    return self._model_get(request)
        except Rejected as rejection:
            return ErrorReply(
                device=request.device,
                cid=request.cid,
                code=rejection.code,
                message=rejection.detail,
                request=request.kind.value,
            )
        raise TypeError(f"not a request: {type(request).__name__}")

    def commit(self) -> None:
        """Make every write staged by handle() durable, with the relations rebuilt since the last commit."""
        _stage_relations(self.store, self.cache)
        self.store.commit()

    def stats(self) -> dict[str, float]:
        """devices, samples, with_knowledge, dirty_classes and cache_fill, for a metrics endpoint."""
        return self.cache.stats().as_dict()

    def close(self) -> None:
        """Close the store; writes not committed are dropped (their requests were never acknowledged)."""
        self.store.close()

    # ------------------------------------------------------------ one method per request kind

    def _hello(self, request: Hello) -> HelloAck:
        admission = self.cache.hello(
            device=request.device,
            model=request.model,
            classes=request.classes,
            samples=request.samples,
            hash_kind=request.hash_kind,
            hash_dim=request.hash_dim,
        )
        if admission.changed:
            self.store.save_device(admission.record)
        if "fedavg" in request.capabilities:
            self.fedavg.join(request.device)
        return HelloAck(
            device=request.device,
            cid=request.cid,
            registered=admission.registered,
            neighbours=self.cache.neighbours,
        )

    def _register(self, request: Register) -> RegisterAck:
        registration = self.cache.register(
            device=request.device, ids=request.ids, labels=request.labels, hashes=request.hashes
        )
        if registration.new_rows.size:
            fresh = registration.fresh
            self.store.save_samples(
                rows=registration.new_rows,
                device=self.cache.record(request.device).index,
                ids=np.asarray(request.ids)[fresh],
                labels=np.asarray(request.labels)[fresh],
                hashes=np.asarray(request.hashes)[fresh],
            )
        return RegisterAck(
            device=request.device,
            cid=request.cid,
            accepted=registration.accepted,
            registered=registration.registered,
        )

    def _fetch(self, request: Fetch) -> Knowledge:
        rows = self.cache.rows_of(request.device, request.ids)
        raw = self._wants_raw(request, request.ids.size)
        return self._knowledge(request, ids=request.ids, teachers=self.cache.fetch(rows, raw=raw))

    def _update(self, request: Update) -> UpdateAck:
        rows = self.cache.rows_of(request.device, request.ids)
        applied, stale = self._apply(rows=rows, logits=request.logits, version=request.version)
        return UpdateAck(device=request.device, cid=request.cid, applied=applied, stale=stale)

    def _update_fetch(self, request: UpdateFetch) -> Knowledge:
        # Validate both halves before applying anything, so a bad fetch id cannot leave the update applied.
        rows = self.cache.rows_of(request.device, request.ids)
        fetch_rows = self.cache.rows_of(request.device, request.fetch_ids)
        raw = self._wants_raw(request, request.fetch_ids.size)
        applied, stale = self._apply(rows=rows, logits=request.logits, version=request.version)
        teachers = self.cache.fetch(fetch_rows, raw=raw)
        return self._knowledge(request, ids=request.fetch_ids, teachers=teachers, applied=applied, stale=stale)

    def _fd_update(self, request: FdUpdate) -> FdGlobal:
        self.cache.record(request.device)  # unknown_device before anything else
        applied = self.fd.update(
            device=request.device,
            classes=self.cache.classes,
            logits=request.logits,
            counts=request.class_counts,
            version=request.version,
        )
        teacher = self.fd.teacher_for(device=request.device, classes=self.cache.classes)
        return FdGlobal(
            device=request.device,
            cid=request.cid,
            logits=teacher.logits,
            class_counts=teacher.counts,
            encoding=request.encoding,
            applied=int(applied),
        )

    def _model_put(self, request: ModelPut) -> ModelAck:
        self.cache.record(request.device)
        ack = self.fedavg.put(
            device=request.device,
            round_=request.round,
            model=request.model,
            samples=request.samples,
            size=request.size,
            part=request.part,
            params=request.params,
        )
        return ModelAck(device=request.device, cid=request.cid, round=ack.open_round, accepted=int(ack.accepted))

    def _model_get(self, request: ModelGet) -> ModelState:
        self.cache.record(request.device)
        model = self.fedavg.get(request.round)
        if model is None:
            empty = np.zeros(0, np.float32)
            return ModelState(
                device=request.device,
                cid=request.cid,
                round=self.fedavg.open_round,
                ready=0,
                participants=0,
                size=0,
                part=0,
                params=empty,
            )
        size = int(model.params.size)
        if request.part >= model_parts(size):
            raise Rejected(ErrorCode.BAD_SHAPE, f"part {request.part} of a {size}-float model of {model_parts(size)}")
        start, stop = model_part_bounds(size, request.part)
        return ModelState(
            device=request.device,
            cid=request.cid,
            round=model.round,
            ready=1,
            participants=model.participants,
            size=size,
            part=request.part,
            params=model.params[start:stop],
        )

    # ------------------------------------------------------------ helpers

    def _wants_raw(self, request: Fetch | UpdateFetch, ids: int) -> bool:
        """Whether to send each neighbour's row; refused when R rows per id could overflow one reply."""
        if request.teacher is TeacherForm.MEAN:
            return False
        worst = ids * self.cache.neighbours * (self.cache.classes * 4 + 4)
        if worst > RAW_REPLY_BUDGET_BYTES:
            raise Rejected(
                ErrorCode.TOO_LARGE,
                f"a raw reply for {ids} ids could carry {worst} bytes of logits (budget {RAW_REPLY_BUDGET_BYTES}): "
                "fetch fewer ids per message or ask for the mean",
            )
        return True

    def _apply(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> tuple[int, int]:
        """Apply an update in memory and stage the rows that changed; returns (applied, stale)."""
        applied = self.cache.apply_update(rows=rows, logits=logits, version=version)
        count = int(np.count_nonzero(applied))
        if count:
            self.store.save_knowledge(
                rows=rows[applied],
                logits=np.asarray(logits, dtype=np.float32)[applied],
                versions=np.full(count, version, np.int64),
            )
        return count, int(rows.size) - count

    @staticmethod
    def _knowledge(
        request: Fetch | UpdateFetch,
        *,
        ids: np.ndarray,
        teachers: Teachers,
        applied: int = 0,
        stale: int = 0,
    ) -> Knowledge:
        return Knowledge(
            device=request.device,
            cid=request.cid,
            ids=np.asarray(ids, dtype=np.uint32),
            counts=teachers.counts,
            logits=teachers.logits,
            encoding=request.encoding,
            applied=applied,
            stale=stale,
            teacher=request.teacher,
        )


def _stage_relations(store: StateStore, cache: KnowledgeCache) -> None:
    """Stage every relation the cache rebuilt since the last call, so a restart reuses it."""
    for label, (rows, neighbour_rows) in cache.take_rebuilt_relations().items():
        store.save_relation(label=label, rows=rows, neighbour_rows=neighbour_rows)
