"""Encode and decode FedCache messages as msgpack maps by walking the declarations of fedwire/schema.py.

Decoding validates everything a message carries (size, version, schema, dtypes, shapes, finite
values) and raises `ProtocolError` with an `ErrorCode` (and the correlation id, once the map has a
valid one), so no malformed input gets past it. The layout is specified in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from fedwire.chunks import model_part_bounds, model_parts
from fedwire.constants import DEVICE_ID_PATTERN, MAX_PAYLOAD_BYTES, ErrorCode, LogitEncoding
from fedwire.errors import ProtocolError
from fedwire.messages import Message
from fedwire.schema import CID, ENVELOPE, LOGITS, SCHEMAS

# model_part_bounds, model_parts and DEVICE_ID_PATTERN stay importable from here for existing callers.
__all__ = [
    "DEVICE_ID_PATTERN",
    "ProtocolError",
    "as_received",
    "decode",
    "encode",
    "encode_logits",
    "model_part_bounds",
    "model_parts",
]


def encode(message: Message) -> bytes:
    """Serialise any message to its wire bytes."""
    body: dict[str, Any] = {}
    for spec in ENVELOPE:
        spec.emit(message, body)
    SCHEMAS[message.kind].emit(message, body)
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return payload


def decode(payload: bytes) -> Message:
    """Parse and validate wire bytes; raises ProtocolError on anything malformed."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}", cid=_peek_cid(payload)
        )
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"not a msgpack document ({type(exc).__name__})") from None
    if type(raw) is not dict:
        raise ProtocolError(ErrorCode.BAD_SCHEMA, "message must be a msgpack map")
    values: dict[str, Any] = {}
    try:
        for spec in ENVELOPE:
            spec.unpack(raw, values, where="message")
        return SCHEMAS[values.pop("kind")].build(raw, values)
    except ProtocolError as error:
        cid = raw.get(CID.key)
        error.cid = cid if CID.accepts(cid) else None
        raise


def _peek_cid(payload: bytes) -> int | None:
    """The valid `c` of an oversized payload's top-level map, if it has one, skipping the values around it."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(payload))
    unpacker.feed(payload)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == CID.key:
                cid = unpacker.unpack()
                return cid if CID.accepts(cid) else None
            unpacker.skip()
    except Exception:  # not a map, or broken before its `c`
        return None
    return None


def encode_logits(logits: np.ndarray, encoding: LogitEncoding) -> dict[str, Any]:
    """The logits block (a msgpack-ready map) of an (n, classes) float matrix; int8 carries a float32 scale per row."""
    return LOGITS.pack(logits, encoding)


def as_received(logits: np.ndarray, encoding: LogitEncoding) -> np.ndarray:
    """The float32 values the other side decodes from `logits` sent with `encoding` (what the server stores)."""
    return LOGITS.read(encode_logits(logits, encoding), "logits")[0]
