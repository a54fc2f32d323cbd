"""The wire schema: every message's fields, wire keys, types and bounds, declared once (docs/protocol.md §4-§8, §16)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedwire.arrays import F32, U8, U16, U32
from fedwire.chunks import model_part_bounds, model_parts
from fedwire.constants import (
    DEVICE_ID_PATTERN,
    MAX_CLASSES,
    MAX_HASH_BYTES,
    MAX_IDS_PER_MESSAGE,
    MAX_MODEL_FLOATS,
    MAX_MODEL_NAME_LEN,
    MODEL_CHUNK_FLOATS,
    PROTOCOL_VERSION,
    ErrorCode,
    HashKind,
    Kind,
    LogitEncoding,
    TeacherForm,
)
from fedwire.fields import Array, Check, Choice, Const, Field, Int, Logits, OptionalField, Schema, Tags, Text
from fedwire.messages import (
    ErrorReply,
    FdGlobal,
    FdUpdate,
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
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

__all__ = ["CID", "ENVELOPE", "LOGITS", "SCHEMAS"]

U32_MAX = 2**32 - 1
I64_MAX = 2**63 - 1
MAX_NEIGHBOURS = 1024
MAX_PARTS = MAX_MODEL_FLOATS // MODEL_CHUNK_FLOATS
MAX_CAPS = 64  # tags in a hello's caps, and characters in one tag
MAX_ERROR_TEXT = 4096
MAX_REQUEST_TEXT = 64  # an error's `re`: the rejected request's kind

# ---------------------------------------------------------------- envelope (§4) and the logits block (§6)

CID = Int("c", "cid", high=I64_MAX, code=ErrorCode.BAD_SCHEMA)
ENVELOPE: tuple[Field, ...] = (
    Const("v", PROTOCOL_VERSION, code=ErrorCode.BAD_VERSION),  # checked before anything else in the map
    Choice("k", "kind", enum=Kind),
    Text("d", "device", pattern=DEVICE_ID_PATTERN),  # the pattern bounds it to MAX_DEVICE_ID_LEN characters
    CID,
)

LOGITS = Logits("logits")  # "logits" -> the matrix and, from its "e", the message's `encoding`
TEACHER = OptionalField(Choice("teach", "teacher", enum=TeacherForm), default=TeacherForm.MEAN)


def _ids(key: str = "ids", attr: str | None = None) -> Array:
    """Sample ids: uint32, at most MAX_IDS_PER_MESSAGE of them, none twice."""
    return Array(key, attr, dtype=U32, max_count=MAX_IDS_PER_MESSAGE, distinct=True)


# ---------------------------------------------------------------- shape rules (from the fields before an array)


def _per_id(values: Mapping[str, Any]) -> tuple[int, ...]:
    """One element per id."""
    return (values["ids"].size,)


def _hash_rows(values: Mapping[str, Any]) -> tuple[int, ...]:
    """One row of hash_bytes per id."""
    return values["ids"].size, values["hash_bytes"]


def _per_class(values: Mapping[str, Any]) -> tuple[int, ...]:
    """One element per row of the class table."""
    return (values["logits"].shape[0],)


def _part_floats(values: Mapping[str, Any]) -> tuple[int, ...]:
    """The floats of part `part` of a `size`-float model (none for a part past its end)."""
    start, stop = model_part_bounds(values["size"], values["part"])
    return (max(0, stop - start),)


def _state_floats(values: Mapping[str, Any]) -> tuple[int, ...]:
    """A ready model state carries its part's floats, a pending one none."""
    return _part_floats(values) if values["ready"] else (0,)


def _hash_row_bytes(message: Register) -> int:
    return int(message.hashes.shape[1])


# ---------------------------------------------------------------- checks across fields


def _hash_dim_fits_kind(values: Mapping[str, Any]) -> str | None:
    # A register chunk carries at most MAX_HASH_BYTES per sample: 8 bits per byte, or 2 bytes per float16.
    dim, kind = values["hash_dim"], values["hash_kind"]
    if kind is HashKind.BINARY and dim % 8:
        return f"hash_dim={dim} is not a whole number of bytes"
    if kind is HashKind.FLOAT16 and dim > MAX_HASH_BYTES // 2:
        return f"hash_dim={dim} float16 features exceed {MAX_HASH_BYTES} bytes"
    return None


def _logit_rows_match_ids(values: Mapping[str, Any]) -> str | None:
    ids, rows = values["ids"].size, values["logits"].shape[0]
    return None if rows == ids else f"{ids} ids but {rows} logit rows"


def _logit_rows_match_teachers(values: Mapping[str, Any]) -> str | None:
    # A mean reply has one row per id with a teacher; a raw one a row per contributing neighbour.
    counts, teacher = values["counts"], values["teacher"]
    wanted = int(np.count_nonzero(counts)) if teacher is TeacherForm.MEAN else int(counts.sum(dtype=np.int64))
    rows = values["logits"].shape[0]
    return None if rows == wanted else f"{rows} logit rows where its {teacher.value} counts need {wanted}"


def _class_table_is_square(values: Mapping[str, Any]) -> str | None:
    rows, cols = values["logits"].shape
    return None if rows == cols >= 2 else f"logits must be classes x classes (>= 2), got {rows} x {cols}"


def _part_in_model(values: Mapping[str, Any]) -> str | None:
    size, part = values["size"], values["part"]
    if size == 0:
        return "size must be at least 1"
    return None if part < model_parts(size) else f"part={part} but a {size}-float model has {model_parts(size)}"


def _ready_part_in_model(values: Mapping[str, Any]) -> str | None:
    return _part_in_model(values) if values["ready"] else None


HASH_DIM_FITS_KIND = Check(name="hash_dim fits hash_kind", code=ErrorCode.BAD_SHAPE, violation=_hash_dim_fits_kind)
LOGIT_ROWS_MATCH_IDS = Check(name="logit rows = ids", code=ErrorCode.BAD_SHAPE, violation=_logit_rows_match_ids)
LOGIT_ROWS_MATCH_TEACHERS = Check(
    name="logit rows = teachers", code=ErrorCode.BAD_SHAPE, violation=_logit_rows_match_teachers
)
CLASS_TABLE_IS_SQUARE = Check(
    name="classes x classes table", code=ErrorCode.BAD_SHAPE, violation=_class_table_is_square
)
PART_IN_MODEL = Check(name="part within the model", code=ErrorCode.BAD_SHAPE, violation=_part_in_model)
READY_PART_IN_MODEL = Check(
    name="ready part within the model", code=ErrorCode.BAD_SHAPE, violation=_ready_part_in_model
)

# ---------------------------------------------------------------- messages (§8), in canonical wire order

_SCHEMAS = (
    Schema(
        Hello,
        (
            Text("model", max_len=MAX_MODEL_NAME_LEN),
            Int("classes", low=2, high=MAX_CLASSES),
            Int("samples", high=U32_MAX),
            Choice("hash_kind", enum=HashKind),
            Int("hash_dim", low=1, high=MAX_HASH_BYTES * 8),
            Tags("caps", "capabilities", max_items=MAX_CAPS, max_len=MAX_CAPS),
        ),
        checks=(HASH_DIM_FITS_KIND,),
    ),
    Schema(
        Register,
        (
            _ids(),
            Array("labels", dtype=U16, shape=_per_id),
            Int("hash_bytes", high=MAX_HASH_BYTES, derive=_hash_row_bytes),  # wire-only: the width of `hashes`
            Array("hashes", dtype=U8, shape=_hash_rows),
        ),
    ),
    Schema(Fetch, (_ids(), Choice("enc", "encoding", enum=LogitEncoding), TEACHER)),
    Schema(Update, (_ids(), Int("ver", "version", high=I64_MAX), LOGITS), checks=(LOGIT_ROWS_MATCH_IDS,)),
    Schema(
        UpdateFetch,
        (_ids(), Int("ver", "version", high=I64_MAX), LOGITS, _ids("fetch_ids"), TEACHER),
        checks=(LOGIT_ROWS_MATCH_IDS,),
    ),
    Schema(HelloAck, (Int("registered", high=U32_MAX), Int("r", "neighbours", high=MAX_NEIGHBOURS))),
    Schema(RegisterAck, (Int("accepted", high=MAX_IDS_PER_MESSAGE), Int("registered", high=U32_MAX))),
    Schema(
        Knowledge,
        (
            _ids(),
            Array("counts", dtype=U16, shape=_per_id),
            LOGITS,
            Int("applied", high=MAX_IDS_PER_MESSAGE),
            Int("stale", high=MAX_IDS_PER_MESSAGE),
            TEACHER,
        ),
        checks=(LOGIT_ROWS_MATCH_TEACHERS,),
    ),
    Schema(UpdateAck, (Int("applied", high=MAX_IDS_PER_MESSAGE), Int("stale", high=MAX_IDS_PER_MESSAGE))),
    Schema(
        ErrorReply,
        (
            Choice("code", enum=ErrorCode),
            Text("msg", "message", max_len=MAX_ERROR_TEXT),
            Text("re", "request", max_len=MAX_REQUEST_TEXT),
        ),
    ),
    # Baselines of the comparison (§16).
    Schema(
        FdUpdate,
        (LOGITS, Array("counts", "class_counts", dtype=U32, shape=_per_class), Int("ver", "version", high=I64_MAX)),
        checks=(CLASS_TABLE_IS_SQUARE,),
    ),
    Schema(
        FdGlobal,
        (LOGITS, Array("counts", "class_counts", dtype=U32, shape=_per_class), Int("applied", high=1)),
        checks=(CLASS_TABLE_IS_SQUARE,),
    ),
    Schema(
        ModelPut,
        (
            Int("round", high=U32_MAX),
            Text("model", max_len=MAX_MODEL_NAME_LEN),
            Int("samples", high=U32_MAX),
            Int("size", low=1, high=MAX_MODEL_FLOATS),
            Int("part", high=MAX_PARTS),
            Array("params", dtype=F32, shape=_part_floats, finite=True, decoded=np.float32),
        ),
        checks=(PART_IN_MODEL,),
    ),
    Schema(ModelAck, (Int("round", high=U32_MAX), Int("accepted", high=1))),
    Schema(ModelGet, (Int("round", high=U32_MAX), Int("part", high=MAX_PARTS))),
    Schema(
        ModelState,
        (
            Int("round", high=U32_MAX),
            Int("ready", high=1),
            Int("participants", high=U32_MAX),
            Int("size", high=MAX_MODEL_FLOATS),
            Int("part", high=MAX_PARTS),
            Array("params", dtype=F32, shape=_state_floats, finite=True, decoded=np.float32),
        ),
        checks=(READY_PART_IN_MODEL,),
    ),
)
SCHEMAS: dict[Kind, Schema] = {schema.kind: schema for schema in _SCHEMAS}
