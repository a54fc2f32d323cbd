"""State stores: round trips, commit semantics, newer-version upserts, fast loads, and surviving SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.store import (
    STORE_FILENAME,
    DeviceRecord,
    MemoryStore,
    SqliteStore,
    StateStore,
    StoredState,
    open_store,
)
from fedwire.constants import HashKind

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = 4
RECORD = DeviceRecord(
    index=0, device="d0", model="m", classes=CLASSES, samples=100, hash_kind=HashKind.BINARY, hash_dim=64
)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], StateStore]]:
    """A factory that reopens the same store (the same file, or the same in-memory object)."""
    opened: list[StateStore] = []
    memory = MemoryStore()

    def reopen() -> StateStore:
        store = memory if request.param == "memory" else SqliteStore(tmp_path / STORE_FILENAME)
        opened.append(store)
        return store

    yield reopen
    for store in opened:
        store.close()


def save_samples(store: StateStore, rng: np.random.Generator, *, start: int, count: int) -> dict[str, np.ndarray]:
    data = {
        "rows": np.arange(start, start + count, dtype=np.int64),
        "ids": rng.choice(10**6, size=count, replace=False).astype(np.uint32),
        "labels": rng.integers(0, CLASSES, size=count).astype(np.uint16),
        "hashes": rng.integers(0, 256, size=(count, 8), dtype=np.uint8),
    }
    store.save_samples(device=0, **data)
    return data


def knowledge_of(state: StoredState) -> dict[int, tuple[int, np.ndarray]]:
    return {
        int(row): (int(version), logits)
        for row, version, logits in zip(
            state.knowledge_rows, state.knowledge_versions, state.knowledge_logits, strict=True
        )
    }


def test_round_trip(make_store: Callable[[], StateStore]) -> None:
    rng = np.random.default_rng(20)
    store = make_store()
    store.save_device(RECORD)
    first = save_samples(store, rng, start=0, count=30)
    second = save_samples(store, rng, start=30, count=20)
    logits = rng.normal(size=(10, CLASSES)).astype(np.float32)
    store.save_knowledge(rows=np.arange(5, 15), logits=logits, versions=np.full(10, 3))
    store.commit()
    state = make_store().load()
    assert state.devices == (RECORD,)
    np.testing.assert_array_equal(state.rows, np.arange(50))
    np.testing.assert_array_equal(state.sample_devices, np.zeros(50))
    np.testing.assert_array_equal(state.sample_ids, np.concatenate([first["ids"], second["ids"]]))
    np.testing.assert_array_equal(state.labels, np.concatenate([first["labels"], second["labels"]]))
    np.testing.assert_array_equal(state.hashes, np.concatenate([first["hashes"], second["hashes"]]))
    np.testing.assert_array_equal(state.knowledge_rows, np.arange(5, 15))
    np.testing.assert_array_equal(state.knowledge_versions, np.full(10, 3))
    np.testing.assert_array_equal(state.knowledge_logits, logits)
    assert state.knowledge_logits.dtype == np.float32


def test_device_record_is_replaced(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    store.save_device(RECORD)
    store.commit()
    bigger = DeviceRecord(**{**RECORD.__dict__, "samples": 200, "model": "m2"})
    store.save_device(bigger)
    store.commit()
    assert make_store().load().devices == (bigger,)


def test_uncommitted_writes_are_not_loaded(make_store: Callable[[], StateStore]) -> None:
    rng = np.random.default_rng(21)
    store = make_store()
    store.save_device(RECORD)
    save_samples(store, rng, start=0, count=10)
    store.commit()
    store.save_knowledge(rows=np.arange(3), logits=np.ones((3, CLASSES), np.float32), versions=np.ones(3))
    save_samples(store, rng, start=10, count=5)
    with pytest.raises(RuntimeError):
        store.load()  # it would mix staged and committed state
    store.close()  # staged writes are dropped
    state = make_store().load()
    assert state.rows.size == 10
    assert state.knowledge_rows.size == 0


def test_knowledge_keeps_only_newer_versions(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    ones = np.ones((4, CLASSES), np.float32)
    store.save_knowledge(rows=np.arange(4), logits=2 * ones, versions=np.full(4, 2))
    store.commit()
    # Older (1) and equal (2) versions must not replace version 2; row 3 gets a newer one.
    store.save_knowledge(rows=np.arange(4), logits=9 * ones, versions=np.array([1, 2, 1, 5]))
    # Within one transaction too: a newer then an older write leaves the newer.
    store.save_knowledge(rows=np.array([4]), logits=7 * ones[:1], versions=np.array([7]))
    store.save_knowledge(rows=np.array([4]), logits=3 * ones[:1], versions=np.array([3]))
    store.commit()
    got = knowledge_of(make_store().load())
    assert {row: version for row, (version, _) in got.items()} == {0: 2, 1: 2, 2: 2, 3: 5, 4: 7}
    for row, value in {0: 2, 1: 2, 2: 2, 3: 9, 4: 7}.items():
        np.testing.assert_array_equal(got[row][1], np.full(CLASSES, value, np.float32))


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / STORE_FILENAME):
        pass
    with sqlite3.connect(tmp_path / STORE_FILENAME) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_store_factory(tmp_path: Path) -> None:
    with open_store(None) as memory:
        assert isinstance(memory, MemoryStore)
    with open_store(tmp_path / "new" / "dir") as disk:
        assert isinstance(disk, SqliteStore)
        assert disk.path == tmp_path / "new" / "dir" / STORE_FILENAME
        assert disk.path.exists()


def test_sixty_thousand_samples_load_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(22)
    count = 60_000
    with SqliteStore(tmp_path / STORE_FILENAME) as store:
        store.save_device(RECORD)
        data = save_samples(store, rng, start=0, count=count)
        logits = rng.normal(size=(count, 10)).astype(np.float32)
        store.save_knowledge(rows=data["rows"], logits=logits, versions=np.ones(count))
        store.commit()
    with SqliteStore(tmp_path / STORE_FILENAME) as store:
        started = time.perf_counter()
        state = store.load()
        elapsed = time.perf_counter() - started
    np.testing.assert_array_equal(state.hashes, data["hashes"])
    np.testing.assert_array_equal(state.sample_ids, data["ids"])
    np.testing.assert_array_equal(state.knowledge_logits, logits)
    assert elapsed < 3.0, f"loading 60k samples took {elapsed:.2f}s"


# The child applies an update to every sample per round, commits, then reports the round on stdout.
_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from broker_server import CacheService
    from fedwire import HashKind, Hello, Register, Update

    service = CacheService.open(Path(sys.argv[1]))
    service.handle(Hello(device="d0", cid=0, model="m", classes=4, samples=64, hash_kind=HashKind.BINARY, hash_dim=64))
    ids = np.arange(64, dtype=np.uint32)
    hashes = np.random.default_rng(0).integers(0, 256, size=(64, 8), dtype=np.uint8)
    service.handle(Register(device="d0", cid=1, ids=ids, labels=(ids % 4).astype(np.uint16), hashes=hashes))
    service.commit()
    version = 0
    while True:
        version += 1
        logits = np.repeat((ids + 1000.0 * version)[:, None], 4, axis=1).astype(np.float32)
        reply = service.handle(Update(device="d0", cid=version, ids=ids, logits=logits, version=version))
        assert reply.applied == 64, reply
        service.commit()
        print(version, flush=True)
    """
)


def test_committed_updates_survive_sigkill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir)], stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT, text=True
    )
    acknowledged = 0
    try:
        assert child.stdout is not None
        while acknowledged < 40:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            acknowledged = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with SqliteStore(data_dir / STORE_FILENAME) as store:
        state = store.load()
    assert [d.device for d in state.devices] == ["d0"]
    assert state.rows.size == 64
    np.testing.assert_array_equal(state.knowledge_rows, np.arange(64))
    # Every commit covered all 64 rows in one transaction, so all rows share one version, never older
    # than the last round the child reported as committed.
    version = int(state.knowledge_versions[0])
    assert np.all(state.knowledge_versions == version)
    assert version >= acknowledged
    expected = np.repeat((np.arange(64) + 1000.0 * version)[:, None], 4, axis=1)
    np.testing.assert_array_equal(state.knowledge_logits, expected)
