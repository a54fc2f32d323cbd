"""CacheService end to end without a broker: replies, rejections that change nothing, restarts, late joiners."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server import CacheConfig, CachedState, CacheService
from fedwire import (
    ErrorCode,
    ErrorReply,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    Register,
    RegisterAck,
    Request,
    TeacherForm,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    encode,
)

CLASSES = 4
HASH_DIM = 64
HASH_BYTES = HASH_DIM // 8
DECLARED = 48
REGISTERED = 40


def hello(device: str, *, cid: int = 1, samples: int = DECLARED, **changes: Any) -> Hello:
    fields: dict[str, Any] = {
        "model": "m",
        "classes": CLASSES,
        "samples": samples,
        "hash_kind": HashKind.BINARY,
        "hash_dim": HASH_DIM,
    }
    return Hello(device=device, cid=cid, **{**fields, **changes})


def samples_of(device_number: int, count: int = REGISTERED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (ids, labels, hashes) of one device; ids are sparse so they are not row positions."""
    rng = np.random.default_rng(100 + device_number)
    ids = (np.arange(count, dtype=np.uint32) * 3 + 7).astype(np.uint32)
    labels = rng.integers(0, CLASSES, size=count).astype(np.uint16)
    hashes = rng.integers(0, 256, size=(count, HASH_BYTES), dtype=np.uint8)
    return ids, labels, hashes


def register(device: str, number: int, *, cid: int = 2) -> Register:
    ids, labels, hashes = samples_of(number)
    return Register(device=device, cid=cid, ids=ids, labels=labels, hashes=hashes)


def logits_for(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, CLASSES)).astype(np.float32)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[CacheService]:
    """A SQLite-backed service holding two devices with knowledge, then a third registration pending rebuild."""
    with CacheService.open(tmp_path / "data") as running:
        for number in range(3):
            device = f"dev{number}"
            assert isinstance(running.handle(hello(device)), HelloAck)
            assert isinstance(running.handle(register(device, number)), RegisterAck)
        for number in range(2):
            ids = samples_of(number)[0]
            running.handle(
                Update(device=f"dev{number}", cid=3, ids=ids, logits=logits_for(ids.size, number), version=1)
            )
        running.handle(Fetch(device="dev0", cid=4, ids=samples_of(0)[0]))  # builds every class
        running.handle(hello("dev3"))
        running.handle(register("dev3", 3))  # leaves classes dirty, to catch a rejected fetch rebuilding them
        running.commit()
        yield running


def snapshot(service: CacheService) -> dict[str, Any]:
    """Everything observable about the state, in memory and in the store."""
    state = service.state
    assert isinstance(state, CachedState)
    cache = state.cache
    stored = state.store.load()
    relations = cache.relations
    assert relations is not None
    return {
        "config": cache.config,
        "devices": dict(cache.devices),
        "registered": {name: cache.registered(name) for name in cache.devices},
        "arrays": [
            cache.sample_devices.copy(),
            cache.sample_ids.copy(),
            cache.labels.copy(),
            cache.hashes.copy(),
            cache.knowledge.copy(),
            cache.versions.copy(),
            relations.table.copy(),
        ],
        "dirty": relations.dirty,
        "stored_devices": stored.devices,
        "stored_arrays": [
            stored.rows,
            stored.sample_devices,
            stored.sample_ids,
            stored.labels,
            stored.hashes,
            stored.knowledge_rows,
            stored.knowledge_logits,
            stored.knowledge_versions,
        ],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("config", "devices", "registered", "dirty", "stored_devices"):
        assert before[key] == after[key], key
    for key in ("arrays", "stored_arrays"):
        for old, new in zip(before[key], after[key], strict=True):
            np.testing.assert_array_equal(old, new)


def _ids(number: int) -> np.ndarray:
    return samples_of(number)[0]


def _bad_labels() -> Register:
    ids = np.array([1000, 1003], np.uint32)  # new ids, one with a label out of range
    hashes = np.zeros((2, HASH_BYTES), np.uint8)
    return Register(device="dev0", cid=9, ids=ids, labels=np.array([0, CLASSES], np.uint16), hashes=hashes)


def _too_many() -> Register:
    ids = np.arange(1000, 1000 + DECLARED - REGISTERED + 1, dtype=np.uint32)
    labels = np.zeros(ids.size, np.uint16)
    return Register(device="dev0", cid=9, ids=ids, labels=labels, hashes=np.zeros((ids.size, HASH_BYTES), np.uint8))


def _conflicting() -> Register:
    ids, labels, hashes = samples_of(0)
    return Register(device="dev0", cid=9, ids=ids, labels=(labels + 1) % CLASSES, hashes=hashes)


def _unknown_in(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([ids[:3], np.array([1], np.uint32)])  # 1 is never a registered id (7, 10, 13, ...)


REJECTIONS: dict[str, tuple[Callable[[], Request], ErrorCode]] = {
    "register before hello": (lambda: register("stranger", 5), ErrorCode.UNKNOWN_DEVICE),
    "fetch before hello": (lambda: Fetch(device="stranger", cid=9, ids=_ids(0)), ErrorCode.UNKNOWN_DEVICE),
    "update before hello": (
        lambda: Update(device="stranger", cid=9, ids=_ids(0), logits=logits_for(REGISTERED, 9), version=5),
        ErrorCode.UNKNOWN_DEVICE,
    ),
    "update_fetch before hello": (
        lambda: UpdateFetch(
            device="stranger", cid=9, ids=_ids(0), logits=logits_for(REGISTERED, 9), version=5, fetch_ids=_ids(0)
        ),
        ErrorCode.UNKNOWN_DEVICE,
    ),
    "hello with other classes": (lambda: hello("newcomer", classes=CLASSES + 1), ErrorCode.CLASS_MISMATCH),
    "hello with other hash kind": (lambda: hello("newcomer", hash_kind=HashKind.FLOAT16), ErrorCode.HASH_MISMATCH),
    "hello with other hash dim": (lambda: hello("newcomer", hash_dim=2 * HASH_DIM), ErrorCode.HASH_MISMATCH),
    "re-hello below registered": (lambda: hello("dev0", samples=REGISTERED - 1), ErrorCode.BAD_SHAPE),
    "register wrong hash bytes": (
        lambda: Register(
            device="dev0",
            cid=9,
            ids=np.array([1000], np.uint32),
            labels=np.zeros(1, np.uint16),
            hashes=np.zeros((1, HASH_BYTES + 1), np.uint8),
        ),
        ErrorCode.HASH_MISMATCH,
    ),
    "register label out of range": (_bad_labels, ErrorCode.BAD_SHAPE),
    "register beyond declared": (_too_many, ErrorCode.BAD_SHAPE),
    "register conflicting label": (_conflicting, ErrorCode.HASH_MISMATCH),
    "fetch unknown sample": (lambda: Fetch(device="dev0", cid=9, ids=_unknown_in(_ids(0))), ErrorCode.UNKNOWN_SAMPLE),
    "fetch other device's rows only": (
        lambda: Fetch(device="dev2", cid=9, ids=np.array([1], np.uint32)),
        ErrorCode.UNKNOWN_SAMPLE,
    ),
    "update unknown sample": (
        lambda: Update(device="dev0", cid=9, ids=_unknown_in(_ids(0)), logits=logits_for(4, 9), version=5),
        ErrorCode.UNKNOWN_SAMPLE,
    ),
    "update wrong logit width": (
        lambda: Update(
            device="dev0", cid=9, ids=_ids(0), logits=np.zeros((REGISTERED, CLASSES + 1), np.float32), version=5
        ),
        ErrorCode.CLASS_MISMATCH,
    ),
    "update_fetch valid update, unknown fetch id": (
        lambda: UpdateFetch(
            device="dev0",
            cid=9,
            ids=_ids(0),
            logits=logits_for(REGISTERED, 9),
            version=5,
            fetch_ids=_unknown_in(_ids(0)),
        ),
        ErrorCode.UNKNOWN_SAMPLE,
    ),
    "update_fetch wrong logit width": (
        lambda: UpdateFetch(
            device="dev3",
            cid=9,
            ids=_ids(3),
            logits=np.zeros((REGISTERED, CLASSES - 1), np.float32),
            version=5,
            fetch_ids=_ids(3),
        ),
        ErrorCode.CLASS_MISMATCH,
    ),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejection_changes_nothing(service: CacheService, case: str) -> None:
    make_request, code = REJECTIONS[case]
    request = make_request()
    before = snapshot(service)
    reply = service.handle(request)
    service.commit()
    assert isinstance(reply, ErrorReply), reply
    assert reply.code is code, reply.message
    assert (reply.device, reply.cid, reply.request) == (request.device, request.cid, request.kind.value)
    assert decode(encode(reply)).code is code
    assert_same(before, snapshot(service))


def test_float16_hashes_must_be_finite() -> None:
    with CacheService.open(None) as service:
        service.handle(hello("f", hash_kind=HashKind.FLOAT16, hash_dim=4))
        hashes = np.zeros((2, 4), np.float16)
        hashes[1, 2] = np.nan
        request = Register(
            device="f",
            cid=5,
            ids=np.arange(2, dtype=np.uint32),
            labels=np.zeros(2, np.uint16),
            hashes=hashes.view(np.uint8),
        )
        reply = service.handle(request)
        assert isinstance(reply, ErrorReply)
        assert reply.code is ErrorCode.NON_FINITE
        assert service.cache.size == 0


def test_happy_path_replies(tmp_path: Path) -> None:
    with CacheService.open(tmp_path / "data") as service:
        ack = service.handle(hello("a", cid=11))
        assert isinstance(ack, HelloAck)
        assert (ack.device, ack.cid, ack.registered, ack.neighbours) == ("a", 11, 0, 16)
        reg = service.handle(register("a", 0, cid=12))
        assert isinstance(reg, RegisterAck)
        assert (reg.cid, reg.accepted, reg.registered) == (12, REGISTERED, REGISTERED)
        again = service.handle(register("a", 0, cid=13))
        assert (again.accepted, again.registered) == (REGISTERED, REGISTERED)
        assert service.handle(hello("a")).registered == REGISTERED

        ids = _ids(0)
        empty = service.handle(Fetch(device="a", cid=14, ids=ids, encoding=LogitEncoding.INT8))
        assert isinstance(empty, Knowledge)
        assert empty.encoding is LogitEncoding.INT8
        assert np.all(empty.counts == 0) and empty.logits.shape == (0, CLASSES)

        first = service.handle(Update(device="a", cid=15, ids=ids, logits=logits_for(REGISTERED, 1), version=1))
        assert isinstance(first, UpdateAck)
        assert (first.cid, first.applied, first.stale) == (15, REGISTERED, 0)
        redelivered = service.handle(Update(device="a", cid=15, ids=ids, logits=logits_for(REGISTERED, 1), version=1))
        assert (redelivered.applied, redelivered.stale) == (0, REGISTERED)

        half = ids[: REGISTERED // 2]
        combined = service.handle(
            UpdateFetch(
                device="a",
                cid=16,
                ids=half,
                logits=logits_for(half.size, 2),
                version=2,
                fetch_ids=ids[::-1],
                encoding=LogitEncoding.FLOAT32,
            )
        )
        assert isinstance(combined, Knowledge)
        assert (combined.cid, combined.applied, combined.stale) == (16, half.size, 0)
        np.testing.assert_array_equal(combined.ids, ids[::-1])
        assert combined.encoding is LogitEncoding.FLOAT32
        # The fetch half sees the update half: compare against the definition over the stored table.
        cache = service.cache
        rows = cache.rows_of("a", ids[::-1])
        table = cache.relations.table[rows]
        expected_counts = ((table >= 0) & (cache.versions[np.maximum(table, 0)] >= 0)).sum(axis=1)
        np.testing.assert_array_equal(combined.counts, expected_counts)
        teachers = [cache.knowledge[row[row >= 0]].mean(axis=0) for row in table if (row >= 0).any()]
        np.testing.assert_allclose(combined.logits, np.array(teachers), rtol=1e-5, atol=1e-6)
        for reply in (ack, reg, empty, first, combined):
            assert type(decode(encode(reply))) is type(reply)
        service.commit()
        stats = service.stats()
        assert (stats["devices"], stats["samples"], stats["cache_fill"]) == (1, REGISTERED, 1.0)


def test_restart_restores_committed_state_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with CacheService.open(data_dir) as service:
        for number in range(2):
            service.handle(hello(f"d{number}"))
            service.handle(register(f"d{number}", number))
            ids = _ids(number)
            service.handle(Update(device=f"d{number}", cid=3, ids=ids, logits=logits_for(ids.size, number), version=4))
        service.commit()
        before = service.handle(Fetch(device="d0", cid=5, ids=_ids(0)))
        before_stats = service.stats()
        # Staged but never committed: lost on restart, as its request was never acknowledged.
        service.handle(Update(device="d1", cid=6, ids=_ids(1), logits=logits_for(REGISTERED, 7), version=9))
    with CacheService.open(data_dir) as service:
        assert service.stats() == before_stats
        assert service.cache.relations.dirty == frozenset()
        after = service.handle(Fetch(device="d0", cid=5, ids=_ids(0)))
        np.testing.assert_array_equal(after.counts, before.counts)
        np.testing.assert_allclose(after.logits, before.logits, rtol=1e-6)
        assert np.all(service.cache.versions == 4)
        assert service.handle(hello("d1")).registered == REGISTERED


def test_configured_server_rejects_other_first_hello() -> None:
    config = CacheConfig(classes=CLASSES, hash_kind=HashKind.FLOAT16, hash_dim=8)
    with CacheService.open(None, config=config) as service:
        reply = service.handle(hello("a"))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.HASH_MISMATCH
        assert not service.cache.devices


def test_late_device_marks_classes_dirty_and_gets_neighbours(tmp_path: Path) -> None:
    with CacheService.open(tmp_path / "data") as service:
        for number in range(2):
            service.handle(hello(f"early{number}"))
            service.handle(register(f"early{number}", number))
            ids = _ids(number)
            service.handle(Update(device=f"early{number}", cid=3, ids=ids, logits=logits_for(ids.size, 9), version=1))
        served = service.handle(Fetch(device="early0", cid=4, ids=_ids(0)))
        assert served.counts.min() > 0
        service.commit()
        relations = service.cache.relations
        assert relations.dirty == frozenset()
        table_before = relations.table.copy()

        # A new device joins while the others keep training.
        service.handle(hello("late"))
        service.handle(register("late", 7))
        late_labels = samples_of(7)[1]
        assert relations.dirty == frozenset(int(label) for label in np.unique(late_labels))
        reply = service.handle(Fetch(device="late", cid=5, ids=_ids(7)))
        assert relations.dirty == frozenset()
        rows = service.cache.rows_of("late", _ids(7))
        table = relations.table[rows]
        labels = service.cache.labels
        assert np.all(table >= 0)
        assert np.all(labels[table] == labels[rows][:, None])
        # The late samples' neighbours include early samples holding knowledge, so every one gets a teacher.
        assert np.all(reply.counts > 0)
        assert reply.logits.shape == (REGISTERED, CLASSES)
        # Late rows were appended after the early ones, whose neighbours may now include late samples.
        assert table_before.shape[0] == rows.min()
        early = np.arange(table_before.shape[0])
        assert np.all(labels[relations.table[early]] == labels[early][:, None])
        service.commit()


def test_raw_teacher_carries_each_neighbour_and_averages_to_the_mean(service: CacheService) -> None:
    """The raw variant sends every contributing neighbour's row; their per-id mean is the server's teacher."""
    ids = samples_of(1)[0]
    mean = service.handle(Fetch(device="dev1", cid=20, ids=ids))
    raw = service.handle(Fetch(device="dev1", cid=21, ids=ids, teacher=TeacherForm.RAW))
    assert isinstance(mean, Knowledge) and isinstance(raw, Knowledge)
    assert raw.teacher is TeacherForm.RAW and mean.teacher is TeacherForm.MEAN
    np.testing.assert_array_equal(raw.counts, mean.counts)
    assert raw.counts.max() > 1  # several neighbours per id, so the raw reply is really longer
    assert raw.logits.shape == (int(raw.counts.sum()), CLASSES)
    np.testing.assert_allclose(raw.teacher_means(), mean.logits, rtol=1e-5, atol=1e-6)
    # Each raw row is one neighbour's stored logits, in neighbour order.
    cache = service.cache
    rows = cache.rows_of("dev1", ids)
    table = cache.relations.table[rows]
    expected = [cache.knowledge[n] for row in table for n in row if n >= 0 and cache.versions[n] >= 0]
    np.testing.assert_array_equal(raw.logits, np.array(expected))
    decoded = decode(encode(raw))
    assert isinstance(decoded, Knowledge) and decoded.teacher is TeacherForm.RAW
    np.testing.assert_allclose(decoded.teacher_means(), mean.logits, atol=2e-2)  # float16 on the wire


def test_raw_reply_that_could_overflow_a_message_is_refused_before_the_update(
    service: CacheService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker_server.fedcache_handlers as handlers

    ids = samples_of(0)[0]
    # R rows of (classes float32 + scale) per id: 16 * 20 B * 40 ids does not fit a budget of 1,000 B.
    monkeypatch.setattr(handlers, "RAW_REPLY_BUDGET_BYTES", 1000)
    request = UpdateFetch(
        device="dev0", cid=22, ids=ids, logits=logits_for(ids.size, 7), version=9, fetch_ids=ids,
        teacher=TeacherForm.RAW,
    )  # fmt: skip
    before = snapshot(service)
    reply = service.handle(request)
    service.commit()
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.TOO_LARGE, reply
    assert "fetch fewer ids" in reply.message
    assert_same(before, snapshot(service))
    allowed = service.handle(replace(request, fetch_ids=ids[:2]))  # 2 ids * 320 B fits
    assert isinstance(allowed, Knowledge) and allowed.applied == ids.size


def test_baseline_states_are_made_only_when_their_algorithm_is_used() -> None:
    with CacheService.open(None) as service:
        assert isinstance(service.handle(hello("plain")), HelloAck)
        assert service.active == ("fedcache",)
        rejected = service.handle(hello("odd", classes=CLASSES + 1, capabilities=("fedavg",)))
        assert isinstance(rejected, ErrorReply) and service.active == ("fedcache",)  # a refused hello joins nothing
        assert isinstance(service.handle(hello("averager", capabilities=("fedavg",))), HelloAck)
        assert service.active == ("fedcache", "fedavg")
        with pytest.raises(TypeError):
            service.handle(HelloAck(device="plain", cid=1, registered=0, neighbours=16))  # type: ignore[arg-type]
