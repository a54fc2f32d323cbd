"""Encode and decode FedCache messages as msgpack maps with arrays as raw little-endian bytes.

Decoding validates everything a message carries (size, version, schema, dtypes, shapes, finite
values) and raises `ProtocolError` with an `ErrorCode`, so no malformed input gets past it. The
layout is specified in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from fedwire.constants import (
    DEVICE_ID_PATTERN,
    MAX_CLASSES,
    MAX_HASH_BYTES,
    MAX_IDS_PER_MESSAGE,
    MAX_MODEL_FLOATS,
    MAX_MODEL_NAME_LEN,
    MAX_PAYLOAD_BYTES,
    MODEL_CHUNK_FLOATS,
    PROTOCOL_VERSION,
    ErrorCode,
    HashKind,
    Kind,
    LogitEncoding,
    TeacherForm,
)
from fedwire.messages import (
    ErrorReply,
    FdGlobal,
    FdUpdate,
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
    Message,
    ModelAck,
    ModelGet,
    ModelPut,
    ModelState,
    Register,
    RegisterAck,
    Update,
    UpdateAck,
    UpdateFetch,
)

_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")
_F32 = np.dtype("<f4")
_MAX_ROUND = 2**32 - 1
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_LOGIT_DTYPES = {
    LogitEncoding.FLOAT32: np.dtype("<f4"),
    LogitEncoding.FLOAT16: np.dtype("<f2"),
    LogitEncoding.INT8: np.dtype("i1"),
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` says which rule, the text says how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.detail = message


# ---------------------------------------------------------------- arrays


def encode_logits(logits: np.ndarray, encoding: LogitEncoding) -> dict[str, Any]:
    """Pack an (n, classes) float matrix; int8 carries one float32 scale per row."""
    matrix = np.asarray(logits, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"logits must be 2-D, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("logits hold NaN or infinite values")
    if encoding is LogitEncoding.FLOAT16:
        # float16 tops out at 65504; beyond it values would arrive as inf and the message be rejected.
        matrix = np.clip(matrix, -_FLOAT16_MAX, _FLOAT16_MAX)
    packed: dict[str, Any] = {"e": encoding.value, "n": matrix.shape[0], "m": matrix.shape[1]}
    if encoding is LogitEncoding.INT8:
        scales = np.abs(matrix).max(axis=1) / 127.0 if matrix.size else np.zeros(0, np.float32)
        scales = np.where(scales > 0, scales, 1.0).astype("<f4")
        quantised = np.clip(np.rint(matrix / scales[:, None]), -127, 127).astype("i1")
        packed["b"] = quantised.tobytes()
        packed["s"] = scales.tobytes()
    else:
        packed["b"] = matrix.astype(_LOGIT_DTYPES[encoding]).tobytes()
    return packed


def as_received(logits: np.ndarray, encoding: LogitEncoding) -> np.ndarray:
    """The float32 values the other side decodes from `logits` sent with `encoding` (what the server stores)."""
    return _decode_logits(encode_logits(logits, encoding), "logits")[0]


def _decode_logits(raw: Any, where: str) -> tuple[np.ndarray, LogitEncoding]:
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where} must be a map")
    encoding = _enum(LogitEncoding, _field(raw, "e", str, where), where + ".e")
    rows = _count(raw, "n", where, MAX_IDS_PER_MESSAGE)
    cols = _count(raw, "m", where, MAX_CLASSES)
    data = _bytes_of(raw, "b", where, _LOGIT_DTYPES[encoding], rows * cols)
    matrix = data.reshape(rows, cols).astype(np.float32)
    if encoding is LogitEncoding.INT8:
        scales = _bytes_of(raw, "s", where, np.dtype("<f4"), rows).astype(np.float32)
        if not np.all(np.isfinite(scales)):
            raise ProtocolError(ErrorCode.NON_FINITE, f"{where}.s holds non-finite scales")
        matrix *= scales[:, None]
    if not np.all(np.isfinite(matrix)):
        raise ProtocolError(ErrorCode.NON_FINITE, f"{where} holds NaN or infinite values")
    return matrix, encoding


def _bytes_of(raw: dict[str, Any], key: str, where: str, dtype: np.dtype, count: int) -> np.ndarray:
    data = _field(raw, key, bytes, where)
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            ErrorCode.BAD_SHAPE,
            f"{where}.{key} has {len(data)} bytes, expected {count} x {dtype.itemsize}",
        )
    return np.frombuffer(data, dtype=dtype)


def _ids(raw: dict[str, Any], key: str, where: str) -> np.ndarray:
    data = _field(raw, key, bytes, where)
    if len(data) % _U32.itemsize:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"{where}.{key} is not a whole number of uint32")
    ids = np.frombuffer(data, dtype=_U32)
    if ids.size > MAX_IDS_PER_MESSAGE:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{where}.{key} has {ids.size} ids, limit {MAX_IDS_PER_MESSAGE}")
    if np.unique(ids).size != ids.size:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.{key} repeats a sample id")
    return ids


# ---------------------------------------------------------------- scalar fields


def _field(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in raw:
        raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where} lacks field '{key}'")
    value = raw[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}.{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _count(raw: dict[str, Any], key: str, where: str, limit: int) -> int:
    value = _field(raw, key, int, where)
    if not 0 <= value <= limit:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.{key}={value} outside [0, {limit}]")
    return int(value)


def _enum(enum: type, value: str, where: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}='{value}' is not one of {allowed}") from None


def _text(raw: dict[str, Any], key: str, where: str, limit: int) -> str:
    value = _field(raw, key, str, where)
    if len(value) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{where}.{key} is longer than {limit}")
    return value


# ---------------------------------------------------------------- encode


def encode(message: Message) -> bytes:
    """Serialise any message to its wire bytes."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": message.kind.value, "d": message.device, "c": message.cid}
    body.update(_ENCODERS[message.kind](message))
    return msgpack.packb(body, use_bin_type=True)


def _unsigned(array: np.ndarray, dtype: np.dtype) -> bytes:
    """Refuse values that would silently wrap around in the narrower wire type."""
    values = np.asarray(array)
    if values.size and (values.min() < 0 or values.max() > np.iinfo(dtype).max):
        raise ValueError(f"values outside the range of {dtype}")
    return values.astype(dtype).tobytes()


def _u32(array: np.ndarray) -> bytes:
    return _unsigned(array, _U32)


def _u16(array: np.ndarray) -> bytes:
    return _unsigned(array, _U16)


def _params(array: np.ndarray) -> bytes:
    values = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("model parameters hold NaN or infinite values")
    return values.astype(_F32).tobytes()


def model_part_bounds(size: int, part: int) -> tuple[int, int]:
    """[start, stop) of the floats that part `part` of a `size`-float model carries."""
    start = part * MODEL_CHUNK_FLOATS
    return start, min(start + MODEL_CHUNK_FLOATS, size)


def model_parts(size: int) -> int:
    """How many parts a model of `size` floats travels in (at least one)."""
    return max(1, -(-size // MODEL_CHUNK_FLOATS))


def _teacher_form(form: TeacherForm) -> dict[str, str]:
    """The optional "teach" key: absent for the default (server-side mean), so those messages stay as they were."""
    return {} if form is TeacherForm.MEAN else {"teach": form.value}


def _decode_teacher_form(raw: dict[str, Any], where: str) -> TeacherForm:
    if "teach" not in raw:
        return TeacherForm.MEAN
    return _enum(TeacherForm, _field(raw, "teach", str, where), where + ".teach")


_ENCODERS: dict[Kind, Callable[[Any], dict[str, Any]]] = {
    Kind.HELLO: lambda m: {
        "model": m.model,
        "classes": m.classes,
        "samples": m.samples,
        "hash_kind": m.hash_kind.value,
        "hash_dim": m.hash_dim,
        "caps": list(m.capabilities),
    },
    Kind.REGISTER: lambda m: {
        "ids": _u32(m.ids),
        "labels": _u16(m.labels),
        "hash_bytes": int(m.hashes.shape[1]),
        "hashes": np.ascontiguousarray(m.hashes, dtype=np.uint8).tobytes(),
    },
    Kind.FETCH: lambda m: {"ids": _u32(m.ids), "enc": m.encoding.value, **_teacher_form(m.teacher)},
    Kind.UPDATE: lambda m: {"ids": _u32(m.ids), "ver": m.version, "logits": encode_logits(m.logits, m.encoding)},
    Kind.UPDATE_FETCH: lambda m: {
        "ids": _u32(m.ids),
        "ver": m.version,
        "logits": encode_logits(m.logits, m.encoding),
        "fetch_ids": _u32(m.fetch_ids),
        **_teacher_form(m.teacher),
    },
    Kind.HELLO_ACK: lambda m: {"registered": m.registered, "r": m.neighbours},
    Kind.REGISTER_ACK: lambda m: {"accepted": m.accepted, "registered": m.registered},
    Kind.KNOWLEDGE: lambda m: {
        "ids": _u32(m.ids),
        "counts": _u16(m.counts),
        "logits": encode_logits(m.logits, m.encoding),
        "applied": m.applied,
        "stale": m.stale,
        **_teacher_form(m.teacher),
    },
    Kind.UPDATE_ACK: lambda m: {"applied": m.applied, "stale": m.stale},
    Kind.ERROR: lambda m: {"code": m.code.value, "msg": m.message, "re": m.request},
    Kind.FD_UPDATE: lambda m: {
        "logits": encode_logits(m.logits, m.encoding),
        "counts": _unsigned(m.class_counts, _U32),
        "ver": m.version,
    },
    Kind.FD_GLOBAL: lambda m: {
        "logits": encode_logits(m.logits, m.encoding),
        "counts": _unsigned(m.class_counts, _U32),
        "applied": m.applied,
    },
    Kind.MODEL_PUT: lambda m: {
        "round": m.round,
        "model": m.model,
        "samples": m.samples,
        "size": m.size,
        "part": m.part,
        "params": _params(m.params),
    },
    Kind.MODEL_ACK: lambda m: {"round": m.round, "accepted": m.accepted},
    Kind.MODEL_GET: lambda m: {"round": m.round, "part": m.part},
    Kind.MODEL_STATE: lambda m: {
        "round": m.round,
        "ready": m.ready,
        "participants": m.participants,
        "size": m.size,
        "part": m.part,
        "params": _params(m.params),
    },
}


# ---------------------------------------------------------------- decode


def decode(payload: bytes) -> Message:
    """Parse and validate wire bytes; raises ProtocolError on anything malformed."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"not a msgpack document ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_SCHEMA, "message must be a msgpack map")
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    kind = _enum(Kind, _field(raw, "k", str, "message"), "message.k")
    device = _field(raw, "d", str, "message")
    if not DEVICE_ID_PATTERN.match(device):
        raise ProtocolError(ErrorCode.BAD_SCHEMA, "device id must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}")
    cid = _field(raw, "c", int, "message")
    if not 0 <= cid < 2**63:
        raise ProtocolError(ErrorCode.BAD_SCHEMA, "correlation id must be a non-negative 63-bit integer")
    return _DECODERS[kind](raw, device, cid, kind.value)


def _decode_hello(raw: dict[str, Any], device: str, cid: int, where: str) -> Hello:
    caps = _field(raw, "caps", list, where)
    if len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
        raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}.caps must be at most 64 short strings")
    hash_kind = _enum(HashKind, _field(raw, "hash_kind", str, where), where + ".hash_kind")
    # A register chunk carries at most MAX_HASH_BYTES per sample: 8 bits per byte, or 2 bytes per float16.
    dim_limit = MAX_HASH_BYTES * 8 if hash_kind is HashKind.BINARY else MAX_HASH_BYTES // 2
    hash_dim = _count(raw, "hash_dim", where, dim_limit)
    if hash_dim == 0 or (hash_kind is HashKind.BINARY and hash_dim % 8):
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.hash_dim={hash_dim} is not a positive whole number of bytes")
    classes = _count(raw, "classes", where, MAX_CLASSES)
    if classes < 2:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.classes must be at least 2")
    return Hello(
        device=device,
        cid=cid,
        model=_text(raw, "model", where, MAX_MODEL_NAME_LEN),
        classes=classes,
        samples=_count(raw, "samples", where, 2**32 - 1),
        hash_kind=hash_kind,
        hash_dim=hash_dim,
        capabilities=tuple(caps),
    )


def _decode_register(raw: dict[str, Any], device: str, cid: int, where: str) -> Register:
    ids = _ids(raw, "ids", where)
    labels = _bytes_of(raw, "labels", where, _U16, ids.size)
    hash_bytes = _count(raw, "hash_bytes", where, MAX_HASH_BYTES)
    hashes = _bytes_of(raw, "hashes", where, np.dtype(np.uint8), ids.size * hash_bytes)
    return Register(device=device, cid=cid, ids=ids, labels=labels, hashes=hashes.reshape(ids.size, hash_bytes))


def _decode_fetch(raw: dict[str, Any], device: str, cid: int, where: str) -> Fetch:
    encoding = _enum(LogitEncoding, _field(raw, "enc", str, where), where + ".enc")
    teacher = _decode_teacher_form(raw, where)
    return Fetch(device=device, cid=cid, ids=_ids(raw, "ids", where), encoding=encoding, teacher=teacher)


def _update_parts(raw: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, int, LogitEncoding]:
    ids = _ids(raw, "ids", where)
    logits, encoding = _decode_logits(_field(raw, "logits", dict, where), where + ".logits")
    if logits.shape[0] != ids.size:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where} has {ids.size} ids but {logits.shape[0]} logit rows")
    version = _count(raw, "ver", where, 2**63 - 1)
    return ids, logits, version, encoding


def _decode_update(raw: dict[str, Any], device: str, cid: int, where: str) -> Update:
    ids, logits, version, encoding = _update_parts(raw, where)
    return Update(device=device, cid=cid, ids=ids, logits=logits, version=version, encoding=encoding)


def _decode_update_fetch(raw: dict[str, Any], device: str, cid: int, where: str) -> UpdateFetch:
    ids, logits, version, encoding = _update_parts(raw, where)
    return UpdateFetch(
        device=device,
        cid=cid,
        ids=ids,
        logits=logits,
        version=version,
        fetch_ids=_ids(raw, "fetch_ids", where),
        encoding=encoding,
        teacher=_decode_teacher_form(raw, where),
    )


def _decode_knowledge(raw: dict[str, Any], device: str, cid: int, where: str) -> Knowledge:
    ids = _ids(raw, "ids", where)
    counts = _bytes_of(raw, "counts", where, _U16, ids.size)
    logits, encoding = _decode_logits(_field(raw, "logits", dict, where), where + ".logits")
    teacher = _decode_teacher_form(raw, where)
    # A mean reply has one row per id with a teacher; a raw one a row per contributing neighbour.
    rows = int(np.count_nonzero(counts)) if teacher is TeacherForm.MEAN else int(counts.sum(dtype=np.int64))
    if logits.shape[0] != rows:
        raise ProtocolError(
            ErrorCode.BAD_SHAPE,
            f"{where} has {logits.shape[0]} logit rows where its {teacher.value} counts need {rows}",
        )
    return Knowledge(
        device=device,
        cid=cid,
        ids=ids,
        counts=counts,
        logits=logits,
        encoding=encoding,
        applied=_count(raw, "applied", where, MAX_IDS_PER_MESSAGE),
        stale=_count(raw, "stale", where, MAX_IDS_PER_MESSAGE),
        teacher=teacher,
    )


def _decode_error(raw: dict[str, Any], device: str, cid: int, where: str) -> ErrorReply:
    return ErrorReply(
        device=device,
        cid=cid,
        code=_enum(ErrorCode, _field(raw, "code", str, where), where + ".code"),
        message=_text(raw, "msg", where, 4096),
        request=_text(raw, "re", where, 64),
    )


def _class_table(raw: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, LogitEncoding]:
    """A (classes x classes) per-class logit table and its uint32 per-class counts."""
    logits, encoding = _decode_logits(_field(raw, "logits", dict, where), where + ".logits")
    rows, cols = logits.shape
    if rows != cols or rows < 2:
        raise ProtocolError(
            ErrorCode.BAD_SHAPE, f"{where}.logits must be classes x classes (>= 2), got {rows} x {cols}"
        )
    counts = _bytes_of(raw, "counts", where, _U32, rows)
    return logits, counts, encoding


def _decode_fd_update(raw: dict[str, Any], device: str, cid: int, where: str) -> FdUpdate:
    logits, counts, encoding = _class_table(raw, where)
    version = _count(raw, "ver", where, 2**63 - 1)
    return FdUpdate(device=device, cid=cid, logits=logits, class_counts=counts, version=version, encoding=encoding)


def _decode_fd_global(raw: dict[str, Any], device: str, cid: int, where: str) -> FdGlobal:
    logits, counts, encoding = _class_table(raw, where)
    applied = _count(raw, "applied", where, 1)
    return FdGlobal(device=device, cid=cid, logits=logits, class_counts=counts, encoding=encoding, applied=applied)


def _model_part(raw: dict[str, Any], where: str, *, present: bool) -> tuple[int, int, np.ndarray]:
    """(size, part, params) of a model part; `present` False means a reply without parameters."""
    size = _count(raw, "size", where, MAX_MODEL_FLOATS)
    part = _count(raw, "part", where, MAX_MODEL_FLOATS // MODEL_CHUNK_FLOATS)
    if not present:
        params = _bytes_of(raw, "params", where, _F32, 0)
        return size, part, params.astype(np.float32)
    if size == 0:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.size must be at least 1")
    if part >= model_parts(size):
        raise ProtocolError(
            ErrorCode.BAD_SHAPE, f"{where}.part={part} but a {size}-float model has {model_parts(size)}"
        )
    start, stop = model_part_bounds(size, part)
    params = _bytes_of(raw, "params", where, _F32, stop - start).astype(np.float32)
    if not np.all(np.isfinite(params)):
        raise ProtocolError(ErrorCode.NON_FINITE, f"{where}.params holds NaN or infinite values")
    return size, part, params


def _decode_model_put(raw: dict[str, Any], device: str, cid: int, where: str) -> ModelPut:
    size, part, params = _model_part(raw, where, present=True)
    return ModelPut(
        device=device,
        cid=cid,
        round=_count(raw, "round", where, _MAX_ROUND),
        model=_text(raw, "model", where, MAX_MODEL_NAME_LEN),
        samples=_count(raw, "samples", where, 2**32 - 1),
        size=size,
        part=part,
        params=params,
    )


def _decode_model_state(raw: dict[str, Any], device: str, cid: int, where: str) -> ModelState:
    ready = _count(raw, "ready", where, 1)
    size, part, params = _model_part(raw, where, present=bool(ready))
    return ModelState(
        device=device,
        cid=cid,
        round=_count(raw, "round", where, _MAX_ROUND),
        ready=ready,
        participants=_count(raw, "participants", where, 2**32 - 1),
        size=size,
        part=part,
        params=params,
    )


_DECODERS: dict[Kind, Callable[[dict[str, Any], str, int, str], Message]] = {
    Kind.HELLO: _decode_hello,
    Kind.REGISTER: _decode_register,
    Kind.FETCH: _decode_fetch,
    Kind.UPDATE: _decode_update,
    Kind.UPDATE_FETCH: _decode_update_fetch,
    Kind.HELLO_ACK: lambda raw, d, c, w: HelloAck(
        device=d, cid=c, registered=_count(raw, "registered", w, 2**32 - 1), neighbours=_count(raw, "r", w, 1024)
    ),
    Kind.REGISTER_ACK: lambda raw, d, c, w: RegisterAck(
        device=d,
        cid=c,
        accepted=_count(raw, "accepted", w, MAX_IDS_PER_MESSAGE),
        registered=_count(raw, "registered", w, 2**32 - 1),
    ),
    Kind.KNOWLEDGE: _decode_knowledge,
    Kind.UPDATE_ACK: lambda raw, d, c, w: UpdateAck(
        device=d,
        cid=c,
        applied=_count(raw, "applied", w, MAX_IDS_PER_MESSAGE),
        stale=_count(raw, "stale", w, MAX_IDS_PER_MESSAGE),
    ),
    Kind.ERROR: _decode_error,
    Kind.FD_UPDATE: _decode_fd_update,
    Kind.FD_GLOBAL: _decode_fd_global,
    Kind.MODEL_PUT: _decode_model_put,
    Kind.MODEL_ACK: lambda raw, d, c, w: ModelAck(
        device=d, cid=c, round=_count(raw, "round", w, _MAX_ROUND), accepted=_count(raw, "accepted", w, 1)
    ),
    Kind.MODEL_GET: lambda raw, d, c, w: ModelGet(
        device=d,
        cid=c,
        round=_count(raw, "round", w, _MAX_ROUND),
        part=_count(raw, "part", w, MAX_MODEL_FLOATS // MODEL_CHUNK_FLOATS),
    ),
    Kind.MODEL_STATE: _decode_model_state,
}
