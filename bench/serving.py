"""Serving benchmark: N simulated devices over MQTT against the real cache server, next to raw Mosquitto QoS 1.

A private Mosquitto and the real server (`broker_server/main.py --broker`, SQLite store) run as
subprocesses. For each device count N, a few load-generator processes each drive many paho clients
(one MQTT connection per simulated device) from one selector loop: every device says hello, registers
synthetic samples (random 256-bit codes, 10 classes), sends one warm-up fetch (which builds the relations),
then runs closed-loop, one request in flight, for a fixed time: fetch or update_fetch of a batch, drawn at
random. Reported: samples served per second, request latency p50/p99 (publish to reply, at the device),
and CPU and RSS of the server (psutil on its PID), of Mosquitto and of the load generators. Beside it the
raw Mosquitto QoS 1 rate, one paho publisher to one subscriber through the same broker: every request
costs the broker two such messages (request in, reply out), so that rate bounds what any server can do.

`--tls` measures the same steps twice in one run: on the plain broker above, then on a secure one
(`fedwire.fleet`: dynamic-security plugin, per-device roles), where every simulated device is provisioned
with a password (timed, one admin session) and connects over TLS to `broker.tls_address`, the server
connects with its own identity to the authenticated loopback listener (as `broker_server/main.py` does on a
secure private broker) and the raw baseline runs over TLS too. Per mode it reports the time from socket
connect to CONNACK per device, bytes per request (device side from the kernel's TCP_INFO counters of every
device socket, so TLS records are included; and Mosquitto's own `$SYS/broker/bytes/*` counters, which count
MQTT packets, read by a bench observer identity allowed `$SYS/#`), server and Mosquitto CPU per request,
and TLS/plain ratios. `--modes plain auth tls` adds devices authenticated over loopback plaintext (the
plugin's cost without TLS's).

Everything is loopback, bounded in message count and time, and stops by itself; the broker, server and
load-generator processes are ended by their PIDs.

    python -m bench serving [--quick] [--devices 10 100 1000] [--duration 20] [--tls | --modes plain auth tls]
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import multiprocessing as mp
import os
import secrets
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from queue import Empty
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import psutil
from tqdm import tqdm

from android_harness.processes import ServerProcess, server_command
from bench._report import machine_line, markdown_table
from broker_server.mqtt_link import ServerLink
from fedwire import (
    ErrorReply,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    Register,
    RegisterAck,
    UpdateFetch,
    decode,
    down_topic,
    encode,
    up_topic,
)
from fedwire.arrays import quantise_logits
from fedwire.constants import Kind
from fedwire.dynsec import SERVER_ROLE, DynsecAdmin
from fedwire.fleet import SecurityDir
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, Credentials, apply_credentials, connect_persistent, make_client
from fedwire.topics import SERVER_STATUS

CLASSES = 10
# A request path's variant with the server's defences on (docs/robustness.md).
DEFENDED = "+defences"
HASH_BITS = 256
SEED = 0
RAW_TOPIC = "bench/raw"
STEP_TIMEOUT_S = 180.0  # registration or warm-up of one device count must finish within this
DRAIN_S = 15.0  # after the timed window, how long devices wait for their last replies
SERVER_START_S = 60.0
MODES = ("plain", "auth", "tls")  # devices: anonymous plaintext | password over loopback plaintext | password over TLS
REQUEST_PATHS = ("legacy", "batched")  # broker_server/main.py --request-path; the first is the ratios' base
OPEN_LOOP_DEVICES = 200
OPEN_LOOP_RATE = 10.0
SECURE_SERVER_ID = "fedcache-server-bench"  # username = client id on a secure broker
OBSERVER_ID = "fedcache-bench-observer"
RAW_IDS = ("fedcache-bench-raw-pub", "fedcache-bench-raw-sub")
SYS_BYTES = ("$SYS/broker/bytes/received", "$SYS/broker/bytes/sent")
SYS_PUBLISH_RECEIVED = "$SYS/broker/publish/messages/received"
SYS_TOPICS = (*SYS_BYTES, SYS_PUBLISH_RECEIVED)
# struct tcp_info (linux/tcp.h): tcpi_segs_out, tcpi_segs_in (u32) at 136; tcpi_bytes_acked, tcpi_bytes_received (u64)
# at 120. Linux 4.2 and later.
TCP_INFO_LEN = 144
IPV4_TCP_HEADER_BYTES = 52  # 20 B IPv4 + 20 B TCP + 12 B timestamp option, per segment (no link layer)

# --------------------------------------------------------------------------- load generator (worker side)


@dataclass(frozen=True)
class TcpCounters:
    """A TCP socket's counters from the kernel (TCP_INFO): payload bytes and segments (pure ACKs included) both ways.

    Counted below TLS, so a TLS connection's figures include its records' headers, nonces and tags.
    """

    bytes_sent: int = 0  # tcpi_bytes_acked: sent and acknowledged (1 more for the SYN)
    bytes_received: int = 0
    segments_out: int = 0
    segments_in: int = 0

    @classmethod
    def parse(cls, info: bytes) -> TcpCounters:
        acked, received = struct.unpack_from("<QQ", info, 120)
        segments_out, segments_in = struct.unpack_from("<II", info, 136)
        return cls(bytes_sent=acked, bytes_received=received, segments_out=segments_out, segments_in=segments_in)

    @classmethod
    def of(cls, sock: Any) -> TcpCounters:
        """The counters of a socket (an SSL socket's underlying TCP one alike)."""
        return cls.parse(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))

    def __add__(self, other: TcpCounters) -> TcpCounters:
        return TcpCounters(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def __sub__(self, other: TcpCounters) -> TcpCounters:
        return TcpCounters(*(a - b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.bytes_sent, self.bytes_received, self.segments_out, self.segments_in

    @property
    def wire_bytes(self) -> int:
        """Payload both ways plus IPv4 and TCP headers of every segment."""
        return self.bytes_sent + self.bytes_received + IPV4_TCP_HEADER_BYTES * (self.segments_out + self.segments_in)


def tcp_totals(clients: Sequence[mqtt.Client]) -> TcpCounters:
    """Sum of the TCP counters of the clients' connected sockets."""
    total = TcpCounters()
    for client in clients:
        sock = client.socket()
        if sock is not None:
            total += TcpCounters.of(sock)
    return total


@dataclass(frozen=True)
class LoadSpec:
    """What one load-generator process runs; picklable, so it can cross into a spawned process."""

    address: BrokerAddress
    devices: tuple[str, ...]
    first_index: int
    samples: int
    batch: int
    fetch_share: float
    encoding: LogitEncoding
    seed: int
    max_requests: int  # per device, so a run is bounded in messages as well as in time
    credentials: tuple[Credentials, ...] = ()  # one per device on a secure broker; empty: anonymous
    rate: float = 0.0  # open loop: requests per second per device, Poisson arrivals; 0: closed loop


@dataclass
class _Device:
    """One simulated device's state in a load generator."""

    name: str
    index: int  # global device number, seeds its samples
    client: mqtt.Client
    ids: np.ndarray
    cursor: int = 0
    version: int = 0
    cid: int = 0
    sent_at: float = 0.0
    sent_kind: str = ""
    requests: int = 0
    subscribed: bool = False
    connected_at: float = 0.0  # monotonic time of its CONNACK
    in_flight: dict[int, tuple[float, str]] = field(default_factory=dict)  # open loop: cid -> (sent at, kind)
    next_at: float = 0.0  # open loop: when its next request is due
    stage: str = "connect"  # connect -> hello -> register -> idle -> warm -> ready -> load -> done


@dataclass
class WorkerResult:
    """What a load generator reports after its timed window."""

    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds, replies inside the window
    served: int = 0  # fetched ids answered inside the window
    teachers: int = 0  # of those, ids that got a teacher
    requests: int = 0  # replies received inside the window
    errors: int = 0
    late: int = 0  # replies after the window (drain)
    lost: int = 0  # requests never answered within the drain time
    last_reply: float = 0.0  # monotonic time of the last reply inside the window (the clock is system-wide)
    handshake_s: list[float] = field(default_factory=list)  # per device: paho's connect() (TCP + TLS handshake)
    connack_s: list[float] = field(default_factory=list)  # per device: socket connect to CONNACK
    tcp: TcpCounters = TcpCounters()  # the devices' sockets over the timed window
    tls: str = ""  # negotiated TLS version and cipher of the first device, "" over plaintext


class _Loop:
    """Many paho clients driven by one selector loop (no thread per connection: 250 threads would starve 2 cores)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.writers: set[mqtt.Client] = set()
        self._last_misc = time.monotonic()

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_register_write = lambda c, _u, _s: self.writers.add(c)
        client.on_socket_unregister_write = lambda c, _u, _s: self.writers.discard(c)
        client.on_socket_open = _open_socket(self, client.on_socket_open)
        client.on_socket_close = lambda c, _u, s: self._forget(s)

    def _forget(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def step(self, timeout: float = 0.005) -> None:
        for client in list(self.writers):
            client.loop_write()
        for key, _ in self.selector.select(timeout):
            _read(key.data)
        now = time.monotonic()
        if now - self._last_misc > 1.0:
            self._last_misc = now
            for key in list(self.selector.get_map().values()):
                key.data.loop_misc()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            self.step()
        return True


def _read(client: mqtt.Client) -> None:
    """Read what the socket has; for TLS also what the SSL object already decrypted (select cannot see that)."""
    client.loop_read()
    for _ in range(64):
        sock = client.socket()
        pending = getattr(sock, "pending", None)
        if pending is None or pending() <= 0 or client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return


def _open_socket(loop: _Loop, previous: Any) -> Callable[[mqtt.Client, Any, Any], None]:
    def on_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if previous is not None:
            previous(client, userdata, sock)  # TCP_NODELAY from fedwire.mqtt.make_client
        loop.selector.register(sock, selectors.EVENT_READ, client)

    return on_open


def _connected(device: _Device) -> bool:
    return device.connected_at > 0


def _synthetic_samples(spec: LoadSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and hashes of one device: random classes, clustered codes (a few centres per class)."""
    rng = np.random.default_rng([spec.seed, index])
    centres = np.random.default_rng([spec.seed, 10**9]).integers(0, 256, (CLASSES * 8, HASH_BITS // 8), np.uint8)
    labels = rng.integers(0, CLASSES, spec.samples).astype(np.uint16)
    centre = labels * 8 + rng.integers(0, 8, spec.samples)
    flips = np.packbits(rng.random((spec.samples, HASH_BITS)) < 0.1, axis=1, bitorder="little")
    return labels, centres[centre] ^ flips


def load_worker(spec: LoadSpec, control: Any, warm: Any, go: Any, window: Any) -> None:
    """Entry point of one load-generator process; talks to the orchestrator through `control` (a queue)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator ends us; Ctrl-C goes to it
    rng = np.random.default_rng([spec.seed, spec.first_index, 7])
    loop = _Loop()
    devices: dict[str, _Device] = {}
    pool = [(3.0 * rng.standard_normal((spec.batch, CLASSES))).astype(np.float32) for _ in range(32)]
    result = WorkerResult()
    state: dict[str, float] = {"start": 0.0, "deadline": 0.0}
    outstanding: set[str] = set()

    def send(device: _Device, message: Any) -> None:
        device.cid = message.cid
        device.sent_at = time.monotonic()
        device.sent_kind = message.kind.value
        if device.stage == "load" and spec.rate > 0:
            device.in_flight[message.cid] = (device.sent_at, device.sent_kind)
        else:
            outstanding.add(device.name)
        device.client.publish(up_topic(device.name, message.kind), encode(message), qos=1)

    def next_ids(device: _Device) -> np.ndarray:
        start = device.cursor
        device.cursor = (device.cursor + spec.batch) % len(device.ids)
        return np.sort(device.ids[(start + np.arange(spec.batch)) % len(device.ids)])

    def next_request(device: _Device) -> Any:
        device.cid += 1
        if rng.random() < spec.fetch_share:
            return Fetch(device=device.name, cid=device.cid, ids=next_ids(device), encoding=spec.encoding)
        device.version += 1
        ids = next_ids(device)
        return UpdateFetch(
            device=device.name,
            cid=device.cid,
            ids=ids,
            logits=pool[device.version % len(pool)],
            version=device.version,
            fetch_ids=next_ids(device),
            encoding=spec.encoding,
        )

    def on_message(_c: mqtt.Client, device: _Device, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        reply = decode(bytes(message.payload))
        if device.stage in ("load", "done") and spec.rate > 0:
            on_open_loop_reply(device, reply, now)
            return
        if reply.cid != device.cid or device.name not in outstanding:
            return  # a redelivered or stale reply
        outstanding.discard(device.name)
        if isinstance(reply, ErrorReply):
            result.errors += 1
            raise RuntimeError(f"{device.name}: server rejected {reply.request}: {reply.code.value} {reply.message}")
        if device.stage == "hello" and isinstance(reply, HelloAck):
            labels, hashes = _synthetic_samples(spec, device.index)
            device.stage = "register"
            send(device, Register(device=device.name, cid=device.cid + 1, ids=device.ids, labels=labels, hashes=hashes))
        elif device.stage == "register" and isinstance(reply, RegisterAck):
            device.stage = "idle"
        elif device.stage == "warm" and isinstance(reply, Knowledge):
            device.stage = "ready"
        elif device.stage == "load" and isinstance(reply, Knowledge):
            if now <= state["deadline"]:
                result.latencies.setdefault(device.sent_kind, []).append(now - device.sent_at)
                result.requests += 1
                result.served += int(reply.ids.size)
                result.last_reply = now
                result.teachers += int(np.count_nonzero(reply.counts))
                device.requests += 1
                if device.requests < spec.max_requests:
                    send(device, next_request(device))
                else:
                    device.stage = "done"
            else:
                result.late += 1
                device.stage = "done"

    def on_open_loop_reply(device: _Device, reply: Any, now: float) -> None:
        sent = device.in_flight.pop(reply.cid, None)
        if sent is None:
            return  # a redelivered or stale reply
        if isinstance(reply, ErrorReply):
            result.errors += 1
            raise RuntimeError(f"{device.name}: server rejected {reply.request}: {reply.code.value} {reply.message}")
        sent_at, kind = sent
        if sent_at > state["deadline"]:
            return  # sent after the window (cannot happen: sending stops at the deadline)
        if now <= state["deadline"]:
            result.latencies.setdefault(kind, []).append(now - sent_at)
            result.requests += 1
            result.served += int(reply.ids.size)
            result.last_reply = now
            result.teachers += int(np.count_nonzero(reply.counts))
        else:
            result.late += 1
            # A request sent in the window and answered in the drain still counts for its latency.
            result.latencies.setdefault(kind, []).append(now - sent_at)

    def on_subscribe(_c: mqtt.Client, device: _Device, *_args: Any) -> None:
        device.subscribed = True

    def on_connect(client: mqtt.Client, device: _Device, _f: Any, reason: Any, _p: Any) -> None:
        device.connected_at = time.monotonic()
        if reason.is_failure:
            raise RuntimeError(f"{device.name}: broker refused the connection: {reason}")
        client.subscribe(down_topic(device.name), qos=1)

    def run_open_loop(everyone: list[_Device]) -> None:
        """Every device sends at its own Poisson times, whatever is still in flight, until the deadline."""
        for device in everyone:
            device.stage = "load"
            device.next_at = state["start"] + rng.exponential(1.0 / spec.rate)
        due = sorted((d.next_at, number) for number, d in enumerate(everyone))
        heapq.heapify(due)
        while True:
            now = time.monotonic()
            if now > state["deadline"]:
                break
            while due and due[0][0] <= now:
                at, number = heapq.heappop(due)
                device = everyone[number]
                if at <= state["deadline"] and device.requests < spec.max_requests:
                    device.requests += 1
                    send(device, next_request(device))
                    heapq.heappush(due, (at + rng.exponential(1.0 / spec.rate), number))
            wait = (due[0][0] - time.monotonic()) if due else 0.005
            loop.step(min(0.005, max(0.0, wait)))
        for device in everyone:
            device.stage = "done"

    credentials = spec.credentials or (None,) * len(spec.devices)
    for number, (name, identity) in enumerate(zip(spec.devices, credentials, strict=True)):
        # On a secure broker the client id is the username (the broker enforces it).
        client = make_client(client_id=name if identity is not None else f"bench-{name}")
        device = _Device(
            name=name, index=spec.first_index + number, client=client, ids=np.arange(spec.samples, dtype=np.uint32)
        )
        client.user_data_set(device)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        loop.attach(client)
        devices[name] = device
        # One device at a time, so that each one's time to CONNACK is its own (not its neighbours' handshakes).
        started = time.monotonic()
        connect_persistent(client, spec.address, credentials=identity)  # TCP connect and TLS handshake: blocking
        result.handshake_s.append(time.monotonic() - started)
        if not loop.run_until(partial(_connected, device), STEP_TIMEOUT_S):
            raise TimeoutError(f"{name}: no CONNACK in time")
        result.connack_s.append(device.connected_at - started)
        sock = client.socket()
        if not result.tls and isinstance(sock, ssl.SSLSocket):
            result.tls = f"{sock.version()} {(sock.cipher() or ('?',))[0]}"
    everyone = list(devices.values())
    if not loop.run_until(lambda: all(d.subscribed for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("devices did not connect and subscribe in time")

    started = time.monotonic()
    for device in everyone:
        device.stage = "hello"
        hello = Hello(
            device=device.name,
            cid=1,
            model="bench",
            classes=CLASSES,
            samples=spec.samples,
            hash_kind=HashKind.BINARY,
            hash_dim=HASH_BITS,
        )
        send(device, hello)
        loop.step(0)
    if not loop.run_until(lambda: all(d.stage == "idle" for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("registration did not finish in time")
    control.put(("registered", time.monotonic() - started))

    while not warm.wait(0.05):
        loop.step(0)
    started = time.monotonic()
    for device in everyone:
        device.stage = "warm"
        send(device, Fetch(device=device.name, cid=device.cid + 1, ids=next_ids(device), encoding=spec.encoding))
        loop.step(0)
    if not loop.run_until(lambda: all(d.stage == "ready" for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("warm-up fetches did not finish in time")
    control.put(("warm", time.monotonic() - started))

    while not go.wait(0.05):
        loop.step(0)
    state["start"], state["deadline"] = window[0], window[1]
    loop.run_until(lambda: time.monotonic() >= state["start"], 10.0)
    tcp_before = tcp_totals([d.client for d in everyone])
    if spec.rate > 0:
        run_open_loop(everyone)
    else:
        for device in everyone:
            device.stage = "load"
            send(device, next_request(device))
        loop.run_until(lambda: time.monotonic() > state["deadline"], state["deadline"] - time.monotonic() + 1.0)
    result.tcp = tcp_totals([d.client for d in everyone]) - tcp_before
    loop.run_until(lambda: not outstanding and not any(d.in_flight for d in everyone), DRAIN_S)
    result.lost = len(outstanding) + sum(len(d.in_flight) for d in everyone)
    control.put(("result", result))
    for device in everyone:
        device.client.disconnect()
    loop.run_until(lambda: not loop.writers, 2.0)


# --------------------------------------------------------------------------- lean load generator


@dataclass(eq=False)
class _LeanDevice:
    """One simulated device of the lean load generator: its own connection, requests packed by hand."""

    name: str
    index: int
    link: ServerLink
    ids: np.ndarray
    topic: dict[str, str]  # request kind -> its up topic
    cursor: int = 0
    version: int = 0
    cid: int = 0
    sent_at: float = 0.0
    sent_kind: str = ""
    requests: int = 0
    stage: str = "connect"
    waiting: bool = False  # closed loop: a request is in flight
    in_flight: dict[int, tuple[float, str]] = field(default_factory=dict)


def lean_worker(spec: LoadSpec, control: Any, warm: Any, go: Any, window: Any) -> None:
    """`load_worker` with the server's own lean MQTT client per device (broker_server.mqtt_link) and requests
    packed by hand: a simulated device costs this process a fraction of what a paho client and the generic
    codec cost, so the machine's cores go to the broker and the server. The same steps and figures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = np.random.default_rng([spec.seed, spec.first_index, 7])
    pack = msgpack.Packer(use_bin_type=True).pack
    pool = [
        quantise_logits((3.0 * rng.standard_normal((spec.batch, CLASSES))).astype(np.float32), spec.encoding)
        for _ in range(32)
    ]
    encoding = spec.encoding.value
    result = WorkerResult()
    state: dict[str, float] = {"start": 0.0, "deadline": 0.0}
    selector = selectors.DefaultSelector()
    dirty: set[_LeanDevice] = set()
    batches: dict[int, bytes] = {}

    def ids_at(device: _LeanDevice) -> bytes:
        start = device.cursor
        device.cursor = (device.cursor + spec.batch) % len(device.ids)
        key = start * 1_000_003 + len(device.ids)
        if key not in batches:
            batches[key] = (
                np.sort(device.ids[(start + np.arange(spec.batch)) % len(device.ids)]).astype("<u4").tobytes()
            )
        return batches[key]

    def publish(device: _LeanDevice, kind: str, cid: int, payload: bytes) -> None:
        device.cid = cid
        device.sent_at = time.monotonic()
        device.sent_kind = kind
        if device.stage == "load" and spec.rate > 0:
            device.in_flight[cid] = (device.sent_at, kind)
        else:
            device.waiting = True
        device.link.publish(device.topic[kind], payload)
        dirty.add(device)

    def fetch(device: _LeanDevice) -> None:
        cid = device.cid + 1
        body = {"v": 1, "k": "fetch", "d": device.name, "c": cid, "ids": ids_at(device), "enc": encoding}
        publish(device, "fetch", cid, pack(body))

    def next_request(device: _LeanDevice) -> None:
        if rng.random() < spec.fetch_share:
            fetch(device)
            return
        device.version += 1
        cid = device.cid + 1
        logits = pool[device.version % len(pool)]
        block: dict[str, Any] = {"e": encoding, "n": logits.rows, "m": logits.cols, "b": logits.data}
        if logits.scales is not None:
            block["s"] = logits.scales
        body = {
            "v": 1, "k": "update_fetch", "d": device.name, "c": cid, "ids": ids_at(device), "ver": device.version,
            "logits": block, "fetch_ids": ids_at(device),
        }  # fmt: skip
        publish(device, "update_fetch", cid, pack(body))

    def on_reply(device: _LeanDevice, payload: bytes, now: float) -> None:
        reply = msgpack.unpackb(payload, raw=False)
        kind, cid = reply.get("k"), reply.get("c")
        if kind == "error":
            result.errors += 1
            raise RuntimeError(
                f"{device.name}: server rejected {reply.get('re')}: {reply.get('code')} {reply.get('msg')}"
            )
        if device.stage in ("load", "done") and spec.rate > 0:
            sent = device.in_flight.pop(cid, None)
            if sent is None:
                return
            sent_at, sent_kind = sent
            result.latencies.setdefault(sent_kind, []).append(now - sent_at)
            if now <= state["deadline"]:
                count_served(reply, now)
            else:
                result.late += 1
            return
        if cid != device.cid or not device.waiting:
            return  # a redelivered or stale reply
        device.waiting = False
        if device.stage == "hello" and kind == "hello_ack":
            labels, hashes = _synthetic_samples(spec, device.index)
            device.stage = "register"
            message = Register(device=device.name, cid=device.cid + 1, ids=device.ids, labels=labels, hashes=hashes)
            publish(device, "register", message.cid, encode(message))
        elif device.stage == "register" and kind == "register_ack":
            device.stage = "idle"
        elif device.stage == "warm" and kind == "knowledge":
            device.stage = "ready"
        elif device.stage == "load" and kind == "knowledge":
            if now <= state["deadline"]:
                result.latencies.setdefault(device.sent_kind, []).append(now - device.sent_at)
                count_served(reply, now)
                device.requests += 1
                if device.requests < spec.max_requests:
                    next_request(device)
                else:
                    device.stage = "done"
            else:
                result.late += 1
                device.stage = "done"

    def count_served(reply: dict[str, Any], now: float) -> None:
        result.requests += 1
        result.served += len(reply["ids"]) // 4
        result.teachers += int(np.count_nonzero(np.frombuffer(reply["counts"], "<u2")))
        result.last_reply = now

    def step(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            device = key.data
            messages = device.link.read_ready()
            if messages:
                now = time.monotonic()
                for message in messages:
                    device.link.ack(message.mid, message.epoch)
                    on_reply(device, message.payload, now)
                dirty.add(device)
        for device in dirty:
            device.link.flush()
        dirty.clear()

    def run_until(done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            step(0.005)
        return True

    credentials = spec.credentials or (None,) * len(spec.devices)
    everyone: list[_LeanDevice] = []
    for number, (name, identity) in enumerate(zip(spec.devices, credentials, strict=True)):
        link = ServerLink(
            address=spec.address, client_id=name if identity is not None else f"bench-{name}", credentials=identity
        )
        started = time.monotonic()
        link.connect(timeout=STEP_TIMEOUT_S)  # TCP connect, TLS handshake and CONNACK: blocking
        result.handshake_s.append(time.monotonic() - started)
        result.connack_s.append(time.monotonic() - started)
        link.subscribe(down_topic(name), qos=1)
        link.flush()
        topics = {
            kind.value: up_topic(name, kind) for kind in (Kind.HELLO, Kind.REGISTER, Kind.FETCH, Kind.UPDATE_FETCH)
        }
        device = _LeanDevice(
            name=name, index=spec.first_index + number, link=link, ids=np.arange(spec.samples, dtype=np.uint32),
            topic=topics,
        )  # fmt: skip
        selector.register(link.fileno(), selectors.EVENT_READ, device)
        everyone.append(device)
        sock = link.socket()
        if not result.tls and isinstance(sock, ssl.SSLSocket):
            result.tls = f"{sock.version()} {(sock.cipher() or ('?',))[0]}"
    if not run_until(lambda: all(d.link.subscribed for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("devices did not connect and subscribe in time")

    started = time.monotonic()
    for device in everyone:
        device.stage = "hello"
        hello = Hello(
            device=device.name, cid=1, model="bench", classes=CLASSES, samples=spec.samples,
            hash_kind=HashKind.BINARY, hash_dim=HASH_BITS,
        )  # fmt: skip
        publish(device, "hello", 1, encode(hello))
    if not run_until(lambda: all(d.stage == "idle" for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("registration did not finish in time")
    control.put(("registered", time.monotonic() - started))

    while not warm.wait(0.05):
        step(0)
    started = time.monotonic()
    for device in everyone:
        device.stage = "warm"
        fetch(device)
    if not run_until(lambda: all(d.stage == "ready" for d in everyone), STEP_TIMEOUT_S):
        raise TimeoutError("warm-up fetches did not finish in time")
    control.put(("warm", time.monotonic() - started))

    while not go.wait(0.05):
        step(0)
    state["start"], state["deadline"] = window[0], window[1]
    run_until(lambda: time.monotonic() >= state["start"], 10.0)
    sockets = [d.link.socket() for d in everyone]
    tcp_before = sum((TcpCounters.of(s) for s in sockets if s is not None), TcpCounters())
    for device in everyone:
        device.stage = "load"
    if spec.rate > 0:
        due = [(state["start"] + rng.exponential(1.0 / spec.rate), number) for number in range(len(everyone))]
        heapq.heapify(due)
        while time.monotonic() <= state["deadline"]:
            now = time.monotonic()
            while due and due[0][0] <= now:
                at, number = heapq.heappop(due)
                device = everyone[number]
                if at <= state["deadline"] and device.requests < spec.max_requests:
                    device.requests += 1
                    next_request(device)
                    heapq.heappush(due, (at + rng.exponential(1.0 / spec.rate), number))
            step(min(0.005, max(0.0, due[0][0] - time.monotonic())) if due else 0.005)
        for device in everyone:
            device.stage = "done"
    else:
        for device in everyone:
            next_request(device)
        run_until(lambda: time.monotonic() > state["deadline"], state["deadline"] - time.monotonic() + 1.0)
    result.tcp = sum((TcpCounters.of(s) for s in sockets if s is not None), TcpCounters()) - tcp_before
    run_until(lambda: not any(d.waiting or d.in_flight for d in everyone), DRAIN_S)
    result.lost = sum(1 for d in everyone if d.waiting) + sum(len(d.in_flight) for d in everyone)
    control.put(("result", result))
    for device in everyone:
        device.link.disconnect()


# --------------------------------------------------------------------------- raw Mosquitto rate


def raw_publisher(
    address: BrokerAddress, messages: int, payload_bytes: int, done: Any, credentials: Credentials | None = None
) -> None:
    """Publish `messages` QoS 1 messages as fast as paho lets one client, then wait for the last PUBACK."""
    client_id = credentials.username if credentials else f"bench-raw-pub-{os.getpid()}"
    client = make_client(client_id=client_id, max_inflight=1000)
    apply_credentials(client, address, credentials)
    client.connect(address.host, address.port)
    client.loop_start()
    payload = bytes(payload_bytes)
    info = None
    for _ in range(messages):
        info = client.publish(RAW_TOPIC, payload, qos=1)
    if info is not None:
        info.wait_for_publish(timeout=120)
    done.set()
    client.disconnect()
    client.loop_stop()


@dataclass(frozen=True)
class RawRate:
    """Raw QoS 1 publish -> subscribe rate through the broker."""

    messages: int
    received: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


def measure_raw(
    address: BrokerAddress,
    *,
    messages: int,
    payload_bytes: int,
    timeout: float,
    credentials: tuple[Credentials, Credentials] | None = None,
) -> RawRate:
    """One paho publisher process -> this process subscribing, QoS 1 both ways; rate at the subscriber.

    `credentials`: the publisher's and the subscriber's, on a secure broker.
    """
    publisher_identity, subscriber_identity = credentials or (None, None)
    received: list[float] = []
    subscribed = threading.Event()
    finished = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        received.append(time.monotonic())
        if len(received) >= messages:
            finished.set()

    client_id = subscriber_identity.username if subscriber_identity else f"bench-raw-sub-{os.getpid()}"
    client = make_client(client_id=client_id, max_inflight=1000)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe(RAW_TOPIC, qos=1)
    apply_credentials(client, address, subscriber_identity)
    client.connect(address.host, address.port)
    client.loop_start()
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    publisher = ctx.Process(
        target=raw_publisher, args=(address, messages, payload_bytes, done, publisher_identity), daemon=True
    )
    try:
        if not subscribed.wait(10):
            raise TimeoutError("raw subscriber could not subscribe")
        publisher.start()
        finished.wait(timeout)
        # First to last receipt: the publisher process's start-up is not the broker's time.
        seconds = received[-1] - received[0] if len(received) > 1 else 0.0
        return RawRate(messages=messages, received=max(0, len(received) - 1), seconds=seconds)
    finally:
        publisher.join(timeout=10)
        if publisher.is_alive():
            publisher.terminate()
        client.disconnect()
        client.loop_stop()


def lean_raw_publisher(
    address: BrokerAddress, messages: int, payload_bytes: int, done: Any, credentials: Credentials | None = None
) -> None:
    """Publish `messages` QoS 1 messages through a lean link (as many in flight as the broker allows)."""
    link = ServerLink(
        address=address, client_id=credentials.username if credentials else f"bench-raw-lpub-{os.getpid()}",
        credentials=credentials,
    )  # fmt: skip
    link.connect()
    payload = bytes(payload_bytes)
    for _ in range(messages):
        link.publish(RAW_TOPIC, payload)
    deadline = time.monotonic() + 120
    while link.unacknowledged() and time.monotonic() < deadline:
        link.poll(0.01)
    done.set()
    link.disconnect(session_expiry_s=0)


def measure_raw_lean(
    address: BrokerAddress,
    *,
    messages: int,
    payload_bytes: int,
    timeout: float,
    credentials: tuple[Credentials, Credentials] | None = None,
) -> RawRate:
    """The raw rate with the lean MQTT client (broker_server.mqtt_link) on both ends: what the broker itself does
    when the clients cost little, the bound for a server and devices that cost little too."""
    publisher_identity, subscriber_identity = credentials or (None, None)
    client_id = subscriber_identity.username if subscriber_identity else f"bench-raw-lsub-{os.getpid()}"
    link = ServerLink(address=address, client_id=client_id, credentials=subscriber_identity)
    link.connect()
    link.subscribe(RAW_TOPIC, qos=1)
    deadline = time.monotonic() + 10
    while not link.subscribed and time.monotonic() < deadline:
        link.poll(0.05)
    if not link.subscribed:
        raise TimeoutError("raw subscriber could not subscribe")
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    publisher = ctx.Process(
        target=lean_raw_publisher, args=(address, messages, payload_bytes, done, publisher_identity), daemon=True
    )
    received: list[float] = []
    try:
        publisher.start()
        deadline = time.monotonic() + timeout
        while len(received) < messages and time.monotonic() < deadline:
            got = link.poll(0.05)
            if got:
                now = time.monotonic()
                for message in got:
                    link.ack(message.mid, message.epoch)
                received.extend([now] * len(got))
                link.flush()
        seconds = received[-1] - received[0] if len(received) > 1 else 0.0
        return RawRate(messages=messages, received=max(0, len(received) - 1), seconds=seconds)
    finally:
        publisher.join(timeout=10)
        if publisher.is_alive():
            publisher.terminate()
        link.disconnect(session_expiry_s=0)


# --------------------------------------------------------------------------- orchestrator


@dataclass(frozen=True)
class StepResult:
    """One device count's figures."""

    devices: int
    processes: int
    register_s: float
    warm_s: float
    duration_s: float
    requests: int
    served: int
    teachers: int
    errors: int
    late: int
    lost: int
    p50_ms: float
    p99_ms: float
    kind_p50_ms: dict[str, float]
    server_cpu: float  # percent of one core over the window
    server_rss_mb: float  # peak
    broker_cpu: float
    loadgen_cpu: float
    window_s: float = 0.0  # the timed window the CPU percentages are over
    provision_s: float = 0.0  # provisioning every device through one admin session (secure modes only)
    handshake_ms: tuple[float, float] = (0.0, 0.0)  # p50, p99 of paho's connect(): TCP connect + TLS handshake
    connack_ms: tuple[float, float] = (0.0, 0.0)  # p50, p99 from socket connect to CONNACK
    tcp: TcpCounters = TcpCounters()  # the devices' sockets over the window (TLS records included)
    sys_bytes: float | None = None  # per request, Mosquitto's $SYS counters: MQTT bytes in + out, both legs
    tls: str = ""  # negotiated TLS version and cipher
    path: str = ""  # the server's --request-path
    rate: float = 0.0  # open loop: requests/s offered per device; 0: closed loop
    other_cpu: float = 0.0  # run_step's `others` (the replication log's Redis), percent of one core

    @property
    def loop(self) -> str:
        return f"open {self.rate:g}/s per device" if self.rate > 0 else "closed"

    @property
    def samples_per_s(self) -> float:
        return self.served / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    def per_request(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    def cpu_us_per_request(self, percent: float) -> float:
        """CPU time per request in µs, from a CPU percentage over the timed window."""
        return percent / 100.0 * self.window_s / self.requests * 1e6 if self.requests else 0.0


class _Sampler:
    """Peak RSS of a process, sampled from a thread while a window runs."""

    def __init__(self, process: psutil.Process, every: float = 0.25) -> None:
        self.process = process
        self.peak = 0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self._every)


class _Observer:
    """A bench client reading Mosquitto's $SYS counters and the server status.

    Mosquitto publishes a counter every ~2 s with `sys_interval 1` (its check is strict), and only when it changed.
    On a secure broker the observer needs its own identity with a role that may read `$SYS/#` (`bench_identities`).
    """

    def __init__(self, address: BrokerAddress, credentials: Credentials | None) -> None:
        self.online = threading.Event()
        self._history: dict[str, list[tuple[float, int]]] = {topic: [] for topic in SYS_TOPICS}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._refused: list[str] = []
        self._client = make_client(client_id=credentials.username if credentials else f"bench-observer-{os.getpid()}")
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in (*SYS_TOPICS, SERVER_STATUS)])
        apply_credentials(self._client, address, credentials)
        self._client.connect(address.host, address.port)
        self._client.loop_start()

    def __enter__(self) -> _Observer:
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError("the bench observer could not subscribe to $SYS")
        if self._refused:
            self.close()
            raise RuntimeError(f"the broker refused the bench observer's subscriptions: {self._refused}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        self._refused = [str(code) for code in codes if getattr(code, "is_failure", False)]
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == SERVER_STATUS:
            (self.online.set if message.payload == b"online" else self.online.clear)()
            return
        with self._lock:
            self._history[message.topic].append((time.monotonic(), int(float(message.payload))))

    def snapshot(self) -> dict[str, list[tuple[float, int]]]:
        with self._lock:
            return {topic: list(values) for topic, values in self._history.items()}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class _BenchServer(ServerProcess):
    """The server process, its start awaited through the bench observer.

    android_harness' own online probe connects anonymously, which a secure broker refuses.
    """

    observer: _Observer | None = None

    def start(self, *, timeout: float = SERVER_START_S) -> _BenchServer:
        if self.observer is None:
            raise RuntimeError("no observer to see the server come online")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout
        while not self.observer.online.wait(0.2):
            if self.process.poll() is not None:
                raise RuntimeError(f"the cache server exited with {self.process.returncode} before going online")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cache server was not online within {timeout:.0f} s")
        return self


def _process_tree(process: psutil.Process) -> list[psutil.Process]:
    """A process and all its descendants now."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def counter_delta(samples: Sequence[tuple[float, int]], start: float, end: float) -> int | None:
    """Growth of a $SYS counter from its first value that arrived after `start` to its last before `end`.

    Mosquitto publishes a counter every sys_interval, and only when it changed; None with fewer than two values.
    """
    inside = [value for at, value in samples if start <= at <= end]
    return inside[-1] - inside[0] if len(inside) >= 2 else None


def sys_bytes_per_request(history: dict[str, list[tuple[float, int]]], start: float, end: float) -> float | None:
    """MQTT bytes the broker received and sent per request, from its own counters over [start, end].

    Each request is two PUBLISHes into the broker (the device's request, the server's reply), so the count of
    PUBLISHes received over the same ticks gives the requests: no need to align the broker's ticks with our clock.
    """
    received, sent, publishes = (counter_delta(history.get(t, []), start, end) for t in SYS_TOPICS)
    if received is None or sent is None or not publishes:
        return None
    return (received + sent) / (publishes / 2)


def _percentiles_ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return float(np.percentile(values, 50) * 1e3), float(np.percentile(values, 99) * 1e3)


def _collect(control: Any, tag: str, count: int, timeout: float, procs: list[Any]) -> list[Any]:
    """Wait for `count` messages tagged `tag` from the workers; fail fast if one of them died."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"load generators did not report '{tag}' within {timeout:.0f} s")
        try:
            got, value = control.get(timeout=0.5)
        except Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load generator exited with {dead[0].exitcode} before '{tag}'") from None
            continue
        if got != tag:
            raise RuntimeError(f"expected '{tag}' from a load generator, got '{got}'")
        out.append(value)
    return out


def device_names(devices: int, tag: str = "") -> list[str]:
    """The simulated devices of one step (also their usernames on a secure broker); `tag` keeps steps apart."""
    return [f"b{devices}{tag}-{i:04d}" for i in range(devices)]


def run_step(
    address: BrokerAddress,
    *,
    devices: int,
    processes: int,
    samples: int,
    batch: int,
    fetch_share: float,
    duration: float,
    seed: int,
    max_requests: int,
    server: psutil.Process,
    broker: psutil.Process,
    observer: _Observer,
    credentials: Sequence[Credentials] = (),
    provision_s: float = 0.0,
    rate: float = 0.0,
    path: str = "",
    names: Sequence[str] | None = None,
    loadgen: str = "paho",
    addresses: Sequence[BrokerAddress] = (),
    more_servers: Sequence[psutil.Process] = (),
    more_brokers: Sequence[psutil.Process] = (),
    others: Sequence[psutil.Process] = (),
) -> StepResult:
    """Register `devices` simulated devices, warm the relations, then load the server for `duration` seconds.

    `credentials`: one per device (in `names` order, by default `device_names(devices)`) on a secure broker.
    `rate` > 0: open loop, each device offering `rate` requests/s (Poisson) whatever is in flight.
    Several nodes (bench/serving_nodes.py): load-generator process i drives its devices through `addresses[i %
    len(addresses)]`; `more_servers` and `more_brokers` count with `server` and `broker`, `others` (the
    replication log's store) apart, as `other_cpu`.
    """
    ctx = mp.get_context("spawn")
    control = ctx.Queue()
    warm, go = ctx.Event(), ctx.Event()
    window = ctx.Array("d", 2)
    names = list(names or device_names(devices))
    processes = max(1, min(processes, devices))
    parts = [names[i::processes] for i in range(processes)]
    identities = [tuple(credentials[i::processes]) for i in range(processes)]
    firsts = [devices * 10 + i for i in range(processes)]
    specs = [
        LoadSpec(
            address=addresses[number % len(addresses)] if addresses else address,
            devices=tuple(part),
            first_index=first * 100_000,
            samples=samples,
            batch=batch,
            fetch_share=fetch_share,
            encoding=LogitEncoding.FLOAT16,
            seed=seed,
            max_requests=max(1, -(-max_requests // devices)),
            credentials=identity,
            rate=rate,
        )
        for number, (part, first, identity) in enumerate(zip(parts, firsts, identities, strict=True))
    ]
    worker = lean_worker if loadgen == "lean" else load_worker
    procs = [ctx.Process(target=worker, args=(s, control, warm, go, window), daemon=True) for s in specs]
    for proc in procs:
        proc.start()
    try:
        register_s = max(_collect(control, "registered", processes, STEP_TIMEOUT_S + 60, procs))
        warm.set()
        warm_s = max(_collect(control, "warm", processes, STEP_TIMEOUT_S + 60, procs))
        generators = [psutil.Process(p.pid) for p in procs if p.pid is not None]
        start = time.monotonic() + 0.5
        window[0], window[1] = start, start + duration
        go.set()
        time.sleep(max(0.0, start - time.monotonic()))
        # The server and, with --workers, its state process and front-ends (and every other node's).
        tree = [process for node in (server, *more_servers) for process in _process_tree(node)]
        brokers = [broker, *more_brokers]
        before = (_cpu_seconds(tree), _cpu_seconds(brokers), _cpu_seconds(generators), _cpu_seconds(list(others)))
        with _Sampler(server) as sampler:
            time.sleep(max(0.0, start + duration - time.monotonic()))
            after = (_cpu_seconds(tree), _cpu_seconds(brokers), _cpu_seconds(generators), _cpu_seconds(list(others)))
        results: list[WorkerResult] = _collect(control, "result", processes, DRAIN_S + 30, procs)
        # Mosquitto's ticks come every ~2 s: the drain after the window adds ticks of the same requests.
        sys_bytes = sys_bytes_per_request(observer.snapshot(), start, time.monotonic())
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    latencies: dict[str, list[float]] = {}
    for r in results:
        for kind, values in r.latencies.items():
            latencies.setdefault(kind, []).extend(values)
    every = np.concatenate([np.asarray(v) for v in latencies.values()]) if latencies else np.zeros(1)
    cpu = [100.0 * (a - b) / duration for a, b in zip(after, before, strict=True)]
    # A run stopped by --max-requests before its window ended is rated over the time it actually ran.
    active = min(duration, max((r.last_reply for r in results), default=start + duration) - start)
    requests = sum(r.requests for r in results)
    tcp = sum((r.tcp for r in results), TcpCounters())
    return StepResult(
        devices=devices,
        path=path,
        rate=rate,
        processes=processes,
        register_s=register_s,
        warm_s=warm_s,
        duration_s=max(active, 1e-9),
        requests=requests,
        served=sum(r.served for r in results),
        teachers=sum(r.teachers for r in results),
        errors=sum(r.errors for r in results),
        late=sum(r.late for r in results),
        lost=sum(r.lost for r in results),
        p50_ms=float(np.percentile(every, 50) * 1e3),
        p99_ms=float(np.percentile(every, 99) * 1e3),
        kind_p50_ms={k: float(np.percentile(v, 50) * 1e3) for k, v in sorted(latencies.items())},
        server_cpu=cpu[0],
        server_rss_mb=sampler.peak / 2**20,
        broker_cpu=cpu[1],
        loadgen_cpu=cpu[2],
        other_cpu=cpu[3],
        window_s=duration,
        provision_s=provision_s,
        handshake_ms=_percentiles_ms([t for r in results for t in r.handshake_s]),
        connack_ms=_percentiles_ms([t for r in results for t in r.connack_s]),
        tcp=tcp,
        sys_bytes=sys_bytes,
        tls=next((r.tls for r in results if r.tls), ""),
    )


def format_steps(steps: list[StepResult], raw: RawRate) -> str:
    """Markdown table; the last column is the server's request rate against the raw broker rate of this run."""
    rows = []
    for s in steps:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in s.kind_p50_ms.items())
        rows.append(
            (
                s.path or "-",
                s.loop,
                s.devices,
                s.processes,
                f"{s.register_s:.2f}",
                f"{s.warm_s:.2f}",
                f"{s.requests_per_s:.0f}",
                f"{s.samples_per_s:.0f}",
                f"{s.p50_ms:.1f}",
                f"{s.p99_ms:.1f}",
                kinds,
                f"{s.server_cpu:.0f}",
                f"{s.cpu_us_per_request(s.server_cpu):.0f}",
                f"{s.server_rss_mb:.0f}",
                f"{s.broker_cpu:.0f}",
                f"{s.loadgen_cpu:.0f}",
                f"{s.errors}/{s.lost}",
                f"{s.requests_per_s / raw.rate:.3f}" if raw.rate else "-",
            )
        )
    headers = (
        "path",
        "loop",
        "devices",
        "loadgen procs",
        "register s",
        "warm-up fetch s",
        "requests/s",
        "samples served/s",
        "p50 ms",
        "p99 ms",
        "p50 ms by kind",
        "server CPU %",
        "server CPU µs/request",
        "server RSS MB (peak)",
        "mosquitto CPU %",
        "loadgen CPU %",
        "errors/lost",
        "requests/s ÷ raw msgs/s",
    )
    return markdown_table(headers, rows)


def _path_metrics(step: StepResult, raw: RawRate, raw_lean: RawRate | None) -> list[tuple[str, float | None, str]]:
    """(row name, value, format) of one request path at one step, for the paths table."""
    lean = raw_lean.rate if raw_lean is not None else 0.0
    return [
        ("requests/s", step.requests_per_s, "{:.0f}"),
        (
            "requests/s ÷ raw QoS 1 msgs/s (paho clients)",
            step.requests_per_s / raw.rate if raw.rate else None,
            "{:.3f}",
        ),
        ("requests/s ÷ raw QoS 1 msgs/s (lean clients)", step.requests_per_s / lean if lean else None, "{:.3f}"),
        ("request p50 ms", step.p50_ms, "{:.2f}"),
        ("request p99 ms", step.p99_ms, "{:.2f}"),
        ("server CPU µs/request", step.cpu_us_per_request(step.server_cpu), "{:.0f}"),
        ("server CPU % of one core", step.server_cpu, "{:.0f}"),
        ("mosquitto CPU µs/request", step.cpu_us_per_request(step.broker_cpu), "{:.0f}"),
        ("load generators CPU µs/request", step.cpu_us_per_request(step.loadgen_cpu), "{:.0f}"),
        ("errors + lost", float(step.errors + step.lost), "{:.0f}"),
    ]


def format_paths(results: list[ModeResult], base_path: str = "legacy") -> str:
    """Per broker set-up and step: every request path side by side, and each one's ratio to `base_path`."""
    tables = []
    for mode in dict.fromkeys(r.mode for r in results):
        group = [r for r in results if r.mode == mode]
        base = next((r for r in group if r.path == base_path), group[0])
        others = [r for r in group if r is not base]
        for index, step in enumerate(base.steps):
            rows = []
            for row, (name, base_value, fmt) in enumerate(_path_metrics(step, base.raw, base.raw_lean)):
                values = [_path_metrics(r.steps[index], r.raw, r.raw_lean)[row][1] for r in group]
                cells = [fmt.format(v) if v is not None else "-" for v in values]
                ratios = [_ratio(_path_metrics(r.steps[index], r.raw, r.raw_lean)[row][1], base_value) for r in others]
                rows.append((name, *cells, *ratios))
            title = f"{mode}, {step.devices} devices, {step.loop}"
            headers = (title, *(r.path for r in group), *(f"{r.path}/{base.path}" for r in others))
            tables.append(markdown_table(headers, rows))
    return "\n\n".join(tables)


@dataclass(frozen=True)
class ModeResult:
    """One broker set-up's figures: its raw baseline and every device count."""

    mode: str
    raw: RawRate
    steps: list[StepResult]
    security_s: float = 0.0  # SecurityDir.ensure: CA, broker certificate, plugin config
    path: str = "batched"  # the server's --request-path
    raw_lean: RawRate | None = None  # the raw rate with lean clients on both ends


def _write_password(path: Path) -> str:
    password = secrets.token_urlsafe(16)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(password + "\n")
    return password


def _allow(topic: str, *kinds: str) -> list[dict[str, Any]]:
    return [{"acltype": kind, "topic": topic, "allow": True} for kind in kinds]


def bench_identities(sd: SecurityDir, admin: DynsecAdmin, *, secrets_dir: Path) -> dict[str, Credentials]:
    """The server's identity (made as `broker_server/main.py` makes it on a secure private broker) and the bench's
    own: an observer that may read `$SYS/#` and the server status, and the raw baseline's publisher and subscriber."""
    read = ("subscribePattern", "publishClientReceive")
    roles = {
        OBSERVER_ID: [*_allow("$SYS/#", *read), *_allow(SERVER_STATUS, *read)],
        RAW_IDS[0]: _allow(RAW_TOPIC, "publishClientSend"),
        RAW_IDS[1]: _allow(RAW_TOPIC, *read),
    }
    identities = {SECURE_SERVER_ID: sd.ensure_service(admin, SECURE_SERVER_ID, role=SERVER_ROLE)}
    for username, acls in roles.items():
        admin.ensure_role(username, acls)
        password = _write_password(secrets_dir / f"{username}.password")
        admin.ensure_client_with(username=username, role=username, password=password)
        identities[username] = Credentials(
            username=username, password_file=str(secrets_dir / f"{username}.password"), ca_file=str(sd.ca_file)
        )
    return identities


def provision_devices(
    sd: SecurityDir, admin: DynsecAdmin, names: list[str], *, out: Path
) -> tuple[list[Credentials], float]:
    """Password credentials for every device through one admin session, and how long that took."""
    started = time.monotonic()
    credentials = [sd.provision(admin, name, auth="password", out=out / name).credentials for name in names]
    return credentials, time.monotonic() - started


@contextlib.contextmanager
def _admin_session(sd: SecurityDir | None) -> Iterator[DynsecAdmin | None]:
    if sd is None:
        yield None
        return
    with sd.admin() as admin:
        yield admin


@dataclass(frozen=True)
class StepPlan:
    """One measurement of a mode: device count and loop (closed, or open at `rate` requests/s per device)."""

    devices: int
    rate: float = 0.0


def run_mode(
    mode: str,
    *,
    root: Path,
    args: argparse.Namespace,
    plans: list[StepPlan],
    paths: list[str],
    duration: float,
    raw_messages: int,
) -> list[ModeResult]:
    """One broker set-up (plain, auth or tls, see MODES): its raw baseline, then every step under every path.

    Each step runs once per request path, back to back, each on a fresh server (its own state), so that the
    paths meet the same load on this shared machine as nearly as one run allows.
    """
    root.mkdir(parents=True)
    started = time.monotonic()
    sd = SecurityDir.ensure(root / "security") if mode != "plain" else None
    security_s = time.monotonic() - started if sd is not None else 0.0
    security = sd.broker_security(cert_port=-1) if sd is not None else None
    steps: dict[str, list[StepResult]] = {path: [] for path in paths}
    with MosquittoBroker(data_dir=root / "mosquitto", security=security) as broker, _admin_session(sd) as admin:
        assert broker.process is not None
        identities = bench_identities(sd, admin, secrets_dir=root / "bench") if sd and admin else {}
        device_address = broker.tls_address if mode == "tls" else broker.address
        broker_ps = psutil.Process(broker.process.pid)
        with _Observer(broker.address, identities.get(OBSERVER_ID)) as observer:
            raw_identities = (identities[RAW_IDS[0]], identities[RAW_IDS[1]]) if identities else None
            payload = _payload_bytes(args.batch)
            raw = measure_raw(
                device_address, messages=raw_messages, payload_bytes=payload, timeout=120, credentials=raw_identities
            )
            raw_lean = measure_raw_lean(
                device_address, messages=raw_messages, payload_bytes=payload, timeout=120, credentials=raw_identities
            )
            for number, plan in enumerate(tqdm(plans, desc=f"{mode}: steps", leave=False)):
                for path in paths:
                    tag = f"{path[0]}{path.rpartition('-w')[2] if '-w' in path else ''}{'o' if plan.rate else ''}"
                    names = device_names(plan.devices, tag)
                    credentials: list[Credentials] = []
                    provision_s = 0.0
                    if sd is not None and admin is not None:
                        credentials, provision_s = provision_devices(sd, admin, names, out=root / "devices")
                    server = _start_bench_server(
                        args, path=path, root=root / "server" / f"{number}-{path}", broker=broker, observer=observer,
                        identity=identities.get(SECURE_SERVER_ID),
                    )  # fmt: skip
                    try:
                        steps[path].append(
                            run_step(
                                device_address,
                                devices=plan.devices,
                                processes=args.processes,
                                samples=args.samples,
                                batch=args.batch,
                                fetch_share=args.fetch_share,
                                duration=duration,
                                seed=args.seed,
                                max_requests=args.max_requests,
                                server=psutil.Process(server.pid),
                                broker=broker_ps,
                                observer=observer,
                                credentials=credentials,
                                provision_s=provision_s,
                                rate=plan.rate,
                                path=path,
                                names=names,
                                loadgen=args.loadgen,
                            )
                        )
                    finally:
                        _stop_bench_server(server)
    return [
        ModeResult(mode=mode, raw=raw, steps=steps[path], security_s=security_s, path=path, raw_lean=raw_lean)
        for path in paths
    ]


def _start_bench_server(
    args: argparse.Namespace,
    *,
    path: str,
    root: Path,
    broker: MosquittoBroker,
    observer: _Observer,
    identity: Credentials | None,
) -> _BenchServer:
    """A fresh server for the variant `path` (a request path, `-wN` for N workers) with its own state under `root`,
    started and awaited through the observer."""
    base, defended = path.removesuffix(DEFENDED), path.endswith(DEFENDED)
    request_path, _, workers = base.partition("-w")
    options = ["--log-level", "WARNING", "--request-path", request_path]
    if defended:
        options += ["--defences", "on"]
    if workers:
        options += ["--workers", workers]
    if args.profile_server:
        options += ["--profile", str(_profile_file(args.profile_server, path))]
    if identity is not None:
        options += ["--username", identity.username, "--password-file", identity.password_file]
    command = server_command(
        broker=broker.address,
        data_dir=root / "data",
        client_id=SECURE_SERVER_ID if identity is not None else f"bench-server-{os.getpid()}-{path}",
        options=options,
    )
    return launch_bench_server(command, broker=broker, log=root / "server.log", observer=observer)


def launch_bench_server(command: list[str], *, broker: MosquittoBroker, log: Path, observer: _Observer) -> _BenchServer:
    """Start `command` as a bench server and await it through the observer; stopped again if it fails to."""
    server = _BenchServer(command=command, broker=broker.address, log=log, observer=observer)
    try:
        server.start(timeout=SERVER_START_S)
    except BaseException:
        _stop_bench_server(server)
        raise
    return server


def _stop_bench_server(server: _BenchServer) -> None:
    server.stop(timeout=20.0)
    if server.returncode not in (0, None):
        print(server.log.read_text()[-3000:], file=sys.stderr)
    if server.observer is not None:
        server.observer.online.clear()  # the next server's 'online' is awaited afresh


def _profile_file(base: Path, path: str) -> Path:
    """Where the server of `path` writes its profile: one file per request path (the last step's run)."""
    return base.with_name(f"{base.stem}.{path}{base.suffix or '.prof'}")


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def _mode_metrics(result: ModeResult, step: StepResult) -> list[tuple[str, float | None, str]]:
    """(row name, value, format) of one mode at one device count, for the comparison table."""
    secure = result.mode != "plain"
    return [
        ("provisioning s (password, one admin session)", step.provision_s if secure else None, "{:.2f}"),
        ("connect(): TCP (+ TLS handshake) ms, p50", step.handshake_ms[0], "{:.2f}"),
        ("socket connect → CONNACK ms, p50", step.connack_ms[0], "{:.2f}"),
        ("socket connect → CONNACK ms, p99", step.connack_ms[1], "{:.2f}"),
        ("raw QoS 1 msgs/s (1 pub → 1 sub)", result.raw.rate, "{:.0f}"),
        ("requests/s", step.requests_per_s, "{:.0f}"),
        ("request p50 ms", step.p50_ms, "{:.1f}"),
        ("request p99 ms", step.p99_ms, "{:.1f}"),
        ("server CPU µs/request", step.cpu_us_per_request(step.server_cpu), "{:.0f}"),
        ("mosquitto CPU µs/request", step.cpu_us_per_request(step.broker_cpu), "{:.0f}"),
        ("load generators CPU µs/request", step.cpu_us_per_request(step.loadgen_cpu), "{:.0f}"),
        ("device TCP payload B/request sent", step.per_request(step.tcp.bytes_sent), "{:.0f}"),
        ("device TCP payload B/request received", step.per_request(step.tcp.bytes_received), "{:.0f}"),
        (
            "device TCP segments/request (both ways)",
            step.per_request(step.tcp.segments_out + step.tcp.segments_in),
            "{:.1f}",
        ),
        ("device B/request on the wire (+ IPv4/TCP headers)", step.per_request(step.tcp.wire_bytes), "{:.0f}"),
        ("broker MQTT B/request in+out ($SYS, both legs)", step.sys_bytes, "{:.0f}"),
    ]


def format_modes(results: list[ModeResult]) -> str:
    """One table per device count: every mode's figures side by side and each secure mode's ratio to plain."""
    tables = []
    base = next((r for r in results if r.mode == "plain"), results[0])
    others = [r for r in results if r is not base]
    for index, step in enumerate(base.steps):
        rows = []
        metrics = [_mode_metrics(r, r.steps[index]) for r in results]
        base_metrics = _mode_metrics(base, step)
        for row, (name, base_value, fmt) in enumerate(base_metrics):
            cells = [fmt.format(m[row][1]) if m[row][1] is not None else "-" for m in metrics]
            ratios = [_ratio(_mode_metrics(r, r.steps[index])[row][1], base_value) for r in others]
            rows.append((name, *cells, *ratios))
        lost = [f"{r.steps[index].errors}/{r.steps[index].lost}" for r in results]
        rows.append(("errors/lost", *lost, *("-" for _ in others)))
        headers = (f"{step.devices} devices", *(r.mode for r in results), *(f"{r.mode}/{base.mode}" for r in others))
        tables.append(markdown_table(headers, rows))
    return "\n\n".join(tables)


def _payload_bytes(batch: int) -> int:
    """Size of a typical request (an update_fetch of one batch, float16 logits), for the raw baseline."""
    rng = np.random.default_rng(SEED)
    message = UpdateFetch(
        device="b1000-0000",
        cid=2**40,
        ids=np.arange(batch, dtype=np.uint32),
        logits=rng.standard_normal((batch, CLASSES)).astype(np.float32),
        version=2**40,
        fetch_ids=np.arange(batch, 2 * batch, dtype=np.uint32),
    )
    return len(encode(message))


def _print_profile(path: Path, top: int = 40) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 s per device count, 5000 raw messages: under a minute")
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 10 100 1000)")
    parser.add_argument("--duration", type=float, default=None, help="timed seconds per device count (default 20)")
    parser.add_argument("--samples", type=int, default=64, help="samples registered per device")
    parser.add_argument("--batch", type=int, default=8, help="ids per fetch / update_fetch (device default 8)")
    parser.add_argument("--fetch-share", type=float, default=0.5, help="fraction of requests that are plain fetches")
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="cap on timed requests per device count")
    parser.add_argument("--raw-messages", type=int, default=None, help="messages of the raw baseline (20000)")
    parser.add_argument("--profile-server", type=Path, default=None, help="run the server under cProfile, save here")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure on a secure broker, devices provisioned with passwords over TLS (same as --modes plain tls; "
        "default device count then 100)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=None,
        help="broker set-ups, measured one after the other: plain (anonymous), auth (passwords over loopback "
        "plaintext), tls (passwords over TLS)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=REQUEST_PATHS,
        default=list(REQUEST_PATHS),
        help="the server's request paths, each measured on every step (default: legacy then batched, and their ratio)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="the batched server also with `main.py --workers N` for each N > 1 given (variants batched-wN; plain "
        "mode only: secure modes would need an identity per worker)",
    )
    parser.add_argument(
        "--open-loop-devices",
        type=int,
        default=OPEN_LOOP_DEVICES,
        help=f"devices of the open-loop step after the closed-loop ones (default {OPEN_LOOP_DEVICES}; 0: none)",
    )
    parser.add_argument(
        "--open-loop-rate",
        type=float,
        default=OPEN_LOOP_RATE,
        help=f"requests/s each open-loop device offers, Poisson arrivals (default {OPEN_LOOP_RATE:g})",
    )
    parser.add_argument(
        "--loadgen",
        choices=("lean", "paho"),
        default=None,
        help="simulated devices: lean (the server's own MQTT client, requests packed by hand: cheap, so the cores go "
        "to the broker and the server) or paho (a paho client and the generic codec per device); default lean, paho "
        "with --tls or --modes (as their figures were measured)",
    )
    parser.add_argument(
        "--nodes",
        action="store_true",
        help="instead of the modes: one node, one node writing the replication log, and two nodes on two brokers "
        "over one redis-server (bench/serving_nodes.py; default device counts 100 400, closed loop)",
    )
    parser.add_argument(
        "--defences",
        action="store_true",
        help=f"each request path also with the server's --defences on (variants PATH{DEFENDED}, measured back to "
        "back with the plain ones)",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(args.modes or (["plain", "tls"] if args.tls else ["plain"])))
    if args.loadgen is None:
        args.loadgen = "paho" if (args.tls or args.modes) else "lean"
    paths = list(dict.fromkeys(args.paths))
    if "batched" in paths and modes == ["plain"]:
        at = paths.index("batched") + 1
        paths[at:at] = [f"batched-w{n}" for n in sorted(set(args.workers)) if n > 1]
    if args.defences:
        paths += [f"{path}{DEFENDED}" for path in list(paths)]
    device_counts = args.devices or ([100] if modes != ["plain"] else [10, 100, 1000])
    duration = args.duration or (4.0 if args.quick else 20.0)
    raw_messages = args.raw_messages or (5000 if args.quick else 20000)
    if max([*device_counts, args.open_loop_devices]) > 1000:
        parser.error("at most 1000 devices (connections) on this benchmark")
    plans = [StepPlan(count) for count in device_counts]
    if args.nodes:
        return _main_nodes(args, plans=[StepPlan(n) for n in args.devices or (100, 400)], duration=duration,
                           raw_messages=raw_messages)  # fmt: skip
    if args.open_loop_devices and args.open_loop_rate > 0:
        plans.append(StepPlan(args.open_loop_devices, rate=args.open_loop_rate))

    print(f"# serving: {machine_line()}")
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for mode in modes:
            results += run_mode(
                mode,
                root=Path(tmp) / mode,
                args=args,
                plans=plans,
                paths=paths,
                duration=duration,
                raw_messages=raw_messages,
            )
    payload = _payload_bytes(args.batch)
    print(
        f"Server: broker_server/main.py --broker --request-path PATH, SQLite store, a fresh server (and state) per "
        f"step and path; devices register {args.samples} samples each (256-bit codes, {CLASSES} classes), then "
        f"{duration:.0f} s closed loop (one request in flight per device) or open loop (Poisson arrivals at the "
        f"offered rate, whatever is in flight), batch {args.batch}, {args.fetch_share:.0%} fetch / "
        f"{1 - args.fetch_share:.0%} update_fetch, float16 logits, {args.loadgen} load generators "
        f"({args.processes} processes). Latency: publish to reply at the device. CPU % "
        "of one core over the window; CPU µs/request: CPU time over the window / requests answered in it. "
        f"Load average at the end: {_loadavg()}."
    )
    for result in results:
        raw = result.raw
        notes = [
            f"raw Mosquitto QoS 1, one paho publisher -> one paho subscriber, {payload} B payloads: "
            f"{raw.received}/{raw.messages} messages in {raw.seconds:.2f} s = {raw.rate:.0f} msgs/s "
            "(a request costs the broker 2 messages: request, reply)"
        ]
        if result.raw_lean is not None:
            lean = result.raw_lean
            notes.append(
                f"with lean clients on both ends (broker_server.mqtt_link): {lean.received}/{lean.messages} in "
                f"{lean.seconds:.2f} s = {lean.rate:.0f} msgs/s"
            )
        if result.security_s:
            notes.append(f"security directory (CA, broker certificate) made in {result.security_s:.2f} s")
        if result.steps and result.steps[0].tls:
            notes.append(f"devices negotiated {result.steps[0].tls}")
        print(f"\n## {result.mode}, {result.path} path: " + "; ".join(notes) + "\n")
        print(format_steps(result.steps, raw))
    if len(paths) > 1:
        print(f"\n## request paths side by side (ratios to {paths[0]}, measured back to back in this run)\n")
        print(format_paths(results, base_path=paths[0]))
    if len(modes) > 1:
        print(
            "\n## modes side by side (device bytes: the devices' sockets' TCP_INFO over the window, TLS records "
            f"included, headers at {IPV4_TCP_HEADER_BYTES} B per segment; broker bytes: Mosquitto's "
            f"$SYS/broker/bytes counters, MQTT packets of the device and the server legs; {paths[-1]} path)\n"
        )
        print(format_modes([r for r in results if r.path == paths[-1]]))
    for path in paths if args.profile_server is not None else ():
        base = _profile_file(args.profile_server, path)
        parts = [base, *sorted(base.parent.glob(f"{base.name}.*"))]  # with --workers: the state process, front-ends
        for profile in parts:
            if profile.exists():
                print(f"\n## server profile, {path} path, {profile.name} (CPU time of every thread, last step)\n")
                _print_profile(profile)
    return 0


def _main_nodes(args: argparse.Namespace, *, plans: list[StepPlan], duration: float, raw_messages: int) -> int:
    """`--nodes`: the multi-node rows (bench/serving_nodes.py), one table."""
    from bench.serving_nodes import format_nodes, run_nodes

    print(f"# serving, more than one node: {machine_line()}; load average at the start: {_loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp:
        rows, raws = run_nodes(args, root=Path(tmp), plans=plans, duration=duration, raw_messages=raw_messages)
    print(
        f"Nodes: broker_server/main.py --broker (batched path, SQLite store), with --replicate redis://... --node-id "
        f"for the log (redis-server, appendonly, appendfsync always); {args.samples} samples per device, "
        f"{duration:.0f} s closed loop, batch {args.batch}, {args.fetch_share:.0%} fetch, {args.loadgen} load "
        f"generators ({args.processes} processes, split over the brokers). CPU µs/request: CPU time over the "
        f"window / requests answered in it. Load average at the end: {_loadavg()}.\n"
    )
    print(format_nodes(rows, raws))
    return 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
