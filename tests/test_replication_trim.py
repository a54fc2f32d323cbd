"""Trimming the replication log (real redis-server, real SQLite): the log keeps what some node still lacks, a node
gone for good is forgotten, and a node joining a trimmed log starts from a copy of a peer's state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from broker_server.main import main as server_main
from broker_server.records import Rejected
from broker_server.replication import RedisLog, ReplicatedState, open_replicated_state
from broker_server.replication.admin import SeedError, seed_node
from broker_server.replication.admin import main as replication_main
from broker_server.replication.metrics import ReplicationCollector
from broker_server.replication.redis_log import CursorTrimmed, id_key
from broker_server.state_factory import STATE_DIRNAME
from fedwire.redis_server import RedisServer
from tests.test_replication import CLASSES, SAMPLES, _join, _wait, redis_server

__all__ = ["redis_server"]  # the fixture, shared with the other replication tests
TRIM_S = 0.05


def _open(tmp_path: Path, node: str, url: str) -> ReplicatedState:
    """Node `node` with its --data-dir at tmp_path/node (state in its STATE_DIRNAME), trimming every TRIM_S."""
    return open_replicated_state(tmp_path / node / STATE_DIRNAME, node=node, url=url, neighbours=4, flush_s=0.05,
                                 trim_s=TRIM_S)  # fmt: skip


def _update(state: ReplicatedState, rows: np.ndarray, version: int) -> None:
    state.apply_updates(rows=rows, logits=np.full((rows.size, CLASSES), float(version), np.float32),
                        versions=np.full(rows.size, version))  # fmt: skip
    state.commit()


def _versions(state: ReplicatedState, device: str) -> list[int]:
    try:
        return state.held(device).versions.tolist()
    except Rejected:
        return []


def _oldest(log: RedisLog) -> str | None:
    """The id of the oldest entry the stream still holds."""
    found = log.between(after="0-0", through="+", count=1)
    return found[0][0] if found else None


def test_the_log_keeps_only_what_some_node_has_yet_to_apply(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    log = RedisLog(redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        for version in range(2, 12):
            _update(a, rows[:8], version)
        _wait(lambda: _versions(b, "da") == [11] * 8, what="b applied a's updates")
        _wait(lambda: log.trimmed() != "0-0" and log.length() <= 2, what="the log trimmed")
        cursors = log.nodes()
        assert set(cursors) == {"a", "b"}
        # Nothing older than the lowest durable cursor is kept, nothing newer is gone.
        assert id_key(log.trimmed()) <= min(id_key(c) for c in cursors.values())
        oldest = _oldest(log)
        assert oldest is None or id_key(oldest) >= id_key(log.trimmed())
        assert a.replication().trimmed_entries + b.replication().trimmed_entries >= 10
        # Replication goes on over a trimmed log.
        _update(a, rows[8:12], 20)
        _wait(lambda: _versions(b, "da")[-4:] == [20] * 4, what="b applied an update made after the trim")
        registry = CollectorRegistry()
        registry.register(ReplicationCollector(a))
        assert (
            registry.get_sample_value("fedcache_replication_trimmed_entries_total") == a.replication().trimmed_entries
        )
        assert registry.get_sample_value("fedcache_replication_forgotten") == 0
        # An operator forgetting a node that still runs: the node notices at its next turn and says so.
        assert log.forget("b")
        _wait(lambda: b.replication().forgotten, what="b noticed it was forgotten")
        assert "b" not in log.nodes()  # and it does not put itself back
    finally:
        log.close()
        a.close()
        b.close()


def test_a_stopped_node_holds_trimming_back_and_catches_up_until_it_is_forgotten(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    log = RedisLog(redis_server.url)
    try:
        rows = _join(a, "da", seed=1)
        _wait(lambda: len(_versions(b, "da")) == 0 and b.stats().samples == SAMPLES, what="b has da")
        b.close()
        stopped_at = log.nodes()["b"]
        for version in range(2, 8):
            _update(a, rows[:6], version)
        _wait(lambda: id_key(log.nodes()["a"]) > id_key(stopped_at), what="a's cursor passed b's")
        assert id_key(log.trim()[0]) <= id_key(stopped_at)  # the rule a's trims follow, run once more here
        assert replication_main(["status", "--replicate", redis_server.url, "--json"], prog="t") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["holding_back"] == "b" and set(status["nodes"]) == {"a", "b"}
        b = _open(tmp_path, "b", redis_server.url)  # back after an outage: everything it missed is still there
        _wait(lambda: _versions(b, "da") == [7] * 6, what="b caught up")
        b.close()

        b_cursor = log.nodes()["b"]
        assert replication_main(["forget", "--replicate", redis_server.url, "--node-id", "b"], prog="t") == 0
        assert "b" not in log.nodes()
        assert replication_main(["forget", "--replicate", redis_server.url, "--node-id", "b"], prog="t") == 1
        _update(a, rows[:6], 9)
        _wait(lambda: id_key(log.trimmed()) > id_key(b_cursor), what="a trimmed past the forgotten node")
        with pytest.raises(CursorTrimmed, match="seed this node"):
            _open(tmp_path, "b", redis_server.url)
        # The server says the same in one line and starts nothing.
        code = server_main(["--broker", "mqtt://127.0.0.1:1", "--replicate", redis_server.url, "--node-id", "b",
                            "--data-dir", str(tmp_path / "b")])  # fmt: skip
        assert code == 2
        assert "trimmed" in capsys.readouterr().err
    finally:
        log.close()
        a.close()


def test_a_node_joining_a_trimmed_log_starts_from_a_peers_copy(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _open(tmp_path, "a", redis_server.url), _open(tmp_path, "b", redis_server.url)
    log = RedisLog(redis_server.url)
    try:
        rows_a, rows_b = _join(a, "da", seed=1), _join(b, "db", seed=2)
        _update(a, rows_a, 3)
        _update(b, rows_b[:5], 4)
        _wait(lambda: _versions(b, "da") == [3] * SAMPLES and len(_versions(a, "db")) == 5, what="replicated")
        _wait(lambda: _oldest(log) is None or log.length() <= 1, what="the registrations trimmed away")
        assert log.trimmed() != "0-0"
        with pytest.raises(CursorTrimmed):
            _open(tmp_path, "c", redis_server.url)  # a fresh node would replay a log that lost its start
        # The refused attempt claimed nothing and left no state to trip over.
        assert "c" not in log.nodes()
        assert list((tmp_path / "c" / STATE_DIRNAME).iterdir()) == []

        with pytest.raises(SeedError, match="empty"):
            seed_node(peer_dir=tmp_path / "a", data_dir=tmp_path / "b", node="c", url=redis_server.url)
        with pytest.raises(SeedError, match="itself"):
            seed_node(peer_dir=tmp_path / "a", data_dir=tmp_path / "fresh", node="a", url=redis_server.url)
        assert replication_main(["seed", "--replicate", redis_server.url, "--node-id", "c", "--data-dir",
                                 str(tmp_path / "c"), "--from", str(tmp_path / "a")], prog="t") == 0  # fmt: skip
        _update(b, rows_b[5:9], 6)  # while c is not running yet: the log keeps it for c
        c = _open(tmp_path, "c", redis_server.url)
        try:
            assert [r.device for r in c.devices()] == ["da", "db"]
            np.testing.assert_array_equal(c.rows("da", np.arange(SAMPLES)), rows_a)
            np.testing.assert_array_equal(c.rows("db", np.arange(SAMPLES)), rows_b)
            _wait(lambda: len(_versions(c, "db")) == 9, what="c applied what came after the copy")
            assert _versions(c, "da") == [3] * SAMPLES
            _update(c, rows_a[:2], 8)  # and c's own updates reach the others
            _wait(lambda: _versions(b, "da")[:2] == [8, 8], what="c's update reached b")
        finally:
            c.close()
    finally:
        log.close()
        a.close()
        b.close()
