"""The replicated knowledge state against a real redis-server and real SQLite: two nodes in one process."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from broker_server.records import Rejected
from broker_server.replication import (
    EntryError,
    HelloEntry,
    Journal,
    LogUnavailable,
    NodeMismatch,
    RedisLog,
    RegisterEntry,
    ReplicatedState,
    UpdatesEntry,
    decode_entry,
    encode_entry,
    open_replicated_state,
)
from broker_server.replication.metrics import ReplicationCollector
from broker_server.state_factory import open_state
from fedwire.constants import ErrorCode, HashKind
from fedwire.redis_server import RedisServer

CLASSES = 4
SAMPLES = 24
HASH_BYTES = 4


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(data_dir=tmp_path / "redis") as server:
        yield server


def _wait(condition: Callable[[], bool], *, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        time.sleep(0.02)


def _join(state: ReplicatedState, device: str, seed: int) -> np.ndarray:
    """hello + register SAMPLES samples of `device`; returns the rows they got."""
    rng = np.random.default_rng(seed)
    state.hello(device=device, model="m", classes=CLASSES, samples=SAMPLES, hash_kind=HashKind.BINARY, hash_dim=32)
    state.register(
        device=device,
        ids=np.arange(SAMPLES, dtype=np.uint32),
        labels=(np.arange(SAMPLES) % CLASSES).astype(np.uint16),
        hashes=rng.integers(0, 256, (SAMPLES, HASH_BYTES), dtype=np.uint8),
    )
    state.commit()
    return state.rows(device, np.arange(SAMPLES, dtype=np.uint32))


def _versions(state: ReplicatedState, device: str) -> dict[int, int]:
    """Version per id the state holds for `device` ({} while the device has not reached this node)."""
    try:
        held = state.held(device)
    except Rejected:
        return {}
    return dict(zip(held.ids.tolist(), held.versions.tolist(), strict=True))


def _open(tmp_path: Path, node: str, url: str) -> ReplicatedState:
    return open_replicated_state(tmp_path / node, node=node, url=url, neighbours=4)


def test_entries_round_trip_and_bad_ones_are_refused() -> None:
    hello = HelloEntry(origin="a", device="d0", model="m", classes=4, samples=8, hash_kind=HashKind.BINARY,
                       hash_dim=32)  # fmt: skip
    assert decode_entry(encode_entry(hello)) == hello
    hashes = np.arange(12, dtype=np.uint8).reshape(3, 4)
    register = RegisterEntry(origin="a", device="d0", ids=np.arange(3, dtype=np.uint32),
                             labels=np.array([0, 1, 2], np.uint16), hashes=hashes)  # fmt: skip
    back = decode_entry(encode_entry(register))
    assert isinstance(back, RegisterEntry)
    np.testing.assert_array_equal(back.hashes, register.hashes)
    updates = UpdatesEntry(origin="b", devices=("d0", "d1"), owners=np.array([1, 0], np.uint32),
                           ids=np.array([5, 6], np.uint32), versions=np.array([3, 9], np.int64),
                           logits=np.ones((2, 4), np.float32))  # fmt: skip
    back = decode_entry(encode_entry(updates))
    assert isinstance(back, UpdatesEntry) and back.devices == ("d0", "d1")
    assert decode_entry(encode_entry(updates), skip_updates_from="b") is None
    assert decode_entry(encode_entry(hello), skip_updates_from="a") == hello
    np.testing.assert_array_equal(back.versions, [3, 9])

    good: dict[str, object] = msgpack.unpackb(encode_entry(updates), raw=False)
    bad_bodies = [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({**good, "v": 2}),
        msgpack.packb({**good, "k": "z"}),
        msgpack.packb({**good, "ds": ["d0", "../etc"]}),
        msgpack.packb({**good, "w": np.array([0, 2], "<u4").tobytes()}),  # owner past the devices
        msgpack.packb({**good, "n": np.array([1, -1], "<i8").tobytes()}),
        msgpack.packb({**good, "x": np.full(8, np.nan, "<f4").tobytes()}),
        msgpack.packb({**good, "x": b"\x00" * 7}),
        msgpack.packb({**good, "c": 3}),
    ]
    for body in bad_bodies:
        with pytest.raises(EntryError):
            decode_entry(body)


def test_two_nodes_learn_each_others_knowledge_and_number_samples_alike(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    try:
        rows_a = _join(a, "da", seed=1)
        rows_b = _join(b, "db", seed=2)
        _wait(lambda: "db" in {r.device for r in a.devices()} and a.stats().samples == 2 * SAMPLES, what="a has db")
        _wait(lambda: b.stats().samples == 2 * SAMPLES, what="b has da")
        # The log's order numbers samples: both nodes give every sample the same row.
        np.testing.assert_array_equal(a.rows("db", np.arange(SAMPLES)), rows_b)
        np.testing.assert_array_equal(b.rows("da", np.arange(SAMPLES)), rows_a)

        a.apply_updates(rows=rows_a[:8], logits=np.full((8, CLASSES), 1.0, np.float32), versions=np.full(8, 5))
        a.commit()
        b.apply_update(rows=rows_b[:4], logits=np.full((4, CLASSES), 2.0, np.float32), version=7)
        b.commit()
        _wait(lambda: len(_versions(b, "da")) == 8 and len(_versions(a, "db")) == 4, what="updates replicated")
        assert _versions(b, "da") == dict.fromkeys(range(8), 5)
        np.testing.assert_array_equal(b.held("da").logits, np.full((8, CLASSES), 1.0))

        # Last writer by version: an older version replicated later changes nothing; a newer one wins.
        b.apply_updates(rows=a.rows("da", np.arange(2)), logits=np.zeros((2, CLASSES), np.float32),
                        versions=np.array([4, 6]))  # fmt: skip
        b.commit()
        _wait(lambda: _versions(a, "da")[1] == 6, what="the newer version reached a")
        assert _versions(a, "da")[0] == 5 and _versions(b, "da")[0] == 5
        # Teachers: a's samples of class 0 learn from b's device once relations span both.
        teachers = a.fetch(rows_a[:4])
        assert teachers.counts.sum() > 0
    finally:
        a.close()
        b.close()
    # Same registrations in the same order: identical stored samples and, rebuilt, identical relations.
    with (
        open_state(tmp_path / "a", neighbours=4, read_only=True) as sa,
        open_state(tmp_path / "b", neighbours=4, read_only=True) as sb,
    ):
        assert [r.device for r in sa.devices()] == [r.device for r in sb.devices()] == ["da", "db"]
        for state in (sa, sb):
            state.fetch(np.arange(2 * SAMPLES))  # builds every class's relation
        assert sa.cache.relations is not None and sb.cache.relations is not None  # type: ignore[attr-defined]
        np.testing.assert_array_equal(sa.cache.relations.table, sb.cache.relations.table)  # type: ignore[attr-defined]
        for device in ("da", "db"):
            np.testing.assert_array_equal(sa.held(device).versions, sb.held(device).versions)
            np.testing.assert_array_equal(sa.held(device).logits, sb.held(device).logits)


def test_updates_wait_in_the_outbox_while_the_log_is_down(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        _wait(lambda: b.stats().samples == SAMPLES, what="b has da")
        redis_server.kill()
        a.apply_updates(rows=rows[:6], logits=np.ones((6, CLASSES), np.float32), versions=np.full(6, 3))
        a.commit()  # durable here and in the outbox: the server may acknowledge although the log is down
        assert a.replication().backlog >= 1
        redis_server.start()  # the same directory: what the log had acknowledged is there again
        _wait(lambda: len(_versions(b, "da")) == 6, what="the outbox reached b")
        _wait(lambda: a.replication().backlog == 0, what="a's outbox emptied")
    finally:
        a.close()
        b.close()


def test_a_bad_log_entry_is_skipped_and_replication_goes_on(tmp_path: Path, redis_server: RedisServer) -> None:
    a = _open(tmp_path, "a", redis_server.url)
    b = _open(tmp_path, "b", redis_server.url)
    writer = RedisLog(redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        writer.append([b"not msgpack \xc1", msgpack.packb({"v": 1, "o": "x", "k": "u"})])
        a.apply_updates(rows=rows[:2], logits=np.ones((2, CLASSES), np.float32), versions=np.full(2, 1))
        a.commit()
        _wait(lambda: len(_versions(b, "da")) == 2, what="b applied the entry after the bad ones")
        assert b.replication().invalid == 2
        registry = CollectorRegistry()
        registry.register(ReplicationCollector(b))
        assert registry.get_sample_value("fedcache_replication_entries_total", {"outcome": "invalid"}) == 2
        assert registry.get_sample_value("fedcache_replication_log_down") == 0
        assert registry.get_sample_value("fedcache_replication_outbox_entries") == 0
    finally:
        writer.close()
        a.close()
        b.close()


def test_a_rejected_registration_is_refused_on_every_node(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    try:
        _join(a, "da", seed=1)
        with pytest.raises(Rejected) as refused:
            # id 0 is registered with label 0 and another hash
            a.register(device="da", ids=np.array([0], np.uint32), labels=np.array([3], np.uint16),
                       hashes=np.zeros((1, HASH_BYTES), np.uint8))  # fmt: skip
        assert refused.value.code is ErrorCode.HASH_MISMATCH
        with pytest.raises(Rejected) as unknown:
            a.register(device="nobody", ids=np.array([0], np.uint32), labels=np.array([0], np.uint16),
                       hashes=np.zeros((1, HASH_BYTES), np.uint8))  # fmt: skip
        assert unknown.value.code is ErrorCode.UNKNOWN_DEVICE
        _wait(lambda: b.replication().rejected == 1, what="b refused the same entry")
        assert b.stats().samples == SAMPLES
    finally:
        a.close()
        b.close()


def test_a_data_directory_belongs_to_one_node(tmp_path: Path) -> None:
    Journal(tmp_path / "n", node="a").close()
    with pytest.raises(NodeMismatch):
        Journal(tmp_path / "n", node="b")


def test_while_the_log_is_down_known_devices_rejoin_and_new_ones_are_told_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a = _open(tmp_path, "a", redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        entries = RedisLog(redis_server.url)
        before = entries.length()
        entries.close()
        redis_server.kill()
        _wait(lambda: a.replication().log_down, what="the tailer noticed the log is down")
        # A device starting again repeats its hello and its chunks: nothing changes, so no log is needed.
        assert _join(a, "da", seed=1).tolist() == rows.tolist()
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            a.hello(device="new", model="m", classes=CLASSES, samples=4, hash_kind=HashKind.BINARY, hash_dim=32)
        assert time.monotonic() - started < 2.0
        redis_server.start()
        entries = RedisLog(redis_server.url)
        assert entries.length() == before  # the repeated hello and chunks were not appended
        entries.close()
        _wait(lambda: not a.replication().log_down, what="the tailer reconnected")
        assert a.hello(device="new", model="m", classes=CLASSES, samples=4, hash_kind=HashKind.BINARY,
                       hash_dim=32).changed  # fmt: skip
    finally:
        a.close()


def test_one_node_id_belongs_to_one_data_directory(tmp_path: Path, redis_server: RedisServer) -> None:
    """Two directories under one id would each skip the other's updates as their own: the second is refused."""
    _open(tmp_path, "a", redis_server.url).close()
    with pytest.raises(NodeMismatch):
        open_replicated_state(tmp_path / "elsewhere", node="a", url=redis_server.url, neighbours=4)
    _open(tmp_path, "a", redis_server.url).close()  # the same directory again (a restart) is fine


def test_a_node_started_later_catches_up_from_the_log(tmp_path: Path, redis_server: RedisServer) -> None:
    a = _open(tmp_path, "a", redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        a.apply_updates(rows=rows, logits=np.ones((SAMPLES, CLASSES), np.float32), versions=np.full(SAMPLES, 2))
        a.commit()
        _wait(lambda: a.replication().backlog == 0, what="a's outbox emptied")
        late = _open(tmp_path, "late", redis_server.url)
        try:
            _wait(lambda: late.stats().with_knowledge == SAMPLES, what="the late node caught up")
            assert _versions(late, "da") == dict.fromkeys(range(SAMPLES), 2)
            np.testing.assert_array_equal(late.rows("da", np.arange(SAMPLES)), rows)
        finally:
            late.close()
    finally:
        a.close()


def test_a_failing_store_delays_replication_but_does_not_stop_it(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        _wait(lambda: b.stats().samples == SAMPLES, what="b has da")
        commit = b.inner.commit
        failures = [sqlite3.OperationalError("disk I/O error")]

        def failing_commit() -> None:
            if failures:
                raise failures.pop()
            commit()

        b.inner.commit = failing_commit  # type: ignore[method-assign]
        a.apply_updates(rows=rows[:3], logits=np.ones((3, CLASSES), np.float32), versions=np.full(3, 4))
        a.commit()
        _wait(lambda: b.replication().errors == 1, what="the tailer met the failing store")
        a.apply_updates(rows=rows[3:5], logits=np.ones((2, CLASSES), np.float32), versions=np.full(2, 4))
        a.commit()
        _wait(lambda: len(_versions(b, "da")) == 5, what="replication went on after the failure")
        b.commit()
    finally:
        a.close()
        b.close()
    with open_state(tmp_path / "b", neighbours=4, read_only=True) as stored:
        assert stored.held("da").ids.tolist() == [0, 1, 2, 3, 4]  # the failed commit's updates made it, later


def test_others_knowledge_held_in_memory_only_is_replayed_after_a_crash(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """b applies a's updates in memory and would write them to its store later; b dies first (its threads stop,
    nothing is flushed or closed, as after kill -9): restarted, it replays them from the log."""
    a = _open(tmp_path, "a", redis_server.url)
    b = open_replicated_state(tmp_path / "b", node="b", url=redis_server.url, neighbours=4, flush_s=3600)
    try:
        rows = _join(a, "da", seed=1)
        _wait(lambda: b.stats().samples == SAMPLES, what="b has da")
        a.apply_updates(rows=rows, logits=np.full((SAMPLES, CLASSES), 3.0, np.float32), versions=np.full(SAMPLES, 9))
        a.commit()
        _wait(lambda: len(_versions(b, "da")) == SAMPLES, what="b applied a's updates in memory")
        b.commit()  # a server commit on b meanwhile must not move its cursor past what its store lacks
        b._stop.set()  # the crash: b's threads stop, its store and journal stay as they are on disk
        for thread in b._threads:
            thread.join(timeout=10)
        with open_state(tmp_path / "b", neighbours=4, read_only=True) as stored:
            assert stored.held("da").ids.size == 0  # in memory only, never written
        again = _open(tmp_path, "b", redis_server.url)
        try:
            _wait(lambda: _versions(again, "da") == dict.fromkeys(range(SAMPLES), 9), what="b replayed a's updates")
        finally:
            again.close()
        with open_state(tmp_path / "b", neighbours=4, read_only=True) as stored:
            assert stored.held("da").versions.tolist() == [9] * SAMPLES  # written at the clean stop
    finally:
        a.close()
