"""Relation build benchmark: faiss exact vs faiss approximate vs hnswlib (FedCache demo parameters), per class.

The server relates every sample to its R=16 nearest same-class samples, class by class
(`broker_server.relations.build_class_neighbours`). This measures, on the 60,000 FashionMNIST train
hashes of the default encoder (conv, 256 bits, seed 0), the build + query time of each method over all
classes and its recall@16 against the exact neighbours of the same metric; then the approximate methods
on 1M synthetic clustered binary codes (10 classes), where the server leaves exact search.

Every index runs on one thread, as the server does (`FAISS_THREADS`); the public FedCache demo runs
hnswlib on all cores, which on this 2-core host would only halve its times at best.

    python -m bench relations [--quick] [--repeats 3] [--synthetic 1000000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from bench._report import machine_line, markdown_table, timed
from broker_server.relations import (
    EXACT_SEARCH_LIMIT,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH_MIN,
    HNSW_M,
    build_class_neighbours,
)
from fedwire.constants import DEFAULT_NEIGHBOURS, HashKind

# The public FedCache demo (FedCache.py, KnowledgeCache.build_relation): hnswlib, space='cosine',
# M=64, ef_construction=1000, ef=1000, one index per class, query k=R+1 and drop the first hit.
DEMO_M = 64
DEMO_EF_CONSTRUCTION = 1000
DEMO_EF = 1000
SEED = 0
QUICK_PER_CLASS = 500
QUICK_SYNTHETIC = 50_000
SYNTHETIC_CLASSES = 10
SYNTHETIC_BITS = 256
SYNTHETIC_CLUSTER_SIZE = 100
SYNTHETIC_FLIP = (0.05, 0.20)
SAMPLED_QUERIES = 1000
EXACT_BUDGET_S = 300.0
_TIE_TOLERANCE = 1e-5

Searcher = Callable[[np.ndarray, int], np.ndarray]


# ---------------------------------------------------------------- neighbour tables and recall


def drop_self(found: np.ndarray, neighbours: int) -> np.ndarray:
    """(n, neighbours) table from a k+1 search, the sample itself dropped by position as the server does.

    Same rule as `build_class_neighbours`: drop the sample's own position (or, when the search did not
    return it, the farthest hit) and pad missing entries with -1, so every method is judged on identical rows.
    """
    count = found.shape[0]
    dropped = (found == np.arange(count)[:, None]) | (found < 0)
    order = np.argsort(dropped, axis=1, kind="stable")
    kept = np.take_along_axis(found, order, axis=1)
    kept[np.take_along_axis(dropped, order, axis=1)] = -1
    table = np.full((count, neighbours), -1, dtype=np.int64)
    width = min(neighbours, kept.shape[1])
    table[:, :width] = kept[:, :width]
    return table


def neighbour_recall(
    found: np.ndarray,
    exact: np.ndarray,
    *,
    found_dist: np.ndarray | None = None,
    exact_dist: np.ndarray | None = None,
) -> float:
    """Mean over rows of the fraction of the exact neighbours that `found` recovers (-1 entries never count).

    Without distances it is the usual id overlap. With them it is tie-aware: a found neighbour counts when
    it is no farther than the exact k-th neighbour. Binary hashes have integer Hamming distances with
    many ties, and which of the tied samples an exact search returns is arbitrary, so id overlap alone
    would penalise an approximate method for picking an equally near sample.
    """
    found = np.asarray(found)
    exact = np.asarray(exact)
    if found.shape[0] != exact.shape[0]:
        raise ValueError(f"tables have {found.shape[0]} and {exact.shape[0]} rows")
    valid = exact >= 0
    wanted = valid.sum(axis=1)
    rows = wanted > 0
    if not rows.any():
        return 1.0
    if (found_dist is None) != (exact_dist is None):
        raise ValueError("give both distance tables or neither")
    if found_dist is None:
        hits = ((found[:, :, None] == exact[:, None, :]) & valid[:, None, :] & (found[:, :, None] >= 0)).any(axis=1)
        got = hits.sum(axis=1)
    else:
        assert exact_dist is not None
        last = np.maximum(wanted - 1, 0)
        kth = np.take_along_axis(np.where(valid, exact_dist, -np.inf), last[:, None], axis=1)
        limit = kth + _TIE_TOLERANCE * np.maximum(np.abs(kth), 1.0)
        got = np.minimum(((found >= 0) & (found_dist <= limit)).sum(axis=1), wanted)
    return float(np.mean(got[rows] / wanted[rows]))


def pair_distances(vectors: np.ndarray, table: np.ndarray, metric: str) -> np.ndarray:
    """Distance of each row to each of its table entries in `metric` (inf for -1 entries).

    Recomputed here rather than taken from each library, so every method is scored in the same units.
    """
    safe = np.maximum(table, 0)
    if metric == "hamming":
        dist = np.bitwise_count(vectors[:, None, :] ^ vectors[safe]).sum(axis=2).astype(np.float64)
    elif metric == "l2":
        dist = ((vectors[:, None, :] - vectors[safe]) ** 2).sum(axis=2, dtype=np.float64)
    elif metric == "cosine":
        dist = 1.0 - np.einsum("nd,nkd->nk", vectors, vectors[safe], dtype=np.float64)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return np.where(table >= 0, dist, np.inf)


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way of building a class's neighbour table; `search` returns k+1 hits per row (self included)."""

    name: str
    kind: HashKind
    metric: str  # "hamming", "l2" or "cosine": what its recall is measured against
    search: Searcher
    exact: bool = False
    wire: bool = False  # takes the wire bytes (the server's entry point) rather than decoded vectors


def _server(kind: HashKind, *, exact: bool) -> Searcher:
    """The server's own code path, index choice and self-dropping included (inputs are wire bytes)."""
    limit = math.inf if exact else 0

    def search(hashes: np.ndarray, neighbours: int) -> np.ndarray:
        return build_class_neighbours(hashes, kind=kind, neighbours=neighbours, exact_limit=limit)  # type: ignore[arg-type]

    return search


def _faiss_search(index: faiss.Index, vectors: np.ndarray, k: int) -> np.ndarray:
    index.add(vectors)
    return np.asarray(index.search(vectors, k)[1], dtype=np.int64)


def _ivf_lists(n: int) -> tuple[int, int]:
    """nlist ~ sqrt(n) (faiss's rule of thumb, at least 39 points per list to train) and nprobe = nlist / 8."""
    nlist = max(1, min(round(math.sqrt(n)), n // 39))
    return nlist, max(1, nlist // 8)


def _binary_ivf(codes: np.ndarray, neighbours: int) -> np.ndarray:
    nlist, nprobe = _ivf_lists(len(codes))
    quantiser = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index = faiss.IndexBinaryIVF(quantiser, codes.shape[1] * 8, nlist)
    index.train(codes)
    index.nprobe = nprobe
    return drop_self(_faiss_search(index, codes, min(neighbours + 1, len(codes))), neighbours)


def _float_ivf(vectors: np.ndarray, neighbours: int) -> np.ndarray:
    nlist, nprobe = _ivf_lists(len(vectors))
    quantiser = faiss.IndexFlatL2(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantiser, vectors.shape[1], nlist)
    index.train(vectors)
    index.nprobe = nprobe
    return drop_self(_faiss_search(index, vectors, min(neighbours + 1, len(vectors))), neighbours)


def _exact_cosine(vectors: np.ndarray, neighbours: int) -> np.ndarray:
    """Exact cosine neighbours: inner product of L2-normalised vectors (the reference for the demo's space)."""
    normed = _normalised(vectors)
    index = faiss.IndexFlatIP(normed.shape[1])
    return drop_self(_faiss_search(index, normed, min(neighbours + 1, len(normed))), neighbours)


def _hnswlib(space: str) -> Searcher:
    def search(vectors: np.ndarray, neighbours: int) -> np.ndarray:
        import hnswlib

        count = len(vectors)
        index = hnswlib.Index(space=space, dim=vectors.shape[1])
        index.init_index(max_elements=count, ef_construction=DEMO_EF_CONSTRUCTION, M=DEMO_M, random_seed=SEED)
        index.set_num_threads(1)
        index.add_items(vectors, np.arange(count))
        index.set_ef(DEMO_EF)
        labels, _ = index.knn_query(vectors, k=min(neighbours + 1, count))
        return drop_self(np.asarray(labels, dtype=np.int64), neighbours)

    return search


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


_SERVER_HNSW = f"M={HNSW_M} efC={HNSW_EF_CONSTRUCTION} efS={max(HNSW_EF_SEARCH_MIN, 2 * (DEFAULT_NEIGHBOURS + 1))}"
_DEMO = f"M={DEMO_M} efC={DEMO_EF_CONSTRUCTION} ef={DEMO_EF}"


def binary_methods() -> list[Method]:
    """Methods on packed 256-bit codes (Hamming); the first is the exact baseline."""
    binary = HashKind.BINARY
    return [
        Method(
            "faiss IndexBinaryFlat (server, exact)",
            binary,
            "hamming",
            _server(binary, exact=True),
            exact=True,
            wire=True,
        ),
        Method(
            f"faiss IndexBinaryHNSW {_SERVER_HNSW} (server)", binary, "hamming", _server(binary, exact=False), wire=True
        ),
        Method("faiss IndexBinaryIVF nlist=√n nprobe=nlist/8", binary, "hamming", _binary_ivf),
    ]


def float_methods() -> list[Method]:
    """Methods on float16 features (L2, and cosine as the demo uses); the first is the exact baseline."""
    halves = HashKind.FLOAT16
    return [
        Method("faiss IndexFlatL2 (server, exact)", halves, "l2", _server(halves, exact=True), exact=True, wire=True),
        Method(f"faiss IndexHNSWFlat {_SERVER_HNSW} (server)", halves, "l2", _server(halves, exact=False), wire=True),
        Method("faiss IndexIVFFlat nlist=√n nprobe=nlist/8", halves, "l2", _float_ivf),
        Method(f"hnswlib l2 {_DEMO} (demo params)", halves, "l2", _hnswlib("l2")),
        Method("faiss IndexFlatIP normalised (exact cosine)", halves, "cosine", _exact_cosine, exact=True),
        Method(f"hnswlib cosine {_DEMO} (FedCache demo)", halves, "cosine", _hnswlib("cosine")),
    ]


# ---------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class ClassData:
    """One class's samples in every representation a method may want."""

    wire: np.ndarray  # uint8 (n, hash_bytes): what the server holds
    vectors: np.ndarray  # what non-server methods search: uint8 codes or float32 features
    cosine: np.ndarray | None  # L2-normalised float32 features, for scoring cosine methods


def fashion_hashes(per_class: int | None, seed: int) -> tuple[list[ClassData], list[ClassData], int]:
    """Binary and float16 hashes of the FashionMNIST train set from the default encoder, split by class.

    They go through the exported ONNX encoder and `HashEncoder`, the path a device takes.
    """
    from edge.data import load_dataset
    from edge.hashing import HashEncoder, decode_float16, hashes_from_features
    from models.encoder import export_encoder_onnx

    data = load_dataset("fashion-mnist")
    labels = np.asarray(data.y_train)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_encoder_onnx(Path(tmp) / "encoder.onnx", input_shape=data.input_shape)
        encoder = HashEncoder(path, intra_op_threads=2)
        chunks = range(0, len(labels), 4096)
        features = np.concatenate(
            [encoder.features(np.asarray(data.x_train[s : s + 4096])) for s in tqdm(chunks, desc="encode", leave=False)]
        )
    binary, floats = [], []
    for label in range(data.classes):
        rows = np.flatnonzero(labels == label)
        if per_class is not None and per_class < rows.size:
            rows = np.sort(rng.choice(rows, size=per_class, replace=False))
        codes = hashes_from_features(features[rows], kind=HashKind.BINARY)
        halves = hashes_from_features(features[rows], kind=HashKind.FLOAT16)
        decoded = decode_float16(halves)
        binary.append(ClassData(wire=codes, vectors=codes, cosine=None))
        floats.append(ClassData(wire=halves, vectors=decoded, cosine=_normalised(decoded)))
    return binary, floats, len(labels) if per_class is None else sum(len(c.wire) for c in binary)


def synthetic_codes(total: int, seed: int) -> list[ClassData]:
    """Clustered random 256-bit codes, `total` over 10 classes.

    Each class has clusters of ~100 codes: a random centre with every bit flipped independently with a
    per-cluster probability drawn from [0.05, 0.20], so true neighbours are near (~10-80 bits) and
    other clusters far (~128 bits), as with real hashes of similar images.
    """
    rng = np.random.default_rng(seed)
    per_class = total // SYNTHETIC_CLASSES
    classes = []
    for _ in tqdm(range(SYNTHETIC_CLASSES), desc="synthetic codes", leave=False):
        clusters = max(1, per_class // SYNTHETIC_CLUSTER_SIZE)
        centres = rng.integers(0, 256, size=(clusters, SYNTHETIC_BITS // 8), dtype=np.uint8)
        flip = rng.uniform(*SYNTHETIC_FLIP, size=clusters)
        member = rng.integers(0, clusters, size=per_class)
        noise = np.empty((per_class, SYNTHETIC_BITS // 8), np.uint8)
        for start in range(0, per_class, 65536):
            part = slice(start, start + 65536)
            bits = rng.random((len(member[part]), SYNTHETIC_BITS)) < flip[member[part], None]
            noise[part] = np.packbits(bits, axis=1, bitorder="little")
        codes = np.ascontiguousarray(centres[member] ^ noise)
        classes.append(ClassData(wire=codes, vectors=codes, cosine=None))
    return classes


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Result:
    """One method over all classes."""

    name: str
    seconds: float  # median over repeats of the sum over classes
    ratio: float  # seconds / the exact baseline's seconds in this run
    recall_ids: float
    recall_ties: float
    note: str = ""


def _inputs(method: Method, data: ClassData) -> np.ndarray:
    return data.wire if method.wire else data.vectors


def _build_all(method: Method, classes: list[ClassData], neighbours: int) -> list[np.ndarray]:
    with _one_thread():
        return [method.search(_inputs(method, data), neighbours) for data in classes]


class _one_thread:
    """faiss on one OpenMP thread for non-server methods too, as the server runs it."""

    def __enter__(self) -> None:
        self._previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *_exc: object) -> None:
        faiss.omp_set_num_threads(self._previous)


def _score_vectors(method: Method, data: ClassData) -> np.ndarray:
    return data.cosine if method.metric == "cosine" and data.cosine is not None else data.vectors


def run_methods(
    methods: list[Method], classes: list[ClassData], *, neighbours: int, repeats: int, desc: str
) -> list[Result]:
    """Time every method over all classes (median of `repeats`) and score it against its metric's exact table."""
    exact_tables: dict[str, list[np.ndarray]] = {}
    exact_dists: dict[str, list[np.ndarray]] = {}
    baseline: float | None = None
    results = []
    for method in tqdm(methods, desc=desc, leave=False):
        seconds, tables = timed(lambda m=method: _build_all(m, classes, neighbours), repeats=repeats)
        dists = [
            pair_distances(_score_vectors(method, d), t, method.metric) for d, t in zip(classes, tables, strict=True)
        ]
        if method.exact and method.metric not in exact_tables:
            exact_tables[method.metric], exact_dists[method.metric] = tables, dists
        baseline = seconds if baseline is None else baseline
        reference, reference_dist = exact_tables[method.metric], exact_dists[method.metric]
        weights = np.array([len(t) for t in tables], dtype=np.float64)
        ids = [neighbour_recall(t, r) for t, r in zip(tables, reference, strict=True)]
        ties = [
            neighbour_recall(t, r, found_dist=d, exact_dist=rd)
            for t, r, d, rd in zip(tables, reference, dists, reference_dist, strict=True)
        ]
        results.append(
            Result(
                name=method.name,
                seconds=seconds,
                ratio=seconds / baseline,
                recall_ids=float(np.average(ids, weights=weights)),
                recall_ties=float(np.average(ties, weights=weights)),
            )
        )
    return results


def _sampled_exact(codes: np.ndarray, rows: np.ndarray, neighbours: int) -> tuple[np.ndarray, float]:
    """Exact neighbours of a sample of rows by brute force, and the time it took (to extrapolate a full build)."""
    start = time.perf_counter()
    with _one_thread():
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        index.add(codes)
        _, found = index.search(codes[rows], min(neighbours + 1, len(codes)))
    found = np.asarray(found, dtype=np.int64)
    dropped = (found == rows[:, None]) | (found < 0)
    order = np.argsort(dropped, axis=1, kind="stable")
    kept = np.take_along_axis(found, order, axis=1)
    kept[np.take_along_axis(dropped, order, axis=1)] = -1
    return kept[:, :neighbours], time.perf_counter() - start


def run_synthetic(
    classes: list[ClassData], *, neighbours: int, queries: int, exact_budget_s: float, seed: int
) -> tuple[list[Result], str]:
    """Approximate methods on the big synthetic set, once each; recall on sampled rows against brute force.

    The exact build runs too when the sampled brute-force time extrapolates to within `exact_budget_s`.
    """
    rng = np.random.default_rng(seed)
    samples = [np.sort(rng.choice(len(c.wire), size=min(queries, len(c.wire)), replace=False)) for c in classes]
    truth, spent = zip(
        *(
            _sampled_exact(c.wire, s, neighbours)
            for c, s in zip(tqdm(classes, desc="sampled exact", leave=False), samples, strict=True)
        ),
        strict=True,
    )
    estimate = sum(t * len(c.wire) / len(s) for t, c, s in zip(spent, classes, samples, strict=True))
    methods = binary_methods()
    note = f"exact build estimated at {estimate:.0f} s from {queries} sampled queries per class"
    if estimate > exact_budget_s:
        methods = methods[1:]
        note += f": over the {exact_budget_s:.0f} s budget, so skipped (recall is against sampled brute force)"
    else:
        note += ", so it was run"
    results = []
    baseline: float | None = None
    for method in tqdm(methods, desc="synthetic", leave=False):
        seconds, tables = timed(lambda m=method: _build_all(m, classes, neighbours), repeats=1)
        picked = [t[s] for t, s in zip(tables, samples, strict=True)]
        ids, ties = [], []
        for c, s, t, r in zip(classes, samples, picked, truth, strict=True):
            ids.append(neighbour_recall(t, r))
            found_dist = _rows_distances(c.wire, s, t)
            exact_dist = _rows_distances(c.wire, s, r)
            ties.append(neighbour_recall(t, r, found_dist=found_dist, exact_dist=exact_dist))
        baseline = baseline or (seconds if method.exact else estimate)
        results.append(
            Result(
                name=method.name,
                seconds=seconds,
                ratio=seconds / baseline,
                recall_ids=float(np.mean(ids)),
                recall_ties=float(np.mean(ties)),
            )
        )
    return results, note


def _rows_distances(codes: np.ndarray, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    safe = np.maximum(table, 0)
    dist = np.bitwise_count(codes[rows][:, None, :] ^ codes[safe]).sum(axis=2).astype(np.float64)
    return np.where(table >= 0, dist, np.inf)


def format_results(results: list[Result], *, baseline: str) -> str:
    """Markdown table; the ratio column is time relative to `baseline`, measured in the same run."""
    rows = [
        (r.name, f"{r.seconds:.2f}", f"{r.ratio:.2f}x", f"{r.recall_ids:.4f}", f"{r.recall_ties:.4f}") for r in results
    ]
    headers = (
        "method",
        "build+query s (all classes)",
        f"time vs {baseline}",
        "recall@16 (ids)",
        "recall@16 (tie-aware)",
    )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench relations", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PER_CLASS} samples per class, {QUICK_SYNTHETIC} synthetic codes: about a minute",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats on FashionMNIST (median reported)")
    parser.add_argument("--per-class", type=int, default=None, help="subsample FashionMNIST to this many per class")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic binary codes (0 skips)")
    parser.add_argument(
        "--exact-budget",
        type=float,
        default=EXACT_BUDGET_S,
        help="seconds the synthetic exact build may take (extrapolated) before it is skipped",
    )
    parser.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    per_class = QUICK_PER_CLASS if args.quick and args.per_class is None else args.per_class
    synthetic = min(args.synthetic, QUICK_SYNTHETIC) if args.quick else args.synthetic

    started = time.perf_counter()
    binary, floats, total = fashion_hashes(per_class, args.seed)
    print(f"# relations: {machine_line()}")
    print(
        f"FashionMNIST train hashes (default conv encoder, 256 bits / 256 float16): {total} samples, "
        f"{len(binary)} classes, R={args.neighbours}, median of {args.repeats}, 1 thread; server switches to HNSW "
        f"above {EXACT_SEARCH_LIMIT} samples per class\n"
    )
    print("Binary hashes (Hamming):")
    print(
        format_results(
            run_methods(binary_methods(), binary, neighbours=args.neighbours, repeats=args.repeats, desc="binary"),
            baseline="IndexBinaryFlat",
        )
    )
    print("\nfloat16 features (L2; cosine rows scored against exact cosine):")
    print(
        format_results(
            run_methods(float_methods(), floats, neighbours=args.neighbours, repeats=args.repeats, desc="float16"),
            baseline="IndexFlatL2",
        )
    )
    if synthetic:
        codes = synthetic_codes(synthetic, args.seed)
        results, note = run_synthetic(
            codes, neighbours=args.neighbours, queries=SAMPLED_QUERIES, exact_budget_s=args.exact_budget, seed=args.seed
        )
        print(f"\nSynthetic clustered binary codes: {synthetic} samples, {SYNTHETIC_CLASSES} classes, one run each;")
        print(f"{note}.")
        print("hnswlib is not run here: it has no Hamming space (256 bits would become 256 float32, 32x the memory).")
        print(format_results(results, baseline="exact (run or estimated)"))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
