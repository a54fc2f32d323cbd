"""Measure how well each candidate hash encoder puts same-label images next to each other (picks the default).

The server searches neighbours within a sample's own class, so within-class kNN accuracy says nothing;
instead this measures, over the whole train set, the fraction of a sample's k nearest neighbours sharing
its label (neighbour-label agreement) and the 1-NN test accuracy, as proxies for how similar the
neighbours that FedCache averages knowledge over really are. Encoding goes through the exported ONNX
file and `edge.hashing.HashEncoder`, i.e. the path devices use.

    python -m bench.encoder_quality [--dataset fashion-mnist] [--dim 256] [--queries 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from edge.data import Dataset, load_dataset
from edge.hashing import HashEncoder, decode_float16, hashes_from_features
from fedwire.constants import HashKind
from models.encoder import DEFAULT_DIM, ENCODER_KINDS, export_encoder_onnx

_CHUNK = 4096
_TIMING_IMAGES = 2048


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    encoder: str
    centring: str
    hash: str
    hash_bytes: int
    agreement: float
    nn1_accuracy: float
    bit_balance: float | None
    encode_ms_per_1k: float | None


def neighbour_agreement(
    index: faiss.Index, *, queries: np.ndarray, query_ids: np.ndarray, labels: np.ndarray, k: int
) -> float:
    """Mean fraction of each query's k nearest neighbours (itself excluded) that share its label."""
    _, found = index.search(queries, k + 1)
    hits = 0.0
    for row, own in zip(found, query_ids, strict=True):
        others = row[row != own][:k]
        hits += float(np.mean(labels[others] == labels[own]))
    return hits / len(query_ids)


def nn1_accuracy(index: faiss.Index, *, queries: np.ndarray, train_labels: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of predicting each query's label by its nearest train sample's label."""
    _, found = index.search(queries, 1)
    return float(np.mean(train_labels[found[:, 0]] == labels))


def _float_index(train: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(train.shape[1])
    index.add(np.ascontiguousarray(train, dtype=np.float32))
    return index


def _binary_index(train: np.ndarray) -> faiss.IndexBinary:
    index = faiss.IndexBinaryFlat(train.shape[1] * 8)
    index.add(np.ascontiguousarray(train))
    return index


def _chunks(n: int) -> Iterable[slice]:
    return (slice(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK))


def _features(encoder: HashEncoder, images: np.ndarray, desc: str) -> np.ndarray:
    parts = [encoder.features(images[s]) for s in tqdm(list(_chunks(len(images))), desc=desc, leave=False)]
    return np.concatenate(parts)


def _encode_ms_per_1k(path: Path, images: np.ndarray) -> float:
    """Single-thread encode time, as a device runs it by default."""
    encoder = HashEncoder(path, intra_op_threads=1)
    encoder.encode(images[:64])
    start = time.perf_counter()
    encoder.encode(images)
    return 1000.0 * (time.perf_counter() - start) / len(images) * 1000.0


def measure(data: Dataset, *, dim: int, queries: int, neighbours: int, calibration: int, seed: int) -> list[Row]:
    """All candidate encoders x {binary, float16}, plus a raw-pixel float32 reference row."""
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(len(data.y_train), size=min(queries, len(data.y_train)), replace=False))
    calib_ids = np.sort(rng.choice(len(data.y_train), size=min(calibration, len(data.y_train)), replace=False))
    y_train, y_test = np.asarray(data.y_train), np.asarray(data.y_test)
    rows: list[Row] = []

    pixels = np.asarray(data.x_train).reshape(len(y_train), -1)
    index = _float_index(pixels)
    rows.append(
        Row(
            encoder="raw pixels (reference)",
            centring="-",
            hash="float32 L2",
            hash_bytes=pixels.shape[1] * 4,
            agreement=neighbour_agreement(
                index, queries=pixels[query_ids], query_ids=query_ids, labels=y_train, k=neighbours
            ),
            nn1_accuracy=nn1_accuracy(
                index, queries=np.asarray(data.x_test).reshape(len(y_test), -1), train_labels=y_train, labels=y_test
            ),
            bit_balance=None,
            encode_ms_per_1k=None,
        )
    )
    del index, pixels

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ENCODER_KINDS:
            for centring in ("none", "median"):
                calib = np.asarray(data.x_train[calib_ids]) if centring == "median" else None
                path = export_encoder_onnx(
                    Path(tmp) / f"{kind}-{centring}.onnx",
                    input_shape=data.input_shape,
                    dim=dim,
                    seed=seed,
                    kind=kind,
                    calibration=calib,
                )
                encoder = HashEncoder(path, intra_op_threads=threads)
                f_train = _features(encoder, data.x_train, f"{kind}/{centring} train")
                f_test = _features(encoder, data.x_test, f"{kind}/{centring} test")
                timing = _encode_ms_per_1k(path, np.asarray(data.x_train[:_TIMING_IMAGES]))
                label = f"{kind}"
                b_train = hashes_from_features(f_train, kind=HashKind.BINARY)
                b_test = hashes_from_features(f_test, kind=HashKind.BINARY)
                index = _binary_index(b_train)
                rows.append(
                    Row(
                        encoder=label,
                        centring=centring,
                        hash="binary Hamming",
                        hash_bytes=dim // 8,
                        agreement=neighbour_agreement(
                            index, queries=b_train[query_ids], query_ids=query_ids, labels=y_train, k=neighbours
                        ),
                        nn1_accuracy=nn1_accuracy(index, queries=b_test, train_labels=y_train, labels=y_test),
                        bit_balance=float(np.mean(np.abs((f_train > 0).mean(axis=0) - 0.5))),
                        encode_ms_per_1k=timing,
                    )
                )
                if centring != "none":
                    continue  # an offset shifts every float feature alike: L2 distances do not change
                h_train = decode_float16(hashes_from_features(f_train, kind=HashKind.FLOAT16))
                h_test = decode_float16(hashes_from_features(f_test, kind=HashKind.FLOAT16))
                index = _float_index(h_train)
                rows.append(
                    Row(
                        encoder=label,
                        centring="any",
                        hash="float16 L2",
                        hash_bytes=dim * 2,
                        agreement=neighbour_agreement(
                            index, queries=h_train[query_ids], query_ids=query_ids, labels=y_train, k=neighbours
                        ),
                        nn1_accuracy=nn1_accuracy(index, queries=h_test, train_labels=y_train, labels=y_test),
                        bit_balance=None,
                        encode_ms_per_1k=timing,
                    )
                )
    return rows


def format_table(rows: list[Row], *, neighbours: int) -> str:
    """A markdown table of the rows."""
    head = (
        f"| encoder | centring | hash | bytes/sample | label agreement@{neighbours} | 1-NN test acc "
        "| bit imbalance | encode ms/1k imgs (1 thread) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        balance = "-" if r.bit_balance is None else f"{r.bit_balance:.3f}"
        timing = "-" if r.encode_ms_per_1k is None else f"{r.encode_ms_per_1k:.0f}"
        lines.append(
            f"| {r.encoder} | {r.centring} | {r.hash} | {r.hash_bytes} | {r.agreement:.4f} | "
            f"{r.nn1_accuracy:.4f} | {balance} | {timing} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--queries", type=int, default=10_000, help="train samples whose neighbours are checked")
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=2048, help="train images for the median centring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset)
    started = time.perf_counter()
    rows = measure(
        data,
        dim=args.dim,
        queries=args.queries,
        neighbours=args.neighbours,
        calibration=args.calibration,
        seed=args.seed,
    )
    print(
        f"{data.name}: train {len(data.y_train)}, test {len(data.y_test)}, D={args.dim}, "
        f"{args.queries} queries, {time.perf_counter() - started:.0f} s"
    )
    print(format_table(rows, neighbours=args.neighbours))


if __name__ == "__main__":
    main()
