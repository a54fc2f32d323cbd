"""Constants of the FedCache wire protocol shared by the device runtime and the cache server."""

from __future__ import annotations

import re
from enum import StrEnum

PROTOCOL_VERSION = 1
TOPIC_ROOT = "fedcache/v1"
SERVER_SHARE_GROUP = "fedcache-server"

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_IDS_PER_MESSAGE = 8192
# Samples per register message a device sends (registration is resumable chunk by chunk).
REGISTER_CHUNK = 2048
MAX_CLASSES = 1000
MAX_HASH_BYTES = 4096
MAX_DEVICE_ID_LEN = 64
MAX_MODEL_NAME_LEN = 64
# FedAvg baseline: a model travels as one flat float32 vector, cut into parts of MODEL_CHUNK_FLOATS
# (the last part shorter), so one part (1 MiB of float32) always fits MAX_PAYLOAD_BYTES with room to spare.
MODEL_CHUNK_FLOATS = 1 << 18
MAX_MODEL_FLOATS = 1 << 28
# A leading underscore is reserved for the server's own topics (fedcache/v1/_server/status).
DEVICE_ID_PATTERN = re.compile(rf"\A[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_DEVICE_ID_LEN - 1}}}\Z")

DEFAULT_NEIGHBOURS = 16
DEFAULT_QOS = 1
# A device's session lives on in the broker this long after it disconnects, so replies wait for it.
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600


class Kind(StrEnum):
    """Message kinds; the request kinds double as the last level of a device's `up` topic."""

    HELLO = "hello"
    REGISTER = "register"
    FETCH = "fetch"
    UPDATE = "update"
    UPDATE_FETCH = "update_fetch"
    # Baselines of the comparison (docs/protocol.md §16): federated distillation and FedAvg.
    FD_UPDATE = "fd_update"
    MODEL_PUT = "model_put"
    MODEL_GET = "model_get"
    HELLO_ACK = "hello_ack"
    REGISTER_ACK = "register_ack"
    KNOWLEDGE = "knowledge"
    UPDATE_ACK = "update_ack"
    ERROR = "error"
    FD_GLOBAL = "fd_global"
    MODEL_ACK = "model_ack"
    MODEL_STATE = "model_state"


REQUEST_KINDS = frozenset(
    {
        Kind.HELLO,
        Kind.REGISTER,
        Kind.FETCH,
        Kind.UPDATE,
        Kind.UPDATE_FETCH,
        Kind.FD_UPDATE,
        Kind.MODEL_PUT,
        Kind.MODEL_GET,
    }
)
REPLY_KINDS = frozenset(
    {
        Kind.HELLO_ACK,
        Kind.REGISTER_ACK,
        Kind.KNOWLEDGE,
        Kind.UPDATE_ACK,
        Kind.ERROR,
        Kind.FD_GLOBAL,
        Kind.MODEL_ACK,
        Kind.MODEL_STATE,
    }
)


class HashKind(StrEnum):
    """How a sample's hash is carried: packed sign bits or float16 features."""

    BINARY = "bin"
    FLOAT16 = "f16"


class LogitEncoding(StrEnum):
    """Encodings of a logit matrix on the wire."""

    FLOAT32 = "f32"
    FLOAT16 = "f16"
    INT8 = "i8"
    # int8 with one float32 scale for the whole matrix: 4 B per message instead of per row, for a coarser step on
    # rows smaller than the matrix's largest (docs/protocol.md §6).
    INT8_BLOCK = "i8b"


class TeacherForm(StrEnum):
    """What a knowledge reply carries per sample: the server-side mean of the neighbours' logits, or each of them.

    RAW is FedCache's costlier variant, kept to measure what averaging at the server saves: up to R rows
    per sample come down and the device takes the mean itself.
    """

    MEAN = "mean"
    RAW = "raw"


class ErrorCode(StrEnum):
    """Codes of an error reply; the message beside the code says what exactly was wrong."""

    TOO_LARGE = "too_large"
    BAD_ENCODING = "bad_encoding"
    BAD_VERSION = "bad_version"
    BAD_SCHEMA = "bad_schema"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_SAMPLE = "unknown_sample"
    CLASS_MISMATCH = "class_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    INTERNAL = "internal"
    MODEL_MISMATCH = "model_mismatch"  # FedAvg baseline: another architecture than the one averaged
