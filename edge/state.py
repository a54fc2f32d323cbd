"""A device's durable state: the outbox of unacknowledged updates, last teachers, and training checkpoints.

Everything a device must not lose across a reboot or a week offline lives here (SQLite in WAL mode
beside an atomically replaced checkpoint file), so a killed device resumes where it was.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.files import write_atomic

STATE_FILENAME = "device.sqlite3"
CHECKPOINT_FILENAME = "checkpoint.pt"
PROGRESS_FILENAME = "progress.json"
LAST_REPORT_FILENAME = "last_report.json"
# Exit status of `python -m edge` when training finished but the broker did not acknowledge everything the
# device published (its final report among them) within `delivery_timeout_s`; 1 and 2 mean it failed.
EXIT_UNDELIVERED = 3
PROGRESS_EVERY_S = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (sample INTEGER PRIMARY KEY, logits BLOB NOT NULL, cid INTEGER);
CREATE TABLE IF NOT EXISTS teachers (sample INTEGER PRIMARY KEY, logits BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS acked (sample INTEGER PRIMARY KEY, version INTEGER NOT NULL, logits BLOB NOT NULL);
"""


@dataclass(frozen=True)
class Progress:
    """How far training is, as an observer outside the device (a test bench) can read it with no network."""

    position: int
    wall_time: float


class ProgressBeacon:
    """Writes `progress.json` (atomically, at most every PROGRESS_EVERY_S) so a bench can see training go on
    while the device's link is cut: the device's own MQTT client only notices an outage after its keepalive."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PROGRESS_FILENAME
        self._last = 0.0

    def write(self, position: int, *, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        write_atomic(self.path, json.dumps({"position": position, "wall_time": now}).encode())


def read_progress(directory: Path) -> Progress | None:
    """The device's last progress beacon, or None if it wrote none yet."""
    try:
        raw = json.loads((directory / PROGRESS_FILENAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return Progress(position=int(raw["position"]), wall_time=float(raw["wall_time"]))


def read_last_report(directory: Path) -> dict[str, Any] | None:
    """The metrics the device last reported (as published on its metrics topic), or None before its first."""
    try:
        report = json.loads((directory / LAST_REPORT_FILENAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


@dataclass(frozen=True)
class Checkpoint:
    """Where training was: the next batch position and the trainer's state (weights, optimiser)."""

    position: int
    trainer: dict[str, Any]


class DeviceState:
    """The device's SQLite store. Only the training thread touches it, so no locking is needed."""

    def __init__(self, directory: Path, *, classes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.classes = classes
        self._db = sqlite3.connect(directory / STATE_FILENAME)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # Updates sent before a crash were never acknowledged to us: they go out again.
        with self._db:
            self._db.execute("UPDATE outbox SET cid = NULL WHERE cid IS NOT NULL")

    def close(self) -> None:
        self._db.close()

    def write_last_report(self, metrics: dict[str, Any]) -> None:
        """Keep the report about to be published, so that completion is known even if the message is lost."""
        write_atomic(self.directory / LAST_REPORT_FILENAME, json.dumps(metrics).encode())

    # ------------------------------------------------------------ small counters

    def get(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def put(self, key: str, value: int) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)
            )

    # ------------------------------------------------------------ outbox

    def outbox_put(self, ids: np.ndarray, logits: np.ndarray) -> None:
        """Queue fresh logits; a sample already waiting is overwritten (only the newest matters)."""
        rows = [(int(i), np.asarray(v, "<f4").tobytes()) for i, v in zip(ids, logits, strict=True)]
        with self._db:
            self._db.executemany(
                "INSERT INTO outbox (sample, logits, cid) VALUES (?, ?, NULL) "
                "ON CONFLICT(sample) DO UPDATE SET logits = excluded.logits, cid = NULL",
                rows,
            )

    def outbox_take(self, *, limit: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Mark up to `limit` waiting samples as in flight under `cid` and return them."""
        with self._db:
            found = self._db.execute(
                "SELECT sample, logits FROM outbox WHERE cid IS NULL ORDER BY sample LIMIT ?", (limit,)
            ).fetchall()
            if not found:
                return np.zeros(0, np.uint32), np.zeros((0, self.classes), np.float32)
            self._db.executemany("UPDATE outbox SET cid = ? WHERE sample = ?", [(cid, s) for s, _ in found])
        ids = np.array([s for s, _ in found], np.uint32)
        logits = np.frombuffer(b"".join(b for _, b in found), "<f4").reshape(len(found), self.classes)
        return ids, logits.copy()

    def outbox_acknowledged(self, cid: int, *, version: int, sent: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The server made an update durable: drop what it carried (unless a newer put replaced it).

        `sent` (ids and the decoded logits as the server holds them) goes to the `acked` journal,
        which fault-injection benches compare with the server's table.
        """
        with self._db:
            self._db.execute("DELETE FROM outbox WHERE cid = ?", (cid,))
            if sent is not None:
                ids, logits = sent
                self._db.executemany(
                    "INSERT INTO acked VALUES (?, ?, ?) ON CONFLICT(sample) DO UPDATE SET "
                    "version = excluded.version, logits = excluded.logits WHERE excluded.version > acked.version",
                    [(int(i), version, np.asarray(v, "<f4").tobytes()) for i, v in zip(ids, logits, strict=True)],
                )

    def outbox_release(self, cid: int) -> None:
        """A request timed out: its samples become sendable again."""
        with self._db:
            self._db.execute("UPDATE outbox SET cid = NULL WHERE cid = ?", (cid,))

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def outbox_waiting(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE cid IS NULL").fetchone()[0])

    def acked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, versions, logits) of the newest acknowledged update per sample."""
        found = self._db.execute("SELECT sample, version, logits FROM acked ORDER BY sample").fetchall()
        ids = np.array([r[0] for r in found], np.int64)
        versions = np.array([r[1] for r in found], np.int64)
        logits = np.frombuffer(b"".join(r[2] for r in found), "<f4").reshape(len(found), self.classes)
        return ids, versions, logits

    # ------------------------------------------------------------ teachers

    def save_teachers(self, ids: np.ndarray, logits: np.ndarray) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO teachers VALUES (?, ?) ON CONFLICT(sample) DO UPDATE SET logits = excluded.logits",
                [(int(i), np.asarray(v, "<f4").tobytes()) for i, v in zip(ids, logits, strict=True)],
            )

    def load_teachers(self) -> tuple[np.ndarray, np.ndarray]:
        found = self._db.execute("SELECT sample, logits FROM teachers").fetchall()
        ids = np.array([r[0] for r in found], np.int64)
        logits = np.frombuffer(b"".join(r[1] for r in found), "<f4").reshape(len(found), self.classes)
        return ids, logits

    # ------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT_FILENAME

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write to a temporary file and rename, so a crash leaves the old or the new checkpoint, never half."""
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"position": checkpoint.position, "trainer": checkpoint.trainer}, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        raw = torch.load(self.checkpoint_path, weights_only=True)
        return Checkpoint(position=int(raw["position"]), trainer=raw["trainer"])
