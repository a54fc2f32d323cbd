"""`python broker_server/main.py inspect`: what a server's durable state holds, read without changing it."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.cache import KnowledgeCache
from broker_server.state import KnowledgeState
from broker_server.state_factory import STATE_DIRNAME, open_state

INSPECTION_FORMAT = 1


def logits_digests(logits: np.ndarray) -> list[str]:
    """Per row, the sha256 (hex) of its logits as little-endian float32 bytes: equal digests, equal rows."""
    rows = np.ascontiguousarray(logits, dtype="<f4")
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]


def describe(state: KnowledgeState, *, devices: Sequence[str] = (), logits: bool = False) -> dict[str, Any]:
    """The state as plain JSON values: totals, and per device its samples that hold knowledge.

    Per device: `registered` sample count, and for each sample id holding knowledge (ascending) its
    `versions` and `digests` (see `logits_digests`); with `logits`, the logit rows themselves too.
    `devices` restricts the listing to those names (an unknown name is listed as unknown).
    """
    stats = state.stats()
    records = {record.device: record for record in state.devices()}
    listed: dict[str, Any] = {}
    for name in devices or list(records):
        record = records.get(name)
        if record is None:
            listed[name] = {"known": False}
            continue
        held = state.held(name)
        entry: dict[str, Any] = {
            "known": True,
            "index": record.index,
            "model": record.model,
            "declared": record.samples,
            "registered": held.registered,
            "with_knowledge": int(held.ids.size),
            "ids": held.ids.tolist(),
            "versions": held.versions.tolist(),
            "digests": logits_digests(held.logits),
        }
        if logits:
            entry["logits"] = held.logits.tolist()
        listed[name] = entry
    return {
        "format": INSPECTION_FORMAT,
        "classes": state.classes,
        "devices_registered": stats.devices,
        "samples": stats.samples,
        "with_knowledge": stats.with_knowledge,
        "devices": listed,
    }


def trust_report(state: KnowledgeState) -> dict[str, Any] | None:
    """The defences' view of a state (docs/robustness.md): per device trust, evidence, hub and over-quota samples.

    Relations are built under the defences' policy and evidence taken from the knowledge held, in memory only
    (the state is not changed); None for a backend without an in-memory KnowledgeCache.
    """
    cache = getattr(state, "cache", None)
    if not isinstance(cache, KnowledgeCache):
        return None
    defences = cache.defences if cache.defences is not None else cache.defend()
    records = sorted(cache.devices.values(), key=lambda record: record.index)
    return defences.describe([record.device for record in records], owners=cache.sample_devices)


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"{report['devices_registered']} devices, {report['samples']} samples, "
        f"{report['with_knowledge']} holding knowledge, {report['classes']} classes"
    ]
    for name, entry in report["devices"].items():
        if not entry["known"]:
            lines.append(f"{name}: unknown device")
            continue
        newest = max(entry["versions"], default=None)
        lines.append(
            f"{name}: model {entry['model']}, registered {entry['registered']} of {entry['declared']}, "
            f"{entry['with_knowledge']} holding knowledge, newest version {newest}"
        )
    if report.get("defences"):
        trust = report["defences"]["devices"]
        lines.append("trust: " + ", ".join(f"{name} {entry['trust']:.2f}" for name, entry in trust.items()))
    return lines


def build_parser(*, prog: str, default_data_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print what a server's durable state holds, without changing it (the server may be stopped "
        "or running). With --json: one JSON object; per device the ids of samples holding knowledge, their "
        "versions and sha256 digests of their logits as little-endian float32.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir,
        help=f"the server's --data-dir (its state is in DIR/{STATE_DIRNAME}; default {default_data_dir})",
    )
    parser.add_argument("--device", action="append", default=[], help="only this device (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of a summary")
    parser.add_argument("--logits", action="store_true", help="with --json: each sample's logits too")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="also the defences' per-device trust, evidence and hub samples (under `defences`; relations are "
        "rebuilt in memory under their policy, which takes a while on a large state)",
    )
    return parser


def main(argv: Sequence[str], *, prog: str, default_data_dir: Path) -> int:
    """Run the subcommand; exit status 2 when the directory holds no state."""
    args = build_parser(prog=prog, default_data_dir=default_data_dir).parse_args(list(argv))
    try:
        state = open_state(args.data_dir / STATE_DIRNAME, read_only=True)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedcache inspect: {exc}", file=sys.stderr)
        return 2
    with state:
        report = describe(state, devices=args.device, logits=args.logits)
        if args.trust:
            report["defences"] = trust_report(state)
    if args.json:
        json.dump(report, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        print("\n".join(_summary_lines(report)))
    return 0
