"""`python -m android_harness trial|demo`: run local FedCache trials and write their reports."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from android_harness.faults import FaultPlan
from android_harness.trial import TrialSettings, run_trial
from fedwire import HashKind, LogitEncoding

ARCH_CHOICES = ("resnet8", "resnet16", "resnet20", "cnn", "mobilenet")


def _add_trial_options(parser: argparse.ArgumentParser, *, epochs: int, devices: int) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    parser.add_argument("--devices", type=int, default=devices, help=f"device processes (default {devices})")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"local epochs per device (default {epochs})")
    parser.add_argument(
        "--archs",
        default="cnn",
        help="comma-separated zoo architectures assigned to devices round-robin (heterogeneous when several): "
        + ", ".join(ARCH_CHOICES),
    )
    parser.add_argument(
        "--backends",
        default="torch",
        help="comma-separated training backends assigned round-robin: torch, executorch (the .pte program)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the non-IID split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hash-kind", default="bin", choices=[k.value for k in HashKind])
    parser.add_argument("--hash-dim", type=int, default=256, help="hash bits (bin) or float16 dimensions (f16)")
    parser.add_argument(
        "--encoder-kind", default="conv", choices=["conv", "pixel"], help="built-in hash encoder (see docs/encoder.md)"
    )
    parser.add_argument("--logit-encoding", default="f16", choices=[e.value for e in LogitEncoding])
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")


def _settings(args: argparse.Namespace, *, algorithm: str, out: Path) -> TrialSettings:
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    unknown = [a for a in archs if a not in ARCH_CHOICES]
    if unknown:
        raise SystemExit(f"unknown architectures {unknown}; choose from {ARCH_CHOICES}")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not set(backends) <= {"torch", "executorch"}:
        raise SystemExit(f"unknown backends in {backends}; choose torch, executorch")
    return TrialSettings(
        out=out,
        backends=backends,
        dataset=args.dataset,
        devices=args.devices,
        epochs=args.epochs,
        algorithm=algorithm,
        archs=archs,
        alpha=args.alpha,
        seed=args.seed,
        hash_kind=HashKind(args.hash_kind),
        hash_dim=args.hash_dim,
        encoder_kind=args.encoder_kind,
        logit_encoding=LogitEncoding(args.logit_encoding),
        timeout_s=args.timeout,
    )


def _summary_line(report: dict) -> str:
    per = report["bytes_per_device_per_epoch"]
    return (
        f"{report['algorithm']:>9}: MAUA {report['maua']:.4f} after {report['epochs']} epochs | "
        f"per device per epoch: up {per['up'] / 1024:.1f} KiB, down {per['down'] / 1024:.1f} KiB | "
        f"registration up {report['bytes']['register_up'] / 1024:.1f} KiB in all | wall {report['wall_s']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m android_harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    trial = commands.add_parser("trial", help="run one local trial (broker, server, N device processes)")
    _add_trial_options(trial, epochs=3, devices=20)
    trial.add_argument("--algorithm", default="fedcache", choices=["fedcache", "local"])
    trial.add_argument("--out", type=Path, required=True, help="directory for report.json, plots and logs")
    faults = commands.add_parser("faults", help="a trial under injected faults, with invariants checked after")
    _add_trial_options(faults, epochs=3, devices=20)
    faults.add_argument("--out", type=Path, required=True)
    faults.add_argument("--offline", type=float, default=0.3, help="share of time each device is cut off (0-1)")
    faults.add_argument("--mean-outage", type=float, default=20.0, help="mean outage length in seconds")
    faults.add_argument("--loss", type=float, default=0.0, help="probability each packet of a device is dropped")
    faults.add_argument("--server-kill-at", type=float, nargs="*", default=[], help="seconds at which to kill -9")
    faults.add_argument("--server-down", type=float, default=5.0, help="seconds before the killed server restarts")
    faults.add_argument("--broker-restart-at", type=float, nargs="*", default=[], help="seconds of broker restarts")
    demo = commands.add_parser("demo", help="FedCache and the local (CE only) baseline on the same split")
    _add_trial_options(demo, epochs=3, devices=20)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "trial":
        report = run_trial(_settings(args, algorithm=args.algorithm, out=args.out))
        print(_summary_line(report))
        print(f"report: {args.out / 'report.json'}  plot: {args.out / 'accuracy.png'}")
        return 0

    if args.command == "faults":
        plan = FaultPlan(
            offline_fraction=args.offline,
            mean_outage_s=args.mean_outage,
            loss=args.loss,
            server_kill_at_s=tuple(args.server_kill_at),
            server_down_s=args.server_down,
            broker_restart_at_s=tuple(args.broker_restart_at),
            seed=args.seed,
        )
        report = run_trial(_settings(args, algorithm="fedcache", out=args.out), faults=plan)
        print(_summary_line(report))
        print(
            f"faults: {report['faults']['mode']}, {len(report['faults']['events'])} events, "
            f"wasted {report['wasted_bytes'] / 1024:.1f} KiB"
        )
        failed = 0
        for name, result in report["invariants"].items():
            failed += not result["ok"]
            print(f"  {'PASS' if result['ok'] else 'FAIL'} {name}: {result['detail']}")
        return 1 if failed else 0

    reports = {}
    for algorithm in ("fedcache", "local"):
        print(f"== {algorithm}: {args.devices} devices on {args.dataset}, {args.epochs} epochs", file=sys.stderr)
        reports[algorithm] = run_trial(_settings(args, algorithm=algorithm, out=args.out / algorithm))
    print()
    for report in reports.values():
        print(_summary_line(report))
    gain = reports["fedcache"]["maua"] - reports["local"]["maua"]
    print(f"FedCache - local MAUA: {gain:+.4f}")
    (args.out / "summary.json").write_text(
        json.dumps(
            {k: {key: r[key] for key in ("maua", "bytes", "wall_s", "epochs")} for k, r in reports.items()}, indent=2
        )
    )
    print(f"reports: {args.out}/fedcache/report.json, {args.out}/local/report.json (plots beside them)")
    print(
        "Go further: python -m android_harness trial --help (more epochs, --archs resnet8,resnet16,resnet20, "
        "--algorithm local); python broker_server/main.py --help; python -m edge --config device.toml"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
