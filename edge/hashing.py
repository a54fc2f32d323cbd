"""Turn a device's images into the compact hashes it registers with the cache server, via any ONNX encoder.

Bit layout of binary hashes (HashKind.BINARY): feature j > 0 sets bit j, packed little-endian within
bytes (np.packbits(..., bitorder="little")), i.e. bit j is `(hash[j // 8] >> (j % 8)) & 1`. Hamming
distance does not depend on the bit order, but any other producer of hashes must use this one.
Float hashes (HashKind.FLOAT16) are the features as little-endian IEEE float16, raw bytes viewed as uint8.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from fedwire.constants import MAX_HASH_BYTES, HashKind

BIT_ORDER: Literal["little"] = "little"
_F16 = np.dtype("<f2")


class HashEncoder:
    """An onnxruntime session over a frozen encoder (N, C, H, W) float32 -> (N, D) features, plus hashing.

    One intra-op thread by default: the device's training loop owns the other cores, and hashing runs
    once at registration, so latency matters less than not stealing CPU from training.
    """

    def __init__(
        self, path: Path | str, *, hash_kind: HashKind | str = HashKind.BINARY, intra_op_threads: int = 1
    ) -> None:
        self.path = Path(path)
        self._kind = HashKind(hash_kind)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: an encoder needs one input and one output")
        self._input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ValueError(f"{self.path}: encoder input must be (N, C, H, W), got {shape}")
        self._input_shape: tuple[int, int, int] | None = (
            tuple(shape[1:]) if all(isinstance(n, int) for n in shape[1:]) else None
        )
        out_shape = outputs[0].shape
        if len(out_shape) != 2:
            raise ValueError(f"{self.path}: encoder output must be (N, D), got {out_shape}")
        if isinstance(out_shape[1], int):
            self._dim = out_shape[1]
        elif self._input_shape is not None:  # symbolic width: ask the model once
            probe = np.zeros((1, *self._input_shape), dtype=np.float32)
            self._dim = int(self._session.run(None, {self._input_name: probe})[0].shape[1])
        else:
            raise ValueError(f"{self.path}: cannot tell the feature width of an encoder with a symbolic input")
        if self._kind is HashKind.BINARY and self._dim % 8:
            raise ValueError(f"{self.path}: binary hashes need a feature width divisible by 8, got {self._dim}")
        if self.hash_bytes > MAX_HASH_BYTES:
            raise ValueError(f"{self.path}: {self.hash_bytes}-byte hashes exceed the protocol's {MAX_HASH_BYTES}")
        meta = self._session.get_modelmeta().custom_metadata_map
        self._metadata = MappingProxyType(dict(meta))

    @property
    def hash_kind(self) -> HashKind:
        return self._kind

    @property
    def hash_dim(self) -> int:
        """Bits per hash for BINARY, float16 values per hash for FLOAT16 (the encoder's feature width)."""
        return self._dim

    @property
    def hash_bytes(self) -> int:
        return self._dim // 8 if self._kind is HashKind.BINARY else 2 * self._dim

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) the encoder expects, or None if the model leaves it symbolic."""
        return self._input_shape

    @property
    def metadata(self) -> MappingProxyType[str, str]:
        """The ONNX model's metadata props (models.encoder records kind, dim, seed, input shape there)."""
        return self._metadata

    def features(self, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """Raw float32 features (n, hash_dim), computed in batches to bound memory."""
        images = self._check(x)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = np.empty((len(images), self._dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size])
            out[start : start + len(batch)] = self._session.run(None, {self._input_name: batch})[0]
        if not np.isfinite(out).all():
            raise ValueError(f"{self.path}: encoder produced non-finite features")
        return out

    def encode(self, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """Hashes of images `x` (n, C, H, W): uint8 (n, hash_bytes) laid out as the module docstring says."""
        feats = self.features(x, batch_size=batch_size)
        return hashes_from_features(feats, kind=self._kind)

    def _check(self, x: Any) -> np.ndarray:
        images = np.asarray(x, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
        if self._input_shape is not None and tuple(images.shape[1:]) != self._input_shape:
            raise ValueError(f"encoder expects (N, {self._input_shape}), got {images.shape}")
        return images


def hashes_from_features(features: np.ndarray, *, kind: HashKind | str) -> np.ndarray:
    """Hash float features (n, D): sign bits packed little-endian, or float16 bytes; uint8 (n, bytes)."""
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be (n, D), got {feats.shape}")
    if HashKind(kind) is HashKind.BINARY:
        if feats.shape[1] % 8:
            raise ValueError(f"binary hashes need D divisible by 8, got {feats.shape[1]}")
        return np.packbits(feats > 0, axis=1, bitorder=BIT_ORDER)
    halves = feats.astype(_F16)
    if not np.isfinite(halves).all():
        raise ValueError("features overflow float16")
    return np.ascontiguousarray(halves).view(np.uint8)


def unpack_binary(hashes: np.ndarray) -> np.ndarray:
    """Sign bits of binary hashes as bool (n, 8 * hash_bytes), bit j being feature j > 0."""
    bits: np.ndarray = np.unpackbits(np.asarray(hashes, dtype=np.uint8), axis=1, bitorder=BIT_ORDER).astype(bool)
    return bits


def decode_float16(hashes: np.ndarray) -> np.ndarray:
    """Float16 hashes (n, 2D) uint8 back to float32 features (n, D)."""
    raw = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint8))
    if raw.ndim != 2 or raw.shape[1] % 2:
        raise ValueError(f"float16 hashes must be (n, 2D) bytes, got {raw.shape}")
    return raw.view(_F16).astype(np.float32)


__all__ = ["BIT_ORDER", "HashEncoder", "decode_float16", "hashes_from_features", "unpack_binary"]
