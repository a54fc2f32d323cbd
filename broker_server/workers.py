"""`--workers N`: N MQTT front-ends on the share group over one state process, supervised and restarted on a crash.

Each front-end is a CacheServer of its own (its own connection, client id and, on a secure broker, identity)
that reads, answers and acknowledges batches as the single-process server does, except that it hands each
batch to the state process over a Unix socket instead of answering it itself. The state process owns the
knowledge state and its durable store: it answers every batch that is waiting when it looks (from any
front-end) as one batch with one commit (a group commit), and only then sends each front-end its answers, so a
front-end acknowledges a request to the broker only once its writes are durable.

kill -9 of a front-end: the broker keeps what it had delivered to it unacknowledged (and what the share group
still routes to its persistent session) until the supervisor has started it again under the same client id;
the other front-ends keep serving. kill -9 of the state process: the front-ends keep their batches
unacknowledged and send them again to the restarted state process (updates and registrations are idempotent).
The supervisor writes the PIDs to DATA_DIR/workers.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from broker_server.batched import Answer
from fedwire.constants import SERVER_SHARE_GROUP, Kind
from fedwire.mqtt import BrokerAddress, Credentials

log = logging.getLogger(__name__)

PID_FILE = "workers.json"
_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30
STATE_READY_TIMEOUT_S = 600.0  # opening a large state (relations rebuilt) may take a while
COALESCE_S = 0.001  # with a batch in hand, how long the state process looks for the other front-ends' batches
RETRY_S = 0.2  # a front-end tries the state process again this often while it is away
INTERRUPTED_GRACE_S = 5.0  # a stopping front-end waits this long for an absent state process, then gives up
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
STOP_FRONTENDS_S = 40.0
STOP_STATE_S = 30.0
_KINDS = {kind.value: kind for kind in Kind}


# ---------------------------------------------------------------- frames: a length, then one msgpack document


def _frame(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(data)) + data


class _Frames:
    """Collects bytes from a stream socket and yields the complete frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        out = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {size} bytes")
            if len(self._buffer) < _HEADER.size + size:
                break
            out.append(msgpack.unpackb(bytes(self._buffer[_HEADER.size : _HEADER.size + size]), raw=False))
            del self._buffer[: _HEADER.size + size]
        return out


def state_socket_name(tag: str) -> str:
    """The state process's address: a Linux abstract Unix socket (no file to clean up, no path length issue)."""
    return f"\0fedcache-state-{tag}"


# ---------------------------------------------------------------- the state process


class StateServer:
    """Answers the front-ends' batches over a Unix socket, everything waiting at once in one batch and one commit."""

    def __init__(self, *, service: Any, socket_name: str, metrics: Any = None) -> None:
        from broker_server.mqtt_server import LocalAnswers

        self.service = service
        self.socket_name = socket_name
        self._answers = LocalAnswers(service)
        self._metrics = metrics
        self._gauges_at = 0.0

    def serve(self, stop: threading.Event, ready: Any = None) -> None:
        """Listen, and answer until `stop` is set; a failed commit raises (nothing is answered: front-ends retry)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_name)
        listener.listen(64)
        listener.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        frames: dict[socket.socket, _Frames] = {}
        if ready is not None:
            ready.set()
        log.info("state process answering on its socket")
        try:
            while not stop.is_set():
                waiting = self._gather(selector, listener, frames, 0.2)
                if waiting and len({connection for connection, _s, _i in waiting}) < len(frames):
                    # Another front-end's batch usually follows within a moment: one batch, one commit for both.
                    waiting += self._gather(selector, listener, frames, COALESCE_S)
                if waiting:
                    self._answer(waiting)
                self._refresh_gauges()
        finally:
            for connection in frames:
                connection.close()
            listener.close()

    @staticmethod
    def _gather(
        selector: selectors.BaseSelector,
        listener: socket.socket,
        frames: dict[socket.socket, _Frames],
        timeout: float,
    ) -> list[tuple[socket.socket, int, list[Any]]]:
        """The frames that arrive within `timeout` (accepting new front-ends, dropping those that left)."""
        waiting: list[tuple[socket.socket, int, list[Any]]] = []
        for key, _ in selector.select(timeout):
            if key.data is None:
                connection, _address = listener.accept()
                connection.setblocking(True)
                connection.settimeout(30.0)
                frames[connection] = _Frames()
                selector.register(connection, selectors.EVENT_READ, connection)
                continue
            connection = key.data
            try:
                data = connection.recv(1 << 20)
                got = frames[connection].feed(data) if data else None
            except (OSError, ValueError):
                got = None
            if got is None:
                selector.unregister(connection)
                frames.pop(connection, None)
                connection.close()
                continue
            waiting += [(connection, seq, items) for seq, items in got]
        return waiting

    def _answer(self, waiting: list[tuple[socket.socket, int, list[Any]]]) -> None:
        requests = [(device, _KINDS[kind], payload) for _c, _s, items in waiting for device, kind, payload in items]
        answers = self._answers.answer(requests, idle=_nothing)  # commits; raises if it cannot
        start = 0
        for connection, seq, items in waiting:
            mine = answers[start : start + len(items)]
            start += len(items)
            try:
                connection.sendall(_frame([seq, [list(answer) for answer in mine]]))
            except OSError:
                log.warning("a front-end went away before its answers; it will send its batch again")
        if self._metrics is not None:
            # The request series (kinds, outcomes, bytes, latency) are the front-ends' (each on its own port).
            self._metrics.batch_size.observe(len(requests))

    def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if self._metrics is None or now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        stats = self.service.stats()
        self._metrics.devices.set(stats["devices"])
        self._metrics.samples.set(stats["samples"])
        self._metrics.cache_fill.set(stats["cache_fill"])


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class StateOptions:
    """What the state process is started with (picklable: it crosses into a spawned process)."""

    state_dir: Path
    socket_name: str
    neighbours: int = 16
    round_timeout_s: float = 120.0
    min_participants: int = 0
    defences: bool = False
    replicate: str = ""  # redis://...: this node's state is replicated (broker_server/replication), as node_id
    node_id: str = ""
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    profile: Path | None = None  # cProfile every thread into this file at exit


def run_state(options: StateOptions, ready: Any = None) -> None:
    """Entry point of the state process: open the state, answer batches until SIGTERM, close the state."""
    stop = _stop_on_signals()
    _configure_logging(options.log_level, options.log_format)
    with _profiled(options.profile):
        _serve_state(options, stop, ready)


def _serve_state(options: StateOptions, stop: threading.Event, ready: Any) -> None:
    from broker_server.handlers import CacheService
    from broker_server.metrics import ServerMetrics

    if options.replicate:
        from broker_server.replication.node import open_replicated_service

        service = open_replicated_service(
            options.state_dir, node=options.node_id, url=options.replicate, neighbours=options.neighbours,
            round_timeout_s=options.round_timeout_s, min_participants=options.min_participants,
        )  # fmt: skip
    else:
        service = CacheService.open(
            options.state_dir,
            neighbours=options.neighbours,
            round_timeout_s=options.round_timeout_s,
            min_participants=options.min_participants,
        )
    try:
        metrics = ServerMetrics()
        if options.replicate:
            from broker_server.replication import ReplicatedState
            from broker_server.replication.metrics import ReplicationCollector

            assert isinstance(service.state, ReplicatedState)
            metrics.registry.register(ReplicationCollector(service.state))
        if options.defences:
            from broker_server.defences import DefenceCollector

            service.cache.defend()
            metrics.registry.register(DefenceCollector(service.cache))
        if options.metrics_port:
            metrics.serve(options.metrics_port)
        StateServer(service=service, socket_name=options.socket_name, metrics=metrics).serve(stop, ready)
    finally:
        service.close()


# ---------------------------------------------------------------- a front-end's side


class RemoteAnswers:
    """Answers from the state process: a front-end's `Answers` (broker_server.mqtt_server).

    A batch is sent again, after a reconnect, until the state process answers it; a front-end therefore never
    acknowledges a request whose changes may not be durable, and a state process restart costs latency only.
    """

    def __init__(self, socket_name: str) -> None:
        self.socket_name = socket_name
        self._sock: socket.socket | None = None
        self._frames = _Frames()
        self._seq = 0
        self._interrupted = False
        self._away_since: float | None = None

    def answer(self, requests: list[tuple[str, Kind, bytes]], *, idle: Any) -> list[Answer]:
        self._seq += 1
        frame = _frame([self._seq, [[device, kind, payload] for device, kind, payload in requests]])  # a Kind is a str
        give_up: float | None = None
        while True:
            try:
                sock = self._sock or self._connect()
                sock.sendall(frame)
                answers = self._await(sock, idle)
                if self._away_since is not None:
                    log.info("the state process is back after %.1f s", time.monotonic() - self._away_since)
                    self._away_since = None
                return answers
            except (OSError, ValueError) as exc:
                self._close()
                now = time.monotonic()
                if self._away_since is None:
                    self._away_since = now
                    log.warning(
                        "the state process is away (%s); keeping %d requests until it is back", exc, len(requests)
                    )
                if self._interrupted:
                    give_up = give_up or now + INTERRUPTED_GRACE_S
                    if now > give_up:
                        raise ConnectionError("stopping while the state process is away") from exc
                idle()
                time.sleep(RETRY_S)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_name)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._frames = _Frames()
        return sock

    def _await(self, sock: socket.socket, idle: Any) -> list[Answer]:
        while True:
            readable, _, _ = select.select([sock], [], [], 1.0)
            if not readable:
                idle()
                continue
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the state process closed the connection")
            for seq, answers in self._frames.feed(data):
                if seq == self._seq:
                    return [Answer(*answer) for answer in answers]

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def gauges(self) -> dict[str, float] | None:
        return None  # the state process exports them

    def interrupt(self) -> None:
        self._interrupted = True


@dataclass(frozen=True)
class FrontendOptions:
    """What a front-end is started with (picklable)."""

    address: BrokerAddress
    client_id: str
    socket_name: str
    credentials: Credentials | None = None
    share_group: str = SERVER_SHARE_GROUP
    status: bool = False  # the one front-end that publishes the server's online/offline status
    metrics_port: int = 0
    keep_session: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    profile: Path | None = None  # cProfile every thread into this file at exit


def run_frontend(options: FrontendOptions) -> None:
    """Entry point of a front-end: serve the share group with answers from the state process until SIGTERM."""
    stop = _stop_on_signals()
    _configure_logging(options.log_level, options.log_format)
    with _profiled(options.profile):
        _serve_frontend(options, stop)


def _serve_frontend(options: FrontendOptions, stop: threading.Event) -> None:
    from broker_server.metrics import ServerMetrics
    from broker_server.mqtt_server import CacheServer

    metrics = ServerMetrics()
    if options.metrics_port:
        metrics.serve(options.metrics_port)
    server = CacheServer(
        address=options.address,
        client_id=options.client_id,
        credentials=options.credentials,
        share_group=options.share_group,
        metrics=metrics,
        answers=RemoteAnswers(options.socket_name),
        status=options.status,
        on_fatal=stop.set,
    )
    server.start()
    stop.wait()
    server.stop(leave_group=not options.keep_session)
    if server.failed:
        raise SystemExit(1)


# ---------------------------------------------------------------- the supervisor


@dataclass
class _Child:
    name: str
    target: Any
    args: tuple[Any, ...]
    process: Any = None
    started_at: float = 0.0
    delay: float = RESTART_MIN_S
    due: float = 0.0  # when a dead child may be started again
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Starts the state process, then the front-ends, restarts whichever dies, and stops them in order."""

    def __init__(self, *, state: StateOptions, frontends: list[FrontendOptions], pid_file: Path) -> None:
        self._ctx = mp.get_context("spawn")
        self._state = _Child("state", run_state, (state,))
        self._frontends = [_Child(f"front-end {i}", run_frontend, (o,)) for i, o in enumerate(frontends)]
        self.pid_file = pid_file

    def start(self) -> None:
        """Start everything; returns once the state process answers and every front-end is started."""
        self._start_state()
        for child in self._frontends:
            self._start(child)
        self._write_pids()

    def _start_state(self) -> None:
        ready = self._ctx.Event()
        self._start(self._state, ready)
        deadline = time.monotonic() + STATE_READY_TIMEOUT_S
        while not ready.wait(0.2):
            if not self._state.process.is_alive():
                raise RuntimeError(f"the state process exited with {self._state.process.exitcode} while opening")
            if time.monotonic() > deadline:
                raise TimeoutError("the state process did not open its state in time")

    def _start(self, child: _Child, *extra: Any) -> None:
        child.process = self._ctx.Process(target=child.target, args=(*child.args, *extra), name=child.name)
        child.process.start()
        child.started_at = time.monotonic()
        log.info("%s started (pid %d)", child.name, child.process.pid)

    def watch(self, stop: threading.Event) -> None:
        """Until `stop`: start again any child that died (with back-off when it dies young)."""
        while not stop.wait(0.2):
            changed = False
            for child in [self._state, *self._frontends]:
                if child.process.is_alive():
                    continue
                now = time.monotonic()
                if not child.due:
                    young = now - child.started_at < 5.0
                    child.delay = min(RESTART_MAX_S, child.delay * 2) if young else RESTART_MIN_S
                    child.due = now + (child.delay if young else 0.0)
                    log.warning("%s (pid %d) exited with %s", child.name, child.process.pid, child.process.exitcode)
                if now < child.due:
                    continue
                child.due = 0.0
                child.restarts += 1
                if child is self._state:
                    try:
                        self._start_state()
                    except (RuntimeError, TimeoutError) as exc:
                        log.error("%s", exc)
                else:
                    self._start(child)
                changed = True
            if changed:
                self._write_pids()

    def stop(self) -> None:
        """Front-ends first (they leave the share group and drain through the state process), then the state."""
        for child in self._frontends:
            if child.process is not None and child.process.is_alive():
                child.process.terminate()
        for child in self._frontends:
            self._join(child, STOP_FRONTENDS_S)
        if self._state.process is not None and self._state.process.is_alive():
            self._state.process.terminate()
        self._join(self._state, STOP_STATE_S)
        self.pid_file.unlink(missing_ok=True)

    @staticmethod
    def _join(child: _Child, timeout: float) -> None:
        if child.process is None:
            return
        child.process.join(timeout)
        if child.process.is_alive():
            log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
            child.process.kill()
            child.process.join()

    def _write_pids(self) -> None:
        pids = {
            "supervisor": os.getpid(),
            "state": self._state.process.pid,
            "frontends": [child.process.pid for child in self._frontends],
        }
        temporary = self.pid_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(pids))
        os.replace(temporary, self.pid_file)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _profiled(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    from broker_server.profiling import ThreadProfiles

    profiles = ThreadProfiles()
    profiles.start()
    try:
        yield
    finally:
        profiles.dump(path)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _configure_logging(level: str, fmt: str) -> None:
    from broker_server.main import configure_logging

    configure_logging(level, fmt)
