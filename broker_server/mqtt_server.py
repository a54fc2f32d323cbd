"""Thin MQTT glue around the cache service: read a batch, validate, handle, commit, then reply and acknowledge.

One thread owns the broker connection (broker_server/mqtt_link.py) and the service: it reads everything the
socket holds, answers it as one batch (broker_server/batched.py: fetch / update / update_fetch vectorised,
everything else message by message), commits the batch to the durable store, and only then queues the
replies and the acknowledgements and writes them with one send. `--request-path legacy` selects the path
before issue 14 (broker_server/legacy_server.py: paho's thread, a queue and one message at a time), kept so
that the serving bench can measure both in one run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import msgpack

from broker_server.batched import Answer, BatchedRequests
from broker_server.handlers import CacheService, check_envelope
from broker_server.legacy_server import LegacyCacheServer
from broker_server.metrics import ServerMetrics
from broker_server.mqtt_link import RETAIN_HANDLING_NEVER, Inbound, ServerLink, Will
from fedwire import ErrorCode, ErrorReply, ProtocolError, decode, down_topic, encode, parse_up_topic
from fedwire.constants import DEFAULT_QOS, MAX_PAYLOAD_BYTES, SERVER_SHARE_GROUP, Kind
from fedwire.mqtt import BrokerAddress, Credentials
from fedwire.topics import SERVER_STATUS, server_subscription

log = logging.getLogger(__name__)

REQUEST_PATHS = ("batched", "legacy")
DEFAULT_REQUEST_PATH = "batched"
MAX_BATCH = 256  # messages answered by one commit; a longer read is answered in several
POLL_S = 0.2
ACTIVE_WINDOW_S = 60.0
# Gauges scan every sample and device: refresh them on a clock, not after every batch.
GAUGE_REFRESH_S = 1.0
DRAIN_IDLE_S = 0.3  # no request for this long after unsubscribing: everything sent to us has arrived
DRAIN_LIMIT_S = 10.0
# On stop, how long to wait for the broker to acknowledge the replies and the 'offline' status still in flight.
DELIVERY_LIMIT_S = 10.0
_TOPIC_CACHE_LIMIT = 100_000


def answer_one(service: CacheService, device: str, kind: Kind, payload: bytes) -> Answer:
    """The per-message path: decode, check the envelope, handle, encode (today's exact replies)."""
    cid = 0  # what an error reply carries when the payload held no valid correlation id
    try:
        request = check_envelope(decode(payload), device=device, topic_kind=kind.value)
        cid = request.cid
        reply = service.handle(request)
    except ProtocolError as exc:
        reply = ErrorReply(device=device, cid=exc.cid or 0, code=exc.code, message=exc.detail, request=kind.value)
    except Exception:
        log.exception("internal error on %s from %s", kind.value, device)
        reply = ErrorReply(
            device=device, cid=cid, code=ErrorCode.INTERNAL, message="internal error", request=kind.value
        )
    outcome = "ok"
    if isinstance(reply, ErrorReply):
        outcome = reply.code.value
        log.warning("rejected %s from %s: %s %s", kind.value, device, reply.code.value, reply.message)
    return Answer(device, reply.kind.value, encode(reply), outcome)


Requests = list[tuple[str, Kind, bytes]]  # (device, topic kind, payload) of a batch, in arrival order


class Answers(Protocol):
    """Where a server's batches are answered and made durable: in its own process, or in a state process."""

    def answer(self, requests: Requests, *, idle: Callable[[], None]) -> list[Answer]:
        """One answer per request, returned only once the batch's changes are durable; raises otherwise.

        `idle` is called now and then while waiting (the caller keeps its broker connection alive there).
        """

    def gauges(self) -> dict[str, float] | None:
        """devices, samples and cache_fill for the metrics endpoint, or None where another process has them."""

    def interrupt(self) -> None:
        """The server is stopping: give up waiting for answers that may not come (soon)."""


class LocalAnswers:
    """Answers in this process: the batched path over `service`, then one commit."""

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.batched = BatchedRequests(state=service.batch_state, per_message=partial(answer_one, service))

    def answer(self, requests: Requests, *, idle: Callable[[], None]) -> list[Answer]:
        answers = self.batched.answer(requests) if requests else []
        self.service.commit()
        return answers

    def gauges(self) -> dict[str, float] | None:
        return self.service.stats()

    def interrupt(self) -> None:
        pass


class RequestMetrics:
    """The request series of ServerMetrics, updated a batch at a time through cached children (labels() is costly)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._bytes_in: dict[str, Any] = {}
        self._bytes_out: dict[str, Any] = {}
        self._latency: dict[str, Any] = {}
        self._requests: dict[tuple[str, str], Any] = {}

    def record(
        self,
        *,
        messages: int,
        bytes_in: dict[str, int],
        bytes_out: dict[str, int],
        replies: dict[str, int],
        latency: float | None,
    ) -> None:
        """One batch: its size, bytes in by request kind and out by reply kind, and (if known) its latency."""
        metrics = self.metrics
        metrics.batch_size.observe(messages)
        for kind, size in bytes_in.items():
            child = self._bytes_in.get(kind) or self._bytes_in.setdefault(kind, metrics.bytes_in.labels(kind))
            child.inc(size)
        for kind, size in bytes_out.items():
            child = self._bytes_out.get(kind) or self._bytes_out.setdefault(kind, metrics.bytes_out.labels(kind))
            child.inc(size)
        if latency is None:
            return
        # Every reply of a batch waited the same time: from the read that brought it to its publish.
        for kind, count in replies.items():
            child = self._latency.get(kind) or self._latency.setdefault(kind, metrics.latency.labels(kind))
            child.observe(latency, count)

    def count(self, outcomes: dict[tuple[str, str], int]) -> None:
        """Requests by (kind, outcome)."""
        for key, count in outcomes.items():
            child = self._requests.get(key)
            if child is None:
                child = self._requests[key] = self.metrics.requests.labels(*key)
            child.inc(count)


class CacheServer:
    """Serves a CacheService over MQTT, a batch at a time, from one thread.

    Replies are published and requests acknowledged (manual PUBACK) only after the batch's writes are
    committed, so a crash means redelivery, never loss; updates are idempotent, so redelivery changes nothing.
    Retained messages are never acted on. `on_fatal` is called (from the server's thread) if it had to stop
    by itself, because a commit failed.
    """

    def __init__(
        self,
        *,
        service: CacheService | None = None,
        address: BrokerAddress,
        client_id: str = "fedcache-server-0",
        share_group: str = SERVER_SHARE_GROUP,
        metrics: ServerMetrics | None = None,
        credentials: Credentials | None = None,
        on_fatal: Callable[[], None] | None = None,
        answers: Answers | None = None,
        status: bool = True,
    ) -> None:
        """Serve `service` in this process, or with `answers` a state another process holds (broker_server/workers.py).

        `status`: this server publishes the retained online/offline status (and 'offline' as its will).
        """
        if answers is None:
            if service is None:
                raise ValueError("a CacheServer needs a service or answers")
            answers = LocalAnswers(service)
        self.service = service
        self.address = address
        self.credentials = credentials
        self.share_group = share_group
        self.metrics = metrics or ServerMetrics()
        self.failed = False
        self._on_fatal = on_fatal
        self._answers = answers
        self._status = status
        will = Will(SERVER_STATUS, b"offline") if status else None
        self._link = ServerLink(address=address, client_id=client_id, credentials=credentials, will=will)
        self._recorder = RequestMetrics(self.metrics)
        self._stop = threading.Event()
        self._leave_group = True
        self._early: list[Inbound] = []
        self._thread = threading.Thread(target=self._run, name="cache-server", daemon=True)
        self._last_seen: dict[str, float] = {}
        self._gauges_at = 0.0
        self._topics: dict[str, tuple[str, Kind] | None] = {}
        self._down: dict[str, str] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Connect with a persistent session (requests queue in the broker while we are down) and subscribe."""
        link = self._link
        link.connect(timeout=timeout)
        # Retain handling 2: Mosquitto 2.0.11 hands a new share-group member the retained messages on the up tree,
        # and a retained request (published once by anyone allowed on a device's up topic) would be handled again
        # by every server that ever starts.
        link.subscribe(server_subscription(self.share_group), qos=DEFAULT_QOS, retain_handling=RETAIN_HANDLING_NEVER)
        deadline = time.monotonic() + timeout
        while not link.subscribed:
            if time.monotonic() > deadline:
                link.close()
                raise TimeoutError(f"could not subscribe on {self.address.url} within {timeout} s")
            self._early += link.poll(0.05)  # a kept session's queued requests may come first: answered first
        if self._status:
            link.publish(SERVER_STATUS, b"online", retain=True)
        link.flush()
        self._thread.start()
        log.info("serving on %s (shared subscription group %s)", self.address.url, self.share_group)

    def stop(self, *, leave_group: bool = True) -> None:
        """Shut down cleanly; with `leave_group`, first leave the shared subscription for good.

        Mosquitto keeps routing a share group's messages to a member whose persistent session outlives its
        connection (they queue there until the session expires), so a server that stops for good must
        unsubscribe, answer what already reached it and end its session; devices resend anything unanswered.
        `leave_group=False` keeps the session for a planned restart of a sole server under the same client id:
        requests then queue in the broker until it is back (a kill -9 behaves the same way).
        """
        self._leave_group = leave_group
        self._stop.set()
        self._answers.interrupt()
        if self._thread.is_alive():
            self._thread.join(timeout=DRAIN_LIMIT_S + DELIVERY_LIMIT_S + 10)
        elif self._link.connected:  # started but its thread never ran, or never started
            self._link.disconnect()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        link = self._link
        pending, self._early = self._early, []
        leaving_since: float | None = None
        last_request = time.monotonic()
        try:
            while True:
                stopping = self._stop.is_set()
                if stopping and leaving_since is None:
                    if not self._leave_group:
                        break
                    link.unsubscribe(server_subscription(self.share_group))
                    leaving_since = last_request = time.monotonic()
                messages = pending or link.poll(0.02 if stopping else POLL_S)
                pending = []
                if messages:
                    last_request = time.monotonic()
                    for start in range(0, len(messages), MAX_BATCH):
                        if not self._process(messages[start : start + MAX_BATCH]):
                            return
                link.flush()
                now = time.monotonic()
                if leaving_since is not None:
                    if link.unsubscribed and now - last_request >= DRAIN_IDLE_S:
                        break
                    if now - leaving_since > DRAIN_LIMIT_S:
                        log.warning("stopping with requests still arriving; devices will resend them")
                        break
                if now - self._gauges_at >= GAUGE_REFRESH_S:
                    self._gauges_at = now
                    self._refresh_gauges(now)
            self._hand_over()
        except Exception:
            log.exception("the server loop failed")
            self._fail()

    def _hand_over(self) -> None:
        """Publish 'offline', wait for the broker to take what we published, and end the connection."""
        link = self._link
        if self._status:
            link.publish(SERVER_STATUS, b"offline", retain=True)
        # Replies are not precious (a device resends an unanswered request), but a server that stops cleanly
        # still hands over what it has answered instead of dropping it with the connection. Requests that
        # still arrive are left unacknowledged: the broker keeps them.
        deadline = time.monotonic() + DELIVERY_LIMIT_S
        while link.unacknowledged() and link.connected and time.monotonic() < deadline:
            link.poll(0.05)
        if link.unacknowledged():
            log.warning("stopping with %d published message(s) unacknowledged by the broker", link.unacknowledged())
        link.disconnect(session_expiry_s=0 if self._leave_group else None)

    def _fail(self) -> None:
        self.failed = True
        self._link.close()  # without DISCONNECT: the broker publishes our 'offline' will
        if self._on_fatal is not None:
            self._on_fatal()

    def _process(self, messages: list[Inbound]) -> bool:
        """Answer one batch, commit it, then queue its replies and acknowledgements; False when the commit failed."""
        now = time.monotonic()
        requests: list[tuple[str, Kind, bytes]] = []
        topics = self._topics
        last_seen = self._last_seen
        bytes_in: dict[str, int] = {}
        for message in messages:
            parsed = topics.get(message.topic, False)
            if parsed is False:
                if len(topics) > _TOPIC_CACHE_LIMIT:
                    topics.clear()
                parsed = topics[message.topic] = parse_up_topic(message.topic)
            if parsed is None:
                log.warning("ignoring message on unexpected topic %s", message.topic)
                continue
            device, kind = parsed  # type: ignore[misc]
            if message.retain:
                # Never acted on (see start()); a device that wants an answer publishes without the retain flag.
                log.warning("ignoring a retained %s on %s's topic", kind.value, device)
                self._recorder.count({(kind.value, "retained"): 1})
                continue
            bytes_in[kind] = bytes_in.get(kind, 0) + len(message.payload)  # a Kind is its str value
            last_seen[device] = now
            requests.append((device, kind, message.payload))
        try:
            answers = self._answers.answer(requests, idle=self._link.keep_alive) if requests else []
        except Exception:
            # Nothing is acknowledged: the broker redelivers these messages after we restart.
            log.exception("a batch could not be made durable; leaving %d messages unacknowledged", len(messages))
            self._fail()
            return False
        link = self._link
        down = self._down
        done = time.monotonic()
        outcomes: dict[tuple[str, str], int] = {}
        bytes_out: dict[str, int] = {}
        replies: dict[str, int] = {}
        for (_device, kind, _payload), answer in zip(requests, answers, strict=True):
            if len(answer.payload) > MAX_PAYLOAD_BYTES:
                answer = _too_large(answer, kind)
            topic = down.get(answer.device)
            if topic is None:
                if len(down) > _TOPIC_CACHE_LIMIT:
                    down.clear()
                topic = down[answer.device] = down_topic(answer.device)
            link.publish(topic, answer.payload)
            key = (kind, answer.outcome)
            outcomes[key] = outcomes.get(key, 0) + 1
            bytes_out[answer.kind] = bytes_out.get(answer.kind, 0) + len(answer.payload)
            replies[answer.kind] = replies.get(answer.kind, 0) + 1
        for message in messages:
            if message.qos:
                link.ack(message.mid, message.epoch)
        # Counted before anything leaves, so that a device holding its reply finds its request counted.
        self._recorder.record(
            messages=len(messages), bytes_in=bytes_in, bytes_out=bytes_out, replies=replies, latency=done - now
        )
        self._recorder.count(outcomes)
        link.flush()
        return True

    def _refresh_gauges(self, now: float) -> None:
        stats = self._answers.gauges()
        if stats is None:
            return
        self.metrics.devices.set(stats["devices"])
        self.metrics.samples.set(stats["samples"])
        self.metrics.cache_fill.set(stats["cache_fill"])
        self.metrics.devices_online.set(sum(1 for t in self._last_seen.values() if now - t < ACTIVE_WINDOW_S))


def _too_large(answer: Answer, kind: Kind) -> Answer:
    """An error reply instead of a reply the wire cannot carry (a fetch of very many ids with many classes)."""
    cid = msgpack.unpackb(answer.payload, raw=False).get("c", 0)
    detail = f"the reply would carry {len(answer.payload)} B, over the {MAX_PAYLOAD_BYTES} B limit: fetch fewer ids"
    log.warning("rejected %s from %s: %s", kind, answer.device, detail)
    reply = ErrorReply(device=answer.device, cid=cid, code=ErrorCode.TOO_LARGE, message=detail, request=str(kind))
    return Answer(answer.device, reply.kind.value, encode(reply), ErrorCode.TOO_LARGE.value)


def make_server(*, request_path: str = DEFAULT_REQUEST_PATH, **options: Any) -> CacheServer | LegacyCacheServer:
    """The server of `request_path` (see REQUEST_PATHS) with the shared options of both."""
    if request_path == "batched":
        return CacheServer(**options)
    if request_path == "legacy":
        options.pop("on_fatal", None)
        return LegacyCacheServer(**options)
    raise ValueError(f"unknown request path {request_path!r}: one of {', '.join(REQUEST_PATHS)}")
