"""FedCache's request handlers: plain functions from the knowledge state and a validated request to a reply."""

from __future__ import annotations

import numpy as np

from broker_server.algorithm import Algorithm
from broker_server.records import Rejected, Teachers
from broker_server.state import KnowledgeState
from fedwire.constants import MAX_PAYLOAD_BYTES, ErrorCode, TeacherForm
from fedwire.messages import (
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
    Register,
    RegisterAck,
    Update,
    UpdateAck,
    UpdateFetch,
)

# A raw reply (every neighbour's row) must fit one message whatever the encoding: at most float32 values plus
# int8's per-row scale, for R rows per requested id, within half the payload limit (the rest is envelope).
RAW_REPLY_BUDGET_BYTES = MAX_PAYLOAD_BYTES // 2


def hello(state: KnowledgeState, request: Hello) -> HelloAck:
    """Admit the device; the reply says how many samples it has registered and the server's R."""
    admission = state.hello(
        device=request.device,
        model=request.model,
        classes=request.classes,
        samples=request.samples,
        hash_kind=request.hash_kind,
        hash_dim=request.hash_dim,
    )
    return HelloAck(
        device=request.device, cid=request.cid, registered=admission.registered, neighbours=state.neighbours
    )


def register(state: KnowledgeState, request: Register) -> RegisterAck:
    """Add one chunk of the device's samples."""
    registration = state.register(device=request.device, ids=request.ids, labels=request.labels, hashes=request.hashes)
    return RegisterAck(
        device=request.device, cid=request.cid, accepted=registration.accepted, registered=registration.registered
    )


def fetch(state: KnowledgeState, request: Fetch) -> Knowledge:
    """Teachers for the requested samples."""
    rows = state.rows(request.device, request.ids)
    raw = _wants_raw(state, request, request.ids.size)
    return _knowledge(request, ids=request.ids, teachers=state.fetch(rows, raw=raw))


def update(state: KnowledgeState, request: Update) -> UpdateAck:
    """Apply the device's logits where its version is newer."""
    rows = state.rows(request.device, request.ids)
    applied, stale = _apply(state, rows=rows, logits=request.logits, version=request.version)
    return UpdateAck(device=request.device, cid=request.cid, applied=applied, stale=stale)


def update_fetch(state: KnowledgeState, request: UpdateFetch) -> Knowledge:
    """An update, then a fetch that sees it; both halves are validated before anything is applied."""
    rows = state.rows(request.device, request.ids)
    fetch_rows = state.rows(request.device, request.fetch_ids)
    raw = _wants_raw(state, request, request.fetch_ids.size)
    applied, stale = _apply(state, rows=rows, logits=request.logits, version=request.version)
    teachers = state.fetch(fetch_rows, raw=raw)
    return _knowledge(request, ids=request.fetch_ids, teachers=teachers, applied=applied, stale=stale)


def _wants_raw(state: KnowledgeState, request: Fetch | UpdateFetch, ids: int) -> bool:
    """Whether to send each neighbour's row; refused when R rows per id could overflow one reply."""
    if request.teacher is TeacherForm.MEAN:
        return False
    worst = ids * state.neighbours * (state.classes * 4 + 4)
    if worst > RAW_REPLY_BUDGET_BYTES:
        raise Rejected(
            ErrorCode.TOO_LARGE,
            f"a raw reply for {ids} ids could carry {worst} bytes of logits (budget {RAW_REPLY_BUDGET_BYTES}): "
            "fetch fewer ids per message or ask for the mean",
        )
    return True


def _apply(state: KnowledgeState, *, rows: np.ndarray, logits: np.ndarray, version: int) -> tuple[int, int]:
    """Apply an update; returns (applied, stale) counts."""
    applied = int(np.count_nonzero(state.apply_update(rows=rows, logits=logits, version=version)))
    return applied, int(rows.size) - applied


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


def _itself(state: KnowledgeState) -> KnowledgeState:
    return state


FEDCACHE: Algorithm[KnowledgeState] = Algorithm(
    name="fedcache",
    handlers={Hello: hello, Register: register, Fetch: fetch, Update: update, UpdateFetch: update_fetch},
    new_state=_itself,
)
