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

Everything is loopback, bounded in message count and time, and stops by itself; the broker, server and
load-generator processes are ended by their PIDs.

    python -m bench serving [--quick] [--devices 10 100 1000] [--duration 20]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import selectors
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from tqdm import tqdm

from android_harness.processes import ServerProcess, server_command
from bench._report import machine_line, markdown_table
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
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, connect_persistent, make_client

CLASSES = 10
HASH_BITS = 256
SEED = 0
RAW_TOPIC = "bench/raw"
STEP_TIMEOUT_S = 180.0  # registration or warm-up of one device count must finish within this
DRAIN_S = 15.0  # after the timed window, how long devices wait for their last replies
SERVER_START_S = 60.0

# --------------------------------------------------------------------------- load generator (worker side)


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
            key.data.loop_read()
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


def _open_socket(loop: _Loop, previous: Any) -> Callable[[mqtt.Client, Any, Any], None]:
    def on_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if previous is not None:
            previous(client, userdata, sock)  # TCP_NODELAY from fedwire.mqtt.make_client
        loop.selector.register(sock, selectors.EVENT_READ, client)

    return on_open


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
    state = {"phase": "register", "start": 0.0, "deadline": 0.0}
    outstanding: set[str] = set()

    def send(device: _Device, message: Any) -> None:
        device.cid = message.cid
        device.sent_at = time.monotonic()
        device.sent_kind = message.kind.value
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

    def on_subscribe(_c: mqtt.Client, device: _Device, *_args: Any) -> None:
        device.subscribed = True

    def on_connect(client: mqtt.Client, device: _Device, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            raise RuntimeError(f"{device.name}: broker refused the connection: {reason}")
        client.subscribe(down_topic(device.name), qos=1)

    for number, name in enumerate(spec.devices):
        client = make_client(client_id=f"bench-{name}")
        device = _Device(
            name=name, index=spec.first_index + number, client=client, ids=np.arange(spec.samples, dtype=np.uint32)
        )
        client.user_data_set(device)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        loop.attach(client)
        devices[name] = device
        connect_persistent(client, spec.address)
        loop.step(0)
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
    for device in everyone:
        device.stage = "load"
        send(device, next_request(device))
    loop.run_until(lambda: time.monotonic() > state["deadline"], state["deadline"] - time.monotonic() + 1.0)
    loop.run_until(lambda: not outstanding, DRAIN_S)
    result.lost = len(outstanding)
    control.put(("result", result))
    for device in everyone:
        device.client.disconnect()
    loop.run_until(lambda: not loop.writers, 2.0)


# --------------------------------------------------------------------------- raw Mosquitto rate


def raw_publisher(address: BrokerAddress, messages: int, payload_bytes: int, done: Any) -> None:
    """Publish `messages` QoS 1 messages as fast as paho lets one client, then wait for the last PUBACK."""
    client = make_client(client_id=f"bench-raw-pub-{os.getpid()}", max_inflight=1000)
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


def measure_raw(address: BrokerAddress, *, messages: int, payload_bytes: int, timeout: float) -> RawRate:
    """One paho publisher process -> this process subscribing, QoS 1 both ways; rate at the subscriber."""
    received: list[float] = []
    subscribed = threading.Event()
    finished = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        received.append(time.monotonic())
        if len(received) >= messages:
            finished.set()

    client = make_client(client_id=f"bench-raw-sub-{os.getpid()}", max_inflight=1000)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe(RAW_TOPIC, qos=1)
    client.connect(address.host, address.port)
    client.loop_start()
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    publisher = ctx.Process(target=raw_publisher, args=(address, messages, payload_bytes, done), daemon=True)
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

    @property
    def samples_per_s(self) -> float:
        return self.served / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s


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


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


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
) -> StepResult:
    """Register `devices` simulated devices, warm the relations, then load the server for `duration` seconds."""
    ctx = mp.get_context("spawn")
    control = ctx.Queue()
    warm, go = ctx.Event(), ctx.Event()
    window = ctx.Array("d", 2)
    names = [f"b{devices}-{i:04d}" for i in range(devices)]
    processes = max(1, min(processes, devices))
    parts = [names[i::processes] for i in range(processes)]
    firsts = [devices * 10 + i for i in range(processes)]
    specs = [
        LoadSpec(
            address=address,
            devices=tuple(part),
            first_index=first * 100_000,
            samples=samples,
            batch=batch,
            fetch_share=fetch_share,
            encoding=LogitEncoding.FLOAT16,
            seed=seed,
            max_requests=max(1, -(-max_requests // devices)),
        )
        for part, first in zip(parts, firsts, strict=True)
    ]
    procs = [ctx.Process(target=load_worker, args=(s, control, warm, go, window), daemon=True) for s in specs]
    for proc in procs:
        proc.start()
    try:
        register_s = max(_collect(control, "registered", processes, STEP_TIMEOUT_S + 60, procs))
        warm.set()
        warm_s = max(_collect(control, "warm", processes, STEP_TIMEOUT_S + 60, procs))
        loadgen = [psutil.Process(p.pid) for p in procs if p.pid is not None]
        start = time.monotonic() + 0.5
        window[0], window[1] = start, start + duration
        go.set()
        time.sleep(max(0.0, start - time.monotonic()))
        before = (_cpu_seconds([server]), _cpu_seconds([broker]), _cpu_seconds(loadgen))
        with _Sampler(server) as sampler:
            time.sleep(max(0.0, start + duration - time.monotonic()))
            after = (_cpu_seconds([server]), _cpu_seconds([broker]), _cpu_seconds(loadgen))
        results: list[WorkerResult] = _collect(control, "result", processes, DRAIN_S + 30, procs)
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
    return StepResult(
        devices=devices,
        processes=processes,
        register_s=register_s,
        warm_s=warm_s,
        duration_s=max(active, 1e-9),
        requests=sum(r.requests for r in results),
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
    )


def format_steps(steps: list[StepResult], raw: RawRate) -> str:
    """Markdown table; the last column is the server's request rate against the raw broker rate of this run."""
    rows = []
    for s in steps:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in s.kind_p50_ms.items())
        rows.append(
            (
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
                f"{s.server_rss_mb:.0f}",
                f"{s.broker_cpu:.0f}",
                f"{s.loadgen_cpu:.0f}",
                f"{s.errors}/{s.lost}",
                f"{s.requests_per_s / raw.rate:.3f}" if raw.rate else "-",
            )
        )
    headers = (
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
        "server RSS MB (peak)",
        "mosquitto CPU %",
        "loadgen CPU %",
        "errors/lost",
        "requests/s ÷ raw msgs/s",
    )
    return markdown_table(headers, rows)


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


def _print_profile(path: Path, top: int = 25) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(top)


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
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    device_counts = args.devices or [10, 100, 1000]
    duration = args.duration or (4.0 if args.quick else 20.0)
    raw_messages = args.raw_messages or (5000 if args.quick else 20000)
    if max(device_counts) > 1000:
        parser.error("at most 1000 devices (connections) on this benchmark")

    print(f"# serving: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        (root / "server").mkdir()
        with MosquittoBroker(data_dir=root / "mosquitto") as broker:
            assert broker.process is not None
            payload = _payload_bytes(args.batch)
            raw = measure_raw(broker.address, messages=raw_messages, payload_bytes=payload, timeout=120)
            profile = ["-m", "cProfile", "-o", str(args.profile_server)] if args.profile_server else []
            command = server_command(
                broker=broker.address,
                data_dir=root / "server" / "data",
                client_id=f"bench-server-{os.getpid()}",
                options=["--log-level", "WARNING"],
                interpreter=[sys.executable, *profile],
            )
            server = ServerProcess(command=command, broker=broker.address, log=root / "server" / "server.log")
            steps: list[StepResult] = []
            try:
                server.start(timeout=SERVER_START_S)
                server_ps, broker_ps = psutil.Process(server.pid), psutil.Process(broker.process.pid)
                for count in tqdm(device_counts, desc="device counts", leave=False):
                    steps.append(
                        run_step(
                            broker.address,
                            devices=count,
                            processes=args.processes,
                            samples=args.samples,
                            batch=args.batch,
                            fetch_share=args.fetch_share,
                            duration=duration,
                            seed=args.seed,
                            max_requests=args.max_requests,
                            server=server_ps,
                            broker=broker_ps,
                        )
                    )
            finally:
                server.stop(timeout=20.0)
            if server.returncode not in (0, None):
                print((root / "server" / "server.log").read_text()[-3000:], file=sys.stderr)
    print(
        f"Raw Mosquitto QoS 1, one paho publisher -> one paho subscriber, {payload} B payloads: "
        f"{raw.received}/{raw.messages} messages in {raw.seconds:.2f} s = {raw.rate:.0f} msgs/s "
        "(a request costs the broker 2 messages: request, reply)"
    )
    print(
        f"Server: broker_server/main.py --broker, SQLite store; devices register {args.samples} samples each "
        f"(256-bit codes, {CLASSES} classes), then closed loop for {duration:.0f} s, one request in flight per "
        f"device, batch {args.batch}, {args.fetch_share:.0%} fetch / {1 - args.fetch_share:.0%} update_fetch, "
        "float16 logits. Latency: publish to reply at the device. CPU % of one core over the window.\n"
    )
    print(format_steps(steps, raw))
    if args.profile_server is not None and args.profile_server.exists():
        _print_profile(args.profile_server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
