"""The cache server over a real Mosquitto: replies, rejections that keep it serving, and durability across kill -9."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from android_harness.processes import ServerProcess, server_command
from broker_server.handlers import CacheService
from broker_server.mqtt_server import CacheServer
from fedwire import (
    ErrorCode,
    ErrorReply,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    Register,
    RegisterAck,
    Update,
    UpdateAck,
    decode,
    down_topic,
    encode,
)
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, connect_persistent, make_client

CLASSES = 4
HASH_BITS = 64


class RawDevice:
    """A device speaking the wire by hand, so tests can send anything, malformed messages included."""

    def __init__(self, address: BrokerAddress, device: str) -> None:
        self.device = device
        self.replies: queue.Queue[bytes] = queue.Queue()
        self.client = make_client(client_id=f"test-{device}-{os.getpid()}")
        self.client.on_message = lambda _c, _u, m: self.replies.put(bytes(m.payload))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.on_connect = lambda c, *_: c.subscribe(down_topic(device), qos=1)
        connect_persistent(self.client, address)
        self.client.loop_start()
        subscribed.get(timeout=10)
        self.cid = 0

    def next_cid(self) -> int:
        self.cid += 1
        return self.cid

    def publish_raw(self, kind: str, payload: bytes) -> None:
        self.client.publish(f"fedcache/v1/{self.device}/up/{kind}", payload, qos=1).wait_for_publish(5)

    def call(self, message: object) -> object:
        self.publish_raw(message.kind.value, encode(message))  # type: ignore[attr-defined]
        return self.reply()

    def reply(self, timeout: float = 10.0) -> object:
        return decode(self.replies.get(timeout=timeout))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _hello(device: RawDevice, samples: int) -> object:
    return device.call(
        Hello(
            device=device.device,
            cid=device.next_cid(),
            model="cnn",
            classes=CLASSES,
            samples=samples,
            hash_kind=HashKind.BINARY,
            hash_dim=HASH_BITS,
        )
    )


def _register(device: RawDevice, rng: np.random.Generator, samples: int) -> object:
    return device.call(
        Register(
            device=device.device,
            cid=device.next_cid(),
            ids=np.arange(samples, dtype=np.uint32),
            labels=(np.arange(samples) % CLASSES).astype(np.uint16),
            hashes=rng.integers(0, 256, size=(samples, HASH_BITS // 8), dtype=np.uint8),
        )
    )


@pytest.fixture
def server(broker: MosquittoBroker) -> Iterator[CacheServer]:
    service = CacheService.open(None, neighbours=4)
    running = CacheServer(service=service, address=broker.address, client_id=f"test-server-{time.time_ns()}")
    running.start()
    yield running
    running.stop()
    service.close()


def test_round_trip_and_bad_messages_get_error_replies(broker: MosquittoBroker, server: CacheServer) -> None:
    rng = np.random.default_rng(0)
    alice = RawDevice(broker.address, "alice")
    try:
        # Before hello the server does not know the device.
        reply = alice.call(Fetch(device="alice", cid=alice.next_cid(), ids=np.arange(3, dtype=np.uint32)))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNKNOWN_DEVICE and reply.cid == alice.cid

        assert isinstance(_hello(alice, 40), HelloAck)
        ack = _register(alice, rng, 40)
        assert isinstance(ack, RegisterAck) and ack.registered == 40

        # Garbage, wrong version, a payload claiming another device, NaN logits: each gets a coded error.
        alice.publish_raw("fetch", b"\xc1not msgpack")
        assert alice.reply().code is ErrorCode.BAD_ENCODING
        alice.publish_raw("fetch", msgpack.packb({"v": 99, "k": "fetch", "d": "alice", "c": 7}))
        bad_version = alice.reply()
        assert bad_version.code is ErrorCode.BAD_VERSION and bad_version.cid == 7
        alice.publish_raw("fetch", encode(Fetch(device="mallory", cid=8, ids=np.arange(2, dtype=np.uint32))))
        assert alice.reply().code is ErrorCode.DEVICE_MISMATCH
        # The encoder refuses NaN, so a misbehaving client's message is built by hand.
        nan_update = msgpack.packb(
            {
                "v": 1,
                "k": "update",
                "d": "alice",
                "c": alice.next_cid(),
                "ver": 1,
                "ids": np.arange(2, dtype="<u4").tobytes(),
                "logits": {"e": "f32", "n": 2, "m": CLASSES, "b": np.full((2, CLASSES), np.nan, "<f4").tobytes()},
            }
        )
        alice.publish_raw("update", nan_update)
        reply = alice.reply()
        assert reply.code is ErrorCode.NON_FINITE
        reply = alice.call(
            Update(
                device="alice",
                cid=alice.next_cid(),
                ids=np.arange(2, dtype=np.uint32),
                logits=np.zeros((2, CLASSES + 1), np.float32),
                version=1,
            )
        )
        assert reply.code is ErrorCode.CLASS_MISMATCH

        # The server kept serving: a valid update and fetch work, and knowledge flows to neighbours.
        logits = rng.normal(size=(40, CLASSES)).astype(np.float32)
        ack = alice.call(
            Update(
                device="alice",
                cid=alice.next_cid(),
                ids=np.arange(40, dtype=np.uint32),
                logits=logits,
                version=5,
                encoding=LogitEncoding.FLOAT32,
            )
        )
        assert isinstance(ack, UpdateAck) and (ack.applied, ack.stale) == (40, 0)
        knowledge = alice.call(
            Fetch(
                device="alice", cid=alice.next_cid(), ids=np.arange(40, dtype=np.uint32), encoding=LogitEncoding.FLOAT32
            )
        )
        assert isinstance(knowledge, Knowledge)
        assert np.all(knowledge.counts == 4)
        rows = server.service.cache.rows_of("alice", np.arange(40, dtype=np.uint32))
        neighbour_rows = server.service.cache.relations.neighbours_of(rows)
        expected = server.service.cache.knowledge[neighbour_rows].mean(axis=1)
        np.testing.assert_allclose(knowledge.logits, expected, rtol=1e-5, atol=1e-6)
        # A duplicate (same version) changes nothing.
        again = alice.call(
            Update(
                device="alice",
                cid=alice.next_cid(),
                ids=np.arange(40, dtype=np.uint32),
                logits=logits + 1,
                version=5,
                encoding=LogitEncoding.FLOAT32,
            )
        )
        assert (again.applied, again.stale) == (0, 40)
    finally:
        alice.close()


def _server_process(address: BrokerAddress, tmp_path: Path) -> ServerProcess:
    command = server_command(broker=address, data_dir=tmp_path / "server", client_id="durability-server")
    return ServerProcess(command=command, broker=address, log=tmp_path / "server.log")


def test_acknowledged_updates_survive_kill_9(tmp_path: Path) -> None:
    """Every update the server acknowledged is still there after SIGKILL and a restart."""
    rng = np.random.default_rng(1)
    with MosquittoBroker(data_dir=tmp_path / "broker") as own_broker:
        address = own_broker.address
        server = _server_process(address, tmp_path).start()
        dev = RawDevice(address, "bob")
        try:
            assert isinstance(_hello(dev, 64), HelloAck)
            assert isinstance(_register(dev, rng, 64), RegisterAck)
            acknowledged = {}
            for version in range(1, 21):
                ids = rng.choice(64, size=8, replace=False).astype(np.uint32)
                logits = rng.normal(size=(8, CLASSES)).astype(np.float32)
                ack = dev.call(
                    Update(
                        device="bob",
                        cid=dev.next_cid(),
                        ids=ids,
                        logits=logits,
                        version=version,
                        encoding=LogitEncoding.FLOAT32,
                    )
                )
                assert isinstance(ack, UpdateAck) and ack.applied == 8
                for i, row in zip(ids, logits, strict=True):
                    acknowledged[int(i)] = row
            server.kill()
            server = _server_process(address, tmp_path).start()
            # Replay against a direct reading of the restarted server's durable state.
            hello = _hello(dev, 64)
            assert isinstance(hello, HelloAck) and hello.registered == 64
            server.stop(timeout=20)
            assert server.returncode == 0
            with CacheService.open(tmp_path / "server" / "state", neighbours=4) as service:
                rows = service.cache.rows_of("bob", np.array(sorted(acknowledged), dtype=np.uint32))
                stored = service.cache.knowledge[rows]
                expected = np.stack([acknowledged[i] for i in sorted(acknowledged)])
                np.testing.assert_array_equal(stored, expected)
        finally:
            dev.close()
            server.stop()


def _serving(address: BrokerAddress, client_id: str) -> CacheServer:
    running = CacheServer(service=CacheService.open(None, neighbours=4), address=address, client_id=client_id)
    running.start()
    return running


def test_a_stopped_server_leaves_the_share_group_and_a_kept_session_queues(tmp_path: Path) -> None:
    """Mosquitto routes share-group messages to offline persistent members: a server stopping for good must
    leave, so every request reaches the one still serving; one stopping with its session kept gets its
    requests queued and answers them when it is back under the same client id."""
    with MosquittoBroker(data_dir=tmp_path / "broker") as own_broker:
        address = own_broker.address
        leaving, staying = _serving(address, "share-a"), _serving(address, "share-b")
        leaving.stop()
        dev = RawDevice(address, "carol")
        try:
            # Round-robin would send every other request into the stopped member's session: none may be lost.
            for _ in range(6):
                reply = dev.call(Fetch(device="carol", cid=dev.next_cid(), ids=np.arange(2, dtype=np.uint32)))
                assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNKNOWN_DEVICE
            staying.stop(leave_group=False)
            cid = dev.next_cid()
            dev.publish_raw("fetch", encode(Fetch(device="carol", cid=cid, ids=np.arange(2, dtype=np.uint32))))
            with pytest.raises(queue.Empty):
                dev.reply(timeout=1.0)
            back = _serving(address, "share-b")
            queued = dev.reply()
            assert isinstance(queued, ErrorReply) and queued.cid == cid
            back.stop()
        finally:
            dev.close()
