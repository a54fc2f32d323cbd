"""Two brokers, two server nodes (one of them `--workers 2`), one Redis, all real processes: devices on each side
learn from the other side's knowledge, both nodes' tables converge, and kill -9 of a node or of Redis loses nothing
acknowledged."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from android_harness.processes import ServerProcess, server_command
from broker_server.replication.journal import JOURNAL_FILENAME, Journal
from broker_server.state_factory import STATE_DIRNAME, open_state
from fedwire import Fetch, HashKind, Hello, HelloAck, Knowledge, LogitEncoding, Register, RegisterAck, Update, UpdateAck
from fedwire import decode as decode_message
from fedwire.mosquitto import MosquittoBroker
from fedwire.redis_server import RedisServer
from tests.test_batched_path import _Device

CLASSES = 4
SAMPLES = 16
NEIGHBOURS = 4
SIDE_A = ("a0", "a1")
SIDE_B = ("b0", "b1")
REPLY_TIMEOUT_S = 30.0

Held = dict[tuple[str, int], tuple[int, bytes]]  # (device, id) -> (version, float32 logits bytes)


class Side:
    """One site: its broker, its server node (a real `main.py --replicate` process) and its devices."""

    def __init__(
        self, tmp_path: Path, name: str, *, redis_url: str, devices: tuple[str, ...], options: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.broker = MosquittoBroker(data_dir=tmp_path / f"broker-{name}").start()
        self.data_dir = tmp_path / f"node-{name}"
        self.log = tmp_path / f"node-{name}.log"
        self.command = server_command(
            broker=self.broker.address, data_dir=self.data_dir, client_id=f"node-{name}",
            options=["--replicate", redis_url, "--node-id", name, "--neighbours", str(NEIGHBOURS), *options],
        )  # fmt: skip
        self.node = ServerProcess(command=self.command, broker=self.broker.address, log=self.log).start()
        self.devices = {device: _Device(self.broker.address, device) for device in devices}

    def restart_node(self) -> None:
        self.node = ServerProcess(command=self.command, broker=self.broker.address, log=self.log).start()

    def close(self) -> None:
        for device in self.devices.values():
            device.close()
        self.node.stop(timeout=60)
        self.broker.stop()


def _replies(device: _Device, cids: set[int]) -> dict[int, object]:
    """The replies carrying `cids`, in whatever order they come (a node's front-ends answer in parallel, and the
    broker may hold them while a node comes back); replies to other requests (resends) are skipped."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    found: dict[int, object] = {}
    while len(found) < len(cids):
        reply = decode_message(device.replies.get(timeout=max(0.1, deadline - time.monotonic())))
        if reply.cid in cids:
            found[reply.cid] = reply
    return found


def _join(device: _Device, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hello = Hello(device=device.device, cid=1, model="m", classes=CLASSES, samples=SAMPLES,
                  hash_kind=HashKind.BINARY, hash_dim=32)  # fmt: skip
    assert isinstance(device.call(hello), HelloAck)
    register = Register(
        device=device.device, cid=2, ids=np.arange(SAMPLES, dtype=np.uint32),
        labels=(np.arange(SAMPLES) % CLASSES).astype(np.uint16),
        hashes=rng.integers(0, 256, (SAMPLES, 4), dtype=np.uint8),
    )  # fmt: skip
    assert isinstance(device.call(register), RegisterAck)


class Traffic:
    """Updates with rising versions; remembers what each acknowledgement covered."""

    def __init__(self) -> None:
        self.acknowledged: Held = {}
        self._cid = 100
        self._version = 0

    def send(self, device: _Device, value: float | None = None, *, part: int | None = None) -> tuple[int, Update]:
        """Publish one update without waiting: of all the device's samples with logits `value`, or of the two
        samples of `part` with random logits (so that no later update hides the loss of this one)."""
        self._cid += 1
        self._version += 1
        rng = np.random.default_rng(self._cid)
        ids = (
            np.arange(SAMPLES, dtype=np.uint32) if part is None else np.arange(2 * part, 2 * part + 2, dtype=np.uint32)
        )
        logits = (
            np.full((ids.size, CLASSES), value, np.float32)
            if value is not None
            else rng.normal(size=(ids.size, CLASSES)).astype(np.float32)
        )
        update = Update(device=device.device, cid=self._cid, ids=ids, logits=logits, version=self._version,
                        encoding=LogitEncoding.FLOAT32)  # fmt: skip
        device.send(update)
        return self._cid, update

    def settle(self, device: _Device, sent: list[tuple[int, Update]]) -> None:
        """Wait for the replies to `sent` and record what they acknowledged (in the order sent)."""
        replies = _replies(device, {cid for cid, _update in sent})
        for cid, update in sent:
            ack = replies[cid]
            assert isinstance(ack, UpdateAck), ack
            for sample, row in zip(update.ids.tolist(), update.logits, strict=True):
                self.acknowledged[(device.device, sample)] = (update.version, row.astype("<f4").tobytes())

    def round(self, side: Side, value: float | None = None) -> None:
        for device in side.devices.values():
            self.settle(device, [self.send(device, value)])


def _fetch(device: _Device, cid: int) -> Knowledge:
    reply = device.call(Fetch(device=device.device, cid=cid, ids=np.arange(SAMPLES, dtype=np.uint32)))
    assert isinstance(reply, Knowledge), reply
    return reply


def _held(data_dir: Path) -> Held:
    """What a node's committed store holds, read-only (the node may be running)."""
    with open_state(data_dir / STATE_DIRNAME, neighbours=NEIGHBOURS, read_only=True) as state:
        return {
            (record.device, sample): (version, row.astype("<f4").tobytes())
            for record in state.devices()
            for sample, version, row in zip(*_columns(state.held(record.device)), strict=True)
        }


def _columns(held: object) -> tuple[list[int], list[int], np.ndarray]:
    return held.ids.tolist(), held.versions.tolist(), held.logits  # type: ignore[attr-defined]


def _outbox(data_dir: Path) -> int:
    """Entries a node's outbox holds (read-only: the node may be running)."""
    path = data_dir / STATE_DIRNAME / JOURNAL_FILENAME
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def _only(held: Held, device: str) -> Held:
    return {key: value for key, value in held.items() if key[0] == device}


def _wait(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.2)


def _covers(held: Held, acknowledged: Held) -> bool:
    """Every acknowledged update is there: the same version and logits, or a newer version."""
    for key, (version, logits) in acknowledged.items():
        have = held.get(key)
        if have is None or have[0] < version or (have[0] == version and have[1] != logits):
            return False
    return True


def test_two_sites_learn_from_each_other_and_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    redis = RedisServer(data_dir=tmp_path / "redis").start()
    sides: list[Side] = []
    try:
        a = Side(tmp_path, "a", redis_url=redis.url, devices=SIDE_A)
        sides.append(a)
        # Node B runs as a state process and two front-ends (--workers 2): its state process replicates.
        b = Side(tmp_path, "b", redis_url=redis.url, devices=SIDE_B, options=("--workers", "2"))
        sides.append(b)
        for seed, device in enumerate([*a.devices.values(), *b.devices.values()]):
            _join(device, seed)
        traffic = Traffic()

        # Only side A has knowledge: side B's devices are taught exactly A's logits, through the log.
        traffic.round(a, value=1.0)
        _wait(lambda: _covers(_held(b.data_dir), traffic.acknowledged), timeout=30, what="B holds A's knowledge")
        for number, device in enumerate(b.devices.values()):
            knowledge = _fetch(device, 500 + number)
            assert knowledge.counts.min() > 0, knowledge.counts
            np.testing.assert_allclose(knowledge.logits, 1.0, atol=1e-3)
        # Side B's knowledge (another value) reaches A's teachers.
        traffic.round(b, value=-1.0)
        _wait(lambda: _covers(_held(a.data_dir), traffic.acknowledged), timeout=30, what="A holds B's knowledge")
        taught = np.concatenate([_fetch(device, 600 + n).logits for n, device in enumerate(a.devices.values())])
        assert (taught < 0.99).any(), "no teacher on side A holds side B's knowledge"

        # kill -9 of node A with updates in flight: the broker keeps them, the restarted node answers them.
        device = a.devices["a0"]
        in_flight = [traffic.send(device, part=part) for part in range(3)]
        a.node.kill()
        in_flight += [traffic.send(device, part=part) for part in range(3, 6)]
        a.restart_node()
        traffic.settle(device, in_flight)
        traffic.round(b, value=0.5)

        # kill -9 of Redis with updates in flight on both sides: acknowledged from the outbox, replicated later.
        in_flight_a = [traffic.send(a.devices["a1"], part=part) for part in range(2)]
        redis.kill()
        in_flight_a += [traffic.send(a.devices["a1"], part=part) for part in range(2, 5)]
        in_flight_b = [traffic.send(b.devices["b1"], part=part) for part in range(3)]
        traffic.settle(a.devices["a1"], in_flight_a)
        traffic.settle(b.devices["b1"], in_flight_b)
        # Acknowledged while the log is down: held by their own node and waiting in its outbox, not yet elsewhere.
        assert _outbox(a.data_dir) > 0 and _outbox(b.data_dir) > 0
        assert not _covers(_held(b.data_dir), _only(traffic.acknowledged, "a1"))
        redis.start()
        # Traffic goes on; a0's and a1's last updates stay the ones acknowledged around the kills, so a lost one
        # cannot be hidden by a newer version.
        traffic.settle(b.devices["b0"], [traffic.send(b.devices["b0"], part=7)])

        # Both nodes converge on the same table, holding everything acknowledged.
        def converged() -> bool:
            held_a = _held(a.data_dir)
            return _covers(held_a, traffic.acknowledged) and held_a == _held(b.data_dir)

        _wait(converged, timeout=40, what="both nodes hold every acknowledged update and the same table")
        assert len(traffic.acknowledged) == SAMPLES * 4
    finally:
        for side in sides:
            side.close()
        redis.stop()
    for side in sides:
        assert side.node.returncode == 0, side.log.read_text()[-3000:]
    # The same registrations in the same order give the same neighbour table, so the same teachers everywhere.
    with (
        open_state(a.data_dir / STATE_DIRNAME, neighbours=NEIGHBOURS, read_only=True) as state_a,
        open_state(b.data_dir / STATE_DIRNAME, neighbours=NEIGHBOURS, read_only=True) as state_b,
    ):
        rows = np.arange(SAMPLES * 4)
        teachers_a, teachers_b = state_a.fetch(rows), state_b.fetch(rows)
        np.testing.assert_array_equal(teachers_a.counts, teachers_b.counts)
        np.testing.assert_array_equal(teachers_a.logits, teachers_b.logits)
        assert [r.device for r in state_a.devices()] == [r.device for r in state_b.devices()]


def test_the_cli_refuses_what_a_node_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal is one line and exit status 2, before any broker or state is started."""
    from broker_server.main import main as server_main

    Journal(tmp_path / "taken" / STATE_DIRNAME, node="a").close()
    cases = [
        (["--node-id", "a"], "--node-id needs --replicate"),
        (["--replicate", "redis://127.0.0.1:1"], "needs --node-id"),
        (["--replicate", "http://127.0.0.1:1", "--node-id", "a"], "redis://HOST:PORT"),
        (["--replicate", "redis://127.0.0.1:1", "--node-id", "a/b"], "a node id is"),
        (["--replicate", "redis://127.0.0.1:1", "--node-id", "a", "--defences", "on"], "--defences on"),
        (["--replicate", "redis://127.0.0.1:1", "--node-id", "b", "--data-dir", str(tmp_path / "taken")], "node 'a'"),
    ]
    for argv, says in cases:
        data_dir = [] if "--data-dir" in argv else ["--data-dir", str(tmp_path / "fresh")]
        assert server_main([*argv, *data_dir, "--metrics-port", "0"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
