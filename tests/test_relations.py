"""Per-class kNN relations: faiss results against brute-force numpy, self exclusion, dirty-class rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.relations import RelationTable, build_class_neighbours
from fedwire.constants import HashKind

R = 16


def hamming_matrix(hashes: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances of packed-bit hashes."""
    return np.unpackbits(hashes[:, None, :] ^ hashes[None, :, :], axis=2).sum(axis=2).astype(np.float64)


def l2_matrix(hashes: np.ndarray) -> np.ndarray:
    """All pairwise squared L2 distances of float16-byte hashes, computed in float64."""
    vectors = hashes.view("<f2").astype(np.float64)
    return ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)


def distances_of(kind: HashKind, hashes: np.ndarray) -> np.ndarray:
    return hamming_matrix(hashes) if kind is HashKind.BINARY else l2_matrix(hashes)


def assert_well_formed(table: np.ndarray, count: int) -> None:
    """No self, no repeats, valid positions first and -1 padding only at the end."""
    assert table.dtype == np.int64
    assert table.shape == (count, R)
    valid = table >= 0
    assert np.all(table < count)
    assert not np.any(table == np.arange(count)[:, None])
    assert np.all(valid[:, :-1] | ~valid[:, 1:]), "padding must trail the neighbours"
    for row in table:
        kept = row[row >= 0]
        assert np.unique(kept).size == kept.size


def assert_exact(kind: HashKind, hashes: np.ndarray, table: np.ndarray, *, atol: float = 0.0) -> None:
    """Each row's neighbour distances equal the R smallest distances to other samples (ties-robust)."""
    distances = distances_of(kind, hashes)
    count = hashes.shape[0]
    np.fill_diagonal(distances, np.inf)  # exclude the sample itself by position
    expected = np.sort(distances, axis=1)[:, : min(R, count - 1)]
    valid = table >= 0
    assert np.all(valid.sum(axis=1) == min(R, count - 1))
    got = np.sort(np.where(valid, np.take_along_axis(distances, np.maximum(table, 0), axis=1), np.inf), axis=1)
    np.testing.assert_allclose(got[:, : expected.shape[1]], expected, rtol=1e-5, atol=atol)


def float_hashes(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    return rng.normal(size=(count, dim)).astype("<f2").view(np.uint8).reshape(count, 2 * dim)


def test_binary_exact_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 256, size=(400, 8), dtype=np.uint8)
    table = build_class_neighbours(hashes, kind=HashKind.BINARY, neighbours=R)
    assert_well_formed(table, 400)
    assert_exact(HashKind.BINARY, hashes, table)


def test_float16_exact_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    hashes = float_hashes(rng, 300, 12)
    table = build_class_neighbours(hashes, kind=HashKind.FLOAT16, neighbours=R)
    assert_well_formed(table, 300)
    assert_exact(HashKind.FLOAT16, hashes, table, atol=1e-3)


@pytest.mark.parametrize("kind", [HashKind.BINARY, HashKind.FLOAT16])
def test_duplicates_are_excluded_by_position(kind: HashKind) -> None:
    """With far more identical hashes than R, faiss may not return the sample itself; it is still never kept."""
    rng = np.random.default_rng(3)
    distinct = rng.integers(0, 256, size=(4, 8), dtype=np.uint8) if kind is HashKind.BINARY else float_hashes(rng, 4, 4)
    hashes = distinct[rng.integers(0, 4, size=240)]
    table = build_class_neighbours(hashes, kind=kind, neighbours=R)
    assert_well_formed(table, 240)
    assert_exact(kind, hashes, table)
    same = np.all(hashes[table] == hashes[:, None, :], axis=2)
    assert same.all(), "every neighbour of a duplicated hash is one of its duplicates"


@pytest.mark.parametrize("count", [0, 1, 2, 5, R, R + 1])
def test_small_classes_are_padded(count: int) -> None:
    rng = np.random.default_rng(count)
    hashes = rng.integers(0, 256, size=(count, 4), dtype=np.uint8)
    table = build_class_neighbours(hashes, kind=HashKind.BINARY, neighbours=R)
    assert table.shape == (count, R)
    if count:
        assert_well_formed(table, count)
        for position, row in enumerate(table):
            assert sorted(row[row >= 0]) == [i for i in range(count) if i != position]


@pytest.mark.parametrize("kind", [HashKind.BINARY, HashKind.FLOAT16])
def test_hnsw_above_the_exact_limit_is_close_to_exact(kind: HashKind) -> None:
    rng = np.random.default_rng(4)
    count = 1500
    hashes = (
        rng.integers(0, 256, size=(count, 8), dtype=np.uint8)
        if kind is HashKind.BINARY
        else float_hashes(rng, count, 8)
    )
    approximate = build_class_neighbours(hashes, kind=kind, neighbours=R, exact_limit=100)
    exact = build_class_neighbours(hashes, kind=kind, neighbours=R)
    assert_well_formed(approximate, count)
    distances = distances_of(kind, hashes)
    # Recall by distance (robust to ties): how many approximate neighbours are within the exact R-th distance.
    kth = np.take_along_axis(distances, exact, axis=1).max(axis=1)
    hits = np.take_along_axis(distances, np.maximum(approximate, 0), axis=1) <= kth[:, None] * (1 + 1e-6)
    assert (hits & (approximate >= 0)).mean() > 0.9


def test_relation_table_rebuilds_only_dirty_classes() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=300).astype(np.uint16)
    hashes = rng.integers(0, 256, size=(300, 8), dtype=np.uint8)
    relations = RelationTable(kind=HashKind.BINARY, neighbours=R)
    relations.mark_dirty(labels)
    assert relations.dirty == {0, 1, 2}
    assert relations.refresh(labels=labels, hashes=hashes) == (0, 1, 2)
    assert relations.dirty == frozenset()
    table = relations.table.copy()
    assert table.shape == (300, R)
    for label in range(3):
        rows = np.flatnonzero(labels == label)
        local = build_class_neighbours(hashes[rows], kind=HashKind.BINARY, neighbours=R)
        np.testing.assert_array_equal(table[rows], rows[local])

    # Twenty new samples of class 1 arrive: only class 1 becomes dirty, and only when asked for.
    new_labels = np.concatenate([labels, np.ones(20, np.uint16)])
    new_hashes = np.concatenate([hashes, rng.integers(0, 256, size=(20, 8), dtype=np.uint8)])
    relations.mark_dirty(new_labels[300:])
    assert relations.dirty == {1}
    assert relations.refresh(labels=new_labels, hashes=new_hashes, classes=[0, 2]) == ()
    np.testing.assert_array_equal(relations.table[:300], table)
    assert np.all(relations.table[300:] == -1)
    assert relations.refresh(labels=new_labels, hashes=new_hashes, classes=[1]) == (1,)
    untouched = new_labels[:300] != 1
    np.testing.assert_array_equal(relations.table[:300][untouched], table[untouched])
    class_one = np.flatnonzero(new_labels == 1)
    assert np.all(np.isin(relations.table[class_one], class_one))
    assert np.all(relations.table[300:] >= 0)
