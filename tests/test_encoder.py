"""Tests of the frozen hash encoder: ONNX export matches torch, and HashEncoder's binary/float16 hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge.hashing import HashEncoder, decode_float16, hashes_from_features, unpack_binary
from fedwire.constants import HashKind
from models.encoder import DEFAULT_ENCODER_KIND, ENCODER_KINDS, build_encoder, export_encoder_onnx


def _images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 12, 10)])
@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_onnx_encoder_matches_torch_module(kind: str, shape: tuple[int, int, int], tmp_path: Path) -> None:
    path = export_encoder_onnx(tmp_path / "enc.onnx", input_shape=shape, dim=64, seed=5, kind=kind)
    module = build_encoder(kind, input_shape=shape, dim=64, seed=5)
    images = _images(7, shape)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    encoder = HashEncoder(path)
    np.testing.assert_allclose(encoder.features(images), expected, atol=1e-4)
    assert encoder.metadata["fedcache.encoder.kind"] == kind
    assert encoder.input_shape == shape


def test_calibrated_export_matches_and_balances_bits(tmp_path: Path) -> None:
    shape = (1, 8, 8)
    calibration = _images(200, shape, seed=1)
    path = export_encoder_onnx(tmp_path / "c.onnx", input_shape=shape, dim=32, calibration=calibration)
    module = build_encoder(input_shape=shape, dim=32, calibration=calibration)
    with torch.no_grad():
        expected = module(torch.from_numpy(calibration)).numpy()
    features = HashEncoder(path).features(calibration)
    np.testing.assert_allclose(features, expected, atol=1e-4)
    assert np.all(np.abs((features > 0).mean(axis=0) - 0.5) <= 0.01)


def test_binary_hashes(tmp_path: Path) -> None:
    shape = (1, 28, 28)
    path = export_encoder_onnx(tmp_path / "b.onnx", input_shape=shape, dim=256)
    encoder = HashEncoder(path, hash_kind=HashKind.BINARY)
    assert (encoder.hash_kind, encoder.hash_dim, encoder.hash_bytes) == (HashKind.BINARY, 256, 32)
    images = _images(10, shape)
    images[5] = images[2]
    hashes = encoder.encode(images, batch_size=3)
    assert hashes.dtype == np.uint8 and hashes.shape == (10, 32)
    np.testing.assert_array_equal(hashes[5], hashes[2])
    assert not np.array_equal(hashes[0], hashes[1])
    np.testing.assert_array_equal(hashes, encoder.encode(images))
    np.testing.assert_array_equal(unpack_binary(hashes), encoder.features(images) > 0)
    bits = np.zeros((1, 16), dtype=np.float32)
    bits[0, [0, 9]] = 1.0  # little-endian within bytes: feature 0 -> byte 0 bit 0, feature 9 -> byte 1 bit 1
    np.testing.assert_array_equal(hashes_from_features(bits, kind=HashKind.BINARY), [[1, 2]])


def test_float16_hashes(tmp_path: Path) -> None:
    shape = (1, 8, 8)
    path = export_encoder_onnx(tmp_path / "f.onnx", input_shape=shape, dim=20, kind="pixel")
    encoder = HashEncoder(path, hash_kind="f16")
    assert (encoder.hash_kind, encoder.hash_dim, encoder.hash_bytes) == (HashKind.FLOAT16, 20, 40)
    images = _images(6, shape)
    hashes = encoder.encode(images)
    assert hashes.dtype == np.uint8 and hashes.shape == (6, 40)
    np.testing.assert_allclose(decode_float16(hashes), encoder.features(images), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(encoder.encode(images[:1]), hashes[:1])


def test_binary_needs_whole_bytes_and_shapes_are_checked(tmp_path: Path) -> None:
    path = export_encoder_onnx(tmp_path / "odd.onnx", input_shape=(1, 8, 8), dim=12)
    with pytest.raises(ValueError, match="divisible by 8"):
        HashEncoder(path, hash_kind=HashKind.BINARY)
    encoder = HashEncoder(path, hash_kind=HashKind.FLOAT16)
    with pytest.raises(ValueError, match="expects"):
        encoder.encode(_images(2, (1, 9, 9)))
    assert encoder.encode(np.zeros((0, 1, 8, 8), dtype=np.float32)).shape == (0, 24)


def test_encoder_is_deterministic_in_its_seed() -> None:
    shape = (1, 8, 8)
    images = torch.from_numpy(_images(4, shape))
    with torch.no_grad():
        a = build_encoder(DEFAULT_ENCODER_KIND, input_shape=shape, seed=1)(images)
        b = build_encoder(DEFAULT_ENCODER_KIND, input_shape=shape, seed=1)(images)
        c = build_encoder(DEFAULT_ENCODER_KIND, input_shape=shape, seed=2)(images)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not any(p.requires_grad for p in build_encoder(input_shape=shape).parameters())
