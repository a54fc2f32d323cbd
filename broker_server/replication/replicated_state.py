"""A knowledge state that every server node holds whole, kept alike through one replicated log (issue 14, part 2).

- Reads (rows, fetch) are served from the node's own memory, as on one node: a remote gather would cost
  about ten times the in-process one.
- Hello and register go through the log first: the node appends the entry, then applies the log in order up
  to it (its own entry included), so every node applies the same registrations in the same order, numbers
  samples alike and, from the same rows and hashes, builds the same neighbour table. The device's answer is
  what applying its entry gave.
- Updates are applied at once (version-guarded) and staged; `commit()` commits the node's store, then writes
  the batch's updates to the outbox and the log cursor (journal.py), and only then may the server acknowledge.
  A sender thread moves the outbox to the log; a tailer thread applies other nodes' entries with the same
  version-guarded rule: idempotent, last writer (highest version) wins per sample, in any order.
- Other nodes' updates are applied in memory at once and written to this node's store at most FLUSH_S later,
  once per sample however often it changed meanwhile (a row upsert costs several in-memory applies). The
  journal's cursor never passes an entry whose effects are not in the store, so a crash replays at most
  that much of the log, and nothing is lost: the log still holds it.
- Every accepted update is staged, also one that was not newer here: a node killed between its two commits
  gets the request again from the broker, finds it already applied, and must still hand it to the others.
- Every TRIM_S the tailer publishes the node's durable cursor and trims the log below the lowest cursor of all
  nodes (redis_log.py), so the log holds only what some node has yet to apply durably.

Not thread-safe for its callers (one server thread, as every KnowledgeState); its own threads take `lock`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from broker_server.cached_state import CachedState
from broker_server.records import Admission, CacheStats, DeviceKnowledge, DeviceRecord, Registration, Rejected, Teachers
from broker_server.replication.entries import (
    Entry,
    EntryError,
    HelloEntry,
    RegisterEntry,
    UpdatesEntry,
    decode_entry,
    encode_entry,
)
from broker_server.replication.journal import Journal
from broker_server.replication.redis_log import LogUnavailable, RedisLog, id_key
from broker_server.state import KnowledgeState
from fedwire.constants import ErrorCode, HashKind

log = logging.getLogger(__name__)

READ_COUNT = 512  # log entries applied per turn
TAIL_BLOCK_MS = 200
SEND_LIMIT = 256  # outbox entries per pipelined XADD
FLUSH_S = 1.0  # other nodes' knowledge reaches this node's store within this long (and at a clean stop)
FLUSH_ROWS = 1 << 18  # ... or sooner, once this many rows wait
# How long a hello or register that changes something waits for the log before its device gets an `internal`
# error reply (the node's other requests wait meanwhile); not at all while the tailer finds the log down.
LOG_WAIT_S = 5.0
RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)
TRIM_S = 10.0  # how often a node publishes its durable cursor and trims the log below every node's
_KEPT_OUTCOMES = 1024  # answers of this node's own hello / register entries, kept until their request takes them
SOCKET_JOIN_S = 15.0
_T = TypeVar("_T")


class ReplicationStats(NamedTuple):
    """What a node's replication did: entries applied and skipped, its outbox backlog and cursor."""

    applied: int
    rejected: int  # valid entries the state refused (every node refuses them alike)
    invalid: int  # entries that did not decode: logged and skipped
    unresolved: int  # update rows naming a sample this node does not hold
    errors: int  # failures of the tailer or sender themselves (a store error, a bug), logged with a traceback
    backlog: int
    cursor: str
    log_down: bool  # the tailer's last read of the log failed
    trimmed: str  # the log's trimmed point as this node last saw it: entries before it are gone
    trimmed_entries: int  # entries this node's trims removed
    forgotten: bool  # an operator dropped this node's claim while it ran: it no longer holds trimming back


Outcome = Admission | Registration | Rejected | None


class ReplicatedState(KnowledgeState):
    """`inner` (the node's own CachedState and SQLite store) kept alike with every other node's through the log."""

    def __init__(
        self,
        *,
        inner: CachedState,
        node: str,
        url: str,
        journal: Journal,
        flush_s: float = FLUSH_S,
        trim_s: float = TRIM_S,
    ) -> None:
        if inner.cache.defences is not None:
            raise ValueError("replication does not support defences yet: their trust follows the local order")
        self.inner = inner
        self.node = node
        self.url = url
        self.lock = threading.RLock()
        self._journal = journal
        self._cursor = journal.cursor  # the last log entry applied in memory
        self._durable = self._cursor  # the last one whose effects are in the store (what the journal holds)
        self._unflushed: list[np.ndarray] = []  # rows others' updates changed in memory only
        self._unflushed_rows = 0
        self._flushed_at = time.monotonic()
        self._flush_s = flush_s
        self._staged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._names: list[str] = []
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._counts = {"applied": 0, "rejected": 0, "invalid": 0, "unresolved": 0, "errors": 0}
        self._log_down = False  # the tailer's last read failed
        self._trim_s = trim_s
        self._trimmed = "0-0"
        self._trimmed_entries = 0
        self._forgotten = False
        self._log = RedisLog(url)  # the server thread's: appends of hello/register and catching up
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"replication-send-{node}", daemon=True),
            threading.Thread(target=self._tail_loop, name=f"replication-tail-{node}", daemon=True),
        ]

    def start(self) -> ReplicatedState:
        """Start the sender (outbox to log) and the tailer (log to state)."""
        for thread in self._threads:
            thread.start()
        return self

    # ------------------------------------------------------------ reads: the node's own memory

    @property
    def neighbours(self) -> int:
        return self.inner.neighbours

    @property
    def classes(self) -> int:
        return self.inner.classes

    @property
    def batchable(self) -> bool:
        return self.inner.batchable

    def record(self, device: str) -> DeviceRecord:
        with self.lock:
            return self.inner.record(device)

    def rows(self, device: str, ids: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.inner.rows(device, ids)

    def rows_many(self, devices: Sequence[str], ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.inner.rows_many(devices, ids, counts)

    def fetch(self, rows: np.ndarray, *, raw: bool = False) -> Teachers:
        with self.lock:
            return self.inner.fetch(rows, raw=raw)

    def held(self, device: str) -> DeviceKnowledge:
        with self.lock:
            return self.inner.held(device)

    def devices(self) -> tuple[DeviceRecord, ...]:
        with self.lock:
            return self.inner.devices()

    def stats(self) -> CacheStats:
        with self.lock:
            return self.inner.stats()

    def replication(self) -> ReplicationStats:
        """Counters, outbox backlog and cursor, for logs, metrics and tests."""
        with self.lock:
            return ReplicationStats(
                **self._counts,
                backlog=self._journal.backlog(),
                cursor=self._cursor,
                log_down=self._log_down,
                trimmed=self._trimmed,
                trimmed_entries=self._trimmed_entries,
                forgotten=self._forgotten,
            )

    # ------------------------------------------------------------ registrations: through the log, in its order

    def hello(
        self,
        *,
        device: str,
        model: str,
        classes: int,
        samples: int,
        hash_kind: HashKind,
        hash_dim: int,
    ) -> Admission:
        with self.lock:
            known = self.inner.cache.devices.get(device)
            if known is not None and (known.model, known.classes, known.samples, known.hash_kind, known.hash_dim) == (
                model, classes, samples, hash_kind, hash_dim,
            ):  # fmt: skip
                # Nothing changes (a device saying hello again at its start): no other node needs to know.
                return self.inner.hello(device=device, model=model, classes=classes, samples=samples,
                                        hash_kind=hash_kind, hash_dim=hash_dim)  # fmt: skip
        entry = HelloEntry(
            origin=self.node, device=device, model=model, classes=classes, samples=samples, hash_kind=hash_kind,
            hash_dim=hash_dim,
        )  # fmt: skip
        outcome = self._through_log(entry)
        assert isinstance(outcome, Admission)
        return outcome

    def register(self, *, device: str, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> Registration:
        with self.lock:
            self.inner.record(device)  # unknown_device before the log sees anything
            if self._registered_alike(device, ids=ids, labels=labels, hashes=hashes):
                # A chunk sent again (a device resuming its registration): accepted without a change, here as
                # on every other node.
                return self.inner.register(device=device, ids=ids, labels=labels, hashes=hashes)
        outcome = self._through_log(_register_entry(self.node, device=device, ids=ids, labels=labels, hashes=hashes))
        assert isinstance(outcome, Registration)
        return outcome

    def _registered_alike(self, device: str, *, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray) -> bool:
        """Whether every sample of the chunk is registered already, with the same label and hash."""
        ids, labels, hashes = np.asarray(ids), np.asarray(labels), np.asarray(hashes)
        if ids.ndim != 1 or labels.shape != ids.shape or hashes.shape[:1] != ids.shape or hashes.dtype != np.uint8:
            return False
        try:
            rows = self.inner.rows(device, ids)
        except Rejected:
            return False
        cache = self.inner.cache
        return hashes.shape[1:] == cache.hashes.shape[1:] and bool(
            np.array_equal(cache.labels[rows], labels) and np.array_equal(cache.hashes[rows], hashes)
        )

    def _through_log(self, entry: Entry) -> Outcome:
        """Append `entry`, apply the log up to it, and return (or raise) what applying it gave."""
        entry_id = self._retrying(lambda: self._log.append([encode_entry(entry)]))[0]
        with self.lock:
            while id_key(self._cursor) < id_key(entry_id):
                found = self._retrying(
                    lambda: self._log.between(after=self._cursor, through=entry_id, count=READ_COUNT)
                )
                if not found:
                    raise LogUnavailable(f"entry {entry_id} is no longer in the log at {self.url}")
                self._apply_all(found)
            outcome = self._outcomes.pop(entry_id, None)
        if isinstance(outcome, Rejected):
            raise outcome
        if outcome is None:
            raise LogUnavailable(f"entry {entry_id} came back from the log undecodable")
        return outcome

    def _retrying(self, call: Callable[[], _T]) -> _T:
        """`call()`, retried while the log is unavailable, for up to LOG_WAIT_S."""
        deadline = time.monotonic() + (0.0 if self._log_down else LOG_WAIT_S)
        for attempt in range(1_000_000):
            try:
                return call()
            except LogUnavailable:
                # A back-off against an unreachable Redis (nothing to wait on but time), cut short by stop().
                if time.monotonic() > deadline or self._stop.wait(RETRY_S[min(attempt, len(RETRY_S) - 1)]):
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ knowledge: applied here, staged for the others

    def apply_update(self, *, rows: np.ndarray, logits: np.ndarray, version: int) -> np.ndarray:
        with self.lock:
            applied = self.inner.apply_update(rows=rows, logits=logits, version=version)
            rows = np.asarray(rows, dtype=np.int64)
            self._stage(rows, np.asarray(logits, dtype=np.float32), np.full(rows.size, version, np.int64))
            return applied

    def apply_updates(self, *, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> np.ndarray:
        with self.lock:
            applied = self.inner.apply_updates(rows=rows, logits=logits, versions=versions)
            self._stage(np.asarray(rows, np.int64), np.asarray(logits, np.float32), np.asarray(versions, np.int64))
            return applied

    def _stage(self, rows: np.ndarray, logits: np.ndarray, versions: np.ndarray) -> None:
        if rows.size:
            self._staged.append((rows.copy(), logits.copy(), versions.copy()))

    def commit(self) -> None:
        """The node's store first, then the outbox and cursor: after this the batch may be acknowledged."""
        with self.lock:
            self.inner.commit()
            bodies = [encode_entry(self._staged_entry())] if self._staged else []
            self._commit_journal(bodies)
            self._staged = []
        if bodies:
            self._wake.set()

    def _commit_journal(self, bodies: list[bytes]) -> None:
        """Outbox entries, and the cursor as far as the store holds the log's effects (caller holds the lock,
        after the store's commit)."""
        cursor = self._cursor if not self._unflushed and self._cursor != self._durable else None
        self._journal.commit(bodies=bodies, cursor=cursor)
        if cursor is not None:
            self._durable = cursor

    def _flush(self) -> None:
        """Write what others' updates changed in memory to the store, newest per row, and commit (lock held)."""
        if self._unflushed:
            rows = np.unique(np.concatenate(self._unflushed))
            cache = self.inner.cache
            self.inner.store.save_knowledge(rows=rows, logits=cache.knowledge[rows], versions=cache.versions[rows])
        self.inner.commit()
        self._unflushed = []
        self._unflushed_rows = 0
        self._flushed_at = time.monotonic()
        self._commit_journal([])

    def _staged_entry(self) -> UpdatesEntry:
        """The staged updates as one entry naming samples by (device id, local id)."""
        rows = np.concatenate([staged[0] for staged in self._staged])
        cache = self.inner.cache
        indices = cache.sample_devices[rows]
        present, owners = np.unique(indices, return_inverse=True)
        if present.size and int(present[-1]) >= len(self._names):
            self._names = [record.device for record in self.inner.devices()]
        return UpdatesEntry(
            origin=self.node,
            devices=tuple(self._names[int(index)] for index in present),
            owners=owners.astype(np.uint32),
            ids=cache.sample_ids[rows].astype(np.uint32),
            versions=np.concatenate([staged[2] for staged in self._staged]),
            logits=np.concatenate([staged[1] for staged in self._staged]),
        )

    # ------------------------------------------------------------ applying the log

    def _apply_all(self, found: list[tuple[str, bytes]]) -> None:
        """Apply entries newer than the cursor, in order, and move the cursor past them (caller holds the lock)."""
        for entry_id, body in found:
            if id_key(entry_id) <= id_key(self._cursor):
                continue
            answerable, outcome = self._apply(entry_id, body)
            if answerable:
                self._outcomes[entry_id] = outcome
                while len(self._outcomes) > _KEPT_OUTCOMES:
                    self._outcomes.popitem(last=False)
            self._cursor = entry_id

    def _apply(self, entry_id: str, body: bytes) -> tuple[bool, Outcome]:
        """One entry's effect on this node, and whether it is this node's own hello or register (then with the
        outcome its device is answered with)."""
        try:
            entry = decode_entry(body, skip_updates_from=self.node)
        except EntryError as exc:
            self._counts["invalid"] += 1
            log.warning("skipping log entry %s: %s", entry_id, exc)
            return False, None
        if entry is None:
            return False, None  # this node applied its own updates when it accepted them
        own = entry.origin == self.node
        try:
            if isinstance(entry, HelloEntry):
                outcome: Outcome = self.inner.hello(
                    device=entry.device, model=entry.model, classes=entry.classes, samples=entry.samples,
                    hash_kind=entry.hash_kind, hash_dim=entry.hash_dim,
                )  # fmt: skip
            elif isinstance(entry, RegisterEntry):
                outcome = self.inner.register(device=entry.device, ids=entry.ids, labels=entry.labels,
                                              hashes=entry.hashes)  # fmt: skip
            else:
                self._apply_remote_updates(entry_id, entry)
                outcome = None
        except Rejected as rejection:
            self._counts["rejected"] += 1
            if not own:
                log.warning("log entry %s from node %s refused here too: %s", entry_id, entry.origin, rejection)
            return own, rejection  # own: a hello or register (this node's updates never get here)
        self._counts["applied"] += 1
        return own, outcome

    def _apply_remote_updates(self, entry_id: str, entry: UpdatesEntry) -> None:
        """Another node's updates with the version-guarded upsert; rows this node lacks are counted and skipped."""
        order = np.argsort(entry.owners, kind="stable")
        counts = np.bincount(entry.owners, minlength=len(entry.devices))
        ids = entry.ids[order]
        rows, resolved = self.inner.rows_many(entry.devices, ids, counts)
        keep = np.repeat(resolved, counts)
        if not keep.all():
            self._counts["unresolved"] += int(np.count_nonzero(~keep))
            log.warning("log entry %s names %d samples this node does not hold", entry_id, int((~keep).sum()))
        if keep.any():
            chosen = rows[keep]
            applied = self.inner.cache.apply_updates(
                rows=chosen, logits=entry.logits[order][keep], versions=entry.versions[order][keep]
            )  # in memory only: _flush() writes the store
            if applied.any():
                self._unflushed.append(chosen[applied])
                self._unflushed_rows += int(np.count_nonzero(applied))

    def _tail_loop(self) -> None:
        """Apply what the log holds beyond the cursor, commit, repeat; waits out an unavailable log."""
        reader = RedisLog(self.url)
        failures = 0
        trim_at = time.monotonic() + self._trim_s
        try:
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= trim_at:
                        self._publish_and_trim(reader)
                        trim_at = time.monotonic() + self._trim_s
                    found = reader.read(after=self._cursor, count=READ_COUNT, block_ms=TAIL_BLOCK_MS)
                    failures = 0
                    self._log_down = False
                except LogUnavailable as exc:
                    self._log_down = True
                    failures = self._wait_out(failures, exc, "tailing")
                    continue
                try:
                    with self.lock:
                        self._apply_all(found)
                        due = time.monotonic() - self._flushed_at >= self._flush_s or self._unflushed_rows >= FLUSH_ROWS
                        if due:
                            self._flush()
                        elif found:
                            self.inner.commit()
                            self._commit_journal([])
                except Exception:
                    # Not an entry's fault (those are EntryError or Rejected, handled one by one): a store that
                    # failed, or a bug. Applying is idempotent, so wait and go on rather than stop learning for
                    # good; the error count (and the log) show a problem that does not heal.
                    self._counts["errors"] += 1
                    log.exception("node %s could not apply log entries; retrying", self.node)
                    self._stop.wait(RETRY_S[-1])
        finally:
            reader.close()

    def _publish_and_trim(self, log_: RedisLog) -> None:
        """Tell the log how far this node's store holds its effects, then trim what every node holds."""
        with self.lock:
            durable = self._durable
        claimed, _trimmed = log_.publish_cursor(self.node, self._journal.token, durable)
        if not claimed and not self._forgotten:
            log.error(
                "node %s was forgotten in the log (replication forget) while running: it no longer holds trimming "
                "back and may miss entries; stop it and seed it again from a peer",
                self.node,
            )
        self._forgotten = not claimed
        trimmed, removed = log_.trim()
        with self.lock:
            self._trimmed = trimmed
            self._trimmed_entries += removed
        if removed:
            log.info("node %s trimmed %d log entries (the log now starts after %s)", self.node, removed, trimmed)

    def _send_loop(self) -> None:
        """Move outbox entries to the log, oldest first; an entry leaves the outbox only once the log has it."""
        writer = RedisLog(self.url)
        failures = 0
        try:
            while True:
                self._wake.clear()
                try:
                    pending = self._journal.pending(SEND_LIMIT)
                    if not pending:
                        if self._stop.is_set():
                            return
                        self._wake.wait(0.5)
                        continue
                    writer.append([body for _seq, body in pending])
                    failures = 0
                    self._journal.sent(pending[-1][0])
                except LogUnavailable as exc:
                    if self._stop.is_set():
                        return  # the outbox keeps them for the next start
                    failures = self._wait_out(failures, exc, "sending")
                except Exception:
                    if self._stop.is_set():
                        return
                    self._counts["errors"] += 1  # the journal failed, or a bug: the outbox keeps what is unsent
                    log.exception("node %s could not send its outbox; retrying", self.node)
                    self._stop.wait(RETRY_S[-1])
        finally:
            writer.close()

    def _wait_out(self, failures: int, exc: LogUnavailable, doing: str) -> int:
        if failures == 0:
            log.warning("replication log unavailable while %s (retrying): %s", doing, exc)
        self._stop.wait(RETRY_S[min(failures, len(RETRY_S) - 1)])
        return failures + 1

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the threads (the sender first hands the log what it can), then close the journal and the state."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=SOCKET_JOIN_S)
        with self.lock:
            try:
                self._flush()
            except Exception:  # the log still holds it: the next start applies it again
                log.exception("node %s could not write others' knowledge to its store at shutdown", self.node)
            with contextlib.suppress(LogUnavailable):  # while this node is down, the log keeps what it lacks
                self._log.publish_cursor(self.node, self._journal.token, self._durable)
            self._log.close()
            self._journal.close()
            self.inner.close()


def _register_entry(
    node: str, *, device: str, ids: np.ndarray, labels: np.ndarray, hashes: np.ndarray
) -> RegisterEntry:
    """A registration chunk as a log entry; shapes and ranges the entry cannot carry exactly are refused here."""
    ids, labels, hashes = np.asarray(ids), np.asarray(labels), np.asarray(hashes)
    if ids.ndim != 1 or labels.shape != ids.shape or hashes.ndim != 2 or hashes.shape[0] != ids.size:
        raise Rejected(ErrorCode.BAD_SHAPE, "ids, labels and hashes must have one entry per sample")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
        raise Rejected(ErrorCode.BAD_SHAPE, "sample ids must lie in [0, 2^32)")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
        raise Rejected(ErrorCode.BAD_SHAPE, "labels must lie in [0, 2^16)")
    if hashes.dtype != np.uint8:
        raise Rejected(ErrorCode.BAD_DTYPE, f"hashes must be bytes (uint8), not {hashes.dtype}")
    return RegisterEntry(origin=node, device=device, ids=ids.astype(np.uint32), labels=labels.astype(np.uint16),
                         hashes=hashes)  # fmt: skip
