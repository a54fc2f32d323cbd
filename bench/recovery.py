"""Server restart after kill -9: time to load the durable state, relations rebuilt or reused (60k and 1M samples)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench._report import machine_line, markdown_table
from broker_server.state_factory import open_state
from broker_server.store import DeviceRecord, SqliteStore
from fedwire import HashKind

CLASSES = 10
HASH_BITS = 256
DEVICES = 100


def populate(path: Path, samples: int, seed: int = 0) -> None:
    """A store as a server leaves it: devices, every sample registered, knowledge for every sample."""
    rng = np.random.default_rng(seed)
    store = SqliteStore(path)
    per_device = samples // DEVICES
    for device in tqdm(range(DEVICES), desc=f"writing {samples:,} samples", unit="dev"):
        store.save_device(
            DeviceRecord(
                index=device,
                device=f"dev{device:04d}",
                model="cnn",
                classes=CLASSES,
                samples=per_device,
                hash_kind=HashKind.BINARY,
                hash_dim=HASH_BITS,
            )
        )
        rows = np.arange(device * per_device, (device + 1) * per_device, dtype=np.int64)
        store.save_samples(
            rows=rows,
            device=device,
            ids=np.arange(per_device, dtype=np.uint32),
            labels=rng.integers(0, CLASSES, per_device).astype(np.uint16),
            hashes=rng.integers(0, 256, (per_device, HASH_BITS // 8), dtype=np.uint8),
        )
        store.save_knowledge(
            rows=rows,
            logits=rng.normal(size=(per_device, CLASSES)).astype(np.float32),
            versions=np.ones(per_device, np.int64),
        )
        store.commit()
    store.close()


def time_open(directory: Path, repeats: int) -> tuple[float, float, float]:
    """Seconds to load the store alone (median), to open the state the first time after a crash that left no
    relations stored (load + rebuild of every class, which then stores them), and to open it again (median:
    load + the stored relations reused)."""
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        store = SqliteStore(directory / "fedcache.sqlite3")
        store.load()
        loads.append(time.perf_counter() - start)
        store.close()
    start = time.perf_counter()
    with open_state(directory):
        first = time.perf_counter() - start
    reopens = []
    for _ in range(repeats):
        start = time.perf_counter()
        with open_state(directory) as state:
            reopens.append(time.perf_counter() - start)
            assert state.stats().dirty_classes == 0
    return statistics.median(loads), first, statistics.median(reopens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recovery", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="60k and 200k samples only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = (60_000, 200_000) if args.quick else (60_000, 1_000_000)
    print(machine_line())
    rows = []
    for samples in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
            directory = Path(tmp)
            populate(directory / "fedcache.sqlite3", samples)
            load, first, reopen = time_open(directory, args.repeats)
            size = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
            rows.append([f"{samples:,}", f"{load:.2f}", f"{first:.2f}", f"{reopen:.2f}", f"{first / reopen:.1f}x",
                         f"{size:.0f}"])  # fmt: skip
    print(
        markdown_table(
            ["samples", "load s", "open, relations rebuilt s", "open, relations reused s", "speed-up", "db MiB"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
