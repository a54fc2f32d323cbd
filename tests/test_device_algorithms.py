"""The device's `Algorithm` hooks without a broker: the loop calls them in order, FedCache's keep its outbox."""

from __future__ import annotations

import ast
import re
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.algorithms import BUILDERS, model_seed
from edge.baseline import exchange_metrics
from edge.config import ALGORITHMS, DataConfig, DeviceConfig, HashConfig, TrainConfig
from edge.data import Shard
from edge.fedcache_client import FedCacheClient
from edge.knowledge import BatchSchedule, ExchangeEpochs
from edge.link import Expired
from edge.local_client import LocalClient
from edge.runtime import DeviceRuntime
from edge.state import DeviceState, read_last_report
from fedwire import ErrorCode, ErrorReply, Fetch, Kind, Knowledge, LogitEncoding, Request, UpdateAck, UpdateFetch

EDGE = Path(__file__).resolve().parents[1] / "edge"
CLASSES = 3
SAMPLES = 6
ALGORITHM_MODULES = ("edge.fedcache_client", "edge.fd_client", "edge.fedavg_client", "edge.local_client")


# ---------------------------------------------------------------- module graph


def _edge_imports(module: str) -> set[str]:
    """The edge modules `module` imports anywhere in its file (functions and TYPE_CHECKING blocks included)."""
    tree = ast.parse((EDGE / f"{module.removeprefix('edge.')}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("edge.")}
    return found


def test_device_modules_import_each_other_one_way() -> None:
    graph = {f"edge.{path.stem}": _edge_imports(f"edge.{path.stem}") for path in EDGE.glob("*.py")}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, "import circle: " + " -> ".join([*visiting[visiting.index(module) :], module])
        if module in done:
            return
        visiting.append(module)
        for target in graph.get(module, set()):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)
    algorithm_side = {*ALGORITHM_MODULES, "edge.registration", "edge.algorithms", "edge.runtime"}
    assert not graph["edge.baseline"] & algorithm_side  # the protocol sits below every algorithm
    for module in ALGORITHM_MODULES:
        assert not graph[module] & (algorithm_side - {module, "edge.registration"}), module
    assert not graph["edge.runtime"] & {*ALGORITHM_MODULES, "edge.registration"}  # only through the factory


def test_runtime_names_no_algorithm() -> None:
    tree = ast.parse((EDGE / "runtime.py").read_text())
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.Name | ast.Attribute | ast.FunctionDef | ast.ClassDef | ast.alias):
            text = str(getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", ""))
        else:
            continue
        words |= set(re.findall(r"[a-z0-9]+", text.lower()))
    assert not words & set(ALGORITHMS)
    assert not {word for word in words if "fedcache" in word or "fedavg" in word}


def test_every_configured_algorithm_has_one_builder() -> None:
    assert set(BUILDERS) == set(ALGORITHMS)


def test_only_fedavg_devices_share_their_initial_weights() -> None:
    for algorithm in ALGORITHMS:
        seeds = {model_seed(_config(Path("."), algorithm=algorithm, index=index)) for index in range(3)}
        assert len(seeds) == (1 if algorithm == "fedavg" else 3), algorithm


# ---------------------------------------------------------------- the loop


def _config(state: Path, *, algorithm: str = "local", index: int = 0, epochs: int = 2) -> DeviceConfig:
    return DeviceConfig(
        id="hooks",
        broker="mqtt://127.0.0.1:1",  # never connected: training never waits for the network
        state_dir=str(state),
        data=DataConfig(dataset="digits", num_devices=4, index=index),
        train=TrainConfig(algorithm=algorithm, epochs=epochs),
        hash=HashConfig(dim=64),
    )


class _Recorder:
    """An algorithm that only notes which hook the loop called, with what."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.calls: list[tuple[Any, ...]] = []

    def start(self) -> None:
        self.calls.append(("start",))

    def begin(self, position: int) -> None:
        self.calls.append(("begin", position))

    def teacher(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(("teacher", ids, labels))
        return np.zeros((ids.size, self.classes), np.float32), np.zeros(ids.size, bool)

    def after_step(self, *, ids: np.ndarray, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        assert logits.shape == (ids.size, self.classes)
        self.calls.append(("after_step", position))

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        self.calls.append(("end_epoch", epoch, last))

    def checkpoint(self) -> None:
        self.calls.append(("checkpoint",))

    def coverage(self) -> float:
        return 0.25

    def metrics(self) -> dict[str, Any]:
        self.calls.append(("metrics",))
        return exchange_metrics(outbox=7) | {"recorded": len(self.calls)}


def test_loop_calls_each_hook_once_per_batch_and_ends_the_epoch_before_it_reports(tmp_path: Path) -> None:
    runtime = DeviceRuntime(_config(tmp_path / "state"))
    recorder = _Recorder(runtime.classes)
    runtime.algorithm = recorder
    try:
        final = runtime.train()
    finally:
        runtime.state.close()
    schedule, y = runtime.schedule, runtime.shard.y_train
    calls = recorder.calls
    assert calls[:2] == [("metrics",), ("begin", 0)]  # the first report, then the exchange may begin
    teachers = [call for call in calls if call[0] == "teacher"]
    assert len(teachers) == len(schedule)
    for (_, ids, labels), batch in zip(teachers, schedule.batches, strict=True):
        np.testing.assert_array_equal(ids, batch)
        np.testing.assert_array_equal(labels, y[batch])
    assert [call[1] for call in calls if call[0] == "after_step"] == list(range(1, len(schedule) + 1))
    per_epoch = len(schedule) // 2
    assert calls[-4:] == [("after_step", len(schedule)), ("end_epoch", 2, True), ("checkpoint",), ("metrics",)]
    middle = calls.index(("end_epoch", 1, False))
    assert calls[middle - 1] == ("after_step", per_epoch) and calls[middle + 1 : middle + 3] == [
        ("checkpoint",),
        ("metrics",),
    ]
    assert "start" not in {call[0] for call in calls}  # run() starts the algorithm, train() does not
    assert final["done"] and final["epoch"] == 2 and final["step"] == len(schedule)
    assert final["teacher_coverage"] == 0.25 and final["outbox"] == 7 and final["recorded"] == len(calls)
    assert read_last_report(tmp_path / "state") == final


def test_device_without_a_server_reports_no_exchange_and_counts_offline_steps(tmp_path: Path) -> None:
    runtime = DeviceRuntime(_config(tmp_path / "state", epochs=1))
    try:
        final = runtime.train()
    finally:
        runtime.state.close()
    assert {"teacher_coverage", "teachers_received", "outbox", "rejections", "wasted_bytes", "offline_steps"} <= set(
        final
    )
    assert final["teacher_coverage"] == 0 and final["outbox"] == 0 and final["rejections"] == 0
    assert final["offline_steps"] == final["step"] == len(runtime.schedule)  # never connected, trained anyway
    assert list(final["startup_s"]) == ["shard", "model", "state", "first_eval", "cpu"]  # start-up, phase by phase


def test_a_capped_device_trains_and_reports_only_its_capped_samples(tmp_path: Path) -> None:
    config = _config(tmp_path / "state", epochs=1)
    capped = replace(config, train=replace(config.train, max_samples=50))
    runtime = DeviceRuntime(capped)
    try:
        final = runtime.train()
    finally:
        runtime.state.close()
    assert len(runtime.shard.y_train) == 50 and final["train_samples"] == 50
    assert final["step"] == len(runtime.schedule) == -(-50 // capped.train.batch_size)
    with pytest.raises(ValueError, match="max_samples"):
        replace(config, train=replace(config.train, max_samples=-1))


# ---------------------------------------------------------------- FedCache's hooks


class _Link:
    """The parts of KnowledgeLink FedCache's exchange uses, recording what it sends."""

    def __init__(self) -> None:
        self.connected = True
        self.on_reply: Any = None
        self.sent: list[Request] = []
        self.expired: list[Expired] = []
        self._cid = 0

    def new_cid(self) -> int:
        self._cid += 1
        return self._cid

    def send(self, request: Request) -> Future[Any]:
        self.sent.append(request)
        return Future()

    def outstanding(self) -> int:
        return 0

    def forget_older_than(self, seconds: float) -> list[Expired]:
        expired, self.expired = self.expired, []
        return expired


class _Registration:
    """A registration the server holds until it says it lost it."""

    def __init__(self) -> None:
        self.done = True
        self.ensured = 0

    def ensure(self) -> None:
        self.ensured += 1

    def lost(self) -> None:
        self.done = False


def _shard() -> Shard:
    x = np.zeros((SAMPLES, 1, 2, 2), np.float32)
    y = np.arange(SAMPLES) % CLASSES
    return Shard(
        name="tiny",
        index=0,
        num_devices=1,
        x_train=x,
        y_train=y,
        x_test=x,
        y_test=y,
        train_indices=np.arange(SAMPLES),
        test_indices=np.arange(SAMPLES),
        classes=CLASSES,
        input_shape=(1, 2, 2),
    )


@pytest.fixture
def fedcache(tmp_path: Path) -> Any:
    state = DeviceState(tmp_path, classes=CLASSES)
    link = _Link()

    def build(*, epochs: int = 1, **train: Any) -> FedCacheClient:
        """A client on one shared state and link; `train`: TrainConfig fields besides float32 logits."""
        config = TrainConfig(logit_encoding=LogitEncoding.FLOAT32, **train)
        client = FedCacheClient(
            config=DeviceConfig(id="fc", state_dir=str(tmp_path), train=config),
            link=link,  # type: ignore[arg-type]
            state=state,
            schedule=BatchSchedule(samples=SAMPLES, batch_size=2, epochs=epochs, seed=0),
            shard=_shard(),
        )
        client.registration = _Registration()  # type: ignore[assignment]
        return client

    yield build, link, state
    state.close()


def _step(client: FedCacheClient, ids: list[int], position: int) -> None:
    batch = np.asarray(ids)
    logits = np.arange(batch.size * CLASSES, dtype=np.float32).reshape(batch.size, CLASSES)
    client.after_step(ids=batch, labels=batch % CLASSES, logits=logits, position=position)


def test_acknowledged_update_leaves_the_outbox_before_the_final_report(fedcache: Any) -> None:
    build, link, state = fedcache
    client = build()
    assert link.on_reply is not None  # replies reach the algorithm through the link
    client.begin(0)
    _step(client, [0, 1], position=1)
    update = link.sent[-1]
    assert isinstance(update, UpdateFetch) and update.ids.tolist() == [0, 1]
    assert client.metrics()["outbox"] == 2
    link.on_reply(UpdateAck(device="fc", cid=update.cid, applied=2, stale=0), 100)
    client.end_epoch(epoch=1, last=True)  # flushes: settles the acknowledgement
    assert client.metrics() == exchange_metrics()
    assert state.acked()[0].tolist() == [0, 1]


def test_refused_update_goes_again_after_registering_again(fedcache: Any) -> None:
    build, link, _ = fedcache
    client = build()
    client.begin(0)
    _step(client, [2, 3], position=1)
    update, sent = link.sent[-1], len(link.sent)
    link.on_reply(ErrorReply(device="fc", cid=update.cid, code=ErrorCode.UNKNOWN_DEVICE, message="who?"), 100)
    _step(client, [4, 5], position=2)
    assert client.registration.done is False and client.registration.ensured == 1  # type: ignore[attr-defined]
    assert client.metrics() == exchange_metrics(wasted_bytes=100, outbox=4, rejections=1)
    assert len(link.sent) == sent  # nothing goes out until the registration is back
    client.registration.done = True  # type: ignore[misc]
    _step(client, [0], position=3)
    assert isinstance(link.sent[-1], UpdateFetch) and link.sent[-1].ids.tolist() == [0, 2, 3, 4, 5]


def test_timed_out_update_is_released_and_counted_as_wasted(fedcache: Any) -> None:
    build, link, _ = fedcache
    client = build()
    client.begin(0)
    _step(client, [1], position=1)
    update = link.sent[-1]
    link.expired = [Expired(cid=update.cid, kind=Kind.UPDATE_FETCH, packet_bytes=80)]
    _step(client, [2], position=2)
    assert link.sent[-1].ids.tolist() == [1, 2]  # type: ignore[attr-defined]
    assert client.metrics()["wasted_bytes"] == 80


def test_knowledge_reply_teaches_the_batch_and_survives_a_restart(fedcache: Any) -> None:
    build, link, _ = fedcache
    client = build()
    rows = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    reply = Knowledge(
        device="fc",
        cid=1,
        ids=np.array([0, 1, 2], np.uint32),
        counts=np.array([1, 0, 2], np.uint16),
        logits=rows,
        encoding=LogitEncoding.FLOAT32,
    )
    link.on_reply(reply, 50)
    teacher, mask = client.teacher(np.array([2, 1, 0]), np.array([2, 1, 0]))
    assert mask.tolist() == [True, False, True]
    np.testing.assert_array_equal(teacher[[0, 2]], rows[::-1])
    assert client.coverage() == pytest.approx(2 / SAMPLES) and client.metrics()["teachers_received"] == 2
    client.checkpoint()
    again = build()
    assert again.coverage() == pytest.approx(2 / SAMPLES) and again.metrics()["teachers_received"] == 0


def test_local_teaches_nothing_and_exchanges_nothing() -> None:
    local = LocalClient(classes=CLASSES)
    local.start()
    teacher, mask = local.teacher(np.array([0, 1]), np.array([0, 1]))
    assert teacher.shape == (2, CLASSES) and not teacher.any() and not mask.any()
    assert local.coverage() == 0.0 and local.metrics() == exchange_metrics()


@pytest.mark.parametrize(
    ("every", "warmup", "exchanging"),
    [(2, 0, [True, False, True]), (2, 1, [False, True, False, True]), (1, 2, [False, False, True])],
)
def test_knowledge_is_exchanged_in_the_scheduled_epochs_only(
    fedcache: Any, every: int, warmup: int, exchanging: list[bool]
) -> None:
    build, link, state = fedcache
    epochs = len(exchanging)
    client = build(epochs=epochs, knowledge_every_epochs=every, knowledge_warmup_epochs=warmup, prefetch_batches=1)
    schedule = client.schedule
    per_epoch = -(-SAMPLES // 2)
    rule = client.config.train.exchange_epochs
    assert rule == ExchangeEpochs(every=every, warmup=warmup)
    assert [schedule.exchanges(b, rule) for b in range(len(schedule))] == [e for e in exchanging for _ in range(3)]
    for epoch, exchanges in enumerate(exchanging):
        wanted = SAMPLES if exchanges else 0
        assert schedule.ids_between(epoch * per_epoch, (epoch + 1) * per_epoch, epochs=rule).size == wanted
        assert schedule.ids_between(epoch * per_epoch, (epoch + 1) * per_epoch).size == SAMPLES  # the default: all

    client.begin(0)  # prefetches epoch 0's first batch if it exchanges; a warm-up epoch sends nothing at all
    if exchanging[0]:
        assert isinstance(link.sent[-1], Fetch)
    else:
        assert link.sent == []
    uploaded, fetched = [0] * epochs, [sum(r.ids.size for r in link.sent), *[0] * (epochs - 1)]
    for position, batch in enumerate(schedule.batches):
        before = len(link.sent)
        _step(client, batch.tolist(), position=position + 1)
        epoch = schedule.epoch_of[position]
        for request in link.sent[before:]:
            if isinstance(request, UpdateFetch):
                uploaded[epoch] += request.ids.size
                fetched[epoch] += request.fetch_ids.size
                # acknowledged at once, as a server would, so the outbox empties
                link.on_reply(UpdateAck(device="fc", cid=request.cid, applied=request.ids.size, stale=0), 10)
            else:
                assert isinstance(request, Fetch)
                fetched[epoch] += request.ids.size
    client.end_epoch(epoch=epochs, last=True)
    # An exchanging epoch uploads every sample, the others nothing. Each exchanging epoch's batches are fetched
    # once, a few batches ahead (its first ones while the epoch before trains).
    assert uploaded == [SAMPLES if e else 0 for e in exchanging]
    assert sum(fetched) == sum(exchanging) * SAMPLES
    for epoch in range(epochs):  # an epoch that does not exchange fetches only ahead of one that does
        if not exchanging[epoch]:
            assert (fetched[epoch] > 0) == (epoch + 1 < epochs and exchanging[epoch + 1])
    assert state.outbox_size() == 0


def test_knowledge_every_two_batches_sends_one_message_each_way_for_two_batches(fedcache: Any) -> None:
    build, link, _ = fedcache
    client = build(epochs=3, knowledge_every_batches=2, prefetch_batches=1)
    schedule = client.schedule  # 3 batches of 2 samples per epoch, 9 in all
    client.begin(0)
    begun = link.sent[-1]
    # Ahead of the first two batches: the batch before the next exchange, and prefetch_batches beyond it.
    assert isinstance(begun, Fetch) and begun.ids.tolist() == schedule.ids_between(0, 2).tolist()
    sent_at: list[int] = []
    for position, batch in enumerate(schedule.batches, start=1):
        before = len(link.sent)
        _step(client, batch.tolist(), position=position)
        for request in link.sent[before:]:
            assert isinstance(request, UpdateFetch)
            sent_at.append(position)
            # The logits of every batch since the last exchange, and the next batches' samples, in one message.
            assert (
                request.ids.tolist() == schedule.ids_between(sent_at[-2] if len(sent_at) > 1 else 0, position).tolist()
            )
            assert request.fetch_ids.tolist() == schedule.ids_between(position, position + 2).tolist()
            link.on_reply(UpdateAck(device="fc", cid=request.cid, applied=request.ids.size, stale=0), 10)
    assert sent_at == [2, 4, 6, 8, 9]  # every other batch, and the last batch sends what is left
