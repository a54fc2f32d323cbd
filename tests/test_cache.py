"""KnowledgeCache: vectorised fetch against a per-sample reference, versioning, registration and lookup rules."""

from __future__ import annotations

import numpy as np
import pytest

import broker_server.cache as cache_module
from broker_server.cache import CacheConfig, KnowledgeCache, Rejected
from fedwire.constants import ErrorCode, HashKind

CLASSES = 5
HASH_DIM = 64
CONFIG = CacheConfig(classes=CLASSES, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM)


def make_cache(
    rng: np.random.Generator, *, devices: int = 3, per_device: int = 120, neighbours: int = 16
) -> KnowledgeCache:
    cache = KnowledgeCache(config=CONFIG, neighbours=neighbours)
    for index in range(devices):
        name = f"dev{index}"
        cache.hello(
            device=name, model="m", classes=CLASSES, samples=per_device, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM
        )
        # Sparse, shuffled local ids so lookup cannot rely on ids being positions.
        ids = rng.choice(10 * per_device, size=per_device, replace=False).astype(np.uint32)
        cache.register(
            device=name,
            ids=ids,
            labels=rng.integers(0, CLASSES, size=per_device).astype(np.uint16),
            hashes=rng.integers(0, 256, size=(per_device, HASH_DIM // 8), dtype=np.uint8),
        )
    return cache


def naive_fetch(cache: KnowledgeCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The definition, one sample at a time: mean of the latest logits of neighbours that have any."""
    table = cache.relations.table
    counts, teachers = [], []
    for row in rows:
        contributors = [n for n in table[row] if n >= 0 and cache.versions[n] >= 0]
        counts.append(len(contributors))
        if contributors:
            teachers.append(np.mean([cache.knowledge[n].astype(np.float64) for n in contributors], axis=0))
    return np.array(counts), np.array(teachers).reshape(-1, CLASSES)


def test_fetch_equals_per_sample_reference() -> None:
    rng = np.random.default_rng(10)
    cache = make_cache(rng)
    # Knowledge for a random half of all samples, overwritten in several versions, so counts vary.
    known = rng.choice(cache.size, size=cache.size // 2, replace=False)
    for version in (1, 2, 3):
        rows = rng.choice(known, size=known.size * 2 // 3, replace=False) if version > 1 else known
        cache.apply_update(rows=rows, logits=rng.normal(size=(rows.size, CLASSES)).astype(np.float32), version=version)
    rows = rng.permutation(cache.size)[:200]
    teachers = cache.fetch(rows)
    counts, expected = naive_fetch(cache, rows)
    assert teachers.counts.dtype == np.uint16
    np.testing.assert_array_equal(teachers.counts, counts)
    assert np.unique(counts).size > 3, "the reference case must mix contributing and silent neighbours"
    np.testing.assert_allclose(teachers.logits, expected, rtol=1e-5, atol=1e-6)


def test_fetch_in_slices_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny gather limit forces the sliced path; results must not change."""
    rng = np.random.default_rng(11)
    cache = make_cache(rng)
    rows = np.arange(cache.size)
    cache.apply_update(rows=rows[::2], logits=rng.normal(size=(rows[::2].size, CLASSES)).astype(np.float32), version=1)
    whole = cache.fetch(rows)
    monkeypatch.setattr(cache_module, "FETCH_GATHER_LIMIT", 7 * 16 * CLASSES)
    sliced = cache.fetch(rows)
    np.testing.assert_array_equal(sliced.counts, whole.counts)
    np.testing.assert_allclose(sliced.logits, whole.logits, rtol=1e-6)
    np.testing.assert_allclose(whole.logits, naive_fetch(cache, rows)[1], rtol=1e-5, atol=1e-6)


def test_fetch_without_any_knowledge_gives_no_teachers() -> None:
    cache = make_cache(np.random.default_rng(12))
    teachers = cache.fetch(np.arange(10))
    assert np.all(teachers.counts == 0)
    assert teachers.logits.shape == (0, CLASSES)


def test_newer_versions_only() -> None:
    rng = np.random.default_rng(13)
    cache = make_cache(rng, devices=1)
    rows = np.arange(10)
    v2 = rng.normal(size=(10, CLASSES)).astype(np.float32)
    assert cache.apply_update(rows=rows, logits=v2, version=2).all()
    # An older version never overwrites a newer one.
    assert not cache.apply_update(rows=rows, logits=v2 + 1, version=1).any()
    np.testing.assert_array_equal(cache.knowledge[rows], v2)
    # A redelivered (same version) update changes nothing, even with different numbers.
    assert not cache.apply_update(rows=rows, logits=v2 + 5, version=2).any()
    np.testing.assert_array_equal(cache.knowledge[rows], v2)
    assert np.all(cache.versions[rows] == 2)
    # Mixed: rows 0-4 get version 3, then a version-3 update over 0-9 only applies to 5-9.
    cache.apply_update(rows=rows[:5], logits=v2[:5] + 3, version=3)
    applied = cache.apply_update(rows=rows, logits=v2 + 7, version=3)
    np.testing.assert_array_equal(applied, np.arange(10) >= 5)
    np.testing.assert_array_equal(cache.knowledge[:5], v2[:5] + 3)
    np.testing.assert_array_equal(cache.knowledge[5:10], v2[5:] + 7)
    assert np.all(cache.versions[10:] == -1)


def test_update_validation() -> None:
    cache = make_cache(np.random.default_rng(14), devices=1)
    rows = np.arange(3)
    before = cache.knowledge.copy()
    with pytest.raises(Rejected) as info:
        cache.apply_update(rows=rows, logits=np.zeros((3, CLASSES + 1), np.float32), version=1)
    assert info.value.code is ErrorCode.CLASS_MISMATCH
    with pytest.raises(Rejected) as info:
        cache.apply_update(rows=rows, logits=np.zeros((2, CLASSES), np.float32), version=1)
    assert info.value.code is ErrorCode.BAD_SHAPE
    np.testing.assert_array_equal(cache.knowledge, before)


def test_lookup_is_vectorised_and_detects_unknown_ids() -> None:
    rng = np.random.default_rng(15)
    cache = make_cache(rng)
    for name, record in cache.devices.items():
        rows = np.flatnonzero(cache.sample_devices == record.index)
        shuffled = rng.permutation(rows)
        np.testing.assert_array_equal(cache.rows_of(name, cache.sample_ids[shuffled]), shuffled)
    ids = cache.sample_ids[cache.sample_devices == 0]
    unknown = np.setdiff1d(np.arange(ids.max() + 2, dtype=np.uint32), ids)[:3]
    with pytest.raises(Rejected) as info:
        cache.rows_of("dev0", np.concatenate([ids[:5], unknown]))
    assert info.value.code is ErrorCode.UNKNOWN_SAMPLE
    with pytest.raises(Rejected) as info:
        cache.rows_of("nobody", ids[:5])
    assert info.value.code is ErrorCode.UNKNOWN_DEVICE


def test_register_in_many_chunks_grows_arrays() -> None:
    """More rows than the initial capacity, in chunks: rows stay dense and lookups stay right."""
    rng = np.random.default_rng(16)
    cache = KnowledgeCache(config=CONFIG)
    cache.hello(device="big", model="m", classes=CLASSES, samples=5000, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM)
    ids = rng.permutation(5000).astype(np.uint32)
    labels = rng.integers(0, CLASSES, size=5000).astype(np.uint16)
    hashes = rng.integers(0, 256, size=(5000, 8), dtype=np.uint8)
    for start in range(0, 5000, 700):
        chunk = slice(start, start + 700)
        registration = cache.register(device="big", ids=ids[chunk], labels=labels[chunk], hashes=hashes[chunk])
        assert registration.registered == min(start + 700, 5000)
    assert cache.size == 5000
    np.testing.assert_array_equal(cache.rows_of("big", ids), np.arange(5000))
    np.testing.assert_array_equal(cache.labels, labels)
    np.testing.assert_array_equal(cache.hashes, hashes)
    assert np.all(cache.versions == -1)
    assert cache.knowledge.shape == (5000, CLASSES)


def test_reregistration_is_idempotent_and_conflicts_are_rejected() -> None:
    rng = np.random.default_rng(17)
    cache = KnowledgeCache(config=CONFIG)
    cache.hello(device="d", model="m", classes=CLASSES, samples=20, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM)
    ids = np.arange(10, dtype=np.uint32)
    labels = (ids % CLASSES).astype(np.uint16)
    hashes = rng.integers(0, 256, size=(10, 8), dtype=np.uint8)
    first = cache.register(device="d", ids=ids, labels=labels, hashes=hashes)
    assert (first.accepted, first.registered, first.new_rows.size) == (10, 10, 10)
    again = cache.register(device="d", ids=ids[::-1], labels=labels[::-1], hashes=hashes[::-1])
    assert (again.accepted, again.registered, again.new_rows.size) == (10, 10, 0)
    assert cache.size == 10
    other = hashes.copy()
    other[3, 0] ^= 1
    with pytest.raises(Rejected) as info:
        cache.register(device="d", ids=ids, labels=labels, hashes=other)
    assert info.value.code is ErrorCode.HASH_MISMATCH
    np.testing.assert_array_equal(cache.hashes, hashes)


def test_first_hello_fixes_the_configuration() -> None:
    cache = KnowledgeCache()
    assert cache.config is None
    cache.hello(device="a", model="m", classes=7, samples=1, hash_kind=HashKind.FLOAT16, hash_dim=16)
    assert cache.config == CacheConfig(classes=7, hash_kind=HashKind.FLOAT16, hash_dim=16)
    assert cache.config.hash_bytes == 32
    for classes, kind, dim, code in [
        (8, HashKind.FLOAT16, 16, ErrorCode.CLASS_MISMATCH),
        (7, HashKind.BINARY, 16, ErrorCode.HASH_MISMATCH),
        (7, HashKind.FLOAT16, 32, ErrorCode.HASH_MISMATCH),
    ]:
        with pytest.raises(Rejected) as info:
            cache.hello(device="b", model="m", classes=classes, samples=1, hash_kind=kind, hash_dim=dim)
        assert info.value.code is code
    assert list(cache.devices) == ["a"]


def test_stats_report_fill() -> None:
    cache = make_cache(np.random.default_rng(18), devices=2, per_device=50)
    cache.apply_update(rows=np.arange(25), logits=np.zeros((25, CLASSES), np.float32), version=0)
    stats = cache.stats()
    assert (stats.devices, stats.samples, stats.with_knowledge) == (2, 100, 25)
    assert stats.cache_fill == pytest.approx(0.25)
    assert stats.as_dict()["cache_fill"] == pytest.approx(0.25)
