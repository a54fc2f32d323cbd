"""A lean MQTT 5 client for the cache server's hot path: one thread, whole reads and writes, a tuple per message.

paho spends ~130-170 µs of CPU per request/reply pair on the server's side on this machine (a Properties
object per packet, three recv calls per packet, a thread hand-off and a lock per publish; see
docs/scaling.md). The server needs only a small part of MQTT 5: CONNECT with a persistent session and a will,
one shared subscription with retain handling, QoS 1 PUBLISH both ways with manual acknowledgement, PINGREQ and
DISCONNECT. `ServerLink` does exactly that from its owner's thread: `poll()` reads everything the socket holds
and returns the PUBLISHes as plain tuples, `publish()` and `ack()` append packets to one output buffer, and
`flush()` writes it with one send. It keeps the measured facts of fedwire.mqtt: TCP_NODELAY, clean_start=False
on every connect with a SessionExpiryInterval, reconnect with back-off (1 s doubling to 30 s), and it resends
the QoS 1 messages the broker has not acknowledged after a reconnect. Not thread-safe: one thread owns it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from fedwire.constants import DEFAULT_SESSION_EXPIRY_S, MAX_PAYLOAD_BYTES
from fedwire.mqtt import KEEPALIVE_S, BrokerAddress, Credentials

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
READ_CHUNK = 1 << 18
MAX_PACKET_ID = 0xFFFF
RECEIVE_MAXIMUM_DEFAULT = 0xFFFF  # what a broker allows in flight when its CONNACK does not say

# Packet types (MQTT 5 §2.1.2).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
PACKET_NAMES = {
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBACK: "SUBACK",
    UNSUBACK: "UNSUBACK",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}

# Properties (MQTT 5 §2.2.2.2) by identifier: how their value is encoded.
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR, 0x12: _UTF8,
    0x13: _TWO, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8,
    0x1F: _UTF8, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
SESSION_EXPIRY_INTERVAL = 0x11
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21

# Subscription options byte (MQTT 5 §3.8.3.1): QoS in bits 0-1, retain handling in bits 4-5.
RETAIN_HANDLING_NEVER = 2


class Inbound(NamedTuple):
    """One PUBLISH from the broker: what the server needs of it and nothing more."""

    topic: str
    payload: bytes
    mid: int  # the packet identifier (0 at QoS 0)
    qos: int
    retain: bool
    epoch: int  # the connection it came on: an acknowledgement is only valid on that connection


class LinkLost(ConnectionError):
    """The connection to the broker ended (the owner keeps polling: the link reconnects by itself)."""


class BrokerRefused(ConnectionError):
    """The broker refused the CONNECT (bad credentials, not authorised, ...): retrying will not help."""

    def __init__(self, reason: int, text: str = "") -> None:
        super().__init__(f"broker refused the connection: reason code 0x{reason:02x}{' ' + text if text else ''}")
        self.reason = reason


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when the connection ends without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _read_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it) of a variable byte integer; ValueError when longer than 4 bytes."""
    value, shift = 0, 0
    for _ in range(4):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("malformed variable byte integer")


def parse_properties(data: bytes | bytearray | memoryview, pos: int) -> tuple[dict[int, object], int]:
    """The properties block at `pos` as {identifier: value} (user properties dropped), and the position after it."""
    length, pos = _read_varint(data, pos)
    end = pos + length
    found: dict[int, object] = {}
    while pos < end:
        identifier = data[pos]
        kind = _PROPERTY_TYPES.get(identifier)
        pos += 1
        value: object
        if kind == _BYTE:
            value, pos = data[pos], pos + 1
        elif kind == _TWO:
            value, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif kind == _FOUR:
            value, pos = int.from_bytes(data[pos : pos + 4], "big"), pos + 4
        elif kind == _VARINT:
            value, pos = _read_varint(data, pos)
        elif kind in (_UTF8, _BINARY):
            size = int.from_bytes(data[pos : pos + 2], "big")
            raw = bytes(data[pos + 2 : pos + 2 + size])
            value, pos = (raw.decode(errors="replace") if kind == _UTF8 else raw), pos + 2 + size
        elif kind == _PAIR:
            for _ in range(2):
                pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
            continue
        else:
            raise ValueError(f"unknown MQTT property 0x{identifier:02x}")
        found[identifier] = value
    if pos != end:
        raise ValueError("malformed properties")
    return found, end


def connect_packet(
    *,
    client_id: str,
    keepalive: int,
    session_expiry_s: int,
    will: Will | None,
    username: str = "",
    password: str | None = None,
) -> bytes:
    """CONNECT, MQTT 5, clean_start=False, with a SessionExpiryInterval (without it a v5 session ends at disconnect)."""
    flags = 0x00  # clean start off
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3) | (0x20 if will.retain else 0)  # will flag, will QoS 1, will retain
        payload += b"\x00" + _utf8(will.topic) + _utf8(will.payload)
    if username:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password.encode())
    properties = bytes((SESSION_EXPIRY_INTERVAL,)) + session_expiry_s.to_bytes(4, "big")
    header = _utf8("MQTT") + bytes((5, flags)) + keepalive.to_bytes(2, "big") + _varint(len(properties)) + properties
    return _packet(CONNECT << 4, header + payload)


def publish_packet(topic: bytes, payload: bytes, mid: int, *, retain: bool = False, dup: bool = False) -> bytes:
    """A QoS 1 PUBLISH without properties; `topic` already carries its two length bytes."""
    first = 0x32 | (0x08 if dup else 0) | (0x01 if retain else 0)
    size = len(topic) + 3 + len(payload)
    if size < 0x4000:  # a reply's usual size: two length bytes at most
        header = bytes((first, size)) if size < 0x80 else bytes((first, (size & 0x7F) | 0x80, size >> 7))
    else:
        header = bytes((first,)) + _varint(size)
    return b"".join((header, topic, mid.to_bytes(2, "big"), b"\x00", payload))


def puback_packet(mid: int) -> bytes:
    """PUBACK with reason Success and no properties (remaining length 2, MQTT 5 §3.4.2.1)."""
    return b"\x40\x02" + mid.to_bytes(2, "big")


_PUBACK_STRUCT = struct.Struct(">BBH")


class ServerLink:
    """One MQTT 5 connection used by one thread; reconnects by itself inside `poll()`.

    Every outgoing PUBLISH is QoS 1 and stays in flight (at most the broker's Receive Maximum of them, the rest
    wait their turn) until its PUBACK; after a reconnect the ones in flight are sent again (DUP) when the broker
    kept the session, or as new messages when it did not. Incoming PUBLISHes are acknowledged only by `ack()`,
    and only on the connection they came on: after a reconnect the broker redelivers what we had not
    acknowledged, so a stale acknowledgement (whose packet id the broker may since have given to another
    message) is dropped instead.
    """

    def __init__(
        self,
        *,
        address: BrokerAddress,
        client_id: str,
        credentials: Credentials | None = None,
        will: Will | None = None,
        keepalive: int = KEEPALIVE_S,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.credentials = credentials or Credentials()
        self.will = will
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.epoch = 0  # connections made so far; Inbound.epoch names the one a message came on
        self.session_present = False
        self.refused = 0  # PUBACKs with a failure reason (the broker would not take that message)
        self._sock: socket.socket | None = None
        self._rbuf = bytearray()
        self._out: list[bytes] = []
        self._pending_out = b""  # what a short send left of the last write
        self._subscriptions: list[tuple[str, int]] = []
        self._suback_wanted: dict[int, str] = {}  # SUBSCRIBE packet id -> its filter, until the SUBACK
        self._unsuback_wanted: dict[int, str] = {}  # UNSUBSCRIBE packet id -> its filter, until the UNSUBACK
        self._leaving: list[str] = []  # filters unsubscribed whose UNSUBACK has not come yet
        self.subscribed = False
        self.unsubscribed = False
        self._inflight: dict[int, tuple[bytes, bytes, bool]] = {}  # mid -> (topic with length, payload, retain)
        self._waiting: deque[tuple[bytes, bytes, bool]] = deque()
        self._receive_maximum = RECEIVE_MAXIMUM_DEFAULT
        self._next_mid = 1
        self._last_out = 0.0
        self._ping_sent_at = 0.0
        self._retry_at = 0.0
        self._backoff = RECONNECT_MIN_S
        self._topics: dict[str, bytes] = {}

    # ------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Open the connection and wait for CONNACK; BrokerRefused when refused, OSError when unreachable."""
        sock = socket.create_connection((self.address.host, self.address.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.address.tls:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.address.host)
            sock.sendall(
                connect_packet(
                    client_id=self.client_id,
                    keepalive=self.keepalive,
                    session_expiry_s=self.session_expiry_s,
                    will=self.will,
                    username=self.credentials.username,
                    password=self.credentials.password(),
                )
            )
            rbuf = bytearray()
            deadline = time.monotonic() + timeout
            while True:
                packet = _take_packet(rbuf)
                if packet is not None:
                    break
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(READ_CHUNK)
                if not data:
                    raise LinkLost("the broker closed the connection before CONNACK")
                rbuf += data
            first, body = packet
            if first >> 4 != CONNACK or len(body) < 2:
                raise LinkLost(f"expected CONNACK, got packet type {first >> 4}")
            reason = body[1]
            properties, _ = parse_properties(body, 2) if len(body) > 2 else ({}, 2)
            if reason >= 0x80:
                raise BrokerRefused(reason, str(properties.get(REASON_STRING, "")))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._rbuf = rbuf
        self.epoch += 1
        self.session_present = bool(body[0] & 0x01)
        self._receive_maximum = int(properties.get(RECEIVE_MAXIMUM, RECEIVE_MAXIMUM_DEFAULT))  # type: ignore[call-overload]
        self.keepalive = int(properties.get(SERVER_KEEP_ALIVE, self.keepalive))  # type: ignore[call-overload]
        self._backoff = RECONNECT_MIN_S
        self._last_out = time.monotonic()
        self._ping_sent_at = 0.0
        self._out = []
        self._pending_out = b""
        self._resume()

    def _tls_context(self) -> ssl.SSLContext:
        """As fedwire.mqtt.apply_credentials: verify the broker against the CA file, TLS 1.2 at least."""
        credentials = self.credentials
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=credentials.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if credentials.cert_file:
            context.load_cert_chain(credentials.cert_file, credentials.key_file)
        return context

    def _resume(self) -> None:
        """After a CONNACK: subscribe again, and send again what the broker had not acknowledged."""
        self.subscribed = not self._subscriptions
        self._suback_wanted.clear()
        self._unsuback_wanted.clear()
        for topic_filter, options in self._subscriptions:
            self._send_subscribe(topic_filter, options)
        for topic_filter in self._leaving:
            self._send_unsubscribe(topic_filter)
        inflight = sorted(self._inflight.items())
        if self.session_present:
            for mid, (topic, payload, retain) in inflight:
                self._out.append(publish_packet(topic, payload, mid, retain=retain, dup=True))
        else:  # the broker forgot our session: what was in flight goes out as new messages
            self._inflight.clear()
            self._waiting.extendleft(message for _mid, message in reversed(inflight))
        self._release_waiting()

    def _lost(self, why: str) -> None:
        if self._sock is None:
            return
        log.warning("connection to %s lost (%s); reconnecting", self.address.url, why)
        self._close_socket()
        self._retry_at = time.monotonic()  # the first retry at once, then with back-off

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._rbuf = bytearray()
        self._out = []
        self._pending_out = b""
        self.subscribed = False

    def _reconnect(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        try:
            self.connect()
            log.info("reconnected to %s (session %s)", self.address.url, "kept" if self.session_present else "new")
        except (OSError, ValueError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(RECONNECT_MAX_S, self._backoff * 2)
            log.warning("reconnecting to %s failed (%s); next try in %.0f s", self.address.url, exc, self._backoff)

    def close(self) -> None:
        """Drop the connection without DISCONNECT (the broker then publishes our will)."""
        self._close_socket()

    def disconnect(self, *, session_expiry_s: int | None = None) -> None:
        """Send DISCONNECT (reason Normal: no will), optionally lowering the session expiry (0 ends it now)."""
        if self._sock is None:
            return
        if session_expiry_s is None:
            packet = b"\xe0\x00"
        else:
            properties = bytes((SESSION_EXPIRY_INTERVAL,)) + session_expiry_s.to_bytes(4, "big")
            packet = _packet(DISCONNECT << 4, b"\x00" + _varint(len(properties)) + properties)
        self._out.append(packet)
        with contextlib.suppress(OSError):
            self._sock.settimeout(CONNECT_TIMEOUT_S)
            self._sock.sendall(self._pending_out + b"".join(self._out))
        self._out = []
        self._pending_out = b""
        self._close_socket()

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, topic_filter: str, *, qos: int = 1, retain_handling: int = 0) -> None:
        """Subscribe now and after every reconnect; `subscribed` turns True once the SUBACK granted it."""
        options = qos | (retain_handling << 4)
        self._subscriptions.append((topic_filter, options))
        self.subscribed = False
        if self._sock is not None:
            self._send_subscribe(topic_filter, options)

    def _send_subscribe(self, topic_filter: str, options: int) -> None:
        mid = self._allocate_mid()
        self._suback_wanted[mid] = topic_filter
        body = mid.to_bytes(2, "big") + b"\x00" + _utf8(topic_filter) + bytes((options,))
        self._out.append(_packet((SUBSCRIBE << 4) | 0x02, body))

    def unsubscribe(self, topic_filter: str) -> None:
        """Leave a subscription (sent again after a reconnect until acknowledged); `unsubscribed` turns True at
        the UNSUBACK."""
        self._subscriptions = [(f, o) for f, o in self._subscriptions if f != topic_filter]
        self._leaving.append(topic_filter)
        self.unsubscribed = False
        if self._sock is not None:
            self._send_unsubscribe(topic_filter)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        mid = self._allocate_mid()
        self._unsuback_wanted[mid] = topic_filter
        self._out.append(_packet((UNSUBSCRIBE << 4) | 0x02, mid.to_bytes(2, "big") + b"\x00" + _utf8(topic_filter)))

    # ------------------------------------------------------------ publishing and acknowledging

    def topic_bytes(self, topic: str) -> bytes:
        """A topic with its two length bytes, cached (replies go to the same few topics again and again)."""
        encoded = self._topics.get(topic)
        if encoded is None:
            if len(self._topics) > 100_000:
                self._topics.clear()
            encoded = self._topics[topic] = _utf8(topic)
        return encoded

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a QoS 1 PUBLISH; it is written by the next flush() and kept until the broker acknowledges it.

        Like fedwire.mqtt.AcknowledgedPublisher, refuses (ValueError) a payload over the wire's limit: the broker
        would disconnect us for the packet, and sending it again after every reconnect would stall the link.
        """
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a {len(payload)} B message for {topic} exceeds the wire's {MAX_PAYLOAD_BYTES} B limit")
        encoded = self._topics.get(topic) or self.topic_bytes(topic)
        if self._waiting or len(self._inflight) >= self._receive_maximum:
            self._waiting.append((encoded, payload, retain))
            self._release_waiting()
            return
        mid = self._allocate_mid()
        self._inflight[mid] = (encoded, payload, retain)
        if self._sock is not None:
            self._out.append(publish_packet(encoded, payload, mid, retain=retain))

    def _release_waiting(self) -> None:
        waiting, inflight, out = self._waiting, self._inflight, self._out
        while waiting and len(inflight) < self._receive_maximum:
            topic, payload, retain = waiting.popleft()
            mid = self._allocate_mid()
            inflight[mid] = (topic, payload, retain)
            if self._sock is not None:
                out.append(publish_packet(topic, payload, mid, retain=retain))

    def _allocate_mid(self) -> int:
        for _ in range(MAX_PACKET_ID):
            mid = self._next_mid
            self._next_mid = 1 if mid == MAX_PACKET_ID else mid + 1
            if mid not in self._inflight and mid not in self._suback_wanted and mid not in self._unsuback_wanted:
                return mid
        raise RuntimeError("every MQTT packet identifier is in use")

    def ack(self, mid: int, epoch: int) -> bool:
        """Acknowledge (PUBACK) a QoS 1 message from the connection `epoch`; False when that connection is gone."""
        if epoch != self.epoch or self._sock is None:
            return False
        self._out.append(puback_packet(mid))
        return True

    def unacknowledged(self) -> int:
        """Our QoS 1 messages the broker has not acknowledged yet (in flight or waiting their turn)."""
        return len(self._inflight) + len(self._waiting)

    # ------------------------------------------------------------ the loop

    def flush(self) -> None:
        """Write what is queued, as far as the socket takes it now (the rest at the next flush or poll)."""
        sock = self._sock
        if sock is None:
            return
        if self._out:
            data = self._pending_out + b"".join(self._out) if self._pending_out else b"".join(self._out)
            self._out = []
        elif self._pending_out:
            data = self._pending_out
        else:
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            self._lost(f"send failed: {exc}")
            return
        self._pending_out = data[sent:] if sent < len(data) else b""
        self._last_out = time.monotonic()

    def socket(self) -> socket.socket | None:
        """The connected socket (for its kernel counters), None while disconnected."""
        return self._sock

    def keep_alive(self) -> None:
        """Ping if the connection has been idle, and write what is queued (for an owner busy elsewhere)."""
        self._keep_alive()
        self.flush()

    def fileno(self) -> int:
        """The socket's descriptor, for a caller that waits on many links with one selector (-1 when closed)."""
        return self._sock.fileno() if self._sock is not None else -1

    def read_ready(self) -> list[Inbound]:
        """Read and parse what the socket holds now (a selector said it is readable); pings when idle.

        For a caller driving many links from one selector loop; it does not reconnect (poll() does).
        """
        if self._sock is None:
            return []
        self._keep_alive()
        return self._read()

    def poll(self, timeout: float) -> list[Inbound]:
        """Flush, wait up to `timeout` for data, read all of it; the PUBLISHes received, in order.

        Handles PUBACK, SUBACK, UNSUBACK and PINGRESP itself, pings when the connection is idle, and reconnects
        (with back-off) when it was lost, so the owner only ever calls poll, publish, ack and flush.
        """
        if self._sock is None:
            self._reconnect()
            if self._sock is None:
                time.sleep(min(timeout, max(0.0, self._retry_at - time.monotonic())))
                return []
        self._keep_alive()
        self.flush()
        sock = self._sock
        if sock is None:
            return []
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        if not pending:
            writers = [sock] if self._pending_out else []
            try:
                readable, writable, _ = select.select([sock], writers, [], timeout)
            except (OSError, ValueError) as exc:
                self._lost(f"select failed: {exc}")
                return []
            if writable:
                self.flush()
            if not readable:
                return []
        return self._read()

    def _read(self) -> list[Inbound]:
        sock = self._sock
        assert sock is not None
        rbuf = self._rbuf
        while True:
            try:
                data = sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                self._lost(f"receive failed: {exc}")
                return []
            if not data:
                self._lost("the broker closed the connection")
                return []
            rbuf += data
            if len(data) < READ_CHUNK and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        try:
            return self._parse()
        except (ValueError, IndexError, LinkLost) as exc:
            self._lost(str(exc) or type(exc).__name__)
            return []

    def _parse(self) -> list[Inbound]:
        """Take every complete packet off the read buffer."""
        buf = self._rbuf
        size = len(buf)
        pos = 0
        out: list[Inbound] = []
        epoch = self.epoch
        while size - pos >= 2:
            first = buf[pos]
            # Remaining length: a variable byte integer of at most 4 bytes.
            length, shift, at, complete = 0, 0, pos + 1, False
            while at < size:
                byte = buf[at]
                at += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed remaining length")
            if not complete:
                break
            end = at + length
            if end > size:
                break
            kind = first >> 4
            if kind == PUBLISH:
                qos = (first >> 1) & 0x03
                if qos > 1:  # we subscribe at QoS 1, so the broker never sends QoS 2
                    raise ValueError("a QoS 2 PUBLISH on a QoS 1 subscription")
                topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1])
                topic = buf[at + 2 : topic_end].decode()
                if qos:
                    mid = (buf[topic_end] << 8) | buf[topic_end + 1]
                    topic_end += 2
                else:
                    mid = 0
                # Properties: skipped whole (we asked for no topic aliases, so none can matter).
                properties, body = buf[topic_end], topic_end + 1
                if properties >= 0x80:
                    properties, body = _read_varint(buf, topic_end)
                body += properties
                out.append(Inbound(topic, bytes(buf[body:end]), mid, qos, bool(first & 0x01), epoch))
            elif kind == PUBACK:
                self._acknowledged((buf[at] << 8) | buf[at + 1], buf[at + 2] if length > 2 else 0)
            elif kind == PINGRESP:
                self._ping_sent_at = 0.0
            elif kind == SUBACK:
                self._on_suback((buf[at] << 8) | buf[at + 1], buf, at + 2, end)
            elif kind == UNSUBACK:
                left = self._unsuback_wanted.pop((buf[at] << 8) | buf[at + 1], None)
                if left is not None:
                    self._leaving = [f for f in self._leaving if f != left]
                    self.unsubscribed = not self._leaving
            elif kind == DISCONNECT:
                reason = buf[at] if length else 0
                del buf[:end]
                raise LinkLost(f"the broker sent DISCONNECT with reason code 0x{reason:02x}")
            else:
                log.warning("ignoring unexpected %s packet", PACKET_NAMES.get(kind, f"type {kind}"))
            pos = end
        del buf[:pos]
        return out

    def _acknowledged(self, mid: int, reason: int) -> None:
        if self._inflight.pop(mid, None) is None:
            return
        if reason >= 0x80:
            # Acknowledged all the same: the broker will not take it, and sending it again would not help.
            self.refused += 1
            log.error("broker refused message %d: reason code 0x%02x", mid, reason)
        if self._waiting:
            self._release_waiting()

    def _on_suback(self, mid: int, buf: bytearray, at: int, end: int) -> None:
        topic_filter = self._suback_wanted.pop(mid, None)
        if topic_filter is None:
            return
        _, at = parse_properties(buf, at)
        reasons = bytes(buf[at:end])
        if any(code >= 0x80 for code in reasons):
            log.error("subscription to %s refused: reason code(s) %s", topic_filter, reasons.hex())
            return
        self.subscribed = not self._suback_wanted

    def _keep_alive(self) -> None:
        """PINGREQ after keepalive/2 s without sending; a missing PINGRESP after keepalive s means the link is dead."""
        if not self.keepalive or self._sock is None:
            return
        now = time.monotonic()
        if self._ping_sent_at and now - self._ping_sent_at > self.keepalive:
            self._lost("no PINGRESP")
            return
        if not self._ping_sent_at and now - self._last_out >= self.keepalive / 2:
            self._out.append(b"\xc0\x00")
            self._ping_sent_at = now


def _take_packet(buf: bytearray) -> tuple[int, bytes] | None:
    """One complete packet (first byte, body) off the front of `buf`, or None while it is incomplete."""
    if len(buf) < 2:
        return None
    try:
        length, at = _read_varint(buf, 1)
    except IndexError:
        return None
    if len(buf) < at + length:
        return None
    first, body = buf[0], bytes(buf[at : at + length])
    del buf[: at + length]
    return first, body
