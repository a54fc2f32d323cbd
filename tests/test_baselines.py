"""The comparison's baselines without a broker: FD and FedAvg messages (round trips, rejections) and server logic."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from broker_server.fd import FdAggregate
from broker_server.fedavg import FedAvgRounds
from broker_server.handlers import CacheService
from fedwire import (
    ErrorCode,
    ErrorReply,
    FdGlobal,
    FdUpdate,
    HashKind,
    Hello,
    LogitEncoding,
    ModelAck,
    ModelGet,
    ModelPut,
    ModelState,
    ProtocolError,
    decode,
    encode,
)
from fedwire.codec import model_part_bounds, model_parts
from fedwire.constants import MODEL_CHUNK_FLOATS

F32 = LogitEncoding.FLOAT32


def _rejected(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(payload)
    assert caught.value.code is code, str(caught.value)


def _mutated(message: Any, **changes: Any) -> bytes:
    document = msgpack.unpackb(encode(message), raw=False)
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            document[outer][inner] = value
        else:
            document[key] = value
    return msgpack.packb(document, use_bin_type=True)


def _fd(counts: list[int], seed: int = 0, version: int = 1, device: str = "a") -> FdUpdate:
    classes = len(counts)
    logits = np.random.default_rng(seed).normal(size=(classes, classes)).astype(np.float32)
    return FdUpdate(device, 7, logits, np.asarray(counts, np.uint32), version, F32)


def _put(
    device: str, flat: np.ndarray, *, round_: int = 0, part: int = 0, samples: int = 10, model: str = "cnn"
) -> ModelPut:
    start, stop = model_part_bounds(flat.size, part)
    return ModelPut(device, 1, round_, model, samples, int(flat.size), part, flat[start:stop])


# ---------------------------------------------------------------- wire


def test_model_parts_cover_the_vector_exactly() -> None:
    size = 2 * MODEL_CHUNK_FLOATS + 5
    assert model_parts(size) == 3 and model_parts(1) == 1 and model_parts(MODEL_CHUNK_FLOATS) == 1
    covered = np.concatenate([np.arange(*model_part_bounds(size, p)) for p in range(model_parts(size))])
    np.testing.assert_array_equal(covered, np.arange(size))


def test_largest_model_part_fits_the_payload_limit() -> None:
    flat = np.ones(MODEL_CHUNK_FLOATS + 1, np.float32)
    payload = encode(_put("a", flat))
    assert len(payload) < 4 * 1024 * 1024
    decoded = decode(payload)
    assert isinstance(decoded, ModelPut) and decoded.params.size == MODEL_CHUNK_FLOATS


@pytest.mark.parametrize(
    ("name", "payload", "code"),
    [
        (
            "fd table not square",
            _mutated(_fd([1, 2, 3]), **{"logits.m": 4, "logits.b": b"\0" * 48}),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "fd one class",
            _mutated(_fd([1, 2]), **{"logits.n": 1, "logits.m": 1, "logits.b": b"\0" * 4, "counts": b"\0" * 4}),
            ErrorCode.BAD_SHAPE,
        ),
        ("fd counts short", _mutated(_fd([1, 2, 3]), counts=b"\0" * 8), ErrorCode.BAD_SHAPE),
        ("fd counts as str", _mutated(_fd([1, 2, 3]), counts="x"), ErrorCode.BAD_SCHEMA),
        (
            "fd nan",
            _mutated(_fd([1, 2]), **{"logits.b": np.asarray([0, np.nan, 0, 0], "<f4").tobytes()}),
            ErrorCode.NON_FINITE,
        ),
        ("fd negative version", _mutated(_fd([1, 2]), ver=-1), ErrorCode.BAD_SHAPE),
        ("put size 0", _mutated(_put("a", np.ones(3, np.float32)), size=0, params=b""), ErrorCode.BAD_SHAPE),
        ("put part past end", _mutated(_put("a", np.ones(3, np.float32)), part=1), ErrorCode.BAD_SHAPE),
        ("put short params", _mutated(_put("a", np.ones(3, np.float32)), params=b"\0" * 8), ErrorCode.BAD_SHAPE),
        ("put odd bytes", _mutated(_put("a", np.ones(3, np.float32)), params=b"\0" * 11), ErrorCode.BAD_SHAPE),
        (
            "put inf",
            _mutated(_put("a", np.ones(2, np.float32)), params=np.asarray([1, np.inf], "<f4").tobytes()),
            ErrorCode.NON_FINITE,
        ),
        ("put params as list", _mutated(_put("a", np.ones(2, np.float32)), params=[1.0, 2.0]), ErrorCode.BAD_SCHEMA),
        ("put long model name", _mutated(_put("a", np.ones(2, np.float32)), model="m" * 65), ErrorCode.TOO_LARGE),
        ("put float round", _mutated(_put("a", np.ones(2, np.float32)), round=1.0), ErrorCode.BAD_SCHEMA),
        ("ack accepted 2", _mutated(ModelAck("a", 1, 0, 1), accepted=2), ErrorCode.BAD_SHAPE),
        (
            "state pending with params",
            _mutated(ModelState("a", 1, 0, 0, 0, 0, 0, np.zeros(0, np.float32)), params=b"\0" * 4),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "state ready wrong length",
            _mutated(ModelState("a", 1, 0, 1, 2, 3, 0, np.ones(3, np.float32)), size=4),
            ErrorCode.BAD_SHAPE,
        ),
    ],
)
def test_rejections(name: str, payload: bytes, code: ErrorCode) -> None:
    _rejected(payload, code)


def test_encoder_refuses_non_finite_parameters() -> None:
    with pytest.raises(ValueError):
        encode(_put("a", np.asarray([1.0, np.nan], np.float32)))


# ---------------------------------------------------------------- FD aggregation


def test_fd_global_is_the_count_weighted_mean_of_the_other_devices() -> None:
    fd = FdAggregate()
    updates = {
        d: _fd(c, seed=i, device=d) for i, (d, c) in enumerate({"a": [2, 0, 1], "b": [1, 3, 0], "c": [5, 1, 0]}.items())
    }
    for device, update in updates.items():
        assert fd.update(device=device, classes=3, logits=update.logits, counts=update.class_counts, version=1)
    teacher = fd.teacher_for(device="a", classes=3)
    b, c = updates["b"], updates["c"]
    weights = np.stack([b.class_counts, c.class_counts]).astype(np.float64)
    expected = (weights[0][:, None] * b.logits + weights[1][:, None] * c.logits) / weights.sum(0)[:, None].clip(1)
    np.testing.assert_allclose(teacher.logits, expected, rtol=1e-5)
    np.testing.assert_array_equal(teacher.counts, [6, 4, 0])  # class 2: only a's own samples -> no teacher
    assert not teacher.logits[2].any()


def test_fd_keeps_only_the_newest_window_per_device() -> None:
    fd = FdAggregate()
    old, new = _fd([4, 4], seed=1, version=5), _fd([1, 1], seed=2, version=6)
    assert fd.update(device="a", classes=2, logits=new.logits, counts=new.class_counts, version=6)
    assert not fd.update(device="a", classes=2, logits=old.logits, counts=old.class_counts, version=5)
    teacher = fd.teacher_for(device="b", classes=2)
    np.testing.assert_allclose(teacher.logits, new.logits, rtol=1e-6)
    np.testing.assert_array_equal(teacher.counts, [1, 1])


def test_fd_window_without_a_class_keeps_the_devices_previous_mean_for_it() -> None:
    """An end-of-epoch window may see few classes or none: it must not erase what the device taught before."""
    fd = FdAggregate()
    full, partial, empty = _fd([3, 2], seed=1, version=1), _fd([0, 4], seed=2, version=2), _fd([0, 0], seed=3)
    assert fd.update(device="a", classes=2, logits=full.logits, counts=full.class_counts, version=1)
    assert fd.update(device="a", classes=2, logits=partial.logits, counts=partial.class_counts, version=2)
    teacher = fd.teacher_for(device="b", classes=2)
    np.testing.assert_allclose(teacher.logits[0], full.logits[0], rtol=1e-6)  # class 0: the older window
    np.testing.assert_allclose(teacher.logits[1], partial.logits[1], rtol=1e-6)  # class 1: the newer one
    np.testing.assert_array_equal(teacher.counts, [3, 4])
    assert fd.update(device="a", classes=2, logits=empty.logits, counts=empty.class_counts, version=3)
    np.testing.assert_array_equal(fd.teacher_for(device="b", classes=2).counts, [3, 4])


# ---------------------------------------------------------------- FedAvg rounds


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rounds(devices: tuple[str, ...], **kwargs: Any) -> FedAvgRounds:
    rounds = FedAvgRounds(**kwargs)
    for device in devices:
        rounds.join(device)
    return rounds


def _upload(rounds: FedAvgRounds, device: str, flat: np.ndarray, *, samples: int, round_: int = 0) -> bool:
    accepted = True
    for part in range(model_parts(flat.size)):
        start, stop = model_part_bounds(flat.size, part)
        ack = rounds.put(
            device=device,
            round_=round_,
            model="cnn",
            samples=samples,
            size=flat.size,
            part=part,
            params=flat[start:stop],
        )
        accepted = ack.accepted
    return accepted


def test_fedavg_round_closes_when_all_arrived_with_the_sample_weighted_mean() -> None:
    rounds = _rounds(("a", "b"))
    a, b = np.full(6, 1.0, np.float32), np.full(6, 4.0, np.float32)
    _upload(rounds, "a", a, samples=30)
    assert rounds.get(0) is None and rounds.open_round == 0
    _upload(rounds, "b", b, samples=10)
    model = rounds.get(0)
    assert model is not None and model.round == 0 and model.participants == 2 and rounds.open_round == 1
    np.testing.assert_allclose(model.params, (30 * a + 10 * b) / 40)


def test_fedavg_chunked_model_is_reassembled() -> None:
    rounds = _rounds(("a",))
    flat = np.random.default_rng(0).normal(size=MODEL_CHUNK_FLOATS + 17).astype(np.float32)
    assert model_parts(flat.size) == 2
    _upload(rounds, "a", flat, samples=3)
    model = rounds.get(0)
    assert model is not None
    np.testing.assert_array_equal(model.params, flat)


def test_fedavg_timeout_closes_with_whoever_arrived_and_stragglers_are_late() -> None:
    clock = _Clock()
    rounds = _rounds(("a", "b"), round_timeout_s=5.0, clock=clock)
    _upload(rounds, "a", np.ones(4, np.float32), samples=1)
    clock.now = 4.9
    assert rounds.get(0) is None
    clock.now = 5.0
    model = rounds.get(0)
    assert model is not None and model.participants == 1
    assert not _upload(rounds, "b", np.zeros(4, np.float32), samples=1)  # round 0 closed: accepted = 0
    assert rounds.get(0) is model  # the straggler still gets round 0's global model


def test_fedavg_waits_for_min_participants_not_yet_said_hello() -> None:
    rounds = _rounds(("a",), min_participants=2)
    _upload(rounds, "a", np.ones(4, np.float32), samples=1)
    assert rounds.get(0) is None
    rounds.join("b")
    _upload(rounds, "b", np.ones(4, np.float32), samples=1)
    assert rounds.get(0) is not None


def _service() -> CacheService:
    service = CacheService.open(None)
    for device, arch in (("a", "cnn"), ("b", "resnet8")):
        reply = service.handle(Hello(device, 1, arch, 3, 10, HashKind.BINARY, 64, ("fedavg", "fd")))
        assert not isinstance(reply, ErrorReply), reply
    return service


def test_service_answers_fd_and_rejects_unknown_device_and_class_mismatch() -> None:
    with _service() as service:
        first = service.handle(_fd([2, 1, 0], device="a"))
        assert isinstance(first, FdGlobal) and first.applied == 1 and not first.class_counts.any()
        second = service.handle(_fd([1, 1, 4], seed=3, device="b"))
        assert isinstance(second, FdGlobal)
        np.testing.assert_array_equal(second.class_counts, [2, 1, 0])
        unknown = service.handle(_fd([1, 1, 1], device="zed"))
        assert isinstance(unknown, ErrorReply) and unknown.code is ErrorCode.UNKNOWN_DEVICE
        wide = service.handle(_fd([1, 1, 1, 1], device="a", version=9))
        assert isinstance(wide, ErrorReply) and wide.code is ErrorCode.CLASS_MISMATCH


def test_service_fedavg_round_trip_and_heterogeneous_models_are_refused() -> None:
    with _service() as service:
        flat = np.arange(6, dtype=np.float32)
        ack = service.handle(_put("a", flat))
        assert isinstance(ack, ModelAck) and ack.accepted == 1 and ack.round == 0
        pending = service.handle(ModelGet("a", 2, 0, 0))
        assert isinstance(pending, ModelState) and pending.ready == 0 and pending.params.size == 0
        other = service.handle(_put("b", np.arange(9, dtype=np.float32), model="resnet8"))
        assert isinstance(other, ErrorReply) and other.code is ErrorCode.MODEL_MISMATCH
        assert "one architecture" in other.message
        assert isinstance(service.handle(_put("b", flat + 2)), ModelAck)
        state = service.handle(ModelGet("b", 3, 0, 0))
        assert isinstance(state, ModelState) and state.ready == 1 and state.participants == 2
        np.testing.assert_allclose(state.params, flat + 1)
        beyond = service.handle(ModelGet("b", 4, 0, 1))
        assert isinstance(beyond, ErrorReply) and beyond.code is ErrorCode.BAD_SHAPE
