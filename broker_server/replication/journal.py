"""A node's replication bookkeeping in SQLite (WAL): the outbox of entries not yet in the log, and the log cursor.

Committed after the knowledge state's own commit and before the server acknowledges anything, so an
acknowledged update is in the node's store and either in the log or in this outbox, which is re-sent
until the log takes it (duplicates are harmless: applying is idempotent). The cursor is the id of the
last log entry whose effects the state committed; a crash between the two commits leaves it behind,
and entries applied again change nothing.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from pathlib import Path

from broker_server.store import SQLITE_BUSY_TIMEOUT_MS
from broker_server.wal_checkpointer import WalCheckpointer

JOURNAL_FILENAME = "replication.sqlite3"
START_CURSOR = "0-0"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class NodeMismatch(ValueError):
    """A data directory that belongs to another node id (two nodes must never share one)."""


class Journal:
    """Outbox and cursor of one node; thread-safe (the server thread, the sender and the tailer share it)."""

    def __init__(self, directory: Path, *, node: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / JOURNAL_FILENAME
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            self._conn.execute(statement)
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'node'").fetchone()
        if row is None:
            self._conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (("node", node), ("token", secrets.token_hex(16)))
            )
        elif row[0] != node:
            self._conn.close()
            raise NodeMismatch(f"{directory} holds the state of node '{row[0]}', not '{node}'")
        # Which data directory this is: the log remembers the token of each node id (RedisLog.claim).
        self.token = str(self._conn.execute("SELECT value FROM meta WHERE key = 'token'").fetchone()[0])
        self._checkpointer: WalCheckpointer | None = WalCheckpointer(self._conn, self.path)  # commits per batch too

    @property
    def cursor(self) -> str:
        """The last log id whose effects are committed ("0-0" before the first)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        return START_CURSOR if row is None else str(row[0])

    def commit(self, *, bodies: list[bytes], cursor: str | None) -> None:
        """Add entries to the outbox and move the cursor, in one transaction."""
        if not bodies and cursor is None:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT INTO outbox (body) VALUES (?)", ((body,) for body in bodies))
                if cursor is not None:
                    self._conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('cursor', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (cursor,),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def pending(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest `limit` outbox entries, (seq, body), oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, body FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(int(seq), bytes(body)) for seq, body in rows]

    def backlog(self) -> int:
        """How many entries wait in the outbox."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def sent(self, through: int) -> None:
        """The log holds every outbox entry up to seq `through`: forget them."""
        with self._lock:
            self._conn.execute("DELETE FROM outbox WHERE seq <= ?", (through,))

    def close(self) -> None:
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self._conn.close()
