"""Per-class k-nearest-neighbour relations over sample hashes, built with faiss and rebuilt class by class."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from fedwire.constants import DEFAULT_NEIGHBOURS, HashKind

# Up to this many samples in a class the search is exact (brute force); above it an HNSW graph keeps
# rebuilds affordable, at the price of approximate neighbours.
EXACT_SEARCH_LIMIT = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH_MIN = 64
# faiss's OpenMP threads spin; on a small shared host (2 cores here) a multi-threaded binary search ran
# ~100x slower than a single-threaded one, and per-class searches are small, so they run on one thread.
FAISS_THREADS = 1
_FLOAT16 = np.dtype("<f2")


def hash_bytes_of(kind: HashKind, dim: int) -> int:
    """Bytes one hash takes on the wire: packed bits for binary hashes, two bytes per float16 feature."""
    return dim // 8 if kind is HashKind.BINARY else dim * _FLOAT16.itemsize


def _float_vectors(hashes: np.ndarray) -> np.ndarray:
    """float32 features from the raw little-endian float16 bytes (faiss has no float16 flat index input)."""
    return np.ascontiguousarray(hashes).view(_FLOAT16).astype(np.float32)


@contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """Run faiss on `count` OpenMP threads, restoring the process-wide setting afterwards."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class ClassIndex:
    """One class's hashes in a faiss index (exact, or HNSW above `exact_limit`), searched as often as needed.

    The plain relation searches once; a neighbour policy (broker_server/defences.py) searches again, wider,
    for the few rows its caps left short, without building the index twice.
    """

    def __init__(self, hashes: np.ndarray, *, kind: HashKind, exact: bool) -> None:
        self.kind = kind
        self.size = int(hashes.shape[0])
        self._hnsw: faiss.HNSW | None = None
        self._binary: faiss.IndexBinary | None = None
        self._flat: faiss.Index | None = None
        with _faiss_threads(FAISS_THREADS):
            if kind is HashKind.BINARY:
                self._bits = np.ascontiguousarray(hashes, dtype=np.uint8)
                width = self._bits.shape[1] * 8
                if exact:
                    self._binary = faiss.IndexBinaryFlat(width)
                else:
                    self._binary = binary_hnsw = faiss.IndexBinaryHNSW(width, HNSW_M)
                    self._hnsw = binary_hnsw.hnsw
                    self._hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                self._binary.add(self._bits)
            else:
                self._vectors = _float_vectors(hashes)
                if exact:
                    self._flat = faiss.IndexFlatL2(self._vectors.shape[1])
                else:
                    self._flat = float_hnsw = faiss.IndexHNSWFlat(self._vectors.shape[1], HNSW_M)
                    self._hnsw = float_hnsw.hnsw
                    self._hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                self._flat.add(self._vectors)

    def candidates(self, k: int, positions: np.ndarray | None = None) -> Candidates:
        """The k nearest hashes of every hash (or of those at `positions`) with each row's own position and
        faiss's -1 moved to the back as -1 (distance inf), nearest-first kept, with their distances.

        The sample is excluded by position, never by distance (see build_class_neighbours).
        """
        distances, found = self._faiss_search(k, positions)
        asked = np.arange(self.size) if positions is None else np.asarray(positions, dtype=np.int64)
        dropped = (found == asked[:, None]) | (found < 0)
        # Stable sort moves dropped entries to the back while keeping the nearest-first order of the rest.
        order = np.argsort(dropped, axis=1, kind="stable")
        kept = np.take_along_axis(found, order, axis=1)
        apart = np.take_along_axis(distances, order, axis=1)
        moved = np.take_along_axis(dropped, order, axis=1)
        kept[moved] = -1
        apart[moved] = np.inf
        return Candidates(kept, apart)

    def _faiss_search(self, k: int, positions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (distances, positions) of the k nearest, distances as float64 Hamming bits or Euclidean."""
        with _faiss_threads(FAISS_THREADS):
            if self._hnsw is not None:
                _tune(self._hnsw, k=k)
            if self._binary is not None:
                bits = self._bits if positions is None else np.ascontiguousarray(self._bits[positions])
                bits_apart, found = self._binary.search(bits, k)
                distances = np.asarray(bits_apart, dtype=np.float64)
            else:
                assert self._flat is not None
                vectors = self._vectors if positions is None else np.ascontiguousarray(self._vectors[positions])
                squared, found = self._flat.search(vectors, k)
                distances = np.sqrt(np.maximum(np.asarray(squared, dtype=np.float64), 0.0))
        return distances, np.asarray(found, dtype=np.int64)


@dataclass(frozen=True)
class Candidates:
    """A search's candidates without the asking samples themselves, nearest first: `positions` (n, k) in the
    class, -1 padded, and `distances` (n, k) to them as faiss measured them (Hamming bits for binary hashes,
    Euclidean for float16 ones; inf where -1). The defences read the distances the search already paid for."""

    positions: np.ndarray
    distances: np.ndarray


def nearest_other_distances(hashes: np.ndarray, *, kind: HashKind, asked: np.ndarray | None = None) -> np.ndarray:
    """(n,) each hash's (or each at `asked`'s) distance to its nearest *other* hash of `hashes`, inf when alone.

    For binary hashes a brute-force Hamming search without an index (faiss.knn_hamming): the defences ask this
    of every device's few samples of a class, where building a faiss index per device cost as much as its
    search. Float hashes go through an exact ClassIndex.
    """
    positions = np.arange(hashes.shape[0]) if asked is None else np.asarray(asked, dtype=np.int64)
    if hashes.shape[0] < 2:
        return np.full(positions.size, np.inf)
    if kind is not HashKind.BINARY:
        return ClassIndex(hashes, kind=kind, exact=True).candidates(2, asked).distances[:, 0]
    bits = np.ascontiguousarray(hashes, dtype=np.uint8)
    with _faiss_threads(FAISS_THREADS):
        bits_apart, found = faiss.knn_hamming(np.ascontiguousarray(bits[positions]), bits, 2)
    # Of the two nearest, the first that is not the hash itself (by position: duplicates are other hashes).
    first_is_self = np.asarray(found[:, 0]) == positions
    nearest = np.where(first_is_self, bits_apart[:, 1], bits_apart[:, 0]).astype(np.float64)
    return nearest


def _tune(hnsw: faiss.HNSW, *, k: int) -> None:
    """HNSW search effort: at least 2k candidates so k neighbours come back (the build is set in ClassIndex)."""
    hnsw.efSearch = max(HNSW_EF_SEARCH_MIN, 2 * k)


def build_class_neighbours(
    hashes: np.ndarray,
    *,
    kind: HashKind,
    neighbours: int = DEFAULT_NEIGHBOURS,
    exact_limit: int = EXACT_SEARCH_LIMIT,
) -> np.ndarray:
    """(n, neighbours) int64 positions of each hash's nearest other hashes within one class, -1 padded.

    One extra neighbour is searched so that dropping the sample itself still leaves `neighbours`.
    The sample is excluded by position, never by distance: identical hashes (distance 0) are
    legitimate neighbours of each other, and with many duplicates faiss may not even return the
    sample itself, in which case the farthest of the k+1 results is the one dropped.
    """
    hashes = np.asarray(hashes, dtype=np.uint8)
    count = hashes.shape[0]
    table = np.full((count, neighbours), -1, dtype=np.int64)
    if count <= 1 or neighbours == 0:
        return table
    k = min(neighbours + 1, count)
    kept = ClassIndex(hashes, kind=kind, exact=count <= exact_limit).candidates(k).positions
    width = min(neighbours, k)
    table[:, :width] = kept[:, :width]
    return table


class NeighbourPolicy(Protocol):
    """Chooses one class's neighbour lists instead of the plain R nearest (broker_server/defences.py)."""

    def class_neighbours(
        self,
        *,
        rows: np.ndarray,
        hashes: np.ndarray,
        owners: np.ndarray,
        kind: HashKind,
        neighbours: int,
        exact_limit: int,
    ) -> np.ndarray:
        """(n, neighbours) positions within the class (-1 padded) for its `rows`, hashes and owning devices."""


class RelationTable:
    """The global N x R neighbour table (global rows, -1 padded), rebuilt only for classes that changed.

    New registrations mark their classes dirty instead of triggering a rebuild, so devices can join
    while others train; a dirty class is rebuilt the next time one of its rows is fetched.
    """

    def __init__(
        self,
        *,
        kind: HashKind,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
    ) -> None:
        self.kind = kind
        self.neighbours = neighbours
        self.exact_limit = exact_limit
        self._table = np.full((0, neighbours), -1, dtype=np.int64)
        self._size = 0
        self._dirty: set[int] = set()
        # Set by KnowledgeCache.defend(): classes are then related by the policy (given `owners` on refresh).
        self.policy: NeighbourPolicy | None = None

    @property
    def dirty(self) -> frozenset[int]:
        """Classes whose relations are out of date."""
        return frozenset(self._dirty)

    @property
    def table(self) -> np.ndarray:
        """Read-only view of the table for the rows it covers so far."""
        view = self._table[: self._size]
        view.flags.writeable = False
        return view

    def mark_dirty(self, labels: np.ndarray) -> None:
        """Record that rows with these labels were added, so their classes need a rebuild."""
        self._dirty.update(int(label) for label in np.unique(labels))

    def refresh(
        self,
        *,
        labels: np.ndarray,
        hashes: np.ndarray,
        classes: Iterable[int] | None = None,
        owners: np.ndarray | None = None,
    ) -> tuple[int, ...]:
        """Rebuild the dirty classes (only those among `classes` when given); returns the classes rebuilt.

        `labels` (N,) and `hashes` (N, hash_bytes) describe every registered row; the table grows to
        N rows, with rows of classes not rebuilt yet left at -1. With a policy, `owners` (N,) are the
        rows' device indices it needs.
        """
        self._grow(labels.shape[0])
        wanted = self._dirty if classes is None else self._dirty.intersection(int(c) for c in classes)
        rebuilt = tuple(sorted(wanted))
        if not rebuilt:
            return rebuilt
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        for label in rebuilt:
            lo, hi = np.searchsorted(sorted_labels, [label, label + 1])
            rows = order[lo:hi]
            if self.policy is not None and owners is not None:
                local = self.policy.class_neighbours(
                    rows=rows, hashes=hashes[rows], owners=owners[rows], kind=self.kind,
                    neighbours=self.neighbours, exact_limit=self.exact_limit,
                )  # fmt: skip
            else:
                local = build_class_neighbours(
                    hashes[rows], kind=self.kind, neighbours=self.neighbours, exact_limit=self.exact_limit
                )
            self._table[rows] = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
            self._dirty.discard(label)
        return rebuilt

    def neighbours_of(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), R) global neighbour rows of the given rows."""
        neighbours: np.ndarray = self._table[rows]
        return neighbours

    def restore(self, *, label: int, rows: np.ndarray, labels: np.ndarray, table: np.ndarray) -> bool:
        """Reuse a stored relation of one class instead of rebuilding it; True when it was taken.

        A class's relation depends only on the hashes of its rows, and rows are append-only with immutable
        hashes, so a stored relation over exactly the class's current rows (same R) is still exact.
        """
        current = np.flatnonzero(labels == label)
        if table.shape != (current.size, self.neighbours) or not np.array_equal(rows, current):
            return False
        self._grow(labels.shape[0])
        self._table[current] = table
        self._dirty.discard(label)
        return True

    def relation_of(self, *, label: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One class's rows and their (rows, R) neighbour rows, as a store keeps them."""
        rows = np.flatnonzero(labels == label)
        return rows, self._table[rows].copy()

    def _grow(self, size: int) -> None:
        """Extend to `size` rows with amortised doubling, new rows holding no neighbours."""
        if size > self._table.shape[0]:
            grown = np.full((max(size, 2 * self._table.shape[0]), self.neighbours), -1, dtype=np.int64)
            grown[: self._size] = self._table[: self._size]
            self._table = grown
        self._size = max(self._size, size)
