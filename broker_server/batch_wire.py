"""The wire on the server's hot path: fetch / update / update_fetch payloads checked per message, decoded per batch.

`scan()` accepts a payload only when `fedwire.decode` would accept it and the server's envelope check
(`device` and `kind` the topic names) would pass, and then returns its fields still as bytes; anything it
does not accept goes to the generic decoder, which says exactly what is wrong. Float decoding and finite
values are checked for a whole batch at once (`decode_logits`, `finite_rows`).
`ReplyWriter` writes the same bytes as `fedwire.encode` of the reply.
tests/test_batched_path.py pins both directions against fedwire's codec.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

from fedwire.arrays import (
    BLOCK_SCALED_ENCODINGS,
    LOGIT_DTYPES,
    SCALED_ENCODINGS,
    int8_elements,
    int8_scales,
    quantise_logits,
)
from fedwire.constants import MAX_CLASSES, MAX_IDS_PER_MESSAGE, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, LogitEncoding

I64_MAX = 2**63 - 1
MAX_ID_BYTES = 4 * MAX_IDS_PER_MESSAGE
FAST_KINDS = frozenset({"fetch", "update", "update_fetch"})
_ITEMSIZE = {e.value: dtype.itemsize for e, dtype in LOGIT_DTYPES.items()}
_DTYPES = {e.value: dtype for e, dtype in LOGIT_DTYPES.items()}
_SCALED = frozenset(e.value for e in SCALED_ENCODINGS)  # `s`: one float32 scale per row
_BLOCK_SCALED = frozenset(e.value for e in BLOCK_SCALED_ENCODINGS)  # `s`: one float32 scale per message
_F32 = np.dtype("<f4")
_U32 = np.dtype("<u4")
_SET_LIMIT = 256  # up to this many ids a Python set checks repeats faster than numpy's sort
_unpackb = msgpack.unpackb


class Scanned(NamedTuple):
    """A fetch, update or update_fetch whose map passed every per-message rule; its arrays are still bytes."""

    kind: str
    device: str
    cid: int
    ids: bytes  # uint32 LE: the update's ids, or a fetch's ids
    fetch_ids: bytes | None  # uint32 LE: the ids to fetch (update_fetch: `fetch_ids`; fetch: `ids`); None: update
    version: int  # -1 for a fetch
    encoding: str  # the logits' `e` (update, update_fetch) or `enc` (fetch): the reply's encoding
    rows: int  # logits rows (n), 0 for a fetch
    cols: int  # logits columns (m), 0 for a fetch
    data: bytes  # logits `b`
    scales: bytes | None  # logits `s` of a scaled encoding: one float32 per row (i8) or one for the block (i8b)
    payload: bytes  # the message as received, for the per-message path should the batch find it invalid


def scan(payload: bytes, *, device: str, kind: str) -> Scanned | None:
    """The fields of a fetch / update / update_fetch `payload` from `device`'s `kind` topic, or None.

    None means "not certainly valid" (also for a valid `teach: raw` fetch): the caller hands the payload to
    the generic path. Not checked here, and left to the batch: finite logits and scales, the logits' columns
    against the deployment's classes, and everything the state decides.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        raw = _unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types for garbage input
        return None
    if type(raw) is not dict:
        return None
    get = raw.get
    version = get("v")
    if type(version) is not int or version != PROTOCOL_VERSION or get("k") != kind or get("d") != device:
        return None
    cid = get("c")
    ids = get("ids")
    if type(cid) is not int or not 0 <= cid <= I64_MAX or type(ids) is not bytes:
        return None
    if len(ids) & 3 or len(ids) > MAX_ID_BYTES or not distinct(ids):
        return None
    if kind == "fetch":
        encoding = get("enc")
        if type(encoding) is not str or encoding not in _ITEMSIZE or ("teach" in raw and raw["teach"] != "mean"):
            return None
        return Scanned(kind, device, cid, ids, ids, -1, encoding, 0, 0, b"", None, payload)
    ver = get("ver")
    block = get("logits")
    if type(ver) is not int or not 0 <= ver <= I64_MAX or type(block) is not dict:
        return None
    encoding = block.get("e")
    rows = block.get("n")
    cols = block.get("m")
    data = block.get("b")
    if type(encoding) is not str or encoding not in _ITEMSIZE or type(rows) is not int or type(cols) is not int:
        return None
    if not 0 <= rows <= MAX_IDS_PER_MESSAGE or not 0 <= cols <= MAX_CLASSES or rows != len(ids) >> 2:
        return None
    if type(data) is not bytes or len(data) != rows * cols * _ITEMSIZE[encoding]:
        return None
    scales = None
    if encoding in _SCALED:
        scales = block.get("s")
        if type(scales) is not bytes or len(scales) != 4 * rows:
            return None
    elif encoding in _BLOCK_SCALED:
        # One scale, checked finite here: with no rows, no value of the batch's would show a bad one.
        scales = block.get("s")
        if type(scales) is not bytes or len(scales) != 4 or not math.isfinite(struct.unpack("<f", scales)[0]):
            return None
    fetch_ids = None
    if kind == "update_fetch":
        fetch_ids = get("fetch_ids")
        if type(fetch_ids) is not bytes or len(fetch_ids) & 3 or len(fetch_ids) > MAX_ID_BYTES:
            return None
        if not distinct(fetch_ids):
            return None
        if "teach" in raw and raw["teach"] != "mean":
            return None
    return Scanned(kind, device, cid, ids, fetch_ids, ver, encoding, rows, cols, data, scales, payload)


def distinct(ids: bytes) -> bool:
    """Whether a whole number of uint32 ids repeats none (a set for a batch's few ids, a sort for many)."""
    count = len(ids) >> 2
    if count < 2:
        return True
    if count <= _SET_LIMIT:
        return len(set(memoryview(ids).cast("I"))) == count
    ordered = np.sort(np.frombuffer(ids, _U32))
    return not bool((ordered[1:] == ordered[:-1]).any())


def decode_logits(encoding: str, cols: int, members: Sequence[Scanned]) -> np.ndarray:
    """The float32 matrix of several updates' logits blocks of one encoding and width, rows concatenated.

    The same values `fedwire.decode` gives each block: a float32 copy of the elements, times the row's float32
    scale (i8) or the block's (i8b).
    """
    rows = sum(m.rows for m in members)
    matrix = np.frombuffer(b"".join(m.data for m in members), _DTYPES[encoding]).astype(np.float32)
    matrix = matrix.reshape(rows, cols)
    if encoding in _SCALED or encoding in _BLOCK_SCALED:
        scales = np.frombuffer(b"".join(m.scales or b"" for m in members), _F32)
        if encoding in _BLOCK_SCALED:
            scales = np.repeat(scales, [m.rows for m in members])
        with np.errstate(over="ignore"):  # an overflow is an infinity, which finite_rows reports
            matrix *= scales[:, None]
    return matrix


def finite_rows(matrix: np.ndarray, encoding: str, members: Sequence[Scanned]) -> np.ndarray:
    """Per row: every value finite (and, for i8, its scale too, which the generic decoder checks first; an i8b
    block's one scale `scan` checked).

    For a batch that is all finite, one call: `finite_rows(...).all()` is what to ask only when it is not.
    """
    finite: np.ndarray = np.isfinite(matrix).all(axis=1)
    if encoding in _SCALED:
        finite &= np.isfinite(np.frombuffer(b"".join(m.scales or b"" for m in members), _F32))
    return finite


class PackedLogits(NamedTuple):
    """Teacher rows of several replies quantised at once: the bytes per row and the scales' bytes, per row (i8) or
    per reply (i8b)."""

    data: bytes
    row_bytes: int
    scales: bytes | None
    per_reply: bool  # `scales` holds one float32 per reply, not per row

    def reply(self, index: int, begin: int, end: int) -> tuple[bytes, bytes | None]:
        """Reply `index`'s elements and scales, its rows being [begin, end) of the packed ones."""
        data = self.data[begin * self.row_bytes : end * self.row_bytes]
        if self.scales is None:
            return data, None
        return data, self.scales[4 * index : 4 * index + 4] if self.per_reply else self.scales[4 * begin : 4 * end]


def pack_logits(matrix: np.ndarray, encoding: str, lengths: Sequence[int]) -> PackedLogits:
    """Quantise the rows of several replies, `lengths[k]` rows each in order, in one go, as each reply alone.

    Row-wise encodings are the same per row whatever the rows around; i8b's one scale per reply is its rows'
    peak magnitude / 127, computed for all replies by one reduction, then every row divided by its reply's.
    """
    matrix = np.asarray(matrix, np.float32)
    row_bytes = matrix.shape[1] * _ITEMSIZE[encoding]
    if encoding not in _BLOCK_SCALED:
        quantised = quantise_logits(matrix, LogitEncoding(encoding))
        return PackedLogits(quantised.data, row_bytes, quantised.scales, per_reply=False)
    counts = np.asarray(lengths, np.int64)
    peaks = np.zeros(counts.size, _F32)
    if matrix.shape[0]:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        taught = counts > 0  # an empty reply's peak is 0; reduceat runs each start to the next one given
        peaks[taught] = np.maximum.reduceat(np.abs(matrix).max(axis=1, initial=0.0), starts[taught])
    scales = int8_scales(peaks)
    elements = int8_elements(matrix, np.repeat(scales, counts))
    return PackedLogits(elements.tobytes(), row_bytes, scales.tobytes(), per_reply=True)


class ReplyWriter:
    """Writes replies with one reused msgpack packer (so one per thread: a packer is not thread-safe)."""

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def knowledge(
        self,
        *,
        device: str,
        cid: int,
        ids: bytes,
        counts: bytes,
        encoding: str,
        rows: int,
        cols: int,
        data: bytes,
        scales: bytes | None,
        applied: int,
        stale: int,
    ) -> bytes:
        """The bytes `fedwire.encode` writes for a mean `knowledge` reply (map order of docs/protocol.md §4, §8.8)."""
        block: dict[str, Any] = {"e": encoding, "n": rows, "m": cols, "b": data}
        if scales is not None:
            block["s"] = scales
        body = {
            "v": PROTOCOL_VERSION,
            "k": "knowledge",
            "d": device,
            "c": cid,
            "ids": ids,
            "counts": counts,
            "logits": block,
            "applied": applied,
            "stale": stale,
        }
        payload: bytes = self._pack(body)
        return payload

    def update_ack(self, *, device: str, cid: int, applied: int, stale: int) -> bytes:
        """The bytes `fedwire.encode` writes for an `update_ack`."""
        body = {"v": PROTOCOL_VERSION, "k": "update_ack", "d": device, "c": cid, "applied": applied, "stale": stale}
        payload: bytes = self._pack(body)
        return payload
