"""Durable state of the cache server behind one interface: an in-memory store and a SQLite (WAL) store."""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

import numpy as np

from broker_server.records import DeviceRecord
from broker_server.wal_checkpointer import WalCheckpointer
from fedwire.constants import HashKind

STORE_FILENAME = "fedcache.sqlite3"
SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 5000
_LOGIT_DTYPE = np.dtype("<f4")
_ROW_DTYPE = np.dtype("<i4")  # rows and neighbour rows of stored relations (-1: no neighbour)
_UPSERT_RELATION = """
INSERT INTO relations (label, neighbours, rows, neighbour_rows) VALUES (?, ?, ?, ?)
ON CONFLICT(label) DO UPDATE SET neighbours = excluded.neighbours, rows = excluded.rows,
    neighbour_rows = excluded.neighbour_rows
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    idx INTEGER PRIMARY KEY,
    device TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    classes INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    hash_kind TEXT NOT NULL,
    hash_dim INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    row INTEGER PRIMARY KEY,
    device INTEGER NOT NULL,
    sid INTEGER NOT NULL,
    label INTEGER NOT NULL,
    hash BLOB NOT NULL,
    UNIQUE (device, sid)
);
CREATE TABLE IF NOT EXISTS knowledge (
    row INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    logits BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS relations (
    label INTEGER PRIMARY KEY,
    neighbours INTEGER NOT NULL,
    rows BLOB NOT NULL,
    neighbour_rows BLOB NOT NULL
);
"""
_UPSERT_DEVICE = """
INSERT INTO devices (idx, device, model, classes, samples, hash_kind, hash_dim) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(idx) DO UPDATE SET model = excluded.model, classes = excluded.classes, samples = excluded.samples,
    hash_kind = excluded.hash_kind, hash_dim = excluded.hash_dim
"""
_INSERT_SAMPLE = "INSERT INTO samples (row, device, sid, label, hash) VALUES (?, ?, ?, ?, ?)"
# A redelivered or reordered update must never replace newer knowledge, even across restarts.
_UPSERT_KNOWLEDGE = """
INSERT INTO knowledge (row, version, logits) VALUES (?, ?, ?)
ON CONFLICT(row) DO UPDATE SET version = excluded.version, logits = excluded.logits
WHERE excluded.version > knowledge.version
"""


@dataclass(frozen=True, eq=False)
class StoredState:
    """Everything needed to rebuild the in-memory cache: devices, samples by global row, latest knowledge."""

    devices: tuple[DeviceRecord, ...] = ()
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample_devices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sample_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    hashes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    knowledge_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    knowledge_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    knowledge_versions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class StateStore(ABC):
    """Stages writes and makes them durable together on commit(); load() returns only committed state.

    The MQTT glue acknowledges messages to the broker only after commit(), so anything staged but
    lost in a crash is redelivered instead of silently dropped.
    """

    @abstractmethod
    def save_device(self, record: DeviceRecord) -> None:
        """Stage a device record, replacing the one with the same index."""

    @abstractmethod
    def save_samples(
        self,
        *,
        rows: np.ndarray,
        device: int,
        ids: np.ndarray,
        labels: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        """Stage newly registered samples of one device under their global rows."""

    @abstractmethod
    def save_knowledge(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> None:
        """Stage logits for rows; a row keeps whichever version is newest."""

    @abstractmethod
    def save_relation(self, *, label: int, rows: np.ndarray, neighbour_rows: np.ndarray) -> None:
        """Stage one class's relation (its rows, ascending, and their R neighbour rows), replacing the stored one.

        Relations are derived data, but rebuilding them takes minutes at a million samples: a restart that
        finds them stored for exactly the current rows of a class serves at once.
        """

    @abstractmethod
    def load_relations(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Committed relations by class: (rows, neighbour rows)."""

    @abstractmethod
    def commit(self) -> None:
        """Make everything staged durable at once."""

    @abstractmethod
    def load(self) -> StoredState:
        """Everything committed so far; refused while writes are staged, as SQLite would show those too."""

    @abstractmethod
    def close(self) -> None:
        """Release resources; staged but uncommitted writes are discarded."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _keep_newest(
    *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One entry per row, the one with the highest version (the earliest of equal versions wins)."""
    if rows.size == 0:
        return rows, logits, versions
    order = np.lexsort((-np.arange(rows.size), versions, rows))
    last = np.r_[rows[order][1:] != rows[order][:-1], True]
    chosen = order[last]
    return rows[chosen], logits[chosen], versions[chosen]


class MemoryStore(StateStore):
    """A store that lives and dies with the process: for tests and throwaway servers.

    It honours the same staging semantics as SqliteStore so that code tested against it behaves
    the same on disk.
    """

    def __init__(self) -> None:
        self._devices: dict[int, DeviceRecord] = {}
        self._samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._knowledge = (np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        self._staged_devices: list[DeviceRecord] = []
        self._staged_samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._staged_knowledge: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._relations: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._staged_relations: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def save_device(self, record: DeviceRecord) -> None:
        self._staged_devices.append(record)

    def save_relation(self, *, label: int, rows: np.ndarray, neighbour_rows: np.ndarray) -> None:
        self._staged_relations[int(label)] = (np.array(rows, dtype=np.int64), np.array(neighbour_rows, np.int64))

    def load_relations(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {label: (rows.copy(), table.copy()) for label, (rows, table) in self._relations.items()}

    def save_samples(
        self,
        *,
        rows: np.ndarray,
        device: int,
        ids: np.ndarray,
        labels: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self._staged_samples.append(
            (
                rows.copy(),
                np.full(rows.size, device, np.int32),
                np.asarray(ids, dtype=np.uint32).copy(),
                np.asarray(labels, dtype=np.uint16).copy(),
                np.asarray(hashes, dtype=np.uint8).copy(),
            )
        )

    def save_knowledge(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> None:
        self._staged_knowledge.append(
            (
                np.asarray(rows, dtype=np.int64).copy(),
                np.asarray(logits, dtype=np.float32).copy(),
                np.asarray(versions, dtype=np.int64).copy(),
            )
        )

    def commit(self) -> None:
        for record in self._staged_devices:
            self._devices[record.index] = record
        self._samples.extend(self._staged_samples)
        self._relations.update(self._staged_relations)
        if self._staged_knowledge:
            old_rows, old_logits, old_versions = self._knowledge
            if old_rows.size == 0:
                old_logits = old_logits.reshape(0, self._staged_knowledge[0][1].shape[1])
            self._knowledge = _keep_newest(
                rows=np.concatenate([old_rows, *(batch[0] for batch in self._staged_knowledge)]),
                logits=np.concatenate([old_logits, *(batch[1] for batch in self._staged_knowledge)]),
                versions=np.concatenate([old_versions, *(batch[2] for batch in self._staged_knowledge)]),
            )
        self._discard_staged()

    def load(self) -> StoredState:
        if self._staged_devices or self._staged_samples or self._staged_knowledge or self._staged_relations:
            raise RuntimeError("load() with staged writes: commit() or close() first")
        devices = tuple(self._devices[index] for index in sorted(self._devices))
        if not self._samples:
            rows, logits, versions = self._knowledge
            return StoredState(
                devices=devices, knowledge_rows=rows, knowledge_logits=logits, knowledge_versions=versions
            )
        columns = [np.concatenate(parts) for parts in zip(*self._samples, strict=True)]
        order = np.argsort(columns[0], kind="stable")
        rows, devs, ids, labels, hashes = (column[order] for column in columns)
        k_rows, k_logits, k_versions = self._knowledge
        return StoredState(
            devices=devices,
            rows=rows,
            sample_devices=devs,
            sample_ids=ids,
            labels=labels,
            hashes=hashes,
            knowledge_rows=k_rows.copy(),
            knowledge_logits=k_logits.copy(),
            knowledge_versions=k_versions.copy(),
        )

    def close(self) -> None:
        self._discard_staged()

    def _discard_staged(self) -> None:
        self._staged_devices = []
        self._staged_samples = []
        self._staged_knowledge = []
        self._staged_relations = {}


def _row_blobs(matrix: np.ndarray) -> list[bytes]:
    """One bytes object per row of a matrix, sliced from a single buffer (no per-row numpy work)."""
    buffer = np.ascontiguousarray(matrix).tobytes()
    width = matrix.shape[1] * matrix.dtype.itemsize
    return [buffer[row * width : (row + 1) * width] for row in range(matrix.shape[0])]


def _matrix_of(blobs: tuple[bytes, ...] | list[bytes], dtype: np.dtype, what: str) -> np.ndarray:
    """Stack equally long blobs into a matrix with one join and one frombuffer."""
    if not blobs:
        return np.zeros((0, 0), dtype)
    width = len(blobs[0])
    joined = b"".join(blobs)
    if len(joined) != width * len(blobs) or width % dtype.itemsize:
        raise ValueError(f"stored {what} blobs differ in length; the store is corrupt")
    return np.frombuffer(joined, dtype=dtype).reshape(len(blobs), width // dtype.itemsize)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the database at `path`, which must hold this server's schema."""
    if not path.is_file():
        raise FileNotFoundError(f"no state store at {path}")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        conn.close()
        raise ValueError(f"{path} has schema version {version}, this server reads {SCHEMA_VERSION}")
    return conn


class SqliteStore(StateStore):
    """SQLite in WAL mode: a commit survives kill -9 of the process (synchronous=NORMAL suffices for that).

    Writes are batched in one open transaction until commit(), which keeps per-message cost low.
    Not thread-safe: the caller serialises access (the connection may be used from any one thread).
    `read_only` opens an existing store without creating or changing anything in the database (for inspection);
    a write then fails. WAL checkpoints run on a thread of their own (broker_server/wal_checkpointer.py), off the
    commits; `checkpoint_thread=False` leaves them to SQLite, inside the commit that fills the WAL.
    """

    def __init__(self, path: Path, *, read_only: bool = False, checkpoint_thread: bool = True) -> None:
        self.path = Path(path)
        self._closed = False
        self._checkpointer: WalCheckpointer | None = None
        if read_only:
            self._conn = _connect_read_only(self.path)
            return
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self._conn.close()
            raise ValueError(f"{self.path} has schema version {version}, this server reads {SCHEMA_VERSION}")
        self._conn.execute("BEGIN")
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self._conn.execute(statement)
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._conn.execute("COMMIT")
        if checkpoint_thread:  # off: SQLite's own auto-checkpoint inside commits (bench/wal_checkpoints.py)
            self._checkpointer = WalCheckpointer(self._conn, self.path)

    def _begin(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    def save_device(self, record: DeviceRecord) -> None:
        self._begin()
        self._conn.execute(
            _UPSERT_DEVICE,
            (
                record.index,
                record.device,
                record.model,
                record.classes,
                record.samples,
                record.hash_kind.value,
                record.hash_dim,
            ),
        )

    def save_samples(
        self,
        *,
        rows: np.ndarray,
        device: int,
        ids: np.ndarray,
        labels: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        self._begin()
        self._conn.executemany(
            _INSERT_SAMPLE,
            zip(
                np.asarray(rows, dtype=np.int64).tolist(),
                [int(device)] * len(rows),
                np.asarray(ids, dtype=np.uint32).tolist(),
                np.asarray(labels, dtype=np.uint16).tolist(),
                _row_blobs(np.asarray(hashes, dtype=np.uint8)),
                strict=True,
            ),
        )

    def save_knowledge(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> None:
        self._begin()
        self._conn.executemany(
            _UPSERT_KNOWLEDGE,
            zip(
                np.asarray(rows, dtype=np.int64).tolist(),
                np.asarray(versions, dtype=np.int64).tolist(),
                _row_blobs(np.asarray(logits, dtype=_LOGIT_DTYPE)),
                strict=True,
            ),
        )

    def save_relation(self, *, label: int, rows: np.ndarray, neighbour_rows: np.ndarray) -> None:
        self._begin()
        table = np.asarray(neighbour_rows)
        self._conn.execute(
            _UPSERT_RELATION,
            (
                int(label),
                int(table.shape[1]),
                np.asarray(rows, dtype=_ROW_DTYPE).tobytes(),
                np.ascontiguousarray(table, dtype=_ROW_DTYPE).tobytes(),
            ),
        )

    def load_relations(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        relations = {}
        for label, neighbours, rows, table in self._conn.execute(
            "SELECT label, neighbours, rows, neighbour_rows FROM relations"
        ):
            row_array = np.frombuffer(rows, dtype=_ROW_DTYPE).astype(np.int64)
            flat = np.frombuffer(table, dtype=_ROW_DTYPE).astype(np.int64)
            if neighbours <= 0 or flat.size != row_array.size * neighbours:
                raise ValueError(f"stored relation of class {label} is corrupt")
            relations[int(label)] = (row_array, flat.reshape(row_array.size, neighbours))
        return relations

    def commit(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def load(self) -> StoredState:
        if self._conn.in_transaction:
            raise RuntimeError("load() with staged writes: commit() or close() first")
        devices = tuple(
            DeviceRecord(
                index=idx,
                device=device,
                model=model,
                classes=classes,
                samples=samples,
                hash_kind=HashKind(kind),
                hash_dim=dim,
            )
            for idx, device, model, classes, samples, kind, dim in self._conn.execute(
                "SELECT idx, device, model, classes, samples, hash_kind, hash_dim FROM devices ORDER BY idx"
            )
        )
        samples = self._conn.execute("SELECT row, device, sid, label, hash FROM samples ORDER BY row").fetchall()
        knowledge = self._conn.execute("SELECT row, version, logits FROM knowledge ORDER BY row").fetchall()
        state = StoredState(devices=devices)
        if samples:
            rows, devs, ids, labels, hashes = zip(*samples, strict=True)
            state = replace(
                state,
                rows=np.array(rows, dtype=np.int64),
                sample_devices=np.array(devs, dtype=np.int32),
                sample_ids=np.array(ids, dtype=np.uint32),
                labels=np.array(labels, dtype=np.uint16),
                hashes=_matrix_of(hashes, np.dtype(np.uint8), "hash"),
            )
        if knowledge:
            k_rows, k_versions, k_logits = zip(*knowledge, strict=True)
            state = replace(
                state,
                knowledge_rows=np.array(k_rows, dtype=np.int64),
                knowledge_logits=_matrix_of(k_logits, _LOGIT_DTYPE, "logit").astype(np.float32),
                knowledge_versions=np.array(k_versions, dtype=np.int64),
            )
        return state

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._conn.close()


def open_store(data_dir: Path | None, *, read_only: bool = False) -> StateStore:
    """A SqliteStore in `data_dir` (created if missing, unless `read_only`), or a MemoryStore without a directory."""
    if data_dir is None:
        if read_only:
            raise ValueError("an in-memory store has nothing to open read-only")
        return MemoryStore()
    directory = Path(data_dir)
    if read_only:
        return SqliteStore(directory / STORE_FILENAME, read_only=True)
    directory.mkdir(parents=True, exist_ok=True)
    return SqliteStore(directory / STORE_FILENAME)
