"""The request path before issue 14 (`--request-path legacy`): paho's thread, a queue, and one message at a time.

Kept, unchanged but for its name, so that `python -m bench serving` can measure it next to the batched path
of broker_server/mqtt_server.py in the same run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker_server.handlers import CacheService, check_envelope
from broker_server.metrics import ServerMetrics
from fedwire import ErrorCode, ErrorReply, ProtocolError, Reply, decode, down_topic, encode, parse_up_topic
from fedwire.constants import DEFAULT_QOS, SERVER_SHARE_GROUP
from fedwire.mqtt import (
    AcknowledgedPublisher,
    BrokerAddress,
    Credentials,
    connect_persistent,
    end_session_properties,
    make_client,
)
from fedwire.topics import SERVER_STATUS, server_subscription

log = logging.getLogger(__name__)

MAX_BATCH = 256
ACTIVE_WINDOW_S = 60.0
# Gauges scan every sample and device: refresh them on a clock, not after every batch.
GAUGE_REFRESH_S = 1.0
DRAIN_IDLE_S = 0.3  # no request for this long after unsubscribing: everything sent to us has arrived
DRAIN_LIMIT_S = 10.0
# On stop, how long to wait for the broker to acknowledge the replies and the 'offline' status still in flight.
DELIVERY_LIMIT_S = 10.0


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    arrived: float
    retained: bool = False


class LegacyCacheServer:
    """Serves a CacheService over MQTT.

    paho's thread only queues messages; one worker thread handles a batch, commits it to the
    durable store, and only then publishes the replies and acknowledges the messages to the broker
    (manual ack), so a crash means redelivery, never loss. Updates are idempotent, so redelivery
    changes nothing.
    """

    def __init__(
        self,
        *,
        service: CacheService,
        address: BrokerAddress,
        client_id: str = "fedcache-server-0",
        share_group: str = SERVER_SHARE_GROUP,
        metrics: ServerMetrics | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.service = service
        self.address = address
        self.credentials = credentials
        self.share_group = share_group
        self.metrics = metrics or ServerMetrics()
        self._inbox: queue.Queue[_Inbound] = queue.Queue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._busy = threading.Event()
        self._last_seen: dict[str, float] = {}
        self._gauges_at = 0.0
        self._client = make_client(client_id=client_id, manual_ack=True, max_inflight=1000)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._publisher = AcknowledgedPublisher(self._client)
        self._client.will_set(SERVER_STATUS, b"offline", qos=1, retain=True)
        self._worker = threading.Thread(target=self._work, name="cache-worker", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Connect with a persistent session (requests queue in the broker while we are down) and subscribe."""
        self._worker.start()
        connect_persistent(self._client, self.address, credentials=self.credentials)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"could not subscribe on {self.address.url} within {timeout} s")
        self._publisher.publish(SERVER_STATUS, b"online", retain=True)
        log.info("serving on %s (shared subscription group %s)", self.address.url, self.share_group)

    def stop(self, *, leave_group: bool = True) -> None:
        """Shut down cleanly; with `leave_group`, first leave the shared subscription for good.

        Mosquitto keeps routing a share group's messages to a member whose persistent session outlives its
        connection (they queue there until the session expires), so a server that stops for good must
        unsubscribe, answer what already reached it and end its session; devices resend anything unanswered.
        `leave_group=False` keeps the session for a planned restart of a sole server under the same client id:
        requests then queue in the broker until it is back (a kill -9 behaves the same way).
        """
        if leave_group:
            self._client.unsubscribe(server_subscription(self.share_group))
            self._drain(idle_s=DRAIN_IDLE_S, limit_s=DRAIN_LIMIT_S)
        self._stop.set()
        self._worker.join(timeout=10)
        self._publisher.publish(SERVER_STATUS, b"offline", retain=True)
        # Replies are not precious (a device resends an unanswered request), but a server that stops cleanly
        # still hands over what it has answered instead of dropping it with the connection.
        if not self._publisher.wait_acknowledged(DELIVERY_LIMIT_S):
            log.warning(
                "stopping with %d published message(s) unacknowledged by the broker", self._publisher.unacknowledged()
            )
        self._client.disconnect(properties=end_session_properties() if leave_group else None)
        self._client.loop_stop()

    def _drain(self, *, idle_s: float, limit_s: float) -> None:
        """Wait until the inbox stayed empty for `idle_s` (the worker answered everything), at most `limit_s`."""
        deadline = time.monotonic() + limit_s
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            if not self._inbox.empty() or self._busy.is_set():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_s:
                return
            time.sleep(0.02)
        log.warning("stopping with %d requests unanswered; devices will resend them", self._inbox.qsize())

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the server: %s", reason)
            return
        # Retain handling 2: Mosquitto 2.0.11 hands a new share-group member the retained messages on the up tree,
        # and a retained request (published once by anyone allowed on a device's up topic) would be handled again
        # by every server that ever starts.
        options = SubscribeOptions(qos=DEFAULT_QOS, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe(server_subscription(self.share_group), options=options)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: Any, _props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._subscribed.set()
        else:
            log.error("subscription refused: %s", reasons)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(
            _Inbound(message.topic, bytes(message.payload), message.mid, message.qos, time.monotonic(), message.retain)
        )

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._busy.set()
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            finally:
                self._busy.clear()

    def _process(self, batch: list[_Inbound]) -> None:
        replies = [self._handle_one(item) for item in batch]
        try:
            self.service.commit()
        except Exception:
            # Nothing is acknowledged: the broker redelivers these messages after we restart.
            log.exception("commit failed; leaving %d messages unacknowledged", len(batch))
            self._stop.set()
            return
        self.metrics.batch_size.observe(len(batch))
        now = time.monotonic()
        for item, reply in zip(batch, replies, strict=True):
            if reply is not None:
                payload = encode(reply)
                self._publisher.publish(down_topic(reply.device), payload)
                self.metrics.bytes_out.labels(reply.kind.value).inc(len(payload))
                self.metrics.latency.labels(reply.kind.value).observe(now - item.arrived)
            if item.qos > 0:
                self._client.ack(item.mid, item.qos)
        if now - self._gauges_at >= GAUGE_REFRESH_S:
            self._gauges_at = now
            self._refresh_gauges(now)

    def _handle_one(self, item: _Inbound) -> Reply | None:
        parsed = parse_up_topic(item.topic)
        if parsed is None:
            log.warning("ignoring message on unexpected topic %s", item.topic)
            return None
        device, kind = parsed
        if item.retained:
            # Never acted on (see _on_connect); a device that wants an answer publishes without the retain flag.
            log.warning("ignoring a retained %s on %s's topic", kind.value, device)
            self.metrics.requests.labels(kind.value, "retained").inc()
            return None
        self.metrics.bytes_in.labels(kind.value).inc(len(item.payload))
        self._last_seen[device] = item.arrived
        cid = 0  # what an error reply carries when the payload held no valid correlation id
        try:
            request = check_envelope(decode(item.payload), device=device, topic_kind=kind.value)
            cid = request.cid
            reply = self.service.handle(request)
        except ProtocolError as exc:
            reply = ErrorReply(device=device, cid=exc.cid or 0, code=exc.code, message=exc.detail, request=kind.value)
        except Exception:
            log.exception("internal error on %s from %s", kind.value, device)
            reply = ErrorReply(
                device=device, cid=cid, code=ErrorCode.INTERNAL, message="internal error", request=kind.value
            )
        outcome = reply.code.value if isinstance(reply, ErrorReply) else "ok"
        if isinstance(reply, ErrorReply):
            log.warning("rejected %s from %s: %s %s", kind.value, device, reply.code.value, reply.message)
        self.metrics.requests.labels(kind.value, outcome).inc()
        return reply

    def _refresh_gauges(self, now: float) -> None:
        stats = self.service.stats()
        self.metrics.devices.set(stats["devices"])
        self.metrics.samples.set(stats["samples"])
        self.metrics.cache_fill.set(stats["cache_fill"])
        self.metrics.devices_online.set(sum(1 for t in self._last_seen.values() if now - t < ACTIVE_WINDOW_S))
