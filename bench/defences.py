"""What the server's defences cost and do on real hashes: relation build, fetch and update, hub registration.

On the FashionMNIST train set hashed by the default encoder (conv, 256 bits, seed 0), split over DEVICES
devices by the trials' Dirichlet(1.0) partition, with R=16 and one thread (as the server runs): the
relation build with and without defences, in-process fetch latency of 32 ids (an update_fetch's prefetch)
and update latency of 8 rows (one batch), modes alternated call by call; honest samples wrongly flagged as
hubs, how full the capped lists stay and how many of their entries a plain list also has; then one device
registering `--copies` near-copies of its class centres per class (edge/attacks.py `hub`): the slots it holds
in honest samples' lists without and with defences, and how many of its crafted hashes are flagged; then one
device registering `--public-copies` copies of every public training image's hash, `--copy-bits` bits flipped
in each (edge/attacks.py `CopyAttack`: the public set encoded by the same encoder): the same figures, with the
defences' relation build on and off; `--older-rules` also with defences on but the foreign-copy rule off (what
the older rules catch; slow: the hub rounds then re-search most rows, over 400 s per FashionMNIST class).

    python -m bench defences [--quick] [--devices 20] [--copies 64] [--public-copies 8] [--copy-bits 8]
        [--older-rules] [--fetches 3000] [--builds 2]

The relation build ratio is of the fastest of `--builds` builds per mode (alternated): on a loaded host
more builds give a steadier ratio. The build runs on one thread, so its CPU time (process_time) is reported
beside the wall time: on a shared host the CPU time ratio is the steadier one (other work inflates wall time,
barely this process's own CPU time). The load average at the end is printed too, as the start's is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._report import machine_line
from broker_server.cache import CacheConfig, KnowledgeCache
from broker_server.defences import DefenceConfig
from edge.attacks import COPY_COPIES, HubSamples, hub_samples, public_copies
from fedwire.constants import HashKind

R = 16
QUICK_DEVICES = 6
QUICK_FETCHES = 300


@dataclasses.dataclass(frozen=True)
class _Hashes:
    """Per device its train hashes and labels, and the public training set's (what a copying attacker encodes)."""

    hashes: list[np.ndarray]
    labels: list[np.ndarray]
    public: np.ndarray
    public_labels: np.ndarray


def _hashes(devices: int, *, quick: bool) -> _Hashes:
    """Every device's train hashes and the public set's, through the exported encoder and HashEncoder as a
    device does (the attacker encodes the public images with the same encoder)."""
    from edge.data import device_shard, load_dataset
    from edge.hashing import HashEncoder
    from models.encoder import export_encoder_onnx

    data = load_dataset("digits" if quick else "fashion-mnist")
    shards = [device_shard(data, num_devices=devices, alpha=1.0, seed=0, index=i) for i in range(devices)]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_encoder_onnx(Path(tmp) / "encoder.onnx", input_shape=data.input_shape)
        encoder = HashEncoder(path, hash_kind=HashKind.BINARY)
        hashes = [encoder.encode(shard.x_train) for shard in shards]
        public = encoder.encode(data.x_train)
    labels = [shard.y_train.astype(np.uint16) for shard in shards]
    return _Hashes(hashes, labels, public, np.asarray(data.y_train, dtype=np.uint16))


def _fleet(
    hashes: list[np.ndarray], labels: list[np.ndarray], *, defences: DefenceConfig | None, hub: HubSamples | None
) -> tuple[KnowledgeCache, float, float]:
    """A cache with every device registered (the last one also `hub`'s samples) and its relation build's wall and
    CPU seconds."""
    cache = KnowledgeCache(config=CacheConfig(classes=10, hash_kind=HashKind.BINARY, hash_dim=256), neighbours=R)
    if defences is not None:
        cache.defend(defences)
    for index, (codes, classes) in enumerate(zip(hashes, labels, strict=True)):
        extra = hub.count if hub is not None and index == len(hashes) - 1 else 0
        name = f"dev{index:03d}"
        cache.hello(
            device=name, model="cnn", classes=10, samples=len(classes) + extra, hash_kind=HashKind.BINARY,
            hash_dim=256,
        )  # fmt: skip
        cache.register(device=name, ids=np.arange(len(classes), dtype=np.uint32), labels=classes, hashes=codes)
        if hub is not None and extra:
            cache.register(device=name, ids=hub.ids, labels=hub.labels, hashes=hub.hashes)
    started, cpu = time.perf_counter(), time.process_time()
    cache.refresh_relations()
    return cache, time.perf_counter() - started, time.process_time() - cpu


def _percentiles(seconds: list[float]) -> dict[str, int]:
    return {f"p{q}": round(float(np.percentile(seconds, q)) * 1e6) for q in (50, 95)}


def _slots(cache: KnowledgeCache, device: int) -> np.ndarray:
    """Per sample of every other device: how many of its R slots `device`'s samples hold."""
    table, owners = cache.relations.table, cache.sample_devices  # type: ignore[union-attr]
    others = np.flatnonzero(owners != device)
    held: np.ndarray = ((table[others] >= 0) & (owners[np.maximum(table[others], 0)] == device)).sum(axis=1)
    return held


def _attacked(
    hashes: list[np.ndarray], labels: list[np.ndarray], crafted: HubSamples, *, defences: DefenceConfig | None
) -> dict[str, Any]:
    """The last device registering `crafted` after its own samples: its slots in the other devices' lists,
    the build's wall and CPU seconds, and (defended) how many crafted and real hashes are flagged."""
    attacker = len(hashes) - 1
    cache, seconds, cpu = _fleet(hashes, labels, defences=defences, hub=crafted)
    held = _slots(cache, attacker)
    entry: dict[str, Any] = {
        "attacker_slots_median": float(np.median(held)),
        "attacker_slots_max": int(held.max()),
        "honest_rows_with_half_or_more": round(float((held >= R // 2).mean()), 4),
        "relation_build_s": round(seconds, 3),
        "relation_build_cpu_s": round(cpu, 3),
    }
    if cache.defences is not None:
        flags = cache.defences.hub_flags(cache.size)
        over = cache.defences.describe([f"dev{i:03d}" for i in range(len(hashes))], owners=cache.sample_devices)
        rows = cache.rows_of(f"dev{attacker:03d}", crafted.ids)
        real = np.setdiff1d(np.arange(cache.size), rows)
        own = np.setdiff1d(np.flatnonzero(cache.sample_devices == attacker), rows)
        entry |= {
            "crafted_flagged": round(float(flags[rows].mean()), 4),
            "real_flagged": round(float(flags[real].mean()), 5),  # the attacker's own samples included
            "honest_flagged": round(float(flags[cache.sample_devices != attacker].mean()), 5),
            "attacker_own_flagged": round(float(flags[own].mean()), 4) if own.size else 0.0,
            "attacker_over_quota_samples": over["devices"][f"dev{attacker:03d}"]["over_quota_samples"],
        }
    return entry


def measure(
    *,
    devices: int,
    copies: int,
    fetches: int,
    quick: bool,
    builds: int = 2,
    public_copies_per_sample: int = COPY_COPIES,
    copy_bits: int = 8,
    older_rules: bool = False,
) -> dict[str, Any]:
    fleet = _hashes(devices, quick=quick)
    hashes, labels = fleet.hashes, fleet.labels
    out: dict[str, Any] = {"devices": devices, "samples": int(sum(len(c) for c in labels)), "R": R}
    built: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    caches: dict[str, KnowledgeCache] = {}
    for _ in range(builds):
        for mode in ("off", "on"):
            defences = DefenceConfig() if mode == "on" else None
            caches[mode], seconds, cpu_seconds = _fleet(hashes, labels, defences=defences, hub=None)
            built[mode].append(seconds)
            cpu[mode].append(cpu_seconds)
    out["relation_build_s"] = {mode: [round(s, 3) for s in times] for mode, times in built.items()}
    out["relation_build_ratio"] = round(min(built["on"]) / min(built["off"]), 3)
    out["relation_build_cpu_s"] = {mode: [round(s, 3) for s in times] for mode, times in cpu.items()}
    out["relation_build_cpu_ratio"] = round(min(cpu["on"]) / min(cpu["off"]), 3)
    plain, defended = caches["off"], caches["on"]
    assert defended.defences is not None and plain.relations is not None and defended.relations is not None
    out["honest_flagged_as_hubs"] = round(float(defended.defences.hub_flags(defended.size).mean()), 5)
    lists, plain_lists = defended.relations.table, plain.relations.table
    filled = (lists >= 0).sum(axis=1)
    out["defended_list_fill"] = {"min": int(filled.min()), "mean": round(float(filled.mean()), 3)}
    sample = np.arange(0, lists.shape[0], 37)
    overlap = (lists[sample, :, None] == plain_lists[sample, None, :]) & (lists[sample, :, None] >= 0)
    out["defended_entries_also_in_plain_list"] = round(float(overlap.any(axis=2).sum() / (lists[sample] >= 0).sum()), 3)

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(plain.size, 10)).astype(np.float32)
    for cache in (plain, defended):
        cache.apply_update(rows=np.arange(cache.size), logits=logits, version=1)
    fetch: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(fetches):
        rows = rng.integers(0, plain.size, size=32)
        for mode, cache in (("off", plain), ("on", defended)):
            started = time.perf_counter()
            cache.fetch(rows)
            fetch[mode].append(time.perf_counter() - started)
    out["fetch_32_ids_us"] = {mode: _percentiles(times) for mode, times in fetch.items()}
    update: dict[str, list[float]] = {"off": [], "on": []}
    for step in range(fetches // 3):
        device = int(rng.integers(0, devices))
        ids = rng.choice(len(labels[device]), size=min(8, len(labels[device])), replace=False).astype(np.uint32)
        batch = rng.normal(size=(ids.size, 10)).astype(np.float32)
        for mode, cache in (("off", plain), ("on", defended)):
            rows = cache.rows_of(f"dev{device:03d}", ids)
            started = time.perf_counter()
            cache.apply_update(rows=rows, logits=batch, version=2 + step)
            update[mode].append(time.perf_counter() - started)
    out["update_8_rows_us"] = {mode: _percentiles(times) for mode, times in update.items()}

    attacker = devices - 1
    hub = hub_samples(
        hashes[attacker], labels[attacker], kind=HashKind.BINARY, classes=10, copies=copies,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    out["hub_copies_per_class"] = copies
    for mode in ("off", "on"):
        out[f"hub_defences_{mode}"] = _attacked(
            hashes, labels, hub, defences=DefenceConfig() if mode == "on" else None
        )  # fmt: skip
    if public_copies_per_sample:
        bits = fleet.public.shape[1] * 8
        crafted = public_copies(
            fleet.public, fleet.public_labels, kind=HashKind.BINARY, classes=10, copies=public_copies_per_sample,
            first_id=len(labels[attacker]), rng=np.random.default_rng(0), flip_share=copy_bits / bits,
        )  # fmt: skip
        out["public_copies"] = {"per_sample": public_copies_per_sample, "bits_flipped": copy_bits, "of": bits}
        out["public_copies"]["crafted"] = crafted.count
        variants: list[tuple[str, DefenceConfig | None]] = [("off", None), ("on", DefenceConfig())]
        if older_rules:
            variants.append(("on_without_copy_rule", DefenceConfig(copy_ratio=0.0)))
        for name, defences in variants:
            out[f"copies_defences_{name}"] = _attacked(hashes, labels, crafted, defences=defences)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench defences", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"digits, {QUICK_DEVICES} devices, fewer calls")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--copies", type=int, default=64, help="hub device's crafted hashes per class")
    parser.add_argument(
        "--public-copies", type=int, default=COPY_COPIES, help="copying device's copies per public sample (0: skip)"
    )
    parser.add_argument("--copy-bits", type=int, default=8, help="bits flipped in each copy of a public hash")
    parser.add_argument(
        "--older-rules", action="store_true", help="also the copying device against defences without the copy rule"
    )
    parser.add_argument("--fetches", type=int, default=3000, help="fetches timed per mode")
    parser.add_argument("--builds", type=int, default=2, help="relation builds timed per mode")
    args = parser.parse_args(argv)
    if args.builds < 1:
        parser.error("--builds must be at least 1")
    devices = QUICK_DEVICES if args.quick else args.devices
    fetches = QUICK_FETCHES if args.quick else args.fetches
    print(machine_line())
    result = measure(
        devices=devices, copies=args.copies, fetches=fetches, quick=args.quick, builds=args.builds,
        public_copies_per_sample=args.public_copies, copy_bits=args.copy_bits, older_rules=args.older_rules,
    )  # fmt: skip
    print(json.dumps(result, indent=1))
    print("load average at the end: " + ", ".join(f"{value:.1f}" for value in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
