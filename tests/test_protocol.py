"""Wire-protocol tests: round trips, every rejection with its exact ErrorCode, topics, and the committed vectors."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedwire import (
    DEVICE_ID_PATTERN,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    FdGlobal,
    FdUpdate,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Kind,
    Knowledge,
    LogitEncoding,
    Message,
    ModelAck,
    ModelGet,
    ModelPut,
    ModelState,
    ProtocolError,
    Register,
    RegisterAck,
    TeacherForm,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    down_topic,
    encode,
    metrics_topic,
    parse_up_topic,
    server_subscription,
    up_topic,
)
from fedwire.codec import as_received, encode_logits
from fedwire.constants import MAX_CLASSES, MAX_HASH_BYTES, MAX_IDS_PER_MESSAGE, REPLY_KINDS, REQUEST_KINDS

F32, F16, I8 = LogitEncoding.FLOAT32, LogitEncoding.FLOAT16, LogitEncoding.INT8
VECTORS = Path(__file__).resolve().parent / "vectors"
DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
CLASSES: dict[Kind, type] = {
    Kind.HELLO: Hello,
    Kind.REGISTER: Register,
    Kind.FETCH: Fetch,
    Kind.UPDATE: Update,
    Kind.UPDATE_FETCH: UpdateFetch,
    Kind.HELLO_ACK: HelloAck,
    Kind.REGISTER_ACK: RegisterAck,
    Kind.KNOWLEDGE: Knowledge,
    Kind.UPDATE_ACK: UpdateAck,
    Kind.ERROR: ErrorReply,
    Kind.FD_UPDATE: FdUpdate,
    Kind.FD_GLOBAL: FdGlobal,
    Kind.MODEL_PUT: ModelPut,
    Kind.MODEL_ACK: ModelAck,
    Kind.MODEL_GET: ModelGet,
    Kind.MODEL_STATE: ModelState,
}


# ---------------------------------------------------------------- helpers


def _u32(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint32)


def _matrix(rows: int, cols: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, cols)) * scale).astype(np.float32)


def _wire(message: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(message), raw=False)


def _pack(document: Any) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


def _rejects(payload: bytes, code: ErrorCode) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught, np.errstate(over="ignore"):
        decode(payload)
    assert caught.value.code is code, str(caught.value)
    return caught.value


def _examples() -> list[Message]:
    """One message of every kind, and of every logit encoding where a kind carries logits."""
    examples: list[Message] = [
        Hello("dev-1", 1, "mobilenet", 10, 500, HashKind.BINARY, 64, ("update_fetch",)),
        Hello("dev-1", 2, "mobilenet", 100, 0, HashKind.FLOAT16, 7),
        Register(
            "dev-1", 3, _u32([4, 2, 9]), np.asarray([1, 0, 9], np.uint16), np.arange(24, dtype=np.uint8).reshape(3, 8)
        ),
        Register("dev-1", 4, _u32([]), np.zeros(0, np.uint16), np.zeros((0, 16), np.uint8)),
        HelloAck("dev-1", 5, 123, 16),
        RegisterAck("dev-1", 6, 3, 126),
        UpdateAck("dev-1", 7, 2, 1),
        ErrorReply("dev-1", 8, ErrorCode.UNKNOWN_SAMPLE, "id 9 is not registered", "fetch"),
        ErrorReply("dev-1", 0, ErrorCode.BAD_ENCODING, "not a msgpack document"),
        ModelPut("dev-1", 20, 3, "cnn", 400, 5, 0, np.arange(5, dtype=np.float32) - 2.5),
        ModelAck("dev-1", 21, 4, 1),
        ModelGet("dev-1", 22, 3, 0),
        ModelState("dev-1", 23, 3, 1, 4, 5, 0, np.arange(5, dtype=np.float32)),
        ModelState("dev-1", 24, 5, 0, 0, 0, 0, np.zeros(0, np.float32)),
    ]
    for encoding in LogitEncoding:
        examples += [
            Fetch("dev-1", 10, _u32([1, 5, 3]), encoding),
            Update("dev-1", 11, _u32([1, 2]), _matrix(2, 10, 1), 5, encoding),
            UpdateFetch("dev-1", 12, _u32([1, 2]), _matrix(2, 10, 2), 6, _u32([3, 1]), encoding),
            Knowledge(
                "dev-1", 13, _u32([3, 1, 7]), np.asarray([2, 0, 1], np.uint16), _matrix(2, 10, 3), encoding, 1, 1
            ),
            Knowledge("dev-1", 14, _u32([3]), np.zeros(1, np.uint16), np.zeros((0, 10), np.float32), encoding),
            Fetch("dev-1", 17, _u32([4, 2]), encoding, TeacherForm.RAW),
            UpdateFetch("dev-1", 18, _u32([1]), _matrix(1, 10, 6), 7, _u32([2]), encoding, TeacherForm.RAW),
            Knowledge(
                "dev-1",
                19,
                _u32([3, 1, 7]),
                np.asarray([2, 0, 1], np.uint16),
                _matrix(3, 10, 7),
                encoding,
                0,
                0,
                TeacherForm.RAW,
            ),
            FdUpdate("dev-1", 15, _matrix(3, 3, 4), np.asarray([5, 0, 70000], np.uint32), 9, encoding),
            FdGlobal("dev-1", 16, _matrix(3, 3, 5), np.asarray([0, 2, 1], np.uint32), encoding, 1),
        ]
    return examples


def _assert_logits_close(sent: np.ndarray, got: np.ndarray, encoding: LogitEncoding) -> None:
    """f32 exact; f16 equal to the float16 rounding; i8 within half a row scale, i8b within half the block's."""
    sent = np.asarray(sent, dtype=np.float32)
    assert got.dtype == np.float32
    assert got.shape == sent.shape
    if encoding is F32:
        np.testing.assert_array_equal(got, sent)
    elif encoding is F16:
        np.testing.assert_array_equal(got, sent.astype(np.float16).astype(np.float32))
        assert np.all(np.abs(got - sent) <= np.abs(sent) * 2.0**-11 + 2.0**-25)
    else:
        scales = np.abs(sent).max(axis=1) / np.float32(127) if sent.size else np.zeros(0, np.float32)
        if encoding is LogitEncoding.INT8_BLOCK:
            scales = np.full(len(sent), scales.max(initial=0.0), np.float32)
        scales = np.where(scales > 0, scales, np.float32(1))
        assert np.all(np.abs(got - sent) <= scales[:, None] * (0.5 + 1e-5))


def _assert_same(sent: Message, got: Message) -> None:
    assert type(got) is type(sent)
    for name, value in vars(sent).items():
        other = getattr(got, name)
        if name == "logits":
            _assert_logits_close(value, other, sent.encoding)  # type: ignore[union-attr]
        elif isinstance(value, np.ndarray):
            assert other.shape == value.shape, name
            np.testing.assert_array_equal(other, value, err_msg=name)
        else:
            assert other == value, name


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", _examples(), ids=lambda m: f"{m.kind.value}-{getattr(m, 'encoding', '')}")
def test_round_trip_every_kind(message: Message) -> None:
    decoded = decode(encode(message))
    _assert_same(message, decoded)
    assert encode(decoded) == encode(message)  # decoded values re-encode to the same bytes, int8 included


def test_every_kind_has_an_example() -> None:
    assert {m.kind for m in _examples()} == set(Kind)
    assert set(Kind) == REQUEST_KINDS | REPLY_KINDS


def test_decoded_arrays_have_wire_dtypes() -> None:
    update = decode(encode(UpdateFetch("d", 1, _u32([1]), _matrix(1, 3), 1, _u32([2]), F16)))
    assert isinstance(update, UpdateFetch)
    assert update.ids.dtype == np.dtype("<u4") and update.fetch_ids.dtype == np.dtype("<u4")
    knowledge = decode(encode(Knowledge("d", 1, _u32([1]), np.ones(1, np.uint16), _matrix(1, 3), F32)))
    assert isinstance(knowledge, Knowledge) and knowledge.counts.dtype == np.dtype("<u2")
    register = decode(encode(Register("d", 1, _u32([1]), np.ones(1, np.uint16), np.ones((1, 4), np.uint8))))
    assert isinstance(register, Register) and register.hashes.dtype == np.uint8 and register.hashes.shape == (1, 4)


def test_random_round_trips() -> None:
    rng = np.random.default_rng(20240601)
    for _ in range(300):
        n = int(rng.integers(0, 40))
        classes = int(rng.integers(2, 60))
        ids = rng.permutation(np.unique(rng.integers(0, 2**32, n, dtype=np.uint64)).astype(np.uint32))
        encoding = LogitEncoding(rng.choice([e.value for e in LogitEncoding]))
        logits = (rng.normal(size=(ids.size, classes)) * rng.uniform(0.01, 100)).astype(np.float32)
        if ids.size and rng.random() < 0.3:
            logits[rng.integers(0, ids.size)] = 0.0  # an all-zero row takes the int8 scale 1.0
        cid = int(rng.integers(0, 2**63, dtype=np.uint64))
        kind = rng.integers(0, 5)
        message: Message
        if kind == 0:
            message = Update("r-1", cid, ids, logits, int(rng.integers(0, 2**62)), encoding)
        elif kind == 1:
            fetch_ids = np.unique(rng.integers(0, 2**32, int(rng.integers(0, 40)), dtype=np.uint64)).astype(np.uint32)
            message = UpdateFetch("r-1", cid, ids, logits, int(rng.integers(0, 100)), fetch_ids, encoding)
        elif kind == 2:
            counts = rng.integers(0, 3, ids.size).astype(np.uint16)
            teachers = logits[: int(np.count_nonzero(counts))]
            message = Knowledge("r-1", cid, ids, counts, teachers, encoding, int(rng.integers(0, 9)), 0)
        elif kind == 3:
            hashes = rng.integers(0, 256, (ids.size, int(rng.integers(0, 65))), dtype=np.uint8)
            message = Register("r-1", cid, ids, rng.integers(0, 2**16, ids.size).astype(np.uint16), hashes)
        else:
            message = Fetch("r-1", cid, ids, encoding)
        _assert_same(message, decode(encode(message)))


def test_int8_quantisation_formula() -> None:
    """The documented formula: s = fl32(max|row| / 127) (1.0 for a zero row); q = clip(rint(x / s), -127, 127)."""
    logits = np.asarray([[1.5, -0.75, 0.25], [0.0, 0.0, 0.0], [-3.0, 2.9, 1e-3]], np.float32)
    packed = encode_logits(logits, I8)
    assert (packed["e"], packed["n"], packed["m"]) == ("i8", 3, 3)
    scales = np.frombuffer(packed["s"], "<f4")
    expected_scales = np.asarray([1.5 / np.float32(127), 1.0, np.float32(3.0) / np.float32(127)], np.float32)
    np.testing.assert_array_equal(scales, expected_scales)
    quantised = np.frombuffer(packed["b"], "i1").reshape(3, 3)
    np.testing.assert_array_equal(quantised, [[127, -64, 21], [0, 0, 0], [-127, 123, 0]])  # -63.5 rounds to even
    assert np.abs(quantised).max() <= 127


def test_int8_block_quantisation_formula() -> None:
    """i8b: one s = fl32(max|matrix| / 127) for the whole block (1.0 when it is all zeros), q as for i8: 4 B of scale
    per message instead of per row, so a row smaller than the block's largest gets a coarser step."""
    logits = np.asarray([[1.5, -0.75, 0.25], [0.0, 0.0, 0.0], [-3.0, 2.9, 1e-3]], np.float32)
    packed = encode_logits(logits, LogitEncoding.INT8_BLOCK)
    assert (packed["e"], packed["n"], packed["m"]) == ("i8b", 3, 3)
    np.testing.assert_array_equal(np.frombuffer(packed["s"], "<f4"), [np.float32(3.0) / np.float32(127)])
    quantised = np.frombuffer(packed["b"], "i1").reshape(3, 3)
    np.testing.assert_array_equal(quantised, [[64, -32, 11], [0, 0, 0], [-127, 123, 0]])
    assert len(packed["s"]) == 4 < len(encode_logits(logits, I8)["s"])
    zeros = encode_logits(np.zeros((2, 3), np.float32), LogitEncoding.INT8_BLOCK)
    assert np.frombuffer(zeros["s"], "<f4").tolist() == [1.0]
    assert as_received(logits, LogitEncoding.INT8_BLOCK)[0].tolist() == pytest.approx([1.5, -0.75, 0.25], abs=0.012)


def test_f32_and_f16_logit_bytes_are_little_endian() -> None:
    logits = np.asarray([[1.0, -2.0]], np.float32)
    assert encode_logits(logits, F32)["b"] == struct.pack("<2f", 1.0, -2.0)
    assert encode_logits(logits, F16)["b"] == struct.pack("<2e", 1.0, -2.0)
    assert _wire(Fetch("d", 1, _u32([1, 256])))["ids"] == struct.pack("<2I", 1, 256)


def test_unknown_fields_are_ignored() -> None:
    message = Update("dev-1", 1, _u32([1]), _matrix(1, 4), 2, F32)
    document = _wire(message)
    document["future"] = {"x": [1, 2]}
    document["logits"]["s"] = b"ignored for f32"
    document["logits"]["z"] = 7
    _assert_same(message, decode(_pack(document)))


def test_any_msgpack_int_width_is_accepted() -> None:
    """Decoders must not insist on the shortest encoding: here v is uint8, c uint64 and r int64."""
    payload = (
        b"\x86"
        + b"\xa1v\xcc\x01"
        + b"\xa1k\xa9hello_ack"
        + b"\xa1d\xa3dev"
        + b"\xa1c\xcf"
        + (5).to_bytes(8, "big")
        + b"\xaaregistered\xcd\x00\x07"
        + b"\xa1r\xd3"
        + (16).to_bytes(8, "big")
    )
    decoded = decode(payload)
    assert isinstance(decoded, HelloAck)
    assert (decoded.device, decoded.cid, decoded.registered, decoded.neighbours) == ("dev", 5, 7, 16)


def test_payload_limit_is_inclusive() -> None:
    document = _wire(HelloAck("dev-1", 1, 0, 16))
    base = len(_pack({**document, "pad": b""})) - 2  # bin8 header of the empty pad
    document["pad"] = bytes(MAX_PAYLOAD_BYTES - base - 5)  # bin32 header is 5 bytes
    payload = _pack(document)
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert isinstance(decode(payload), HelloAck)
    document["pad"] += b"\x00"
    _rejects(_pack(document), ErrorCode.TOO_LARGE)


def test_protocol_error_carries_code_and_detail() -> None:
    error = _rejects(b"\xc1", ErrorCode.BAD_ENCODING)
    assert isinstance(error, ValueError)
    assert str(error).startswith("bad_encoding: ") and error.detail


# ---------------------------------------------------------------- rejections


def _mutated(message: Message, *path_and_value: Any) -> bytes:
    """Wire bytes of a message with one field (path of keys) replaced, or deleted when the value is ..."""
    *path, value = path_and_value
    document = _wire(message)
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return _pack(document)


HELLO = Hello("dev-1", 1, "m", 10, 5, HashKind.BINARY, 64, ("a",))
REGISTER = Register("dev-1", 2, _u32([1, 2]), np.asarray([0, 1], np.uint16), np.zeros((2, 8), np.uint8))
FETCH = Fetch("dev-1", 3, _u32([1, 2]))
UPDATE = Update("dev-1", 4, _u32([1, 2]), _matrix(2, 3), 1, F32)
UPDATE_FETCH = UpdateFetch("dev-1", 5, _u32([1, 2]), _matrix(2, 3), 1, _u32([3]), F32)
KNOWLEDGE = Knowledge("dev-1", 6, _u32([1, 2]), np.asarray([1, 0], np.uint16), _matrix(1, 3), F32)
HELLO_ACK = HelloAck("dev-1", 7, 0, 16)
ERROR = ErrorReply("dev-1", 8, ErrorCode.INTERNAL, "boom", "fetch")
NAN_F32 = np.asarray([[1.0, np.nan, 0.0], [0.0, 0.0, 0.0]], "<f4").tobytes()
INF_F32 = np.asarray([[1.0, 0.0, 0.0], [0.0, -np.inf, 0.0]], "<f4").tobytes()
NAN_F16 = np.asarray([[1.0, 0.0, np.nan], [0.0, 0.0, 0.0]], "<f2").tobytes()
INF_F16 = np.asarray([[np.inf, 0.0, 0.0], [0.0, 0.0, 0.0]], "<f2").tobytes()

REJECTIONS: list[tuple[str, Callable[[], bytes], ErrorCode]] = [
    ("over-limit", lambda: b"\x00" * (MAX_PAYLOAD_BYTES + 1), ErrorCode.TOO_LARGE),
    ("garbage", lambda: b"\xc1\xc1\xc1", ErrorCode.BAD_ENCODING),
    ("empty", lambda: b"", ErrorCode.BAD_ENCODING),
    ("random-bytes", lambda: np.random.default_rng(1).bytes(64), ErrorCode.BAD_ENCODING),
    ("truncated", lambda: encode(FETCH)[:-3], ErrorCode.BAD_ENCODING),
    ("trailing", lambda: encode(FETCH) + b"\x90", ErrorCode.BAD_ENCODING),
    ("int-map-key", lambda: _pack({1: 2}), ErrorCode.BAD_ENCODING),
    ("bad-utf8", lambda: _mutated(HELLO, "model", "zz").replace(b"\xa2zz", b"\xa2\xc3\x28"), ErrorCode.BAD_ENCODING),
    ("array", lambda: _pack([1, "fetch"]), ErrorCode.BAD_SCHEMA),
    ("int", lambda: _pack(1), ErrorCode.BAD_SCHEMA),
    ("nil", lambda: _pack(None), ErrorCode.BAD_SCHEMA),
    ("bin", lambda: _pack(b"\x81"), ErrorCode.BAD_SCHEMA),
    ("version-2", lambda: _mutated(FETCH, "v", 2), ErrorCode.BAD_VERSION),
    ("version-0", lambda: _mutated(FETCH, "v", 0), ErrorCode.BAD_VERSION),
    ("version-str", lambda: _mutated(FETCH, "v", "1"), ErrorCode.BAD_VERSION),
    ("version-missing", lambda: _mutated(FETCH, "v", ...), ErrorCode.BAD_VERSION),
    ("unknown-kind", lambda: _mutated(FETCH, "k", "ping"), ErrorCode.BAD_SCHEMA),
    ("kind-case", lambda: _mutated(FETCH, "k", "FETCH"), ErrorCode.BAD_SCHEMA),
    ("bool-for-int", lambda: _mutated(HELLO_ACK, "registered", True), ErrorCode.BAD_SCHEMA),
    ("float-for-int", lambda: _mutated(HELLO_ACK, "registered", 1.0), ErrorCode.BAD_SCHEMA),
    ("str-for-bytes", lambda: _mutated(FETCH, "ids", "\x01\x00\x00\x00"), ErrorCode.BAD_SCHEMA),
    ("bytes-for-str", lambda: _mutated(FETCH, "enc", b"f16"), ErrorCode.BAD_SCHEMA),
    ("list-for-map", lambda: _mutated(UPDATE, "logits", []), ErrorCode.BAD_SCHEMA),
    ("nil-for-int", lambda: _mutated(UPDATE, "ver", None), ErrorCode.BAD_SCHEMA),
    ("ids-7-bytes", lambda: _mutated(FETCH, "ids", bytes(7)), ErrorCode.BAD_DTYPE),
    ("fetch-ids-6-bytes", lambda: _mutated(UPDATE_FETCH, "fetch_ids", bytes(6)), ErrorCode.BAD_DTYPE),
    ("knowledge-ids-5-bytes", lambda: _mutated(KNOWLEDGE, "ids", bytes(5)), ErrorCode.BAD_DTYPE),
    ("duplicate-ids", lambda: _mutated(FETCH, "ids", _u32([4, 5, 4]).tobytes()), ErrorCode.BAD_SHAPE),
    ("duplicate-fetch-ids", lambda: _mutated(UPDATE_FETCH, "fetch_ids", _u32([3, 3]).tobytes()), ErrorCode.BAD_SHAPE),
    ("duplicate-register-ids", lambda: _mutated(REGISTER, "ids", _u32([1, 1]).tobytes()), ErrorCode.BAD_SHAPE),
    (
        "too-many-ids",
        lambda: _mutated(FETCH, "ids", np.arange(MAX_IDS_PER_MESSAGE + 1, dtype="<u4").tobytes()),
        ErrorCode.TOO_LARGE,
    ),
    ("labels-short", lambda: _mutated(REGISTER, "labels", bytes(2)), ErrorCode.BAD_SHAPE),
    ("labels-long", lambda: _mutated(REGISTER, "labels", bytes(6)), ErrorCode.BAD_SHAPE),
    ("labels-odd", lambda: _mutated(REGISTER, "labels", bytes(3)), ErrorCode.BAD_SHAPE),
    ("hashes-length", lambda: _mutated(REGISTER, "hashes", bytes(15)), ErrorCode.BAD_SHAPE),
    ("hash-bytes-over", lambda: _mutated(REGISTER, "hash_bytes", MAX_HASH_BYTES + 1), ErrorCode.BAD_SHAPE),
    ("counts-length", lambda: _mutated(KNOWLEDGE, "counts", bytes(6)), ErrorCode.BAD_SHAPE),
    ("nan-f32", lambda: _mutated(UPDATE, "logits", "b", NAN_F32), ErrorCode.NON_FINITE),
    ("inf-f32", lambda: _mutated(UPDATE_FETCH, "logits", "b", INF_F32), ErrorCode.NON_FINITE),
    ("nan-f16", lambda: _mutated(_in_encoding(UPDATE, F16), "logits", "b", NAN_F16), ErrorCode.NON_FINITE),
    ("inf-f16", lambda: _mutated(_in_encoding(UPDATE, F16), "logits", "b", INF_F16), ErrorCode.NON_FINITE),
    (
        "inf-scale-i8",
        lambda: _mutated(_in_encoding(UPDATE, I8), "logits", "s", struct.pack("<2f", 1.0, np.inf)),
        ErrorCode.NON_FINITE,
    ),
    (
        "nan-scale-i8",
        lambda: _mutated(_in_encoding(KNOWLEDGE, I8), "logits", "s", struct.pack("<f", np.nan)),
        ErrorCode.NON_FINITE,
    ),
    (
        "overflowing-scale-i8",
        lambda: _mutated(_in_encoding(UPDATE, I8), "logits", "s", struct.pack("<2f", 3e38, 3e38)),
        ErrorCode.NON_FINITE,
    ),
    (
        "nan-knowledge",
        lambda: _mutated(KNOWLEDGE, "logits", "b", struct.pack("<3f", 0, 0, np.nan)),
        ErrorCode.NON_FINITE,
    ),
    ("rows-not-ids", lambda: _mutated(UPDATE, "ids", _u32([1, 2, 3]).tobytes()), ErrorCode.BAD_SHAPE),
    ("rows-not-ids-uf", lambda: _mutated(UPDATE_FETCH, "ids", _u32([1]).tobytes()), ErrorCode.BAD_SHAPE),
    ("rows-not-teachers", lambda: _mutated(KNOWLEDGE, "counts", _u16([1, 1])), ErrorCode.BAD_SHAPE),
    ("logit-bytes", lambda: _mutated(UPDATE, "logits", "b", bytes(23)), ErrorCode.BAD_SHAPE),
    ("scale-bytes", lambda: _mutated(_in_encoding(UPDATE, I8), "logits", "s", bytes(4)), ErrorCode.BAD_SHAPE),
    ("logit-rows-over", lambda: _mutated(UPDATE, "logits", "n", MAX_IDS_PER_MESSAGE + 1), ErrorCode.BAD_SHAPE),
    ("logit-cols-over", lambda: _mutated(UPDATE, "logits", "m", MAX_CLASSES + 1), ErrorCode.BAD_SHAPE),
    ("logit-encoding", lambda: _mutated(UPDATE, "logits", "e", "bf16"), ErrorCode.BAD_SCHEMA),
    ("fetch-encoding", lambda: _mutated(FETCH, "enc", "f64"), ErrorCode.BAD_SCHEMA),
    ("negative-version", lambda: _mutated(UPDATE, "ver", -1), ErrorCode.BAD_SHAPE),
    ("negative-cid", lambda: _mutated(FETCH, "c", -1), ErrorCode.BAD_SCHEMA),
    ("cid-2^63", lambda: _mutated(FETCH, "c", 2**63), ErrorCode.BAD_SCHEMA),
    ("cid-2^64-1", lambda: _mutated(FETCH, "c", 2**64 - 1), ErrorCode.BAD_SCHEMA),
    ("hash-dim-bits", lambda: _mutated(HELLO, "hash_dim", 60), ErrorCode.BAD_SHAPE),
    ("hash-dim-zero", lambda: _mutated(HELLO, "hash_dim", 0), ErrorCode.BAD_SHAPE),
    ("hash-dim-over", lambda: _mutated(HELLO, "hash_dim", MAX_HASH_BYTES * 8 + 8), ErrorCode.BAD_SHAPE),
    ("hash-kind", lambda: _mutated(HELLO, "hash_kind", "f32"), ErrorCode.BAD_SCHEMA),
    ("classes-1", lambda: _mutated(HELLO, "classes", 1), ErrorCode.BAD_SHAPE),
    ("classes-over", lambda: _mutated(HELLO, "classes", MAX_CLASSES + 1), ErrorCode.BAD_SHAPE),
    ("samples-over", lambda: _mutated(HELLO, "samples", 2**32), ErrorCode.BAD_SHAPE),
    ("model-long", lambda: _mutated(HELLO, "model", "m" * 65), ErrorCode.TOO_LARGE),
    ("caps-too-many", lambda: _mutated(HELLO, "caps", ["x"] * 65), ErrorCode.BAD_SCHEMA),
    ("caps-long", lambda: _mutated(HELLO, "caps", ["x" * 65]), ErrorCode.BAD_SCHEMA),
    ("caps-not-str", lambda: _mutated(HELLO, "caps", [1]), ErrorCode.BAD_SCHEMA),
    ("neighbours-over", lambda: _mutated(HELLO_ACK, "r", 1025), ErrorCode.BAD_SHAPE),
    ("applied-over", lambda: _mutated(KNOWLEDGE, "applied", MAX_IDS_PER_MESSAGE + 1), ErrorCode.BAD_SHAPE),
    ("error-code", lambda: _mutated(ERROR, "code", "oops"), ErrorCode.BAD_SCHEMA),
    ("error-msg-long", lambda: _mutated(ERROR, "msg", "x" * 4097), ErrorCode.TOO_LARGE),
    ("error-re-long", lambda: _mutated(ERROR, "re", "x" * 65), ErrorCode.TOO_LARGE),
]


def _in_encoding(message: Message, encoding: LogitEncoding) -> Message:
    """The same message with its logits in another encoding."""
    fields = {k: v for k, v in vars(message).items() if k != "kind"}
    fields["encoding"] = encoding
    return type(message)(**fields)


def _u16(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<u2").tobytes()


@pytest.mark.parametrize(("name", "build", "code"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejection(name: str, build: Callable[[], bytes], code: ErrorCode) -> None:
    _rejects(build(), code)


@pytest.mark.parametrize(
    "device", ["", "a" * 65, "a/b", "a b", "a+b", "a#", "dév", "a.b", "$SYS", "a\x00", "-", "_server"], ids=repr
)
def test_invalid_device_id(device: str) -> None:
    _rejects(_mutated(FETCH, "d", device), ErrorCode.BAD_SCHEMA)


@pytest.mark.parametrize("device", ["a", "A-z_0-9", "x" * 64, "7", "pi_07-b"])
def test_valid_device_id(device: str) -> None:
    assert decode(encode(Fetch(device, 1, _u32([1])))).device == device


def test_limits_are_inclusive() -> None:
    assert decode(_mutated(FETCH, "c", 2**63 - 1)).cid == 2**63 - 1
    ids = np.arange(MAX_IDS_PER_MESSAGE, dtype=np.uint32)
    assert decode(encode(Fetch("d", 1, ids))).ids.size == MAX_IDS_PER_MESSAGE  # type: ignore[union-attr]
    for classes in (2, MAX_CLASSES):
        assert decode(_mutated(HELLO, "classes", classes)).classes == classes  # type: ignore[union-attr]
    assert decode(_mutated(HELLO, "hash_dim", 8)).hash_dim == 8  # type: ignore[union-attr]
    f16_hello = Hello("d", 1, "m", 10, 5, HashKind.FLOAT16, 61)
    assert decode(encode(f16_hello)).hash_dim == 61  # type: ignore[union-attr]
    assert decode(_mutated(HELLO, "model", "m" * 64)).model == "m" * 64  # type: ignore[union-attr]
    assert decode(_mutated(HELLO_ACK, "r", 1024)).neighbours == 1024  # type: ignore[union-attr]


def _paths(document: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in document.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _paths(value, (*prefix, key))
    return paths


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str | bytes | list | dict):
        raise AssertionError(f"unexpected wire type {type(value)}")
    return {int: True, str: b"x", bytes: "x", list: "x", dict: []}[type(value)]


@pytest.mark.parametrize("message", _examples(), ids=lambda m: f"{m.kind.value}-{getattr(m, 'encoding', '')}")
def test_every_field_is_required_and_typed(message: Message) -> None:
    """Deleting any field, or giving it another msgpack type, is rejected (v: bad_version, others: bad_schema)."""
    document = _wire(message)
    for path in _paths(document):
        if path[-1] == "s" and document.get("logits", {}).get("e") not in ("i8", "i8b"):
            continue
        if path == ("teach",):  # optional (absent means the mean), but typed when present
            _rejects(_mutated(message, *path, _wrong_type(document["teach"])), ErrorCode.BAD_SCHEMA)
            continue
        expected = ErrorCode.BAD_VERSION if path == ("v",) else ErrorCode.BAD_SCHEMA
        _rejects(_mutated(message, *path, ...), expected)
        if path != ("v",):
            original = document
            for key in path:
                original = original[key]
            _rejects(_mutated(message, *path, _wrong_type(original)), expected)


# ---------------------------------------------------------------- codec bugs found in review, now fixed


def test_device_id_with_trailing_newline_is_rejected() -> None:
    assert not DEVICE_ID_PATTERN.match("dev\n")
    _rejects(_mutated(FETCH, "d", "dev\n"), ErrorCode.BAD_SCHEMA)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_integer(version: object) -> None:
    _rejects(_mutated(FETCH, "v", version), ErrorCode.BAD_VERSION)


def test_encoder_refuses_non_finite_int8_logits() -> None:
    logits = np.asarray([[np.nan, 1.0, -2.0]], np.float32)
    with pytest.raises(ValueError), np.errstate(all="ignore"):
        encode_logits(logits, I8)


# ---------------------------------------------------------------- topics


def test_topic_names() -> None:
    assert up_topic("dev-1", Kind.UPDATE_FETCH) == "fedcache/v1/dev-1/up/update_fetch"
    assert down_topic("dev-1") == "fedcache/v1/dev-1/down"
    assert metrics_topic("dev-1") == "fedcache/v1/dev-1/metrics"
    assert server_subscription() == "$share/fedcache-server/fedcache/v1/+/up/+"


@pytest.mark.parametrize("kind", sorted(REQUEST_KINDS))
def test_parse_up_topic_accepts_requests(kind: Kind) -> None:
    assert parse_up_topic(up_topic("Dev_9-x", kind)) == ("Dev_9-x", kind)


@pytest.mark.parametrize(
    "topic",
    [
        *(f"fedcache/v1/dev-1/up/{kind.value}" for kind in sorted(REPLY_KINDS)),
        "fedcache/v1/dev-1/down",
        "fedcache/v1/dev-1/metrics",
        "fedcache/v1/dev-1/up",
        "fedcache/v1/dev-1/up/",
        "fedcache/v1/dev-1/up/ping",
        "fedcache/v1/dev-1/up/FETCH",
        "fedcache/v1/dev-1/up/fetch/",
        "fedcache/v1/dev-1/up/fetch/extra",
        "fedcache/v1/dev-1/down/fetch",
        "fedcache/v1/up/fetch",
        "fedcache/v2/dev-1/up/fetch",
        "/fedcache/v1/dev-1/up/fetch",
        "fedcache/v1dev-1/up/fetch",
        "$share/fedcache-server/fedcache/v1/dev-1/up/fetch",
        "",
    ],
)
def test_parse_up_topic_rejects(topic: str) -> None:
    assert parse_up_topic(topic) is None


@pytest.mark.parametrize("topic", ["fedcache/v1//up/fetch", "fedcache/v1/a b/up/fetch", "fedcache/v1/dév/up/fetch"])
def test_parse_up_topic_rejects_invalid_device(topic: str) -> None:
    assert parse_up_topic(topic) is None


# ---------------------------------------------------------------- vectors


def _message_from(meaning: dict[str, Any]) -> Message:
    """Build the message a valid vector's JSON describes (independent of the generator)."""
    fields = dict(meaning["fields"])
    fields.pop("kind", None)
    arrays = {
        "ids": "<u4",
        "fetch_ids": "<u4",
        "labels": "<u2",
        "counts": "<u2",
        "class_counts": "<u4",
        "hashes": "u1",
        "logits": "<f4",
        "params": "<f4",
    }
    for name, dtype in arrays.items():
        if name in fields:
            array = np.asarray(fields.pop(name), dtype=dtype)
            shape = fields.pop(name + "_shape", None)
            fields[name] = array.reshape(shape) if shape is not None else array
    for name, enum in (
        ("hash_kind", HashKind),
        ("encoding", LogitEncoding),
        ("code", ErrorCode),
        ("teacher", TeacherForm),
    ):
        if name in fields:
            fields[name] = enum(fields[name])
    if "capabilities" in fields:
        fields["capabilities"] = tuple(fields["capabilities"])
    return CLASSES[Kind(meaning["kind"])](**fields)


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if list(value) == ["bin"]:
            return bytes.fromhex(value["bin"])
        return {key: _from_jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(item) for item in value]
    return value


VALID_VECTORS = sorted(p.stem for p in VECTORS.glob("*.json") if not p.stem.startswith("invalid_"))
INVALID_VECTORS = sorted(p.stem for p in VECTORS.glob("invalid_*.json"))


def test_vectors_exist() -> None:
    names = {p.stem for p in VECTORS.glob("*.json")}
    assert names == {p.stem for p in VECTORS.glob("*.bin")}
    assert {json.loads((VECTORS / f"{n}.json").read_text())["kind"] for n in VALID_VECTORS} == {k.value for k in Kind}
    assert len(INVALID_VECTORS) >= 10


@pytest.mark.parametrize("name", VALID_VECTORS)
def test_valid_vector(name: str) -> None:
    payload = (VECTORS / f"{name}.bin").read_bytes()
    meaning = json.loads((VECTORS / f"{name}.json").read_text())
    assert meaning["name"] == name
    expected = _message_from(meaning)
    decoded = decode(payload)
    assert decoded.kind.value == meaning["kind"]
    for field, value in vars(expected).items():  # (a) decoding gives the meaning, exactly
        got = getattr(decoded, field)
        if isinstance(value, np.ndarray):
            assert got.shape == value.shape and got.dtype == value.dtype, field
            np.testing.assert_array_equal(got, value, err_msg=field)
        else:
            assert got == value, field
    assert encode(expected) == payload  # (b) encoding the meaning gives the very same bytes
    assert msgpack.unpackb(payload, raw=False) == _from_jsonable(meaning["wire"])


@pytest.mark.parametrize("name", INVALID_VECTORS)
def test_invalid_vector(name: str) -> None:
    meaning = json.loads((VECTORS / f"{name}.json").read_text())
    _rejects((VECTORS / f"{name}.bin").read_bytes(), ErrorCode(meaning["error"]))


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("fedwire_vectors_generate", VECTORS / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_are_what_the_generator_writes() -> None:
    built: dict[str, bytes] = _generator().build()
    on_disk = {p.name: p.read_bytes() for p in [*VECTORS.glob("*.bin"), *VECTORS.glob("*.json")]}
    assert sorted(built) == sorted(on_disk)
    stale = [name for name, content in built.items() if on_disk[name] != content]
    assert not stale, f"run `python tests/vectors/generate.py`; stale: {stale}"


def test_doc_example_matches_its_vector() -> None:
    """The annotated hex dump in docs/protocol.md is the exact update_fetch_i8 vector."""
    text = DOC.read_text()
    block = re.search(r"<!-- vector: update_fetch_i8 -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/protocol.md lacks the annotated update_fetch_i8 dump"
    offset, data = 0, bytearray()
    for line in block.group(1).splitlines():
        match = re.match(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} ?)+)", line)
        if not match:
            continue
        assert int(match.group(1), 16) == offset, line
        chunk = bytes.fromhex(match.group(2).strip())
        data += chunk
        offset += len(chunk)
    assert bytes(data) == (VECTORS / "update_fetch_i8.bin").read_bytes()
    assert PROTOCOL_VERSION == 1


def test_raw_knowledge_averages_each_ids_rows_on_the_device() -> None:
    rows = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, -1.0]], np.float32)
    raw = Knowledge("dev-1", 1, _u32([7, 8, 9]), np.asarray([2, 0, 1], np.uint16), rows, F32, teacher=TeacherForm.RAW)
    np.testing.assert_array_equal(raw.teacher_means(), [[2.0, 4.0], [5.0, -1.0]])
    mean = Knowledge("dev-1", 1, _u32([7]), np.asarray([3], np.uint16), rows[:1], F32)
    assert mean.teacher_means() is mean.logits  # the default form is already one row per id
    none = Knowledge(
        "dev-1", 1, _u32([7]), np.zeros(1, np.uint16), np.zeros((0, 2), np.float32), F32, teacher=TeacherForm.RAW
    )
    assert none.teacher_means().shape == (0, 2)
