"""The device's side of the wire: publish requests, match replies by correlation id, count bytes."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from fedwire import Kind, ProtocolError, Reply, Request, decode, down_topic, encode, metrics_topic, up_topic
from fedwire.constants import DEFAULT_QOS
from fedwire.mqtt import BrokerAddress, connect_persistent, make_client, publish_packet_bytes

log = logging.getLogger(__name__)

REGISTRATION_KINDS = frozenset({Kind.HELLO, Kind.REGISTER})


@dataclass
class _Pending:
    kind: Kind
    sent_at: float
    future: Future[Reply]


class KnowledgeLink:
    """One persistent MQTT session per device.

    Replies are matched to requests by correlation id; replies nobody waits for (from before a
    restart, or after a timeout) are dropped. Every Knowledge reply is also handed to `on_knowledge`.
    """

    def __init__(
        self,
        *,
        device_id: str,
        address: BrokerAddress,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.on_reply = on_reply
        self._client = make_client(client_id=f"fedcache-device-{device_id}")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        # A random start keeps correlation ids of a restarted process apart from its previous life's.
        self._next_cid = secrets.randbits(48)
        self.bytes_up: Counter[str] = Counter()
        self.bytes_down: Counter[str] = Counter()
        self.latencies_s: list[float] = []
        self.dropped_replies = 0

    # ------------------------------------------------------------ connection

    def start(self, timeout: float = 30.0) -> None:
        """Connect (persistent session) and wait until the broker accepted us."""
        connect_persistent(self._client, self.address)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"no connection to broker {self.address.url} within {timeout} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused connection: %s", reason)
            return
        client.subscribe(down_topic(self.device_id), qos=DEFAULT_QOS)
        self._connected.set()
        log.info("connected to %s", self.address.url)

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
        with self._lock:
            self._pending[request.cid] = _Pending(kind=request.kind, sent_at=time.monotonic(), future=future)
            self.bytes_up[request.kind.value] += publish_packet_bytes(topic, len(payload))
        self._client.publish(topic, payload, qos=DEFAULT_QOS)
        return future

    def call(self, request: Request, timeout: float) -> Reply:
        """Send and wait for the reply (used for hello and registration, which training waits on anyway)."""
        future = self.send(request)
        try:
            return future.result(timeout=timeout)
        finally:
            with self._lock:
                self._pending.pop(request.cid, None)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)

    def forget_older_than(self, seconds: float) -> int:
        """Give up on replies that never came (a server restart may lose an unacknowledged request)."""
        cutoff = time.monotonic() - seconds
        with self._lock:
            stale = [cid for cid, pending in self._pending.items() if pending.sent_at < cutoff]
            for cid in stale:
                self._pending.pop(cid).future.cancel()
        return len(stale)

    def publish_metrics(self, metrics: dict[str, Any]) -> None:
        """Report metrics as JSON on the device's metrics topic (read by trials and dashboards)."""
        self._client.publish(metrics_topic(self.device_id), json.dumps(metrics), qos=DEFAULT_QOS)

    # ------------------------------------------------------------ replies

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            reply = decode(message.payload)
        except ProtocolError as exc:
            log.warning("dropping undecodable reply on %s: %s", message.topic, exc)
            return
        with self._lock:
            self.bytes_down[reply.kind.value] += publish_packet_bytes(message.topic, len(message.payload))
            pending = self._pending.pop(reply.cid, None)
            if pending is None:
                self.dropped_replies += 1
            else:
                self.latencies_s.append(time.monotonic() - pending.sent_at)
        if pending is None:
            log.debug("dropping reply %s with unknown correlation id %d", reply.kind, reply.cid)
            return
        if reply.kind is Kind.ERROR:
            log.warning("server rejected %s: %s %s", pending.kind, reply.code, reply.message)  # type: ignore[union-attr]
        if self.on_reply is not None:
            self.on_reply(reply)
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
