"""Honest samples' teachers in a finished trial's server state: plain mean, without the attackers, defended.

Opens the state a trial left in RUN/server (read as the server would at start-up), takes every sample of the
devices that did not attack (report.json's `attackers`) and fetches its teacher as the server would serve it:
with the plain mean, with the mean over its non-attacking contributors only (what an oracle defence would
give), and under each defence configuration. A teacher is counted right when its maximum is the sample's label;
coverage is the share of samples with any teacher. No trial is run: this measures what the defences would have
served from the same knowledge, which a trial with defences on cannot show for the same run.

    python -m bench teacher_quality RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.cache import KnowledgeCache
from broker_server.defences import DefenceConfig
from broker_server.state_factory import STATE_DIRNAME, open_state

CONFIGS = {
    "defended": DefenceConfig(),
    "defended, no label filter": DefenceConfig(label_filter=False),
    "defended, median": DefenceConfig(aggregation="median"),
}


def _right(logits: np.ndarray, counts: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    taught = counts > 0
    right = float((logits.argmax(axis=1) == labels[taught]).mean()) if taught.any() else 0.0
    return right, float(taught.mean())


def measure(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    attackers = set(report.get("attackers", []))
    # A copy: opening builds relations and may write them; the trial's state stays as it was.
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / STATE_DIRNAME
        copy.mkdir()
        for item in (run / "server" / STATE_DIRNAME).iterdir():
            (copy / item.name).write_bytes(item.read_bytes())
        with open_state(copy) as state:
            cache = getattr(state, "cache", None)
            if not isinstance(cache, KnowledgeCache) or cache.relations is None:
                raise SystemExit(f"{run}: no in-memory knowledge cache with relations in this state")
            names = [r.device for r in sorted(cache.devices.values(), key=lambda record: record.index)]
            owners = cache.sample_devices
            attacking = np.array([name in attackers for name in names])
            labels = cache.labels.astype(np.int64)
            rows = np.flatnonzero(~attacking[owners])
            out: dict[str, Any] = {"run": str(run), "attackers": sorted(attackers), "honest_samples": int(rows.size)}
            neighbours = cache.relations.neighbours_of(rows)
            safe = np.where(neighbours >= 0, neighbours, 0)
            contributing = (neighbours >= 0) & (cache.versions[safe] >= 0)
            clean = contributing & ~attacking[owners[safe]]
            out["attacker_share_of_contributors"] = round(
                float((contributing & ~clean).sum() / max(contributing.sum(), 1)), 4
            )
            plain = cache.fetch(rows)
            out["plain"] = _right(plain.logits, plain.counts, labels[rows])
            counts = clean.sum(axis=1)
            sums = np.einsum("nr,nrc->nc", clean.astype(np.float32), cache.knowledge[safe])
            taught = counts > 0
            out["without attackers"] = _right(sums[taught] / counts[taught, None], counts, labels[rows])
            for name, config in CONFIGS.items():
                cache.defend(config)
                served = cache.fetch(rows)
                out[name] = _right(served.logits, served.counts, labels[rows])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench teacher_quality", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="trial directories (report.json and server/)")
    args = parser.parse_args(argv)
    print("| run | attackers' share of contributors | teacher | top-1 = label | coverage |\n|---|---|---|---|---|")
    for run in args.runs:
        figures = measure(run)
        for teacher in ("plain", "without attackers", *CONFIGS):
            right, coverage = figures[teacher]
            share = figures["attacker_share_of_contributors"]
            print(f"| {run.name} | {share:.3f} | {teacher} | {right:.4f} | {coverage:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
