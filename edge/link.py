"""The device's side of the wire: publish requests, match replies by correlation id, count bytes."""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from fedwire import ErrorReply, Kind, ProtocolError, Reply, Request, decode, down_topic, encode, metrics_topic, up_topic
from fedwire.constants import DEFAULT_QOS
from fedwire.mqtt import (
    AcknowledgedPublisher,
    BrokerAddress,
    Credentials,
    connect_persistent,
    make_client,
    publish_packet_bytes,
)

log = logging.getLogger(__name__)

REGISTRATION_KINDS = frozenset({Kind.HELLO, Kind.REGISTER})


RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
DEVICE_KEEPALIVE_S = 15


@dataclass
class _Pending:
    kind: Kind
    sent_at: float
    packet_bytes: int
    future: Future[Reply]


@dataclass(frozen=True)
class Expired:
    """A request whose reply never came: its cid and what it cost on the wire."""

    cid: int
    kind: Kind
    packet_bytes: int


class KnowledgeLink:
    """One persistent MQTT session per device.

    Replies are matched to requests by correlation id; replies nobody waits for (from before a
    restart, or after a timeout) are dropped. Every matched reply is also handed to `on_reply`
    with the wire size of its request.
    """

    def __init__(
        self,
        *,
        device_id: str,
        address: BrokerAddress,
        on_reply: Callable[[Reply, int], None] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.credentials = credentials
        self.on_reply = on_reply
        self._client = make_client(client_id=f"fedcache-device-{device_id}")
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._publisher = AcknowledgedPublisher(self._client)
        self._closing = False
        self._jitter_reconnect()
        self._connected = threading.Event()
        self._offline_since: float | None = time.monotonic()
        self._offline_total_s = 0.0
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        # A random start keeps correlation ids of a restarted process apart from its previous life's.
        self._next_cid = secrets.randbits(48)
        self.bytes_up: Counter[str] = Counter()
        self.bytes_down: Counter[str] = Counter()
        self.latencies_s: list[float] = []
        self.dropped_replies = 0

    # ------------------------------------------------------------ connection

    def start(self, timeout: float | None = None) -> None:
        """Connect (persistent session); paho keeps reconnecting with backoff until the broker is reachable.

        With a timeout, wait that long for the first connection; without, return at once (a device
        that boots offline trains anyway).
        """
        connect_persistent(
            self._client,
            self.address,
            keepalive=DEVICE_KEEPALIVE_S,
            asynchronous=True,
            credentials=self.credentials,
        )
        self._client.loop_start()
        if timeout is not None and not self._connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"no connection to broker {self.address.url} within {timeout} s")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def offline_seconds(self) -> float:
        """Total time without a broker connection since start."""
        with self._lock:
            current = time.monotonic() - self._offline_since if self._offline_since is not None else 0.0
            return self._offline_total_s + current

    def _jitter_reconnect(self) -> None:
        """Exponential backoff with a random start, so devices cut off together do not return in lockstep."""
        self._client.reconnect_delay_set(
            min_delay=int(RECONNECT_MIN_S + random.random() * 2), max_delay=int(RECONNECT_MAX_S + random.random() * 10)
        )

    def stop(self) -> None:
        """Disconnect now; whatever the broker has not acknowledged is lost with this process (see `close`)."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def close(self, *, timeout: float) -> int:
        """Wait until the broker acknowledged every message this device published, then disconnect.

        paho resends unacknowledged QoS 1 messages after each reconnect while the wait lasts, so a lossy or
        briefly cut link still delivers them. Returns how many were still unacknowledged when `timeout`
        passed (0: everything the device owed has arrived).
        """
        owed = self._publisher.unacknowledged()
        if owed:
            log.info("waiting up to %.0f s for the broker to acknowledge %d message(s)", timeout, owed)
        self._publisher.wait_acknowledged(timeout)
        undelivered = self._publisher.unacknowledged()
        if undelivered:
            log.error(
                "%d message(s) still unacknowledged by the broker after %.0f s; disconnecting without them",
                undelivered,
                timeout,
            )
        self.stop()
        return undelivered

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused connection: %s", reason)
            return
        client.subscribe(down_topic(self.device_id), qos=DEFAULT_QOS)
        with self._lock:
            if self._offline_since is not None:
                self._offline_total_s += time.monotonic() - self._offline_since
                self._offline_since = None
        self._connected.set()
        log.info("connected to %s (session present: %s)", self.address.url, getattr(_flags, "session_present", None))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        with self._lock:
            if self._offline_since is None:
                self._offline_since = time.monotonic()
        if self._closing:
            log.info("disconnected from broker")
            return
        self._jitter_reconnect()
        log.warning("disconnected from broker (%s); training goes on, updates wait in the outbox", reason)

    # ------------------------------------------------------------ requests

    def new_cid(self) -> int:
        with self._lock:
            self._next_cid += 1
            return self._next_cid

    def send(self, request: Request) -> Future[Reply]:
        """Publish a request (QoS 1); the future resolves with its reply."""
        payload = encode(request)
        topic = up_topic(self.device_id, request.kind)
        future: Future[Reply] = Future()
        packet_bytes = publish_packet_bytes(topic, len(payload))
        with self._lock:
            self._pending[request.cid] = _Pending(
                kind=request.kind, sent_at=time.monotonic(), packet_bytes=packet_bytes, future=future
            )
            self.bytes_up[request.kind.value] += packet_bytes
        self._publisher.publish(topic, payload)
        return future

    def call(self, request: Request, timeout: float) -> Reply:
        """Send and wait for the reply (used for hello and registration, which training waits on anyway)."""
        future = self.send(request)
        try:
            return future.result(timeout=timeout)
        except CancelledError:
            # Another thread gave up on it (forget_older_than): to the caller that is a timeout.
            raise TimeoutError(f"{request.kind.value} {request.cid} expired without a reply") from None
        finally:
            with self._lock:
                self._pending.pop(request.cid, None)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)

    def forget_older_than(self, seconds: float) -> list[Expired]:
        """Give up on replies that never came; a reply arriving later is dropped as stale."""
        cutoff = time.monotonic() - seconds
        expired = []
        with self._lock:
            for cid in [cid for cid, pending in self._pending.items() if pending.sent_at < cutoff]:
                pending = self._pending.pop(cid)
                pending.future.cancel()
                expired.append(Expired(cid=cid, kind=pending.kind, packet_bytes=pending.packet_bytes))
        return expired

    def packet_bytes_of(self, cid: int) -> int:
        """Wire size of a request still waiting for its reply (0 when unknown)."""
        with self._lock:
            pending = self._pending.get(cid)
            return pending.packet_bytes if pending else 0

    def publish_metrics(self, metrics: dict[str, Any]) -> None:
        """Report metrics as JSON on the device's metrics topic (read by trials and dashboards)."""
        self._publisher.publish(metrics_topic(self.device_id), json.dumps(metrics))

    # ------------------------------------------------------------ replies

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            reply = decode(bytes(message.payload))
        except ProtocolError as exc:
            log.warning("dropping undecodable reply on %s: %s", message.topic, exc)
            return
        if not isinstance(reply, Reply):
            log.warning("dropping a %s request published on this device's reply topic %s", reply.kind, message.topic)
            return
        with self._lock:
            self.bytes_down[reply.kind.value] += publish_packet_bytes(message.topic, len(message.payload))
            pending = self._pending.get(reply.cid)
            if pending is None:
                self.dropped_replies += 1
            else:
                self.latencies_s.append(time.monotonic() - pending.sent_at)
        if pending is None:
            log.debug("dropping reply %s with unknown correlation id %d", reply.kind, reply.cid)
            return
        if isinstance(reply, ErrorReply):
            log.warning("server rejected %s: %s %s", pending.kind, reply.code, reply.message)
        if self.on_reply is not None:
            self.on_reply(reply, pending.packet_bytes)
        with self._lock:
            self._pending.pop(reply.cid, None)
        pending.future.set_result(reply)

    # ------------------------------------------------------------ accounting

    def byte_totals(self) -> dict[str, int]:
        """Registration uplink apart from training uplink; downlink in total."""
        with self._lock:
            register_up = sum(v for k, v in self.bytes_up.items() if Kind(k) in REGISTRATION_KINDS)
            return {
                "register_up": register_up,
                "up": sum(self.bytes_up.values()) - register_up,
                "down": sum(self.bytes_down.values()),
            }
