"""Arrays on the wire: raw little-endian bytes to and from numpy; logits as float32, float16 or scaled int8."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fedwire.constants import LogitEncoding

__all__ = [
    "BLOCK_SCALED_ENCODINGS",
    "F32",
    "LOGIT_DTYPES",
    "SCALED_ENCODINGS",
    "U8",
    "U16",
    "U32",
    "QuantisedLogits",
    "dequantise_logits",
    "int8_elements",
    "int8_scales",
    "pack_finite",
    "pack_unsigned",
    "quantise_logits",
]

U8 = np.dtype("u1")
U16 = np.dtype("<u2")
U32 = np.dtype("<u4")
F32 = np.dtype("<f4")
LOGIT_DTYPES: dict[LogitEncoding, np.dtype] = {
    LogitEncoding.FLOAT32: np.dtype("<f4"),
    LogitEncoding.FLOAT16: np.dtype("<f2"),
    LogitEncoding.INT8: np.dtype("i1"),
    LogitEncoding.INT8_BLOCK: np.dtype("i1"),
}
# Encodings whose matrix travels with one float32 scale per row (the logits block's `s`) ...
SCALED_ENCODINGS = frozenset({LogitEncoding.INT8})
# ... and those whose `s` holds one float32 scale for the whole matrix.
BLOCK_SCALED_ENCODINGS = frozenset({LogitEncoding.INT8_BLOCK})
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class QuantisedLogits(NamedTuple):
    """A logit matrix as it travels: its shape, its elements' bytes and, for scaled encodings, its row scales."""

    rows: int
    cols: int
    data: bytes
    scales: bytes | None


def pack_unsigned(values: np.ndarray, dtype: np.dtype) -> bytes:
    """Raw bytes of `values` as the unsigned wire `dtype`, refusing values that would silently wrap around."""
    array = np.asarray(values)
    if array.size and not np.can_cast(array.dtype, dtype) and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"values outside the range of {dtype}")
    return array.astype(dtype, copy=False).tobytes()


def pack_finite(values: np.ndarray) -> bytes:
    """Raw float32 little-endian bytes of `values`, refusing NaN and infinities."""
    array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("values hold NaN or infinite numbers")
    return array.astype(F32, copy=False).tobytes()


def quantise_logits(logits: np.ndarray, encoding: LogitEncoding) -> QuantisedLogits:
    """Pack an (n, classes) float matrix; int8 gets one float32 scale per row, int8-block one for the whole matrix
    (docs/protocol.md §6)."""
    matrix = np.asarray(logits, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"logits must be 2-D, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("logits hold NaN or infinite values")
    rows, cols = matrix.shape
    if encoding in SCALED_ENCODINGS or encoding in BLOCK_SCALED_ENCODINGS:
        magnitudes = np.abs(matrix)
        per_row = encoding in SCALED_ENCODINGS
        scales = int8_scales(
            magnitudes.max(axis=1, initial=0.0) if per_row else np.array([magnitudes.max(initial=0.0)], F32)
        )
        row_scales = scales if per_row else np.repeat(scales, rows)
        return QuantisedLogits(rows, cols, int8_elements(matrix, row_scales).tobytes(), scales.tobytes())
    if encoding is LogitEncoding.FLOAT16:
        # float16 tops out at 65504; beyond it values would arrive as inf and the message be rejected.
        matrix = np.clip(matrix, -_FLOAT16_MAX, _FLOAT16_MAX)
    return QuantisedLogits(rows, cols, matrix.astype(LOGIT_DTYPES[encoding]).tobytes(), None)


def int8_scales(peaks: np.ndarray) -> np.ndarray:
    """The float32 int8 scales of rows or blocks whose largest magnitudes are `peaks`: peak / 127, and 1.0 where that
    is 0 (all zeros, or a peak / 127 underflowing)."""
    scales = np.asarray(peaks, F32) / np.float32(127)
    return np.where(scales > 0, scales, 1.0).astype(F32)


def int8_elements(matrix: np.ndarray, row_scales: np.ndarray) -> np.ndarray:
    """The int8 elements of a float32 matrix, each row divided by its scale and rounded (docs/protocol.md §6)."""
    elements: np.ndarray = np.clip(np.rint(matrix / row_scales[:, None]), -127, 127).astype(np.int8)
    return elements


def dequantise_logits(data: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """The float32 matrix a received (n, m) element array stands for: a copy, times its row scales (or its one block
    scale) if scaled."""
    matrix = data.astype(np.float32)
    if scales is not None:
        matrix *= scales[:, None]
    return matrix
