"""Server restart after kill -9: time to load the durable state and rebuild relations for 60k and 1M samples."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from broker_server.handlers import CacheService
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


def time_open(directory: Path, repeats: int) -> tuple[float, float]:
    """Median seconds to open the service (load + relation rebuild), and the same for loading alone."""
    totals, loads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        store = SqliteStore(directory / "fedcache.sqlite3")
        store.load()
        loads.append(time.perf_counter() - start)
        store.close()
        start = time.perf_counter()
        with CacheService.open(directory):
            totals.append(time.perf_counter() - start)
    return statistics.median(totals), statistics.median(loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recovery", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="60k and 200k samples only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = (60_000, 200_000) if args.quick else (60_000, 1_000_000)
    print(f"{'samples':>10} {'load s':>8} {'load + relations s':>19} {'db MiB':>7}")
    for samples in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
            directory = Path(tmp)
            populate(directory / "fedcache.sqlite3", samples)
            total, load = time_open(directory, args.repeats)
            size = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
            print(f"{samples:>10,} {load:>8.2f} {total:>19.2f} {size:>7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
