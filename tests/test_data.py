"""Tests of dataset loading (IDX reader, FashionMNIST cache, digits) and the Dirichlet device partitions."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge.config import DataConfig, DeviceConfig, config_from_dict, config_to_toml
from edge.data import (
    Dataset,
    IdxFormatError,
    device_shard,
    dirichlet_partition,
    fashion_mnist_dir,
    limit_train_samples,
    load_dataset,
    partition_shards,
    per_class_seeded_proportions,
    read_idx,
    write_idx,
)

_ROOT = Path(__file__).resolve().parents[1]


def _idx_bytes(magic_type: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, magic_type, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    return header + payload


def test_read_idx_decodes_a_handwritten_file(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(_idx_bytes(0x08, images.shape, images.tobytes()))
    decoded = read_idx(path, expected_magic=2051)
    np.testing.assert_array_equal(decoded, images)
    assert decoded.dtype == np.uint8

    ints = np.array([1, -2, 70000], dtype=">i4")
    plain = tmp_path / "ints-idx1"
    plain.write_bytes(_idx_bytes(0x0C, ints.shape, ints.tobytes()))
    np.testing.assert_array_equal(read_idx(plain), [1, -2, 70000])


def test_write_idx_round_trips(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz", expected_magic=2049), labels)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(_idx_bytes(0x08, (5,), b"\x00\x00"))
    with pytest.raises(IdxFormatError, match="data bytes"):
        read_idx(truncated)
    labels = tmp_path / "labels"
    labels.write_bytes(_idx_bytes(0x08, (2,), b"\x00\x01"))
    with pytest.raises(IdxFormatError, match="2051"):
        read_idx(labels, expected_magic=2051)


def _fake_fashion(directory: Path, *, train: int, test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_loader_normalises_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, cache = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    _fake_fashion(source, train=50, test=20)
    monkeypatch.setenv("FEDCACHE_FASHION_MNIST_DIR", str(source))
    monkeypatch.setenv("FEDCACHE_CACHE_DIR", str(cache))
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (50, 1, 28, 28) and data.x_test.shape == (20, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.input_shape == (1, 28, 28) and data.classes == 10
    raw = read_idx(source / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(data.x_train[:, 0], (raw / 255.0 - 0.2860) / 0.3530, atol=1e-5)
    cached = sorted(p.name for p in cache.rglob("*.npy"))
    assert cached == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    assert not list(cache.rglob("*.tmp"))
    again = load_dataset("fashion-mnist")
    np.testing.assert_array_equal(again.x_train, data.x_train)


def test_unusable_cache_falls_back_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    source.mkdir()
    _fake_fashion(source, train=30, test=10)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("FEDCACHE_FASHION_MNIST_DIR", str(source))
    monkeypatch.setenv("FEDCACHE_CACHE_DIR", str(not_a_dir))
    with pytest.warns(UserWarning, match="decoding in memory"):
        data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (30, 1, 28, 28) and not data.x_train.flags.writeable


def test_processes_starting_together_share_one_cache(tmp_path: Path) -> None:
    source, cache = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    _fake_fashion(source, train=200, test=40)
    env = {**os.environ, "FEDCACHE_FASHION_MNIST_DIR": str(source), "FEDCACHE_CACHE_DIR": str(cache)}
    code = "from edge.data import load_dataset; d = load_dataset('fashion-mnist'); print(float(d.x_train.sum()))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=_ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert len(list(cache.rglob("*.npy"))) == 4 and not list(cache.rglob("*.tmp"))


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCACHE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_real_fashion_mnist_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("FashionMNIST is not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("FEDCACHE_CACHE_DIR", str(tmp_path))
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
    assert abs(float(data.x_train[:5000].mean())) < 0.05


def test_digits_loads_split_stratified_and_deterministic() -> None:
    data = load_dataset("digits")
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.input_shape == (1, 8, 8) and data.classes == 10
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    test_share = np.bincount(data.y_test) / (np.bincount(data.y_test) + np.bincount(data.y_train))
    assert np.all(np.abs(test_share - 0.25) < 0.01)
    assert abs(float(data.x_train.mean())) < 0.05 and abs(float(data.x_train.std()) - 1.0) < 0.05
    np.testing.assert_array_equal(load_dataset("digits").y_train, data.y_train)


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar-1000")


@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_partition_is_disjoint_complete_deterministic_and_large_enough(alpha: float) -> None:
    labels = np.repeat(np.arange(10), 600)
    parts = dirichlet_partition(labels, num_devices=20, alpha=alpha, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 20
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, num_devices=20, alpha=alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(labels, num_devices=20, alpha=alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 600)

    def classes_held(alpha: float) -> float:
        parts = dirichlet_partition(labels, num_devices=10, alpha=alpha, seed=0)
        return float(np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)) for p in parts]))

    assert classes_held(0.1) < classes_held(100.0)


def test_partition_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError):
        dirichlet_partition(np.arange(50) % 10, num_devices=10, alpha=1.0, seed=0)
    with pytest.raises(ValueError):
        dirichlet_partition(np.arange(500) % 10, num_devices=10, alpha=0.0, seed=0)


def _synthetic_dataset() -> Dataset:
    rng = np.random.default_rng(1)
    y_train = np.repeat(np.arange(10), 600).astype(np.int64)
    y_test = np.repeat(np.arange(10), 300).astype(np.int64)
    return Dataset(
        name="synthetic",
        x_train=rng.standard_normal((len(y_train), 1, 2, 2)).astype(np.float32),
        y_train=y_train,
        x_test=rng.standard_normal((len(y_test), 1, 2, 2)).astype(np.float32),
        y_test=y_test,
        classes=10,
        input_shape=(1, 2, 2),
    )


def test_device_test_split_follows_its_train_label_mix() -> None:
    data = _synthetic_dataset()
    shards = [device_shard(data, num_devices=10, alpha=0.5, seed=0, index=i) for i in range(10)]
    for shard in shards:
        train_hist = np.bincount(shard.y_train, minlength=10)
        test_hist = np.bincount(shard.y_test, minlength=10)
        assert np.corrcoef(train_hist, test_hist)[0, 1] > 0.95
        np.testing.assert_array_equal(shard.x_train, data.x_train[shard.train_indices])
        np.testing.assert_array_equal(shard.y_test, data.y_test[shard.test_indices])
    all_test = np.concatenate([s.test_indices for s in shards])
    assert len(all_test) == len(data.y_test) and len(np.unique(all_test)) == len(data.y_test)
    again = device_shard(data, num_devices=10, alpha=0.5, seed=0, index=3)
    np.testing.assert_array_equal(again.train_indices, shards[3].train_indices)
    np.testing.assert_array_equal(again.test_indices, shards[3].test_indices)


def test_device_shard_of_digits() -> None:
    data = load_dataset("digits")
    shard = device_shard(data, num_devices=5, alpha=1.0, seed=0, index=4)
    assert shard.x_train.shape[1:] == (1, 8, 8) and len(shard.y_train) >= 10
    assert shard.index == 4 and shard.num_devices == 5 and shard.classes == 10
    with pytest.raises(ValueError):
        device_shard(data, num_devices=5, alpha=1.0, seed=0, index=5)


def test_sample_cap_keeps_a_fixed_stratified_subset_and_the_whole_test_split() -> None:
    data = _synthetic_dataset()
    shard = device_shard(data, num_devices=10, alpha=0.5, seed=0, index=2)
    cap = len(shard.y_train) // 3
    capped = limit_train_samples(shard, max_samples=cap, seed=0)
    assert len(capped.y_train) == cap
    assert set(capped.train_indices) <= set(shard.train_indices)
    np.testing.assert_array_equal(capped.x_train, data.x_train[capped.train_indices])
    np.testing.assert_array_equal(capped.y_train, data.y_train[capped.train_indices])
    expected = np.bincount(shard.y_train, minlength=10) * cap / len(shard.y_train)
    assert np.abs(np.bincount(capped.y_train, minlength=10) - expected).max() < 1  # the device's label mix
    np.testing.assert_array_equal(capped.test_indices, shard.test_indices)  # evaluated on the same split
    again = limit_train_samples(device_shard(data, num_devices=10, alpha=0.5, seed=0, index=2), max_samples=cap, seed=0)
    np.testing.assert_array_equal(again.train_indices, capped.train_indices)  # every run keeps the same samples
    other_seed = limit_train_samples(shard, max_samples=cap, seed=1)
    assert not np.array_equal(other_seed.train_indices, capped.train_indices)
    assert limit_train_samples(shard, max_samples=0, seed=0) is shard
    assert limit_train_samples(shard, max_samples=len(shard.y_train), seed=0) is shard
    with pytest.raises(ValueError):
        limit_train_samples(shard, max_samples=-1, seed=0)


# --- the published loader's per-class-seeded split ("dirichlet-per-class") ---

PER_CLASS = "dirichlet-per-class"


def _class_shares(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """(classes, devices): the share of each class's samples every device holds."""
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts], axis=1)
    return counts / np.bincount(labels, minlength=10)[:, None]


@pytest.mark.parametrize("devices", [3, 5, 8])
def test_per_class_split_is_deterministic_complete_and_ignores_the_seed(devices: int) -> None:
    data = load_dataset("digits")
    train, test = partition_shards(data, num_devices=devices, alpha=1.0, seed=0, partition=PER_CLASS)
    for parts, labels in ((train, data.y_train), (test, data.y_test)):
        joined = np.concatenate(parts)
        assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
        assert min(len(p) for p in parts) >= 10
    again = partition_shards(data, num_devices=devices, alpha=1.0, seed=0, partition=PER_CLASS)
    other_seed = partition_shards(data, num_devices=devices, alpha=1.0, seed=7, partition=PER_CLASS)
    for first, second, third in zip(train + test, again[0] + again[1], other_seed[0] + other_seed[1], strict=True):
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(first, third)  # class k is seeded with k alone: our seed plays no part


def test_each_class_draw_is_seeded_with_the_class_index() -> None:
    """Class 0 comes first, before any device is over its fair share: its proportions are MT19937(0)'s draw."""
    labels = np.repeat(np.arange(10), 600)
    _, proportions = per_class_seeded_proportions(labels, num_devices=20, alpha=0.5)
    np.testing.assert_allclose(proportions[0], np.random.RandomState(0).dirichlet(np.full(20, 0.5)))
    first_class_only = per_class_seeded_proportions(labels[labels == 0], num_devices=20, alpha=0.5, min_size=0)[0]
    np.testing.assert_array_equal(
        [len(p) for p in first_class_only], np.diff(np.r_[0, (np.cumsum(proportions[0]) * 600).astype(int)[:-1], 600])
    )
    # Later classes are the same seeded draws, with devices already over N / devices masked out and renormalised.
    for cls in (1, 5, 9):
        raw = np.random.RandomState(cls).dirichlet(np.full(20, 0.5))
        used = proportions[cls] > 0
        np.testing.assert_allclose(proportions[cls][used], raw[used] / raw[used].sum())


def test_per_class_train_and_test_of_a_device_share_class_proportions() -> None:
    """Measured: each device's share of every class differs between train and test by cut rounding only."""
    data = load_dataset("digits")
    train, test = partition_shards(data, num_devices=5, alpha=1.0, seed=0, partition=PER_CLASS)
    rounding = 1 / np.bincount(data.y_train)[:, None] + 1 / np.bincount(data.y_test)[:, None]
    gap = np.abs(_class_shares(data.y_train, train) - _class_shares(data.y_test, test))
    assert (gap < rounding).all()
    _, train_props = per_class_seeded_proportions(data.y_train, num_devices=5, alpha=1.0)
    _, test_props = per_class_seeded_proportions(data.y_test, num_devices=5, alpha=1.0)
    np.testing.assert_allclose(train_props, test_props)
    # The same measure catches a test split that does not follow the train split's mix.
    _, other_test = partition_shards(data, num_devices=5, alpha=0.3, seed=0, partition=PER_CLASS)
    assert (np.abs(_class_shares(data.y_train, train) - _class_shares(data.y_test, other_test)) >= rounding).any()


def test_per_class_split_changes_with_alpha_and_differs_from_ours() -> None:
    data = load_dataset("digits")
    base, _ = partition_shards(data, num_devices=5, alpha=1.0, seed=0, partition=PER_CLASS)
    for other in (
        partition_shards(data, num_devices=5, alpha=0.5, seed=0, partition=PER_CLASS)[0],
        partition_shards(data, num_devices=5, alpha=1.0, seed=0)[0],
    ):
        assert not all(np.array_equal(a, b) for a, b in zip(base, other, strict=True))

    def classes_held(alpha: float) -> float:
        parts, _ = partition_shards(data, num_devices=5, alpha=alpha, seed=0, partition=PER_CLASS)
        return float(np.mean([np.sum(np.bincount(data.y_train[p], minlength=10) >= 0.05 * len(p)) for p in parts]))

    assert classes_held(0.1) < classes_held(100.0)


def test_per_class_split_that_leaves_a_device_too_small_is_an_error() -> None:
    """Every redraw repeats the same split, so a device under min_size cannot be redrawn: refused, not looped."""
    labels = load_dataset("digits").y_train
    with pytest.raises(RuntimeError, match="same on every redraw"):
        per_class_seeded_proportions(labels, num_devices=40, alpha=0.05)
    with pytest.raises(ValueError):
        per_class_seeded_proportions(labels, num_devices=5, alpha=0.0)


def test_our_partition_is_unchanged_and_stays_the_default() -> None:
    """The split every earlier figure used: its digits fingerprint, by default and by name."""
    data = load_dataset("digits")

    def fingerprint(**kwargs: str) -> str:
        digest = hashlib.sha256()
        for index in range(4):
            shard = device_shard(data, num_devices=4, alpha=1.0, seed=0, index=index, **kwargs)
            digest.update(shard.train_indices.astype("<i8").tobytes() + shard.test_indices.astype("<i8").tobytes())
        return digest.hexdigest()

    pinned = "1c5b34fb37d961f1cd8347ba987a0e9a337f1685277c0b310a8c3627b0fb06d2"  # edge/data.py before the new split
    assert fingerprint() == fingerprint(partition="dirichlet") == pinned
    assert fingerprint(partition=PER_CLASS) != pinned
    assert DataConfig().partition == "dirichlet"
    with pytest.raises(ValueError, match="unknown partition"):
        device_shard(data, num_devices=4, alpha=1.0, seed=0, index=0, partition="iid")


def test_device_config_carries_the_partition_and_rejects_unknown_ones() -> None:
    config = DeviceConfig(id="dev000", data=DataConfig(dataset="digits", num_devices=4, partition=PER_CLASS))
    text = config_to_toml(config)
    assert 'partition = "dirichlet-per-class"' in text
    assert config_from_dict(tomllib.loads(text)).data.partition == PER_CLASS
    with pytest.raises(ValueError, match=r"data\.partition"):
        DataConfig(partition="per-class")
