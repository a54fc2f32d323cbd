"""Commit latency of the server's SQLite store with WAL checkpoints inline (SQLite's default) or on their own thread.

```
python -m bench wal_checkpoints [--commits 20000] [--rows 4] [--repeats 2]
```

Each variant opens a fresh `SqliteStore` and commits `--commits` small knowledge batches (`--rows` rows of 10
float32 logits, random rows of 70,000, the shape of a lone open-loop request's update), timing each
save+commit. `inline` is `SqliteStore(checkpoint_thread=False)`: SQLite's auto-checkpoint (1,000 pages) inside
the commits, which is what the store did before; `thread` is the store as it is. The variants alternate, `--repeats`
times each, so both see the same machine load; the table gives the median of each figure over the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from broker_server.store import STORE_FILENAME, SqliteStore

VARIANTS = ("inline", "thread")


def _run(variant: str, *, commits: int, rows: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(Path(directory) / STORE_FILENAME, checkpoint_thread=variant == "thread")
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal((rows, 10)).astype(np.float32)
        latencies = np.empty(commits)
        try:
            for index in range(commits):
                chosen = rng.integers(0, 70_000, rows)
                start = time.perf_counter()
                store.save_knowledge(rows=chosen, logits=logits, versions=np.full(rows, index))
                store.commit()
                latencies[index] = time.perf_counter() - start
        finally:
            store.close()
    ms = latencies * 1e3
    return {
        "p50": float(np.median(ms)),
        "p99": float(np.percentile(ms, 99)),
        "p99.9": float(np.percentile(ms, 99.9)),
        "max": float(ms.max()),
        "over 5 ms": float((ms > 5).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench wal_checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=4, help="rows per commit")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    args = parser.parse_args(argv)
    print(f"# wal_checkpoints: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            results[variant].append(_run(variant, commits=args.commits, rows=args.rows, seed=repeat))
    figures = list(results[VARIANTS[0]][0])
    print(f"\n{args.commits} commits of {args.rows} rows each, median over {args.repeats} runs per variant\n")
    print("| figure | " + " | ".join(VARIANTS) + " | thread/inline |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    for figure in figures:
        medians = [statistics.median(run[figure] for run in results[variant]) for variant in VARIANTS]
        ratio = f"{medians[1] / medians[0]:.2f}" if medians[0] else "-"
        unit = "" if figure == "over 5 ms" else " ms"
        print(f"| commit {figure} | " + " | ".join(f"{m:.3f}{unit}" for m in medians) + f" | {ratio} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0
