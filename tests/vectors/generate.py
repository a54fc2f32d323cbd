"""Write the FedCache wire test vectors (`<name>.bin` + `<name>.json`, format in docs/protocol.md §14)."""

# Usage, from the repository root: `python tests/vectors/generate.py` rewrites every vector (output is
# deterministic: no random numbers, only exactly rounded float arithmetic; tests/test_protocol.py checks
# the committed files equal it); `--annotate NAME` prints a diagnostic and annotated hex dump of one.

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedwire import (  # noqa: E402
    MAX_PAYLOAD_BYTES,
    ErrorCode,
    ErrorReply,
    FdGlobal,
    FdUpdate,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    Message,
    ModelAck,
    ModelGet,
    ModelPut,
    ModelState,
    Register,
    RegisterAck,
    TeacherForm,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    encode,
)
from fedwire.constants import MAX_IDS_PER_MESSAGE, Kind  # noqa: E402
from fedwire.fields import Array  # noqa: E402
from fedwire.schema import LOGITS, SCHEMAS  # noqa: E402

HERE = Path(__file__).resolve().parent
F32, F16, I8 = LogitEncoding.FLOAT32, LogitEncoding.FLOAT16, LogitEncoding.INT8
I8B = LogitEncoding.INT8_BLOCK


# ---------------------------------------------------------------- deterministic data


def _u32(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint32)


def _logits(rows: int, cols: int, salt: int) -> np.ndarray:
    """A reproducible (rows, cols) float32 matrix: small integers over 7 and 16, exactly rounded."""
    k = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    numerators = ((k * 37 + salt * 11) % 97 - 48).astype(np.float32)
    return numerators / np.float32(7.0 if salt % 2 else 16.0)


def _sign_bits(rows: int, hash_bytes: int, salt: int) -> np.ndarray:
    k = np.arange(rows * hash_bytes, dtype=np.int64).reshape(rows, hash_bytes)
    return ((k * 73 + salt * 29) % 256).astype(np.uint8)


def _f16_hashes(rows: int, dim: int, salt: int) -> np.ndarray:
    features = _logits(rows, dim, salt).astype("<f2")
    return np.frombuffer(features.tobytes(), dtype=np.uint8).reshape(rows, dim * 2)


# ---------------------------------------------------------------- valid vectors


def _worked_update_fetch(cid: int, encoding: LogitEncoding) -> UpdateFetch:
    """docs/protocol.md's worked example (2 samples x 3 classes, one row all zeros, then fetch 3 ids) in `encoding`."""
    logits = np.asarray([[1.5, -0.75, 0.25], [0.0, 0.0, 0.0]], np.float32)
    return UpdateFetch("dev-01", cid, _u32([7, 9]), logits, 3, _u32([7, 9, 12]), encoding)


def valid_vectors() -> list[tuple[str, str, Message]]:
    """(name, description, message) of every valid vector."""
    vectors: list[tuple[str, str, Message]] = [
        (
            "hello_bin",
            "hello with 64-bit binary (packed sign bit) hashes and two capabilities",
            Hello("phone-a1", 1, "mobilenetv3-small", 10, 5000, HashKind.BINARY, 64, ("update_fetch", "i8")),
        ),
        (
            "hello_f16",
            "hello with 16 float16 hash features, a non-ASCII model name and no capabilities",
            Hello("Pixel_7-0042", 2, "résnet-8", 100, 600, HashKind.FLOAT16, 16),
        ),
        (
            "register_bin",
            "registration chunk of 3 samples with 8-byte (64-bit) binary hashes",
            Register("phone-a1", 3, _u32([0, 1, 2]), np.asarray([3, 9, 0], np.uint16), _sign_bits(3, 8, 1)),
        ),
        (
            "register_f16",
            "registration chunk of 2 samples with 4 float16 features (8 bytes) per hash",
            Register("Pixel_7-0042", 4, _u32([600, 65537]), np.asarray([99, 65535], np.uint16), _f16_hashes(2, 4, 2)),
        ),
        (
            "register_empty",
            "empty registration chunk (no samples), hash_bytes still 8",
            Register("phone-a1", 5, _u32([]), np.zeros(0, np.uint16), np.zeros((0, 8), np.uint8)),
        ),
        ("fetch_f16", "fetch 3 ids, reply logits as float16", Fetch("phone-a1", 6, _u32([5, 1, 4000000000]))),
        ("fetch_i8", "fetch 2 ids, reply logits as int8 with per-row scales", Fetch("phone-a1", 7, _u32([2, 3]), I8)),
        ("fetch_f32", "fetch a single id, reply logits as float32", Fetch("phone-a1", 8, _u32([4]), F32)),
        (
            "fetch_raw",
            "fetch 2 ids asking for every neighbour's logits (teach='raw') as float16",
            Fetch("phone-a1", 9, _u32([2, 3]), F16, TeacherForm.RAW),
        ),
        (
            "update_f32",
            "update of 2 samples x 4 classes as float32; large cid and version use uint64/uint32",
            Update("phone-a1", 2**63 - 1, _u32([10, 11]), _logits(2, 4, 1), 2**40, F32),
        ),
        (
            "update_f16",
            "update of 3 samples x 5 classes as float16",
            Update("phone-a1", 300, _u32([1, 2, 3]), _logits(3, 5, 2), 7, F16),
        ),
        (
            "update_i8",
            "update of 3 samples x 4 classes as int8; the all-zero middle row gets scale 1.0",
            Update(
                "phone-a1",
                70000,
                _u32([20, 21, 22]),
                np.vstack([_logits(1, 4, 3), np.zeros((1, 4)), _logits(1, 4, 4)]),
                0,
                I8,
            ),
        ),
        (
            "update_fetch_i8",
            "the worked example of docs/protocol.md: update 2 samples x 3 classes as int8, then fetch 3 ids",
            _worked_update_fetch(42, I8),
        ),
        (
            "update_fetch_i8b",
            "update_fetch_i8's update with one int8 scale for the block (i8b), then fetch 3 ids",
            _worked_update_fetch(44, I8B),
        ),
        (
            "update_fetch_f16_no_fetch",
            "update_fetch of 2 samples x 3 classes as float16 with an empty fetch_ids",
            UpdateFetch("dev-01", 43, _u32([1, 0]), _logits(2, 3, 6), 4, _u32([]), F16),
        ),
        ("hello_ack", "hello_ack: 1200 samples already registered, 16 neighbours", HelloAck("phone-a1", 1, 1200, 16)),
        ("register_ack", "register_ack: 3 accepted, 1203 registered", RegisterAck("phone-a1", 3, 3, 1203)),
        ("update_ack", "update_ack: 1 applied, 1 stale", UpdateAck("phone-a1", 2**63 - 1, 1, 1)),
        (
            "knowledge_f16",
            "knowledge for 4 ids, two without teacher (count 0) so only 2 logit rows, float16",
            Knowledge("phone-a1", 6, _u32([5, 1, 8, 3]), np.asarray([3, 0, 16, 0], np.uint16), _logits(2, 5, 8), F16),
        ),
        (
            "knowledge_i8",
            "the reply to update_fetch_i8: 3 ids, id 9 without teacher, int8, applied=2 stale=0",
            Knowledge("dev-01", 42, _u32([7, 9, 12]), np.asarray([16, 0, 3], np.uint16), _logits(2, 3, 9), I8, 2, 0),
        ),
        (
            "knowledge_i8b",
            "the reply to update_fetch_i8b: 3 ids, id 9 without teacher, int8 with one scale for both rows",
            Knowledge("dev-01", 44, _u32([7, 9, 12]), np.asarray([16, 0, 3], np.uint16), _logits(2, 3, 9), I8B, 2, 0),
        ),
        (
            "knowledge_f32",
            "knowledge for 1 id as float32",
            Knowledge("phone-a1", 8, _u32([4]), np.asarray([65535], np.uint16), _logits(1, 10, 10), F32),
        ),
        (
            "knowledge_raw_f16",
            "raw knowledge (teach='raw'): 3 ids with counts [2, 0, 1], so 3 logit rows (each neighbour's), float16",
            Knowledge("phone-a1", 11, _u32([5, 1, 8]), np.asarray([2, 0, 1], np.uint16), _logits(3, 5, 13), F16,
                      teacher=TeacherForm.RAW),
        ),
        (
            "knowledge_no_teacher",
            "knowledge where no id has a teacher: zero logit rows, m still 10",
            Knowledge("phone-a1", 9, _u32([1, 2]), np.zeros(2, np.uint16), np.zeros((0, 10), np.float32), F16, 0, 2),
        ),
        (
            "fd_update_f16",
            "federated distillation: per-class mean logits of 3 classes as float16, class 1 without samples",
            FdUpdate("phone-a1", 10, np.vstack([_logits(1, 3, 11), np.zeros((1, 3)), _logits(1, 3, 12)]),
                     np.asarray([12, 0, 70000], np.uint32), 5, F16),
        ),
        (
            "fd_global_i8",
            "the leave-one-out global per-class teacher, int8; class 2 has no teacher (count 0, zero row)",
            FdGlobal("phone-a1", 10, np.vstack([_logits(2, 3, 13), np.zeros((1, 3))]),
                     np.asarray([40, 7, 0], np.uint32), I8, 1),
        ),
        (
            "model_put",
            "FedAvg: part 0 of a 4-float model for round 2, weight 300 samples",
            ModelPut("phone-a1", 11, 2, "cnn", 300, 4, 0, np.asarray([0.5, -1.25, 3.0, 0.0], np.float32)),
        ),
        ("model_ack", "FedAvg: the part was accepted; round 2 still open", ModelAck("phone-a1", 11, 2, 1)),
        ("model_get", "FedAvg: ask for part 0 of round 2's global model", ModelGet("phone-a1", 12, 2, 0)),
        (
            "model_state",
            "FedAvg: part 0 of round 2's global model, the average of 3 devices",
            ModelState("phone-a1", 12, 2, 1, 3, 4, 0, np.asarray([0.25, -1.0, 2.5, 0.125], np.float32)),
        ),
        (
            "model_state_pending",
            "FedAvg: round 2 is still open (ready 0, no params)",
            ModelState("phone-a1", 13, 2, 0, 0, 0, 0, np.zeros(0, np.float32)),
        ),
    ]  # fmt: skip
    for i, code in enumerate(ErrorCode):
        request = "" if code in (ErrorCode.TOO_LARGE, ErrorCode.BAD_ENCODING) else "update_fetch"
        cid = 0 if not request else 100 + i
        vectors.append(
            (
                f"error_{code.value}",
                f"error reply with code {code.value}"
                + (" to an undecodable request (c=0, re='')" if not request else ""),
                ErrorReply("dev-01", cid, code, f"example message for {code.value}", request),
            )
        )
    return vectors


def fields_of(message: Message) -> dict[str, Any]:
    """The decoded meaning of a message as JSON-ready values."""
    out: dict[str, Any] = {}
    for name, value in vars(message).items():
        if isinstance(value, np.ndarray):
            out[name] = value.tolist()
            if value.ndim == 2:
                out[name + "_shape"] = list(value.shape)
        elif isinstance(value, tuple):
            out[name] = list(value)
        elif hasattr(value, "value"):  # the StrEnums
            out[name] = value.value
        else:
            out[name] = value
    return out


def _jsonable_wire(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, dict):
        return {key: _jsonable_wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable_wire(item) for item in value]
    return value


def stable_bytes(message: Message) -> tuple[bytes, Message]:
    """Encode until decode-then-encode reproduces the bytes, so the JSON meaning re-encodes exactly."""
    payload = encode(message)
    for _ in range(4):
        decoded = decode(payload)
        again = encode(decoded)
        if again == payload:
            return payload, decoded
        payload = again
    raise RuntimeError(f"{message.kind} does not reach a fixed point under decode/encode")


# ---------------------------------------------------------------- invalid vectors


def _pack(document: Any) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


def _wire(message: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(message), raw=False)


def _with(message: Message, **changes: Any) -> bytes:
    document = _wire(message)
    for key, value in changes.items():
        if value is None:
            del document[key]
        else:
            document[key] = value
    return _pack(document)


def _with_logits(message: Message, **changes: Any) -> bytes:
    document = _wire(message)
    document["logits"].update(changes)
    return _pack(document)


def invalid_vectors() -> list[tuple[str, str, bytes, ErrorCode]]:
    """(name, description, payload, expected error) of every invalid vector; each breaks exactly one rule."""
    hello = Hello("phone-a1", 1, "m", 10, 5, HashKind.BINARY, 64)
    fetch = Fetch("phone-a1", 2, _u32([1, 2]))
    register = Register("phone-a1", 3, _u32([1, 2]), np.asarray([0, 1], np.uint16), _sign_bits(2, 8, 0))
    update = Update("phone-a1", 4, _u32([1, 2]), _logits(2, 3, 0), 1, F32)
    knowledge = Knowledge("phone-a1", 5, _u32([1, 2]), np.asarray([1, 0], np.uint16), _logits(1, 3, 0), F32)
    ack = HelloAck("phone-a1", 6, 0, 16)
    nan_f32 = np.asarray([[1.0, np.nan, 0.0], [0.0, 0.0, 0.0]], "<f4").tobytes()
    inf_f16 = np.asarray([[1.0, 2.0, 3.0], [np.inf, 0.0, 0.0]], "<f2").tobytes()
    valid = encode(fetch)
    return [
        ("invalid_garbage", "0xc1 is never used by msgpack", b"\xc1\x00\xff", ErrorCode.BAD_ENCODING),
        ("invalid_empty", "zero-length payload", b"", ErrorCode.BAD_ENCODING),
        ("invalid_truncated", "a valid fetch without its last byte", valid[:-1], ErrorCode.BAD_ENCODING),
        ("invalid_trailing_bytes", "a valid fetch followed by one extra byte", valid + b"\x00", ErrorCode.BAD_ENCODING),
        (
            "invalid_bad_utf8",
            "hello whose model str holds the bytes ff fe (not UTF-8)",
            _with(hello, model="zz").replace(b"\xa2zz", b"\xa2\xff\xfe"),
            ErrorCode.BAD_ENCODING,
        ),
        ("invalid_int_map_key", "a map key that is an integer", _pack({1: 1, "v": 1}), ErrorCode.BAD_ENCODING),
        ("invalid_not_a_map", "a msgpack array instead of a map", _pack([1, "fetch"]), ErrorCode.BAD_SCHEMA),
        ("invalid_version_2", "v=2", _with(fetch, v=2), ErrorCode.BAD_VERSION),
        ("invalid_version_missing", "no v field", _with(fetch, v=None), ErrorCode.BAD_VERSION),
        ("invalid_unknown_kind", "k='ping'", _with(fetch, k="ping"), ErrorCode.BAD_SCHEMA),
        ("invalid_missing_field", "fetch without enc", _with(fetch, enc=None), ErrorCode.BAD_SCHEMA),
        ("invalid_bool_for_int", "hello_ack with registered=true", _with(ack, registered=True), ErrorCode.BAD_SCHEMA),
        (
            "invalid_str_for_bin",
            "fetch ids sent as msgpack str",
            _with(fetch, ids="\x01\x00\x00\x00"),
            ErrorCode.BAD_SCHEMA,
        ),
        (
            "invalid_ids_not_u32",
            "fetch ids of 7 bytes",
            _with(fetch, ids=b"\x01\x00\x00\x00\x02\x00\x00"),
            ErrorCode.BAD_DTYPE,
        ),
        ("invalid_duplicate_ids", "fetch ids [1, 1]", _with(fetch, ids=_u32([1, 1]).tobytes()), ErrorCode.BAD_SHAPE),
        (
            "invalid_too_many_ids",
            f"fetch of {MAX_IDS_PER_MESSAGE + 1} ids",
            _with(fetch, ids=np.arange(MAX_IDS_PER_MESSAGE + 1, dtype="<u4").tobytes()),
            ErrorCode.TOO_LARGE,
        ),
        (
            "invalid_labels_length",
            "register with 2 ids but 3 labels",
            _with(register, labels=b"\x00\x00" * 3),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "invalid_hashes_length",
            "register with 2 ids, hash_bytes 8 but 15 hash bytes",
            _with(register, hashes=bytes(15)),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "invalid_logits_nan_f32",
            "update logits with a NaN (f32)",
            _with_logits(update, b=nan_f32),
            ErrorCode.NON_FINITE,
        ),
        (
            "invalid_logits_inf_f16",
            "update logits with +inf (f16)",
            _with_logits(update, e="f16", b=inf_f16),
            ErrorCode.NON_FINITE,
        ),
        (
            "invalid_logits_inf_scale_i8",
            "update logits as int8 with an infinite row scale",
            _with_logits(update, e="i8", b=bytes(6), s=struct.pack("<2f", 1.0, float("inf"))),
            ErrorCode.NON_FINITE,
        ),
        (
            "invalid_logits_overflow_i8",
            "int8 logits whose finite scale overflows float32 when applied",
            _with_logits(update, e="i8", b=b"\x7f" * 6, s=struct.pack("<2f", 1.0, 3.0e38)),
            ErrorCode.NON_FINITE,
        ),
        (
            "invalid_logits_row_scales_i8b",
            "int8-block logits (i8b) carrying a scale per row instead of one",
            _with_logits(update, e="i8b", b=bytes(6), s=struct.pack("<2f", 1.0, 1.0)),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "invalid_logits_bytes",
            "update logits n=2 m=3 f32 with 20 bytes",
            _with_logits(update, b=bytes(20)),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "invalid_logit_rows",
            "update with 2 ids but 1 logit row",
            _with_logits(update, n=1, b=_logits(1, 3, 0).astype("<f4").tobytes()),
            ErrorCode.BAD_SHAPE,
        ),
        (
            "invalid_knowledge_raw_rows",
            "raw knowledge with counts [1, 0] (1 neighbour row) but 2 logit rows",
            _with_logits(replace(knowledge, teacher=TeacherForm.RAW), n=2, b=_logits(2, 3, 0).astype("<f4").tobytes()),
            ErrorCode.BAD_SHAPE,
        ),
        ("invalid_teacher_form", "fetch with teach='median'", _with(fetch, teach="median"), ErrorCode.BAD_SCHEMA),
        (
            "invalid_knowledge_rows",
            "knowledge with 1 teacher (counts [1, 0]) but 2 logit rows",
            _with_logits(knowledge, n=2, b=_logits(2, 3, 0).astype("<f4").tobytes()),
            ErrorCode.BAD_SHAPE,
        ),
        ("invalid_unknown_encoding", "logits e='bf16'", _with_logits(update, e="bf16"), ErrorCode.BAD_SCHEMA),
        ("invalid_device_id", "device id with a '/'", _with(fetch, d="phone/a1"), ErrorCode.BAD_SCHEMA),
        ("invalid_device_id_long", "device id of 65 characters", _with(fetch, d="a" * 65), ErrorCode.BAD_SCHEMA),
        ("invalid_negative_cid", "c=-1", _with(fetch, c=-1), ErrorCode.BAD_SCHEMA),
        ("invalid_huge_cid", "c=2^63", _with(fetch, c=2**63), ErrorCode.BAD_SCHEMA),
        ("invalid_negative_version", "update ver=-1", _with(update, ver=-1), ErrorCode.BAD_SHAPE),
        (
            "invalid_hash_dim_bits",
            "hello bin with hash_dim=60 (not whole bytes)",
            _with(hello, hash_dim=60),
            ErrorCode.BAD_SHAPE,
        ),
        ("invalid_classes_one", "hello with classes=1", _with(hello, classes=1), ErrorCode.BAD_SHAPE),
        ("invalid_classes_too_many", "hello with classes=1001", _with(hello, classes=1001), ErrorCode.BAD_SHAPE),
        (
            "invalid_model_too_long",
            "hello with a 65-character model name",
            _with(hello, model="m" * 65),
            ErrorCode.TOO_LARGE,
        ),
    ]


# ---------------------------------------------------------------- output


def _dump(value: Any, indent: int = 0) -> str:
    """JSON with one line per scalar list (or matrix row), for diff-friendly vector files."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        if not value or list(value) == ["bin"]:
            return json.dumps(value)
        items = [f"{pad}{json.dumps(key)}: {_dump(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        rows = [pad + _dump(item, indent + 1) for item in value]
        return "[\n" + ",\n".join(rows) + "\n" + "  " * indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def build() -> dict[str, bytes]:
    """Every vector file name with its exact content."""
    files: dict[str, bytes] = {}
    for name, description, message in valid_vectors():
        payload, decoded = stable_bytes(message)
        meaning = {
            "name": name,
            "description": description,
            "kind": decoded.kind.value,
            "fields": fields_of(decoded),
            "wire": _jsonable_wire(msgpack.unpackb(payload, raw=False)),
        }
        files[name + ".bin"] = payload
        files[name + ".json"] = (_dump(meaning) + "\n").encode()
    for name, description, payload, code in invalid_vectors():
        assert len(payload) <= MAX_PAYLOAD_BYTES
        files[name + ".bin"] = payload
        files[name + ".json"] = (_dump({"name": name, "description": description, "error": code.value}) + "\n").encode()
    return files


# ---------------------------------------------------------------- annotated dump


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _head(reader: _Reader) -> tuple[str, Any, str]:
    """Read one msgpack item header; return (family, value or length, format name)."""
    b = reader.uint(1)
    if b <= 0x7F:
        return "int", b, "positive fixint"
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F, "fixmap"
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F, "fixarray"
    if 0xA0 <= b <= 0xBF:
        return "str", b & 0x1F, "fixstr"
    if b >= 0xE0:
        return "int", b - 0x100, "negative fixint"
    sized = {
        0xC4: ("bin", 1, "bin8"),
        0xC5: ("bin", 2, "bin16"),
        0xC6: ("bin", 4, "bin32"),
        0xD9: ("str", 1, "str8"),
        0xDA: ("str", 2, "str16"),
        0xDB: ("str", 4, "str32"),
        0xDC: ("array", 2, "array16"),
        0xDD: ("array", 4, "array32"),
        0xDE: ("map", 2, "map16"),
        0xDF: ("map", 4, "map32"),
    }
    if b in sized:
        family, width, name = sized[b]
        return family, reader.uint(width), name
    unsigned = {0xCC: (1, "uint8"), 0xCD: (2, "uint16"), 0xCE: (4, "uint32"), 0xCF: (8, "uint64")}
    if b in unsigned:
        width, name = unsigned[b]
        return "int", reader.uint(width), name
    signed = {0xD0: (1, "int8"), 0xD1: (2, "int16"), 0xD2: (4, "int32"), 0xD3: (8, "int64")}
    if b in signed:
        width, name = signed[b]
        return "int", int.from_bytes(reader.take(width), "big", signed=True), name
    simple = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in simple:
        return "simple", simple[b], {0xC0: "nil", 0xC2: "false", 0xC3: "true"}[b]
    raise ValueError(f"byte 0x{b:02x} is outside the subset this annotator reads")


def _layout(context: dict[str, Any], key: str | None) -> str | None:
    """The element type of the bin under `key` as the schema declares it; None for plain bytes (hashes)."""
    kind, encoding = context.get("k"), context.get("e")
    if key == "b" and encoding in {e.value for e in LogitEncoding}:
        dtype = LOGITS.data[LogitEncoding(encoding)].dtype
    elif key == "s":
        dtype = LOGITS.scales.dtype
    else:
        fields = SCHEMAS[Kind(kind)].fields if kind in {k.value for k in Kind} else ()
        spec = next((field for field in fields if field.key == key), None)
        if not isinstance(spec, Array) or spec.dtype.itemsize == 1:
            return None
        dtype = spec.dtype
    return dtype.str.lstrip("|")


def annotate(payload: bytes) -> str:
    """A line per msgpack token: offset, bytes, and what they mean (bin values decoded by key)."""
    reader = _Reader(payload)
    lines: list[str] = []
    context: dict[str, Any] = {}

    def emit(start: int, label: str) -> None:
        raw = payload[start : reader.at]
        for i in range(0, max(len(raw), 1), 12):
            chunk = " ".join(f"{byte:02x}" for byte in raw[i : i + 12])
            lines.append(f"{start + i:04x}  {chunk:<35} {label if i == 0 else ''}".rstrip())

    def item(depth: int, key: str | None) -> Any:
        start = reader.at
        family, value, fmt = _head(reader)
        pad = "  " * depth
        if family in ("str", "bin"):
            data = reader.take(value)
            if family == "str":
                text = data.decode()
                emit(start, f"{pad}{fmt} {json.dumps(text, ensure_ascii=False)}")
                return text
            layout = _layout(context, key)
            if layout:
                numbers = ", ".join(str(number) for number in np.frombuffer(data, dtype=layout))
                shown = f"{value} bytes = {layout} [{numbers}]"
            else:
                shown = f"{value} bytes"
            emit(start, f"{pad}{fmt}, {shown}")
            return data
        if family == "map":
            emit(start, f"{pad}{fmt}, {value} entries")
            for _ in range(value):
                name = item(depth + 1, None)
                val = item(depth + 2, name)
                if isinstance(name, str) and isinstance(val, str):
                    context[name] = val
            return None
        if family == "array":
            emit(start, f"{pad}{fmt}, {value} items")
            for _ in range(value):
                item(depth + 1, None)
            return None
        emit(start, f"{pad}{fmt} {json.dumps(value)}")
        return value

    item(0, None)
    return "\n".join(lines)


def diagnostic(payload: bytes) -> str:
    """A msgpack diagnostic (JSON with h'hex' for bin) of one document."""

    def show(value: Any) -> str:
        if isinstance(value, bytes):
            return f"h'{value.hex()}'"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{show(k)}: {show(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=False)

    return show(msgpack.unpackb(payload, raw=False))


def main() -> None:
    """Write every vector next to this script, or print one vector's annotated dump."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotate", metavar="NAME", help="print a diagnostic and hex dump of NAME.bin instead")
    args = parser.parse_args()
    files = build()
    if args.annotate:
        payload = files[args.annotate + ".bin"]
        print(f"{len(payload)} bytes\n\n{diagnostic(payload)}\n\n{annotate(payload)}")
        return
    for stale in [*HERE.glob("*.bin"), *HERE.glob("*.json")]:
        if stale.name not in files:
            stale.unlink()
    for name, content in files.items():
        (HERE / name).write_bytes(content)
    print(f"wrote {len(files)} files to {HERE}")


if __name__ == "__main__":
    main()
