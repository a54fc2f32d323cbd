"""The paper's comparison over the wire: FedCache (and its variants), FD, FedAvg and local training, MAUA vs bytes.

Every method runs as a real trial (`android_harness.trial.run_trial`: a private Mosquitto, the server,
one process per device) on the same Dirichlet split, and bytes are the MQTT PUBLISH packet bytes each
device's link counts, so the methods are compared on the same footing. Registration (hello + hashes)
is a one-off cost and is shown apart; "bytes to target" counts training traffic only (uplink +
downlink of all devices) until the MAUA curve first reaches the target.

Settings (`--setting`): the paper's FashionMNIST experiment (Dirichlet alpha = 1.0) with every device
on ResNet-20 (`homogeneous`) or on ResNet-8/16/20 in turn (`heterogeneous`; FedAvg, which averages one
architecture's weights, is shown as not applicable there), or the zoo's small CNN (`cnn`, the
default: the fastest). Scaled to a 2-core CPU box: 20 devices, the paper's full-width models and
full device shards, but a few local epochs (`--epochs`) instead of hundreds of rounds on a GPU.
`--quick` is a smoke-sized run: sklearn digits, 4 devices, 2 epochs (about two minutes).
`--reuse` keeps every method whose report in `--out` was made with the same settings, so a long run
can be resumed or extended by one method.

`--seeds 0,1,2` repeats the methods of `--seeded-methods` (default FedCache and local) on every partition
seed (the split, the initial weights and the batch order all follow the seed) and the others on the first
seed only; a second table then gives each method's MAUA over its seeds (mean, min, max) and, against local
training on the same seeds, each device's accuracy gain averaged over the seeds: the worst device's, and how
many devices lose more than a point. A seed's runs sit in `--out`/<method>-s<seed> (the first seed's in
`--out`/<method>, as before, so earlier runs are reused).

    python -m bench comparison [--quick] [--setting S] [--epochs N] [--methods M,..] [--seeds S,..] [--reuse]
                               [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._report import machine_line, markdown_table
from fedwire import HashKind, LogitEncoding, TeacherForm
from models.loss import TeacherGate


@dataclass(frozen=True)
class Method:
    """One row of the comparison: an algorithm and the trial options that make it a variant."""

    name: str
    algorithm: str
    logit_encoding: LogitEncoding = LogitEncoding.FLOAT16
    hash_kind: HashKind = HashKind.BINARY
    extra_train: dict[str, Any] = field(default_factory=dict)


SETTINGS: dict[str, tuple[str, ...]] = {
    "cnn": ("cnn",),
    "homogeneous": ("resnet20",),
    "heterogeneous": ("resnet8", "resnet16", "resnet20"),
}

METHODS = (
    Method("fedcache", "fedcache"),
    Method("fedcache logits i8", "fedcache", logit_encoding=LogitEncoding.INT8),
    Method("fedcache logits f32", "fedcache", logit_encoding=LogitEncoding.FLOAT32),
    Method("fedcache hash f16", "fedcache", hash_kind=HashKind.FLOAT16),
    # Every neighbour's logits down, averaged on the device: what the server-side mean saves.
    Method("fedcache raw R", "fedcache", extra_train={"teacher_form": TeacherForm.RAW}),
    # Distil only from teachers whose top class is the sample's label (models.loss.TeacherGate): issue 17's idea.
    Method("fedcache label gate", "fedcache", extra_train={"teacher_gate": TeacherGate.LABEL}),
    # Knowledge exchanged every other epoch only (TrainConfig.knowledge_every_epochs): half the bytes, staler teachers.
    Method("fedcache every 2 epochs", "fedcache", extra_train={"knowledge_every_epochs": 2}),
    # The same with int8 logits on the wire (issue 17's bytes goal against FedAvg).
    Method(
        "fedcache every 2 epochs i8",
        "fedcache",
        logit_encoding=LogitEncoding.INT8,
        extra_train={"knowledge_every_epochs": 2},
    ),
    # ... and 16 batches' logits per message each way (TrainConfig.knowledge_every_batches): 128 ids, not 8.
    Method(
        "fedcache every 2 epochs i8 x16",
        "fedcache",
        logit_encoding=LogitEncoding.INT8,
        extra_train={"knowledge_every_epochs": 2, "knowledge_every_batches": 16},
    ),
    # ... with one int8 scale per message instead of per row (LogitEncoding.INT8_BLOCK): 4 B less per sample each way.
    Method(
        "fedcache every 2 epochs i8b x16",
        "fedcache",
        logit_encoding=LogitEncoding.INT8_BLOCK,
        extra_train={"knowledge_every_epochs": 2, "knowledge_every_batches": 16},
    ),
    # ... after one epoch of local training (TrainConfig.knowledge_warmup_epochs): no bytes for untrained knowledge.
    Method(
        "fedcache warm-up 1 every 2 epochs i8b x16",
        "fedcache",
        logit_encoding=LogitEncoding.INT8_BLOCK,
        extra_train={"knowledge_every_epochs": 2, "knowledge_every_batches": 16, "knowledge_warmup_epochs": 1},
    ),
    Method(
        "fedcache warm-up 2 every 2 epochs i8b x16",
        "fedcache",
        logit_encoding=LogitEncoding.INT8_BLOCK,
        extra_train={"knowledge_every_epochs": 2, "knowledge_every_batches": 16, "knowledge_warmup_epochs": 2},
    ),
    Method("fd", "fd"),
    Method("fedavg", "fedavg"),
    Method("local", "local"),
)


@dataclass(frozen=True)
class Outcome:
    """What the table needs of one trial."""

    method: str
    maua: float
    training_bytes: int
    register_bytes: int
    wall_s: float
    curve: list[tuple[int, float]]  # (cumulative training bytes of all devices, MAUA) in time order
    maua_by_arch: dict[str, float] = field(default_factory=dict)


def bytes_curve(history: list[dict[str, Any]], devices: int) -> list[tuple[int, float]]:
    """MAUA against cumulative training bytes, one point per metrics message once every device has reported.

    Each device's metrics carry its running byte totals, so the sum of the latest totals is what the
    whole federation has sent and received up to that moment (registration excluded).
    """
    latest: dict[str, dict[str, Any]] = {}
    points: list[tuple[int, float]] = []
    for metrics in sorted(history, key=lambda m: m["trial_time_s"]):
        latest[metrics["device"]] = metrics
        if len(latest) == devices:
            spent = sum(m["bytes"]["up"] + m["bytes"]["down"] for m in latest.values())
            points.append((spent, sum(m["accuracy"] for m in latest.values()) / devices))
    return points


def bytes_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """Training bytes spent when MAUA first reached `target`, or None if it never did.

    MAUA sums the same accuracies in another order here than in the report, so equality is met within 1e-9.
    """
    return next((spent for spent, maua in curve if maua >= target - 1e-9), None)


def outcome_of(method: str, report: dict[str, Any]) -> Outcome:
    """Reduce a trial report (report.json's shape) to the comparison's figures."""
    devices = len(report["devices"])
    return Outcome(
        method=method,
        maua=report["maua"],
        training_bytes=report["bytes"]["up"] + report["bytes"]["down"],
        register_bytes=report["bytes"]["register_up"],
        wall_s=report["wall_s"],
        curve=bytes_curve(report["history"], devices),
        maua_by_arch=maua_by_arch(report["devices"]),
    )


def maua_by_arch(devices: list[dict[str, Any]]) -> dict[str, float]:
    """MAUA over the devices of each architecture (the heterogeneous setting's per-model view)."""
    accuracies: dict[str, list[float]] = {}
    for device in devices:
        accuracies.setdefault(device["arch"], []).append(device["accuracy"])
    return {arch: sum(values) / len(values) for arch, values in sorted(accuracies.items())}


@dataclass(frozen=True)
class SeedSummary:
    """One method over its seeds, and its devices against local training on the same seeds."""

    method: str
    seeds: tuple[int, ...]
    maua_mean: float
    maua_min: float
    maua_max: float
    gain_over_local: float | None  # mean over the common seeds of MAUA - local MAUA, points
    worst_device_gain: float | None  # the lowest per-device gain over local, averaged over the common seeds, points
    devices_below_local: int | None  # devices whose averaged gain is below -1 point


def device_accuracies(report: dict[str, Any]) -> dict[str, float]:
    """Final accuracy per device id."""
    return {device["id"]: float(device["accuracy"]) for device in report["devices"]}


def seed_summary(
    method: str, reports: dict[int, dict[str, Any]], local: dict[int, dict[str, Any]] | None = None
) -> SeedSummary:
    """`method`'s reports by seed summarised; per-device gains use the seeds local training also ran."""
    if not reports:
        raise ValueError(f"{method}: no reports to summarise")
    mauas = [float(report["maua"]) for report in reports.values()]
    common = sorted(set(reports) & set(local or {})) if method != "local" else []
    gain = worst = below = None
    if common and local is not None:
        gain = 100 * sum(float(reports[s]["maua"]) - float(local[s]["maua"]) for s in common) / len(common)
        per_device: dict[str, list[float]] = {}
        for seed in common:
            mine, theirs = device_accuracies(reports[seed]), device_accuracies(local[seed])
            for device in mine.keys() & theirs.keys():
                per_device.setdefault(device, []).append(100 * (mine[device] - theirs[device]))
        averaged = [sum(values) / len(values) for values in per_device.values()]
        worst = min(averaged) if averaged else None
        below = sum(1 for value in averaged if value < -1.0)
    return SeedSummary(
        method=method,
        seeds=tuple(sorted(reports)),
        maua_mean=sum(mauas) / len(mauas),
        maua_min=min(mauas),
        maua_max=max(mauas),
        gain_over_local=gain,
        worst_device_gain=worst,
        devices_below_local=below,
    )


SEED_HEADERS = (
    "method",
    "seeds",
    "MAUA mean",
    "MAUA min - max",
    "vs local, points (mean over seeds)",
    "worst device vs local, points (averaged over seeds)",
    "devices more than 1 point below local",
)


def seed_rows(summaries: list[SeedSummary]) -> list[list[object]]:
    """The seed table's rows."""

    def points(value: float | None) -> str:
        return "-" if value is None else f"{value:+.2f}"

    return [
        [
            s.method,
            ",".join(str(seed) for seed in s.seeds),
            f"{s.maua_mean:.4f}",
            f"{s.maua_min:.4f} - {s.maua_max:.4f}",
            points(s.gain_over_local),
            points(s.worst_device_gain),
            "-" if s.devices_below_local is None else str(s.devices_below_local),
        ]
        for s in summaries
    ]


def applicable(method: Method, archs: tuple[str, ...]) -> bool:
    """FedAvg averages one architecture's weights: it has no meaning among different models."""
    return method.algorithm != "fedavg" or len(set(archs)) == 1


def reusable_report(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A finished trial report made with exactly these settings (except where it was written), else None."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    ignored = {"out", "timeout_s"}
    recorded = {k: v for k, v in report.get("settings", {}).items() if k not in ignored}
    wanted = json.loads(json.dumps({k: v for k, v in settings.items() if k not in ignored}, default=str))
    return report if recorded == wanted else None


def clear_stale_run(path: Path) -> None:
    """Remove what an interrupted or differently configured run left in `path` before it is run again.

    A trial resumes whatever device checkpoints, outboxes and server state it finds in its directory (that is
    how a device survives a restart); a benchmark run must start from nothing, or its bytes and wall time would
    be of two runs.
    """
    if path.exists():
        shutil.rmtree(path)


def default_target(outcomes: list[Outcome]) -> float:
    """The lowest final MAUA among the methods that communicate: every one of them reaches it."""
    communicating = [o.maua for o in outcomes if o.training_bytes > 0]
    return min(communicating) if communicating else 0.0


def comparison_rows(
    outcomes: list[Outcome], *, target: float, devices: int, epochs: int, archs: tuple[str, ...] = ()
) -> list[list[object]]:
    """The table's rows; speed-up is against the method that needed the most bytes to reach the target.

    With several architectures, one MAUA column per architecture follows the overall MAUA.
    """
    per_arch = arch_columns(archs)
    reached = {o.method: bytes_to_target(o.curve, target) for o in outcomes if o.training_bytes > 0}
    costliest = max((b for b in reached.values() if b), default=None)
    rows: list[list[object]] = []
    for o in outcomes:
        spent = reached.get(o.method)
        speedup = f"{costliest / spent:.1f}x" if costliest and spent else "-"
        rows.append(
            [
                o.method,
                f"{o.maua:.4f}",
                *(f"{o.maua_by_arch[a]:.4f}" if a in o.maua_by_arch else "-" for a in per_arch),
                _kib(o.training_bytes),
                _kib(o.training_bytes / max(devices * epochs, 1)),
                _kib(o.register_bytes),
                "no traffic" if o.training_bytes == 0 else (_kib(spent) if spent is not None else "not reached"),
                speedup,
                f"{o.wall_s:.0f}",
            ]
        )
    return rows


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def arch_columns(archs: tuple[str, ...]) -> list[str]:
    """The architectures that get their own MAUA column: all of them when the models differ, else none."""
    return sorted(set(archs)) if len(set(archs)) > 1 else []


def headers(archs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The table's columns (one MAUA column per architecture when the models differ)."""
    return (HEADERS[0], HEADERS[1], *(f"MAUA {a}" for a in arch_columns(archs)), *HEADERS[2:])


HEADERS = (
    "method",
    "MAUA",
    "training KiB (up+down, all devices)",
    "KiB per device per epoch",
    "registration KiB (apart)",
    "KiB to target MAUA",
    "speed-up vs costliest",
    "wall s",
)


def plot(outcomes: list[Outcome], *, target: float, path: Path) -> None:
    """MAUA against cumulative training bytes for every method (log x); local, with no traffic, as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for o in outcomes:
        if o.training_bytes == 0:
            axes.axhline(o.maua, linestyle=":", color="grey", label=f"{o.method} (no traffic)")
            continue
        points = [(b, m) for b, m in o.curve if b > 0]
        if points:
            axes.plot([b / 1024 for b, _ in points], [m for _, m in points], marker=".", label=o.method)
    axes.axhline(target, linestyle="--", linewidth=0.8, color="black", label=f"target MAUA {target:.3f}")
    axes.set_xscale("log")
    axes.set_xlabel("cumulative training bytes of all devices (KiB, MQTT PUBLISH; registration excluded)")
    axes.set_ylabel("MAUA")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench comparison", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 4 devices, 2 epochs (a smoke-sized run)")
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], help="default fashion-mnist (quick: digits)")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), default="cnn",
        help="models: cnn (default), homogeneous (ResNet-20) or heterogeneous (ResNet-8/16/20 in turn)",
    )  # fmt: skip
    parser.add_argument(
        "--archs", help="comma-separated architectures, devices take them in turn (overrides --setting)"
    )
    parser.add_argument("--devices", type=int, help="default 20 (quick: 4)")
    parser.add_argument("--epochs", type=int, help="default 10 (quick: 2)")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (the paper's 1.0)")
    parser.add_argument("--target", type=float, help="target MAUA (default: the lowest final MAUA of the methods)")
    parser.add_argument("--methods", help="comma-separated subset of: " + ", ".join(m.name for m in METHODS))
    parser.add_argument("--reuse", action="store_true", help="keep methods whose report in --out has these settings")
    parser.add_argument("--out", type=Path, help="default runs/comparison[-SETTING] (quick: runs/comparison-quick)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="per-trial limit in seconds")
    parser.add_argument("--seeds", default="0", help="comma-separated partition seeds (default 0)")
    parser.add_argument(
        "--seeded-methods", default="fedcache,local",
        help="methods run on every seed of --seeds; the others run on the first seed only",
    )  # fmt: skip
    parser.add_argument(
        "--partition", default="dirichlet", help="edge.data's partition (dirichlet-per-class: published)"
    )
    parser.add_argument(
        "--bn-recalibration", type=int, default=0,
        help="every device recomputes batch-norm statistics over this many training samples before each evaluation",
    )  # fmt: skip
    parser.add_argument("--max-samples", type=int, default=0, help="training samples per device (0: whole shards)")
    args = parser.parse_args(argv)

    from android_harness.trial import TrialSettings, run_trial

    dataset = args.dataset or ("digits" if args.quick else "fashion-mnist")
    devices = args.devices or (4 if args.quick else 20)
    epochs = args.epochs or (2 if args.quick else 10)
    archs = tuple(a.strip() for a in args.archs.split(",")) if args.archs else SETTINGS[args.setting]
    default_out = "runs/comparison" + ("" if args.setting == "cnn" else f"-{args.setting}")
    out = args.out or Path("runs/comparison-quick" if args.quick else default_out)
    chosen: tuple[Method, ...] = METHODS
    if args.methods:
        names = [n.strip() for n in args.methods.split(",")]
        unknown = set(names) - {m.name for m in METHODS}
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}")
        chosen = tuple(m for m in METHODS if m.name in names)
    skipped = [m.name for m in chosen if not applicable(m, archs)]
    chosen = tuple(m for m in chosen if applicable(m, archs))
    print(
        f"# comparison: {dataset}, {devices} devices, Dirichlet alpha {args.alpha}, {epochs} epochs, {','.join(archs)}"
    )
    print(f"machine: {machine_line()}", flush=True)
    seeds = [int(value) for value in args.seeds.split(",")]
    seeded = {name.strip() for name in args.seeded_methods.split(",")}
    extra: dict[str, Any] = {}
    if args.bn_recalibration:
        extra["bn_recalibration"] = args.bn_recalibration
    if args.max_samples:
        extra["max_samples"] = args.max_samples
    outcomes = []
    reports: dict[str, dict[int, dict[str, Any]]] = {}
    for method in chosen:
        for seed in seeds if method.name in seeded else seeds[:1]:
            folder = method.name.replace(" ", "-") + ("" if seed == seeds[0] and seed == 0 else f"-s{seed}")
            settings = TrialSettings(
                out=out / folder,
                dataset=dataset,
                devices=devices,
                epochs=epochs,
                algorithm=method.algorithm,
                archs=archs,
                alpha=args.alpha,
                seed=seed,
                partition=args.partition,
                logit_encoding=method.logit_encoding,
                hash_kind=method.hash_kind,
                extra_train={**method.extra_train, **extra},
                timeout_s=args.timeout,
            )
            report = reusable_report(settings.out / "report.json", asdict(settings)) if args.reuse else None
            print(f"== {method.name}, seed {seed}" + (" (reused)" if report is not None else ""), file=sys.stderr,
                  flush=True)  # fmt: skip
            if report is None:
                clear_stale_run(settings.out)
                report = run_trial(settings, progress=False)
            reports.setdefault(method.name, {})[seed] = report
        outcomes.append(outcome_of(method.name, reports[method.name][min(reports[method.name])]))
    target = args.target if args.target is not None else default_target(outcomes)
    print(f"\ntarget MAUA {target:.4f}; bytes are MQTT PUBLISH packet bytes counted by each device's link\n")
    rows = comparison_rows(outcomes, target=target, devices=devices, epochs=epochs, archs=archs)
    if len(seeds) > 1:
        print(f"seed {min(seeds)} of each method (bytes and curves; MAUA over the seeds in the next table):\n")
    print(markdown_table(headers(archs), rows))
    summaries = [seed_summary(name, by_seed, reports.get("local")) for name, by_seed in reports.items()]
    if len(seeds) > 1 or "local" in reports:
        print("\nover the seeds (per-device gains against local training on the same seed and split):\n")
        print(markdown_table(SEED_HEADERS, seed_rows(summaries)))
    for name in skipped:
        print(f"\n{name}: not applicable, it averages one architecture's weights and the devices run {set(archs)}")
    out.mkdir(parents=True, exist_ok=True)
    plot(outcomes, target=target, path=out / "comparison.png")
    summary = {
        "dataset": dataset,
        "devices": devices,
        "epochs": epochs,
        "alpha": args.alpha,
        "archs": list(archs),
        "seeds": seeds,
        "partition": args.partition,
        "extra_train": extra,
        "target": target,
        "not_applicable": skipped,
        "methods": {
            o.method: {
                "maua": o.maua,
                "maua_by_arch": o.maua_by_arch,
                "training_bytes": o.training_bytes,
                "register_bytes": o.register_bytes,
                "bytes_to_target": bytes_to_target(o.curve, target),
                "wall_s": o.wall_s,
                "curve": o.curve,
            }
            for o in outcomes
        },
        "over_seeds": {summary.method: asdict(summary) for summary in summaries},
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    print(f"\nplot: {out / 'comparison.png'}  figures: {out / 'comparison.json'}  trial reports: {out}/<method>/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
