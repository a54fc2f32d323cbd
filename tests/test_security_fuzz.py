"""A capture-and-mutate fuzzer holding one device's credentials: nothing it sends changes another device's state.

Device A runs a real exchange with the server over TLS; a spy captures A's requests as the broker delivered them;
then A replays them, flips their bits (seeded), relabels them as B's or C's, and aims them at B's and C's topics.
B's and C's rows (versions, logit digests, registrations) are compared before and after, in the server's own state
and through `main.py inspect --json`; B, C and A are served normally afterwards.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from broker_server.inspection import describe
from broker_server.mqtt_server import CacheServer
from fedwire import (
    ErrorCode,
    ErrorReply,
    Fetch,
    HelloAck,
    Kind,
    Knowledge,
    LogitEncoding,
    Register,
    RegisterAck,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    down_topic,
    up_topic,
)
from fedwire.constants import REQUEST_KINDS
from fedwire.topics import parse_up_topic
from tests.test_broker_security import (
    CLASSES,
    MAIN,
    NOT_AUTHORIZED,
    QUIET_S,
    REPLY_TIMEOUT_S,
    REPO,
    SAMPLES,
    SERVER_ID,
    SPY,
    Connection,
    SecureStack,
    call,
    hello,
    listening,
    register,
    serve,
    stop_serving,
)

SEED = 20261201
OTHERS = ("B", "C")
OTHERS_VERSION = 1  # the version of B's and C's knowledge; A's updates carry higher ones
# How many messages of each mutation the fuzzer sends (several hundred in all).
PLAN = {
    "replay": 2,  # per captured message, unchanged, on A's own topic
    "flip": 240,  # 1-8 bits flipped, on A's own topic
    "cut": 40,  # truncated or extended with random bytes, on A's own topic
    "wrong kind": 30,  # a captured payload on another of A's request topics
    "as other": 60,  # the device field rewritten to B or C, on A's own topic
    "as other, flipped": 40,
    "aimed": 60,  # unchanged, on B's or C's up topic
    "aimed as other": 60,  # rewritten to the target, on the target's up topic
}
AIMED = ("aimed", "aimed as other")


@dataclass(frozen=True)
class Shot:
    """One mutated message: what was done, where it goes and what it carries."""

    mutation: str
    topic: str
    payload: bytes


class Fuzzer:
    """A's one connection at a time (the broker binds A's client id, so a second one would take the first over).

    Messages on A's own topics each earn exactly one reply on A's down topic; a message on another device's topic
    is refused (PUBACK 0x87) and costs the connection, so the fuzzer lets every reply arrive first, then
    reconnects after the refusal.
    """

    def __init__(self, stack: SecureStack) -> None:
        self.stack = stack
        self.replies: list[bytes] = []
        self.sent_own = 0
        self.refusals: Counter[str] = Counter()
        self._connection = self._connect()

    def _connect(self) -> Connection:
        return listening(self.stack.connect("A"), "A")

    def _answered_here(self) -> list[bytes]:
        return [bytes(m.payload) for m in self._connection.since(0) if m.topic == down_topic("A")]

    def _collect(self) -> None:
        self.replies += self._answered_here()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every message sent on A's own topics has been answered."""
        expected = self.sent_own - len(self.replies)
        if expected:
            arrived = self._connection.wait_message(lambda _m: len(self._answered_here()) >= expected, timeout=timeout)
            assert arrived is not None, f"{expected - len(self._answered_here())} of {self.sent_own} replies missing"

    def send(self, shot: Shot) -> None:
        target = parse_up_topic(shot.topic)
        assert target is not None
        if target[0] == "A":
            reason = self._connection.publish(shot.topic, shot.payload)
            assert reason is not None and not reason.is_failure, (shot.mutation, reason)
            self.sent_own += 1
            return
        self.settle()
        reason = self._connection.publish(shot.topic, shot.payload)
        assert reason is not None and reason.value == NOT_AUTHORIZED, (shot.mutation, shot.topic, reason)
        self.refusals[shot.mutation] += 1
        assert self._connection.wait_disconnected(REPLY_TIMEOUT_S)  # Mosquitto 2.0.11 closes after a refusal
        self._collect()
        self._connection.close()
        self._connection = self._connect()

    def finish(self) -> list[bytes]:
        self.settle()
        self._collect()
        self._connection.close()
        return self.replies


# ---------------------------------------------------------------- mutations


def _flip(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _cut(payload: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return payload[: rng.randrange(len(payload))]
    return payload + rng.randbytes(rng.randint(1, 64))


def _as(payload: bytes, device: str) -> bytes:
    document = msgpack.unpackb(payload, raw=False)
    document["d"] = device
    return msgpack.packb(document, use_bin_type=True)


def mutations(captured: list[tuple[Kind, bytes]], rng: random.Random) -> list[Shot]:
    """The fuzzer's messages, in a seeded random order."""
    shots: list[Shot] = []
    kinds = sorted(REQUEST_KINDS, key=lambda k: k.value)
    for kind, payload in captured:
        shots += [Shot("replay", up_topic("A", kind), payload)] * PLAN["replay"]

    def pick() -> tuple[Kind, bytes]:
        return captured[rng.randrange(len(captured))]

    for _ in range(PLAN["flip"]):
        kind, payload = pick()
        shots.append(Shot("flip", up_topic("A", kind), _flip(payload, rng)))
    for _ in range(PLAN["cut"]):
        kind, payload = pick()
        shots.append(Shot("cut", up_topic("A", kind), _cut(payload, rng)))
    for _ in range(PLAN["wrong kind"]):
        kind, payload = pick()
        other = rng.choice([k for k in kinds if k is not kind])
        shots.append(Shot("wrong kind", up_topic("A", other), payload))
    for _ in range(PLAN["as other"]):
        kind, payload = pick()
        shots.append(Shot("as other", up_topic("A", kind), _as(payload, rng.choice(OTHERS))))
    for _ in range(PLAN["as other, flipped"]):
        kind, payload = pick()
        shots.append(Shot("as other, flipped", up_topic("A", kind), _flip(_as(payload, rng.choice(OTHERS)), rng)))
    for _ in range(PLAN["aimed"]):
        kind, payload = pick()
        target_kind = kind if rng.random() < 0.7 else rng.choice(kinds)
        shots.append(Shot("aimed", up_topic(rng.choice(OTHERS), target_kind), payload))
    for _ in range(PLAN["aimed as other"]):
        kind, payload = pick()
        target = rng.choice(OTHERS)
        shots.append(Shot("aimed as other", up_topic(target, kind), _as(payload, target)))
    rng.shuffle(shots)
    return shots


# ---------------------------------------------------------------- the fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureStack, CacheServer, Path]]:
    """A secure broker, a server with durable state (so `inspect` can read it), devices A, B (passwords), C
    (certificate), and B's and C's knowledge in place."""
    root = tmp_path_factory.mktemp("fuzz")
    stack = SecureStack.start(root)
    try:
        stack.provision(("A", "password"), ("B", "password"), ("C", "certificate"))
        server = serve(stack, SERVER_ID, data_dir=root / "server")
        try:
            for number, device in enumerate(OTHERS):
                connection = listening(stack.connect(device), device)
                try:
                    assert isinstance(call(connection, device, hello(device, cid=1)), HelloAck)
                    assert isinstance(call(connection, device, register(device, cid=2, seed=10 + number)), RegisterAck)
                    logits = np.random.default_rng(20 + number).normal(size=(SAMPLES, CLASSES)).astype(np.float32)
                    update = Update(
                        device=device,
                        cid=3,
                        ids=np.arange(SAMPLES, dtype=np.uint32),
                        logits=logits,
                        version=OTHERS_VERSION,
                        encoding=LogitEncoding.FLOAT32,
                    )
                    ack = call(connection, device, update)
                    assert isinstance(ack, UpdateAck) and ack.applied == SAMPLES
                finally:
                    connection.close()
            yield stack, server, root / "server"
        finally:
            stop_serving(server)
    finally:
        stack.stop()


def exchange(stack: SecureStack) -> list[tuple[Kind, bytes]]:
    """A's real session (hello, register, updates, fetch, update-and-fetch), captured off the wire by the spy."""
    spy = stack.observer(SPY)
    try:
        assert [r.value for r in spy.subscribe(["fedcache/v1/A/up/+"])] == [1]
        device = listening(stack.connect("A"), "A")
        rng = np.random.default_rng(SEED)
        try:
            assert isinstance(call(device, "A", hello("A", cid=1, samples=24)), HelloAck)
            whole = register("A", cid=2, seed=3, samples=24)
            for cid, part in ((2, slice(0, 12)), (3, slice(12, 24))):
                chunk = Register(
                    device="A", cid=cid, ids=whole.ids[part], labels=whole.labels[part], hashes=whole.hashes[part]
                )
                assert isinstance(call(device, "A", chunk), RegisterAck)
            # Ids that B and C hold too and versions above theirs: relabelled as B's or C's, these updates would
            # overwrite their rows if the server took the payload's word for who is speaking.
            ids = np.arange(SAMPLES, dtype=np.uint32)
            for cid, version in ((4, OTHERS_VERSION + 1), (5, OTHERS_VERSION + 2)):
                logits = rng.normal(size=(SAMPLES, CLASSES)).astype(np.float32)
                update = Update(device="A", cid=cid, ids=ids, logits=logits, version=version)
                assert isinstance(call(device, "A", update), UpdateAck)
            assert isinstance(call(device, "A", Fetch(device="A", cid=6, ids=ids[:8])), Knowledge)
            both = UpdateFetch(
                device="A",
                cid=7,
                ids=ids[:4],
                logits=rng.normal(size=(4, CLASSES)).astype(np.float32),
                version=OTHERS_VERSION + 3,
                fetch_ids=ids[4:12],
            )
            assert isinstance(call(device, "A", both), Knowledge)
        finally:
            device.close()
        wanted = 7  # hello, two register chunks, two updates, a fetch, an update-and-fetch
        assert spy.wait_message(lambda _m: len(spy.since(0)) >= wanted) is not None
        captured = []
        for message in spy.since(0):
            parsed = parse_up_topic(message.topic)
            assert parsed is not None and parsed[0] == "A"
            captured.append((parsed[1], bytes(message.payload)))
        assert len(captured) == wanted, [k.value for k, _ in captured]
        return captured
    finally:
        spy.close()


def snapshot(server: CacheServer) -> dict[str, Any]:
    """B's and C's rows as `inspect --json --logits` lists them, read from the server's own state."""
    report = describe(server.service.state, devices=OTHERS, logits=True)
    return json.loads(json.dumps(report["devices"]))


def inspect(data_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    arguments = ["inspect", "--data-dir", str(data_dir), "--json", "--logits", *(f"--device={d}" for d in OTHERS)]
    done = subprocess.run(
        [sys.executable, str(MAIN), *arguments], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    devices: dict[str, Any] = json.loads(done.stdout)["devices"]
    return devices


def test_a_fuzzer_with_one_devices_credentials_changes_no_other_devices_rows(
    fleet: tuple[SecureStack, CacheServer, Path],
) -> None:
    stack, server, data_dir = fleet
    captured = exchange(stack)
    before = snapshot(server)
    assert all(before[d]["known"] and before[d]["with_knowledge"] == SAMPLES for d in OTHERS), before
    watchers = {device: listening(stack.connect(device), device) for device in OTHERS}
    try:
        shots = mutations(captured, random.Random(SEED))
        assert len(shots) >= 500
        fuzzer = Fuzzer(stack)
        for shot in shots:
            fuzzer.send(shot)
        replies = [decode(payload) for payload in fuzzer.finish()]

        # Every message on A's own topics was answered, to A only; the broker refused every aimed one.
        own = [shot for shot in shots if shot.mutation not in AIMED]
        assert len(replies) == len(own)
        assert {reply.device for reply in replies} == {"A"}
        assert sum(fuzzer.refusals.values()) == len(shots) - len(own)
        # Replies come back in the order the requests went: a message relabelled as B's or C's is refused by the
        # server as a mismatch (the device on the topic is A).
        for shot, reply in zip(own, replies, strict=True):
            if shot.mutation == "as other":
                assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.DEVICE_MISMATCH, (shot, reply)
        outcomes = Counter(reply.code.value if isinstance(reply, ErrorReply) else "ok" for reply in replies)
        assert outcomes["ok"] > 0 and outcomes[ErrorCode.DEVICE_MISMATCH.value] >= PLAN["as other"]

        # Nobody else heard a thing, and B's and C's rows are exactly as they were.
        for device, watcher in watchers.items():
            assert not watcher.disconnected.wait(QUIET_S / len(watchers)), (device, watcher.disconnect_reason)
            assert [m.topic for m in watcher.since(0)] == [], device
        assert snapshot(server) == before
        assert inspect(data_dir) == before

        # The server is still serving, every device.
        for device, watcher in watchers.items():
            reply = call(watcher, device, Fetch(device=device, cid=100, ids=np.arange(4, dtype=np.uint32)))
            assert isinstance(reply, Knowledge) and reply.device == device
        again = listening(stack.connect("A"), "A")
        try:
            assert isinstance(call(again, "A", hello("A", cid=1000, samples=24)), HelloAck)
        finally:
            again.close()
        summary = f"{len(shots)} sent, {len(replies)} answered {dict(outcomes)}, refused {dict(fuzzer.refusals)}"
        print(f"\nfuzz: {summary}")
    finally:
        for watcher in watchers.values():
            watcher.close()
