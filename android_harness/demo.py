"""`python -m android_harness demo`: FedCache and the local (CE only) baseline on one split, a table and one page."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from android_harness.html_report import kib, write_comparison_html
from android_harness.plots import plot_device_gains, plot_maua_comparison
from android_harness.report import maua_by_epoch, startup_phases
from android_harness.trial import TrialSettings, run_trial
from edge.data import PARTITIONS

# The demo's setting (README, "Measured"): the paper's heterogeneous models on FashionMNIST, 20 devices,
# each training on a small fixed share of its Dirichlet shard for more epochs, so that local training
# overfits and what the neighbours know matters, in a few minutes per method on two cores.
DATASET = "fashion-mnist"
DEVICES = 20
EPOCHS = 10
ARCHS = ("resnet8", "resnet16", "resnet20")
MAX_SAMPLES = 250
# Each device evaluates on its test split every this many epochs (and after the last): at 250 training samples
# an evaluation of ~500 test samples costs about half an epoch, so evaluating every epoch would cost ~25 % more.
EVAL_EVERY = 2
ALPHA = 1.0
SEED = 0
METHODS = ("fedcache", "local")
PAGE = "demo.html"
# Start-up phases in the order a device goes through them (edge.runtime.StartupClock), then the trial's view.
STARTUP_PHASES = ("imports", "shard", "model", "state", "join", "first_eval", "cpu", "first_report")


@dataclass(frozen=True)
class DemoSettings:
    """What both runs of the demo share; only the algorithm differs between them."""

    out: Path = Path("runs/demo")
    dataset: str = DATASET
    devices: int = DEVICES
    epochs: int = EPOCHS
    archs: tuple[str, ...] = ARCHS
    max_samples: int = MAX_SAMPLES
    eval_every: int = EVAL_EVERY
    # Devices recompute batch-norm statistics over this many of their training samples before each evaluation
    # (train.bn_recalibration; 0 = off, the measured default; docs/benchmarks.md §6).
    bn_recalibration: int = 0
    alpha: float = ALPHA
    partition: str = "dirichlet"  # edge.data.PARTITIONS
    seed: int = SEED
    timeout_s: float = 3600.0

    def trial(self, algorithm: str) -> TrialSettings:
        """One method's trial: the same split, models, seeds and epochs as the other's, in its own directory."""
        return TrialSettings(
            out=self.out / algorithm,
            dataset=self.dataset,
            devices=self.devices,
            epochs=self.epochs,
            algorithm=algorithm,
            archs=self.archs,
            alpha=self.alpha,
            partition=self.partition,
            seed=self.seed,
            extra_train={
                "max_samples": self.max_samples,
                "eval_every_epochs": self.eval_every,
                **({"bn_recalibration": self.bn_recalibration} if self.bn_recalibration else {}),
            },
            timeout_s=self.timeout_s,
        )

    def describe(self) -> str:
        samples = f"at most {self.max_samples} training samples each" if self.max_samples else "whole shards"
        split = "" if self.partition == "dirichlet" else f", {self.partition} split"
        recalibrated = (
            f", batch-norm statistics recomputed over {self.bn_recalibration} samples before each evaluation"
            if self.bn_recalibration
            else ""
        )
        return (
            f"{self.devices} devices on {self.dataset} (Dirichlet alpha {self.alpha}{split}, {samples}), "
            f"{'/'.join(self.archs)}, {self.epochs} local epochs, seed {self.seed}{recalibrated}"
        )


def add_demo_parser(commands: Any) -> None:
    """The `demo` subcommand and its options (defaults: the setting the README measures)."""
    demo = commands.add_parser(
        "demo",
        help="FedCache and the local (CE only) baseline on the same split: a table and one comparison page",
        description="Runs FedCache, then local training on the same split, models, seeds and epochs, prints a "
        f"table and writes one page ({PAGE}) with both side by side.",
    )
    demo.add_argument("--out", type=Path, default=DemoSettings.out, help="directory of both trials and the page")
    demo.add_argument("--dataset", default=DATASET, choices=["fashion-mnist", "digits"])
    demo.add_argument("--devices", type=int, default=DEVICES, help=f"device processes (default {DEVICES})")
    demo.add_argument("--epochs", type=int, default=EPOCHS, help=f"local epochs per device (default {EPOCHS})")
    demo.add_argument(
        "--archs", default=",".join(ARCHS), help="zoo architectures assigned round-robin (default: %(default)s)"
    )
    demo.add_argument(
        "--max-samples",
        type=int,
        default=MAX_SAMPLES,
        help=f"training samples per device, a fixed stratified share of its shard; 0 = all (default {MAX_SAMPLES})",
    )
    demo.add_argument(
        "--eval-every",
        type=int,
        default=EVAL_EVERY,
        help=f"devices evaluate every this many epochs and after the last (default {EVAL_EVERY})",
    )
    demo.add_argument(
        "--bn-recalibration",
        type=int,
        default=0,
        metavar="N",
        help="before each evaluation, devices recompute batch-norm statistics over N of their training samples "
        "(0 = off, default; docs/benchmarks.md §6)",
    )
    demo.add_argument("--alpha", type=float, default=ALPHA, help="Dirichlet concentration of the split")
    demo.add_argument(
        "--partition",
        default="dirichlet",
        choices=PARTITIONS,
        help="dirichlet (ours, default) or dirichlet-per-class (the published FedCache loader's split)",
    )
    demo.add_argument("--seed", type=int, default=SEED, help="split, models and batch order, shared by both runs")
    demo.add_argument("--timeout", type=float, default=3600.0, help="give up a run after this many seconds")


def run_demo(args: argparse.Namespace) -> int:
    """Run both methods, print the closing table and the page's path; exit status 1 if an invariant failed."""
    settings = DemoSettings(
        out=args.out,
        dataset=args.dataset,
        devices=args.devices,
        epochs=args.epochs,
        archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
        max_samples=args.max_samples,
        eval_every=args.eval_every,
        bn_recalibration=args.bn_recalibration,
        alpha=args.alpha,
        partition=args.partition,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    reports = run_methods(settings)
    page = write_page(reports, settings=settings)
    print()
    for line in closing_lines(reports):
        print(line)
    print(f"page: {page}")
    failed = [name for name, result in reports["fedcache"].get("invariants", {}).items() if not result["ok"]]
    if failed:
        print(f"FAIL: FedCache trial invariants {', '.join(failed)} (see {settings.out / 'fedcache' / 'report.html'})")
    return 1 if failed else 0


def run_methods(settings: DemoSettings) -> dict[str, dict[str, Any]]:
    """FedCache, then local training, each a real trial; their reports by method, also in summary.json."""
    reports = {}
    for number, method in enumerate(METHODS, start=1):
        print(f"== {number}/{len(METHODS)} {method}: {settings.describe()}", file=sys.stderr, flush=True)
        reports[method] = run_trial(settings.trial(method))
    settings.out.mkdir(parents=True, exist_ok=True)
    summary = {
        method: {
            "maua": r["maua"],
            "maua_by_epoch": maua_by_epoch(r),
            "bytes": r["bytes"],
            "bytes_per_device_per_epoch": r["bytes_per_device_per_epoch"],
            "wall_s": r["wall_s"],
            "epochs": r["epochs"],
        }
        for method, r in reports.items()
    }
    (settings.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return reports


def _per_epoch(report: dict[str, Any]) -> float:
    """Training bytes (up + down) per device per epoch."""
    per = report["bytes_per_device_per_epoch"]
    return float(per.get("up", 0) + per.get("down", 0))


def _gain_points(reports: dict[str, dict[str, Any]]) -> float:
    return 100 * (reports["fedcache"]["maua"] - reports["local"]["maua"])


def device_gains(reports: dict[str, dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(device, arch, FedCache accuracy - local accuracy in points) for every device both runs had."""
    local = {d["id"]: d for d in reports["local"]["devices"]}
    return [
        (d["id"], d["arch"], 100 * (d["accuracy"] - local[d["id"]]["accuracy"]))
        for d in reports["fedcache"]["devices"]
        if d["id"] in local
    ]


def closing_lines(reports: dict[str, dict[str, Any]]) -> list[str]:
    """The table the demo ends with: method, MAUA, bytes per device per epoch, wall; then the gain."""
    rows = [["method", "MAUA", "bytes / device / epoch", "wall"]]
    for method, r in reports.items():
        per = r["bytes_per_device_per_epoch"]
        traffic = (
            f"{kib(_per_epoch(r))} ({kib(per.get('up', 0))} up, {kib(per.get('down', 0))} down)"
            if _per_epoch(r)
            else "0 (no traffic)"
        )
        rows.append([method, f"{r['maua']:.4f}", traffic, f"{r['wall_s']:.0f} s"])
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    lines = [
        "  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3].rjust(widths[3])])
        for row in rows
    ]
    gains = device_gains(reports)
    ahead = sum(g > 0 for _, _, g in gains)
    registration = reports["fedcache"]["bytes"]["register_up"] / max(len(reports["fedcache"]["devices"]), 1)
    lines.append(
        f"FedCache - local: {_gain_points(reports):+.2f} MAUA points after {reports['fedcache']['epochs']} epochs "
        f"(same split, models, seeds and epochs), ahead on {ahead} of {len(gains)} devices; "
        f"registration {kib(registration)} per device, once"
    )
    return lines


def write_page(reports: dict[str, dict[str, Any]], *, settings: DemoSettings) -> Path:
    """demo.html in the demo's directory: both MAUA curves, per-device gains, bytes, start-up, links."""
    out = settings.out
    gains = device_gains(reports)
    maua_png, gains_png = out / "maua-comparison.png", out / "device-gains.png"
    plot_maua_comparison(
        by_epoch={m: maua_by_epoch(r) for m, r in reports.items()},
        over_time={m: r["maua_curve"] for m, r in reports.items()},
        path=maua_png,
        title=f"FedCache {reports['fedcache']['maua']:.4f} vs local {reports['local']['maua']:.4f} "
        f"({_gain_points(reports):+.2f} points)",
    )
    plot_device_gains(gains=gains, path=gains_png, title="FedCache minus local, per device (test accuracy)")
    figures = [maua_png, gains_png]
    bytes_png = out / "fedcache" / "bytes.png"  # the FedCache trial's own cumulative-bytes figure
    if bytes_png.exists():
        figures.append(bytes_png)
    return write_comparison_html(
        path=out / PAGE,
        title=f"FedCache vs local training: {settings.dataset}, {settings.devices} devices",
        intro=f"{settings.describe()}. Both runs use the same Dirichlet split, the same initial weights and batch "
        "order per device, and the same number of epochs; MAUA is the mean over devices of each one's accuracy on "
        "its own test split.",
        summary=_summary_table(reports),
        figures=figures,
        devices=_device_table(reports, gains),
        startup=_startup_table(reports),
        links={f"{m} trial report": f"{m}/report.html" for m in reports},
    )


def _summary_table(reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "method", "MAUA", "vs local (points)", "up / device / epoch", "down / device / epoch",
        "registration / device (once)", "first MAUA point", "wall",
    ]  # fmt: skip
    rows = []
    for method, r in reports.items():
        count = max(len(r["devices"]), 1)
        per = r["bytes_per_device_per_epoch"]
        rows.append([
            method,
            f"{r['maua']:.4f}",
            f"{100 * (r['maua'] - reports['local']['maua']):+.2f}",
            kib(per.get("up", 0)),
            kib(per.get("down", 0)),
            kib(r["bytes"]["register_up"] / count),
            f"{r['maua_curve'][0][0]:.0f} s" if r["maua_curve"] else "",
            f"{r['wall_s']:.0f} s",
        ])  # fmt: skip
    return headers, rows


def _device_table(
    reports: dict[str, dict[str, Any]], gains: list[tuple[str, str, float]]
) -> tuple[list[str], list[list[Any]]]:
    by_id = {m: {d["id"]: d for d in r["devices"]} for m, r in reports.items()}
    headers = ["device", "arch", "train samples", "FedCache accuracy", "local accuracy", "gain (points)",
               "teacher coverage"]  # fmt: skip
    rows = [
        [
            device,
            arch,
            by_id["fedcache"][device]["train_samples"],
            f"{by_id['fedcache'][device]['accuracy']:.4f}",
            f"{by_id['local'][device]['accuracy']:.4f}",
            f"{gain:+.2f}",
            f"{by_id['fedcache'][device]['teacher_coverage']:.2f}",
        ]
        for device, arch, gain in gains
    ]
    return headers, rows


def _startup_table(reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    phases = {m: startup_phases(r) for m, r in reports.items()}
    headers = ["phase", *reports]
    rows = []
    for phase in STARTUP_PHASES:
        cells = [
            f"{phases[m][phase]['median']:.1f} / {phases[m][phase]['max']:.1f}" if phase in phases[m] else ""
            for m in reports
        ]
        if any(cells):
            rows.append([phase, *cells])
    return headers, rows


__all__ = ["DemoSettings", "add_demo_parser", "closing_lines", "device_gains", "run_demo", "run_methods", "write_page"]
