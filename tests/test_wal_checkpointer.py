"""WAL checkpoints off the writer's commits (real SQLite files): the writer never checkpoints, the thread does."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from broker_server.store import STORE_FILENAME, SqliteStore
from broker_server.wal_checkpointer import WalCheckpointer

COMMITS = 3000  # each a page or more: three times SQLite's default auto-checkpoint threshold


def _writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    return conn


def _rows_in_database_file_alone(path: Path, tmp: Path) -> int:
    """Rows the main database file holds without its WAL (what checkpoints have copied into it)."""
    alone = tmp / "alone.sqlite3"
    shutil.copyfile(path, alone)
    conn = sqlite3.connect(alone)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    except sqlite3.OperationalError:  # not even the table reached the file
        return 0
    finally:
        conn.close()


def _commit_many(conn: sqlite3.Connection) -> None:
    for key in range(COMMITS):
        conn.execute("INSERT INTO t VALUES (?, ?)", (key, bytes(4096)))


def test_the_writer_leaves_checkpoints_to_the_thread(tmp_path: Path) -> None:
    idle_path, busy_path = tmp_path / "idle.sqlite3", tmp_path / "busy.sqlite3"
    idle_conn, busy_conn = _writer(idle_path), _writer(busy_path)
    idle = WalCheckpointer(idle_conn, idle_path, every_s=3600)  # never gets to a turn during the test
    busy = WalCheckpointer(busy_conn, busy_path, every_s=0.01)
    try:
        _commit_many(idle_conn)
        _commit_many(busy_conn)
        # The writer's own commits checkpoint nothing: everything is still in the WAL only.
        assert _rows_in_database_file_alone(idle_path, tmp_path) == 0
        turns = busy.checkpoints
        deadline = time.monotonic() + 15
        while busy.checkpoints < turns + 2:  # two full turns after the last commit
            assert time.monotonic() < deadline, "the checkpoint thread made no progress"
            time.sleep(0.01)
        assert _rows_in_database_file_alone(busy_path, tmp_path) == COMMITS
    finally:
        idle.close()
        busy.close()
    # Closing folds the rest of the WAL in and truncates it.
    assert (tmp_path / "idle.sqlite3-wal").stat().st_size == 0
    assert _rows_in_database_file_alone(idle_path, tmp_path) == COMMITS
    idle_conn.close()
    busy_conn.close()


def test_the_store_commits_without_checkpointing_and_closes_with_an_empty_wal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / STORE_FILENAME)
    try:
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        store.save_knowledge(rows=np.arange(4), logits=np.ones((4, 3), np.float32), versions=np.full(4, 2))
        store.commit()
    finally:
        store.close()
    wal = tmp_path / (STORE_FILENAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # SQLite deletes it when the last connection closes
    with SqliteStore(tmp_path / STORE_FILENAME, read_only=True) as again:
        assert again.load().knowledge_versions.tolist() == [2, 2, 2, 2]
