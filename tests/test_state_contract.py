"""The KnowledgeState contract, run against every backend: what any store behind the handlers must guarantee."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server import (
    STORE_FILENAME,
    CachedState,
    KnowledgeState,
    MemoryStore,
    ReadOnlyState,
    Rejected,
    SqliteStore,
    open_state,
)
from fedwire.constants import ErrorCode, HashKind

CLASSES = 4
HASH_DIM = 64
HASH_BYTES = HASH_DIM // 8
NEIGHBOURS = 4
DECLARED = 48
REGISTERED = 40


@dataclass
class Backend:
    """Opens one backend's state again and again over the same storage, as a restarted server would."""

    kind: str
    directory: Path
    memory: MemoryStore = field(default_factory=MemoryStore)
    opened: list[KnowledgeState] = field(default_factory=list)

    def open(self) -> KnowledgeState:
        if self.kind == "memory":  # the in-memory backend's storage outlives a state only within the process
            state: KnowledgeState = CachedState.open(self.memory, neighbours=NEIGHBOURS)
        else:
            state = open_state(self.directory, neighbours=NEIGHBOURS)
        self.opened.append(state)
        return state


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made = Backend(kind=request.param, directory=tmp_path / "state")
    yield made
    for state in made.opened:
        state.close()


def admit(state: KnowledgeState, device: str, **changes: Any) -> Any:
    fields: dict[str, Any] = {
        "model": "m",
        "classes": CLASSES,
        "samples": DECLARED,
        "hash_kind": HashKind.BINARY,
        "hash_dim": HASH_DIM,
    }
    return state.hello(device=device, **{**fields, **changes})


def samples_of(number: int, *, label: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, hashes) of device `number`: ids no other device uses; one class for all when `label`."""
    rng = np.random.default_rng(200 + number)
    ids = (1000 * number + 7 + 3 * np.arange(REGISTERED)).astype(np.uint32)
    labels = rng.integers(0, CLASSES, REGISTERED) if label is None else np.full(REGISTERED, label)
    hashes = rng.integers(0, 256, size=(REGISTERED, HASH_BYTES), dtype=np.uint8)
    return ids, labels.astype(np.uint16), hashes


def join(state: KnowledgeState, number: int, *, label: int | None = None) -> np.ndarray:
    """Hello and register device `number`; returns its ids."""
    admit(state, f"dev{number}")
    ids, labels, hashes = samples_of(number, label=label)
    state.register(device=f"dev{number}", ids=ids, labels=labels, hashes=hashes)
    return ids


def logits_for(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, CLASSES)).astype(np.float32)


def observe(state: KnowledgeState) -> dict[str, Any]:
    """Everything the interface shows of a state, without changing it."""
    records = state.devices()
    held = {record.device: state.held(record.device) for record in records}
    return {
        "classes": state.classes,
        "records": records,
        "stats": (state.stats().devices, state.stats().samples, state.stats().with_knowledge),
        "registered": {name: h.registered for name, h in held.items()},
        "arrays": [array for h in held.values() for array in (h.ids, h.versions, h.logits)],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("classes", "records", "stats", "registered"):
        assert before[key] == after[key], key
    assert len(before["arrays"]) == len(after["arrays"])
    for old, new in zip(before["arrays"], after["arrays"], strict=True):
        np.testing.assert_array_equal(old, new)


def rejected(code: ErrorCode, action: Callable[[], object]) -> None:
    with pytest.raises(Rejected) as info:
        action()
    assert info.value.code is code, info.value.detail


# ---------------------------------------------------------------- hello and registration


def test_first_hello_fixes_the_layout_and_repeating_it_changes_nothing(backend: Backend) -> None:
    state = backend.open()
    assert state.classes == 0 and state.devices() == () and state.neighbours == NEIGHBOURS
    first = admit(state, "a")
    assert first.changed and first.registered == 0 and first.record.index == 0
    assert state.classes == CLASSES
    again = admit(state, "a")
    assert not again.changed and again.record == first.record
    before = observe(state)
    rejected(ErrorCode.CLASS_MISMATCH, lambda: admit(state, "b", classes=CLASSES + 1))
    rejected(ErrorCode.HASH_MISMATCH, lambda: admit(state, "b", hash_kind=HashKind.FLOAT16))
    rejected(ErrorCode.HASH_MISMATCH, lambda: admit(state, "b", hash_dim=2 * HASH_DIM))
    assert_same(before, observe(state))
    assert admit(state, "b").record.index == 1
    assert [record.device for record in state.devices()] == ["a", "b"]


def test_register_is_idempotent_and_a_rejected_chunk_changes_nothing(backend: Backend) -> None:
    state = backend.open()
    ids, labels, hashes = samples_of(0)
    rejected(ErrorCode.UNKNOWN_DEVICE, lambda: state.register(device="dev0", ids=ids, labels=labels, hashes=hashes))
    admit(state, "dev0")
    first = state.register(device="dev0", ids=ids, labels=labels, hashes=hashes)
    assert (first.accepted, first.registered) == (REGISTERED, REGISTERED)
    again = state.register(device="dev0", ids=ids, labels=labels, hashes=hashes)
    assert (again.accepted, again.registered) == (REGISTERED, REGISTERED)
    assert state.stats().samples == REGISTERED
    before = observe(state)
    more = np.arange(5000, 5000 + DECLARED - REGISTERED + 1, dtype=np.uint32)
    cases: dict[ErrorCode, dict[str, np.ndarray]] = {
        ErrorCode.HASH_MISMATCH: dict(ids=ids, labels=(labels + 1) % CLASSES, hashes=hashes),
        ErrorCode.BAD_SHAPE: dict(ids=more, labels=np.zeros(more.size, np.uint16), hashes=hashes[: more.size]),
    }
    for code, chunk in cases.items():
        rejected(code, partial(state.register, device="dev0", **chunk))
    rejected(ErrorCode.BAD_SHAPE, lambda: admit(state, "dev0", samples=REGISTERED - 1))
    assert_same(before, observe(state))


def test_rows_resolve_only_a_devices_own_registered_ids(backend: Backend) -> None:
    state = backend.open()
    ids0, ids1 = join(state, 0), join(state, 1)
    rows0, rows1 = state.rows("dev0", ids0), state.rows("dev1", ids1)
    assert np.unique(np.concatenate([rows0, rows1])).size == 2 * REGISTERED
    np.testing.assert_array_equal(state.rows("dev0", ids0[::-1]), rows0[::-1])
    rejected(ErrorCode.UNKNOWN_SAMPLE, lambda: state.rows("dev1", ids0[:1]))
    rejected(ErrorCode.UNKNOWN_DEVICE, lambda: state.rows("stranger", ids0))
    rejected(ErrorCode.UNKNOWN_DEVICE, lambda: state.record("stranger"))
    assert state.record("dev1").index == 1


# ---------------------------------------------------------------- updates


def test_updates_are_idempotent_by_sample_and_version(backend: Backend) -> None:
    state = backend.open()
    ids = join(state, 0)
    rows = state.rows("dev0", ids)
    first = logits_for(REGISTERED, 1)
    assert state.apply_update(rows=rows, logits=first, version=1).all()
    assert not state.apply_update(rows=rows, logits=first, version=1).any()  # redelivered
    assert not state.apply_update(rows=rows, logits=logits_for(REGISTERED, 2), version=1).any()  # same version
    held = state.held("dev0")
    np.testing.assert_array_equal(held.ids, np.sort(ids))
    assert np.all(held.versions == 1)
    np.testing.assert_array_equal(held.logits, first[np.argsort(ids)])


def test_an_older_version_never_overwrites_a_newer_one_even_after_reopen(backend: Backend) -> None:
    state = backend.open()
    ids = join(state, 0)
    rows = state.rows("dev0", ids)
    half = REGISTERED // 2
    newest = logits_for(half, 7)
    state.apply_update(rows=rows[:half], logits=newest, version=7)
    applied = state.apply_update(rows=rows, logits=logits_for(REGISTERED, 6), version=6)
    np.testing.assert_array_equal(applied, np.arange(REGISTERED) >= half)
    state.commit()
    state.close()
    state = backend.open()
    assert not state.apply_update(rows=state.rows("dev0", ids), logits=logits_for(REGISTERED, 3), version=3).any()
    held = state.held("dev0")
    order = np.argsort(ids)
    np.testing.assert_array_equal(held.versions, np.where(np.arange(REGISTERED) < half, 7, 6)[order])
    np.testing.assert_array_equal(held.logits[np.argsort(order)[:half]], newest)


BAD_UPDATES: dict[str, tuple[Callable[[], tuple[np.ndarray, int]], ErrorCode]] = {
    "non-finite logits": (lambda: (np.full((REGISTERED, CLASSES), np.nan, np.float32), 5), ErrorCode.NON_FINITE),
    "other width": (lambda: (np.zeros((REGISTERED, CLASSES + 1), np.float32), 5), ErrorCode.CLASS_MISMATCH),
    "other row count": (lambda: (np.zeros((REGISTERED - 1, CLASSES), np.float32), 5), ErrorCode.BAD_SHAPE),
    "negative version": (lambda: (np.zeros((REGISTERED, CLASSES), np.float32), -1), ErrorCode.BAD_SCHEMA),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_rejected_update_changes_nothing_now_or_after_reopen(backend: Backend, case: str) -> None:
    state = backend.open()
    ids = join(state, 0)
    rows = state.rows("dev0", ids)
    state.apply_update(rows=rows[:10], logits=logits_for(10, 1), version=1)
    state.commit()
    before = observe(state)
    make, code = BAD_UPDATES[case]
    logits, version = make()
    rejected(code, lambda: state.apply_update(rows=rows, logits=logits, version=version))
    assert_same(before, observe(state))
    state.commit()
    state.close()
    assert_same(before, observe(backend.open()))


# ---------------------------------------------------------------- fetch


def test_fetch_gives_no_teacher_where_neighbours_hold_no_knowledge(backend: Backend) -> None:
    state = backend.open()
    ids0, ids1 = join(state, 0, label=0), join(state, 1, label=1)  # relations are per class: no shared neighbours
    rows0, rows1 = state.rows("dev0", ids0), state.rows("dev1", ids1)
    nobody = state.fetch(np.concatenate([rows0, rows1]))
    assert nobody.counts.dtype == np.uint16 and not nobody.counts.any()
    assert nobody.logits.shape == (0, CLASSES)
    value = np.arange(CLASSES, dtype=np.float32)
    state.apply_update(rows=rows0, logits=np.tile(value, (REGISTERED, 1)), version=1)
    taught, untaught = state.fetch(rows0), state.fetch(rows1)
    assert np.all(taught.counts == NEIGHBOURS)
    np.testing.assert_allclose(taught.logits, np.tile(value, (REGISTERED, 1)))
    assert not untaught.counts.any() and untaught.logits.shape == (0, CLASSES)
    assert state.fetch(np.zeros(0, np.int64)).counts.size == 0


def test_raw_teachers_are_the_contributors_rows_and_average_to_the_mean(backend: Backend) -> None:
    state = backend.open()
    ids = join(state, 0)
    join(state, 1)
    rows = state.rows("dev0", ids)
    state.apply_update(rows=rows[::2], logits=logits_for(REGISTERED // 2, 4), version=2)
    mean, raw = state.fetch(rows), state.fetch(rows, raw=True)
    np.testing.assert_array_equal(raw.counts, mean.counts)
    assert mean.logits.shape == (np.count_nonzero(mean.counts), CLASSES)
    assert raw.logits.shape == (int(raw.counts.sum()), CLASSES)
    groups = np.split(raw.logits, np.cumsum(raw.counts)[:-1])
    averaged = np.array([group.mean(axis=0) for group in groups if len(group)])
    np.testing.assert_allclose(averaged, mean.logits, rtol=1e-5, atol=1e-6)


def test_fetch_sees_updates_before_they_are_committed(backend: Backend) -> None:
    state = backend.open()
    rows = state.rows("dev0", join(state, 0, label=2))
    before = state.fetch(rows)
    state.apply_update(rows=rows, logits=logits_for(REGISTERED, 5), version=1)
    assert not before.counts.any() and np.all(state.fetch(rows).counts == NEIGHBOURS)


# ---------------------------------------------------------------- commit, restart, reads


def test_commit_then_reopen_restores_committed_state_only(backend: Backend) -> None:
    state = backend.open()
    for number in range(2):
        ids = join(state, number)
        state.apply_update(rows=state.rows(f"dev{number}", ids), logits=logits_for(REGISTERED, number), version=4)
    state.commit()
    committed = observe(state)
    teachers = state.fetch(state.rows("dev0", samples_of(0)[0]))
    # Changed but never committed: gone after a restart (their requests were never acknowledged).
    join(state, 2)
    ids0 = samples_of(0)[0]
    state.apply_update(rows=state.rows("dev0", ids0), logits=logits_for(REGISTERED, 9), version=9)
    admit(state, "dev1", samples=DECLARED + 1)
    state.close()
    state = backend.open()
    assert_same(committed, observe(state))
    again = state.fetch(state.rows("dev0", ids0))
    np.testing.assert_array_equal(again.counts, teachers.counts)
    np.testing.assert_allclose(again.logits, teachers.logits, rtol=1e-6)
    assert state.stats().dirty_classes == 0  # relations came back or were rebuilt on open


def test_held_lists_exactly_the_ids_holding_knowledge(backend: Backend) -> None:
    state = backend.open()
    ids = join(state, 0)
    assert state.held("dev0").registered == REGISTERED and state.held("dev0").ids.size == 0
    some = ids[[3, 1, 8]]
    logits = logits_for(3, 11)
    state.apply_update(rows=state.rows("dev0", some), logits=logits, version=2)
    held = state.held("dev0")
    order = np.argsort(some)
    np.testing.assert_array_equal(held.ids, some[order])
    np.testing.assert_array_equal(held.versions, [2, 2, 2])
    np.testing.assert_array_equal(held.logits, logits[order])
    rejected(ErrorCode.UNKNOWN_DEVICE, lambda: state.held("stranger"))
    stats = state.stats()
    assert (stats.devices, stats.samples, stats.with_knowledge) == (1, REGISTERED, 3)


def test_closing_twice_is_harmless(backend: Backend) -> None:
    state = backend.open()
    join(state, 0)
    state.commit()
    state.close()
    state.close()


# ---------------------------------------------------------------- the factory and read-only opening


def test_factory_opens_memory_without_a_path_and_sqlite_in_a_directory(tmp_path: Path) -> None:
    with open_state(None) as memory:
        assert isinstance(memory, CachedState) and isinstance(memory.store, MemoryStore)
    with open_state(tmp_path / "new" / "dir") as disk:
        assert isinstance(disk, CachedState) and isinstance(disk.store, SqliteStore)
        assert disk.store.path == tmp_path / "new" / "dir" / STORE_FILENAME
    with pytest.raises(ValueError):
        open_state(None, read_only=True)


def test_read_only_state_reads_committed_state_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_state(tmp_path / "missing", read_only=True)
    directory = tmp_path / "state"
    with open_state(directory, neighbours=NEIGHBOURS) as state:
        ids = join(state, 0)
        state.apply_update(rows=state.rows("dev0", ids), logits=logits_for(REGISTERED, 1), version=3)
        state.commit()
        committed = observe(state)
    database = (directory / STORE_FILENAME).read_bytes()
    with open_state(directory, neighbours=NEIGHBOURS, read_only=True) as reader:
        assert_same(committed, observe(reader))
        assert reader.fetch(reader.rows("dev0", ids)).counts.size == REGISTERED
        with pytest.raises(ReadOnlyState):
            admit(reader, "dev1")
        with pytest.raises(ReadOnlyState):
            reader.apply_update(rows=reader.rows("dev0", ids), logits=logits_for(REGISTERED, 2), version=9)
        reader.commit()  # nothing to commit
        assert_same(committed, observe(reader))
    assert (directory / STORE_FILENAME).read_bytes() == database
