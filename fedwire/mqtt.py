"""paho-mqtt clients configured as the measured MQTT facts require: v5, TCP_NODELAY, persistent sessions."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedwire.constants import DEFAULT_QOS, DEFAULT_SESSION_EXPIRY_S, MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
KEEPALIVE_S = 30
PLAIN_SCHEMES = ("mqtt", "tcp")
TLS_SCHEMES = ("mqtts", "ssl", "tls")


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens and whether over TLS, parsed from `mqtt://host:port` or `mqtts://host:port`."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in PLAIN_SCHEMES + TLS_SCHEMES:
            raise ValueError(
                f"unsupported broker URL scheme '{parsed.scheme}' in {url!r} (use mqtt://host:port or mqtts://host:port)"
            )
        if not parsed.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        if parsed.username or parsed.password:
            raise ValueError(f"broker URL {url!r} carries credentials: give them in a file, never in a URL")
        tls = parsed.scheme in TLS_SCHEMES
        return cls(host=parsed.hostname, port=parsed.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT), tls=tls)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    """Who a client is to the broker, and which CA it trusts: every secret stays in a file, never in an argument.

    A password device gives `username` and `password_file`; a certificate device gives `cert_file` and
    `key_file` (the broker takes its identity from the certificate's CN). `ca_file` is the project CA that
    signed the broker's certificate; without it a TLS client trusts the system's CAs.
    """

    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if self.password_file and not self.username:
            raise ValueError("password_file given without a username")

    @property
    def empty(self) -> bool:
        return not (self.username or self.password_file or self.ca_file or self.cert_file)

    def password(self) -> str | None:
        """The password, read from its file at connect time (files are 0600; the value is never logged)."""
        if not self.password_file:
            return None
        return Path(self.password_file).read_text().strip()


def apply_credentials(client: mqtt.Client, address: BrokerAddress, credentials: Credentials | None) -> None:
    """Set username/password and, for an mqtts:// address, TLS (verifying the broker against the CA file)."""
    credentials = credentials or Credentials()
    if credentials.username:
        client.username_pw_set(credentials.username, credentials.password())
    if address.tls:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=credentials.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if credentials.cert_file:
            context.load_cert_chain(credentials.cert_file, credentials.key_file)
        client.tls_set_context(context)
    elif credentials.cert_file:
        raise ValueError(f"a client certificate needs a TLS broker URL (mqtts://), not {address.url}")


def _disable_nagle(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Nagle's algorithm turns a 0.4 ms request/reply into 88 ms; switch it off on every new socket."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(*, client_id: str, manual_ack: bool = False, max_inflight: int = 100) -> mqtt.Client:
    """An MQTT v5 client with TCP_NODELAY, no local queue limit and reconnect backoff.

    `manual_ack` lets a server acknowledge a QoS 1 message only once its effect is durable.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    client.on_socket_open = _disable_nagle
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


class AcknowledgedPublisher:
    """Publishes QoS 1 messages and knows which ones the broker has not acknowledged (PUBACK) yet.

    paho keeps an unacknowledged QoS 1 message and sends it again after a reconnect, but only while the
    client lives: a process that disconnects with messages in flight loses them. `wait_acknowledged` lets it
    wait for the broker's PUBACKs before it goes, instead of sleeping and hoping. paho's own
    `MQTTMessageInfo.wait_for_publish` cannot serve here: it raises for a message published while the link
    was down, even though paho queues that message and delivers it after the reconnect. Every publish on the
    client must go through this object (it owns the client's `on_publish`).
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._changed = threading.Condition()
        self._unacknowledged: set[int] = set()
        # A PUBACK can beat `publish()` returning its mid (paho's network thread handles it first).
        self._acknowledged_early: set[int] = set()
        self.refused = 0
        client.on_publish = self._on_publish

    def publish(
        self, topic: str, payload: bytes | str, *, retain: bool = False, properties: Properties | None = None
    ) -> None:
        size = len(payload.encode() if isinstance(payload, str) else payload)
        if size > MAX_PAYLOAD_BYTES:
            # The broker would refuse the packet by disconnecting us, and paho would resend it after every
            # reconnect: one oversized message would stall everything queued behind it for good.
            raise ValueError(f"a {size} B message for {topic} exceeds the wire's {MAX_PAYLOAD_BYTES} B limit")
        info = self._client.publish(topic, payload, qos=DEFAULT_QOS, retain=retain, properties=properties)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError(f"paho refused to queue a message for {topic}: its outgoing queue is full")
        with self._changed:
            if info.mid in self._acknowledged_early:
                self._acknowledged_early.discard(info.mid)
            else:
                self._unacknowledged.add(info.mid)

    def unacknowledged(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker."""
        with self._changed:
            return len(self._unacknowledged)

    def wait_acknowledged(self, timeout: float) -> bool:
        """Block until the broker acknowledged every message published so far (True), or `timeout` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._unacknowledged, timeout=timeout)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            # Acknowledged all the same: the broker will not take it, and paho will not send it again.
            self.refused += 1
            log.error("broker refused message %d: %s", mid, reason)
        with self._changed:
            if mid in self._unacknowledged:
                self._unacknowledged.discard(mid)
                self._changed.notify_all()
            else:
                self._acknowledged_early.add(mid)


def session_properties(session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S) -> Properties:
    """CONNECT properties: without a SessionExpiryInterval a v5 session ends at disconnect."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry_s
    return properties


def end_session_properties() -> Properties:
    """DISCONNECT properties that end the session now (MQTT 5 lets a client lower its expiry to 0 on the way out)."""
    properties = Properties(PacketTypes.DISCONNECT)
    properties.SessionExpiryInterval = 0
    return properties


def connect_persistent(
    client: mqtt.Client,
    address: BrokerAddress,
    *,
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    keepalive: int = KEEPALIVE_S,
    asynchronous: bool = False,
    credentials: Credentials | None = None,
) -> None:
    """Connect with clean_start=False on every connect, so queued replies survive disconnects and broker restarts.

    `asynchronous` returns at once and lets paho's loop connect (and keep retrying) in the background.
    """
    apply_credentials(client, address, credentials)
    connect = client.connect_async if asynchronous else client.connect
    connect(
        address.host,
        address.port,
        keepalive=keepalive,
        clean_start=False,
        properties=session_properties(session_expiry_s),
    )


def message_expiry(seconds: int) -> Properties:
    """PUBLISH properties that let the broker discard a message nobody fetched in time."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = seconds
    return properties


def publish_packet_bytes(topic: str, payload_len: int, *, qos: int = 1, properties_len: int = 0) -> int:
    """Bytes of one MQTT v5 PUBLISH packet on the wire (fixed header, topic, packet id, properties, payload).

    The byte counts we report are MQTT packet bytes; TCP/IP framing is not included.
    """
    props = properties_len + _varint_len(properties_len)
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + props + payload_len
    return 1 + _varint_len(remaining) + remaining


def _varint_len(value: int) -> int:
    length = 1
    while value >= 128:
        value //= 128
        length += 1
    return length
