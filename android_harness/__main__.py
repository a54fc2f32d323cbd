"""`python -m android_harness trial|faults|scenario|demo|flash|provision|revoke`: trials, bundles, credentials."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from android_harness.demo import add_demo_parser, run_demo
from android_harness.faults import FaultPlan
from android_harness.flash import add_flash_parser, run_flash, run_provision, run_revoke
from android_harness.spec import SpecError, TrialSpec, load_spec
from android_harness.trial import AUTH_MODES, DEFENCE_MODES, SECURITY_MODES, TrialSettings, run_trial
from edge.config import ATTACK_KNOBS, ATTACKS, KNOWLEDGE_SCHEDULE, attack_knobs
from edge.data import PARTITIONS
from fedwire import HashKind, LogitEncoding, TeacherForm
from fedwire.child_process import exit_on_sigterm
from models.loss import TeacherGate

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
        help="training backends assigned round-robin: torch, executorch (the .pte program), native (edge_native/)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the non-IID split")
    parser.add_argument(
        "--partition",
        default="dirichlet",
        choices=PARTITIONS,
        help="how the split is drawn: dirichlet (ours, seeded by --seed; default) or dirichlet-per-class (the "
        "published FedCache loader's, each class seeded by its index, --seed not used)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hash-kind", default="bin", choices=[k.value for k in HashKind])
    parser.add_argument("--hash-dim", type=int, default=256, help="hash bits (bin) or float16 dimensions (f16)")
    parser.add_argument(
        "--encoder-kind", default="conv", choices=["conv", "pixel"], help="built-in hash encoder (see docs/encoder.md)"
    )
    parser.add_argument("--logit-encoding", default="f16", choices=[e.value for e in LogitEncoding])
    parser.add_argument(
        "--teacher",
        default="mean",
        choices=[t.value for t in TeacherForm],
        help="fedcache: the server's mean of the R neighbours' logits (default) or every neighbour's row (raw)",
    )
    parser.add_argument(
        "--bn-recalibration",
        type=int,
        default=0,
        metavar="N",
        help="before each evaluation, recompute batch-norm statistics over N of each device's training samples "
        "(0 = off, default; torch backend only; docs/benchmarks.md §6)",
    )
    parser.add_argument(
        "--teacher-gate",
        default="none",
        choices=[g.value for g in TeacherGate],
        help="fedcache: distil from every teacher (none, the paper's; default) or only from those whose top class "
        "is the sample's label (label; torch backend only; docs/benchmarks.md §4)",
    )
    parser.add_argument(
        "--knowledge-every-epochs",
        type=int,
        default=1,
        metavar="K",
        help="fedcache: upload logits and fetch teachers in every K-th epoch only, from the first (1 = every epoch, "
        "the paper's; default); the epochs between train on the teachers last received, for 1/K of the bytes",
    )
    parser.add_argument(
        "--knowledge-every-batches",
        type=int,
        default=1,
        metavar="B",
        help="fedcache: send the waiting logits and fetch teachers every B batches, one message each way for all "
        "of them (1 = every batch, the paper's; default): fewer, larger messages, fewer bytes per sample",
    )
    parser.add_argument(
        "--knowledge-warmup-epochs",
        type=int,
        default=0,
        metavar="W",
        help="fedcache: train W epochs with cross-entropy only before the first exchange (0 = from the first "
        "epoch, the paper's; default): no bytes for a nearly untrained model's knowledge",
    )
    parser.add_argument(
        "--security",
        default="none",
        choices=SECURITY_MODES,
        help="tls: the private broker is secure (dynamic security plugin, TLS for devices) and every device, the "
        "server and the trial's observers get identities of their own (default none: plaintext, anonymous)",
    )
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        help="with --security tls: devices authenticate by password, client certificate, or mixed (alternating by "
        "device index); default password",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")


def _settings(args: argparse.Namespace, *, algorithm: str, out: Path) -> TrialSettings:
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    unknown = [a for a in archs if a not in ARCH_CHOICES]
    if unknown:
        raise SystemExit(f"unknown architectures {unknown}; choose from {ARCH_CHOICES}")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not set(backends) <= {"torch", "executorch", "native"}:
        raise SystemExit(f"unknown backends in {backends}; choose torch, executorch, native")
    if args.auth is not None and args.security == "none":
        raise SystemExit("--auth: devices authenticate only in a secure trial; add --security tls")
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
        partition=args.partition,
        hash_kind=HashKind(args.hash_kind),
        hash_dim=args.hash_dim,
        encoder_kind=args.encoder_kind,
        logit_encoding=LogitEncoding(args.logit_encoding),
        extra_train=_extra_train(args),
        timeout_s=args.timeout,
        security=args.security,
        auth=args.auth or "password",
    )


def _extra_train(args: argparse.Namespace) -> dict[str, object]:
    """The [train] settings the options change from the devices' defaults (only those, so files stay minimal)."""
    extra: dict[str, object] = {}
    if args.teacher != "mean":
        extra["teacher_form"] = TeacherForm(args.teacher)
    if args.bn_recalibration < 0:
        raise SystemExit(f"--bn-recalibration {args.bn_recalibration}: 0 (off) or a number of samples")
    if args.bn_recalibration:
        extra["bn_recalibration"] = args.bn_recalibration
    if args.teacher_gate != "none":
        extra["teacher_gate"] = TeacherGate(args.teacher_gate)
    for name, knob in KNOWLEDGE_SCHEDULE.items():
        if (value := getattr(args, name)) < knob.minimum:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: {knob.minimum} ({knob.meaning}) or more")
        if value != knob.minimum:
            extra[name] = value
    return extra


def add_attack_options(parser: argparse.ArgumentParser) -> None:
    """`trial`'s malicious devices and the server's defences (`_attacked` reads them)."""
    parser.add_argument("--attack", choices=ATTACKS, help="malicious devices' behaviour (docs/robustness.md)")
    parser.add_argument(
        "--attackers",
        type=int,
        default=0,
        help="with --attack: how many devices attack, the last ones (so the honest devices are those of a run "
        "without attack); report.json's maua_honest averages the others",
    )
    parser.add_argument(
        "--attack-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attack knob for every attacker, repeatable (edge.config.AttackConfig: "
        + ", ".join(ATTACK_KNOBS)
        + "), e.g. --attack-option shift=40",
    )
    parser.add_argument("--defences", choices=DEFENCE_MODES, help="the cache server's --defences (default: its own)")


def _attacked(settings: TrialSettings, args: argparse.Namespace) -> TrialSettings:
    """The trial's --attack on its last --attackers devices, and the server's --defences."""
    if (args.attack is None) != (args.attackers == 0):
        raise SystemExit("--attack and --attackers go together (--attackers N >= 1 of the devices)")
    if not 0 <= args.attackers <= settings.devices:
        raise SystemExit(f"--attackers {args.attackers}: the trial has {settings.devices} devices")
    if args.attack_option and args.attack is None:
        raise SystemExit("--attack-option sets an attack's knobs: give --attack and --attackers too")
    honest = settings.devices - args.attackers
    attacks = ("",) * honest + (args.attack,) * args.attackers if args.attackers else ()
    return dataclasses.replace(
        settings, attacks=attacks, defences=args.defences, attack_options=_attack_options(args.attack_option)
    )


def _attack_options(pairs: list[str]) -> dict[str, int | float]:
    """--attack-option KEY=VALUE ... as the attackers' typed knobs (edge.config.attack_knobs)."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--attack-option {pair!r}: KEY=VALUE, e.g. shift=40 (knobs: {', '.join(ATTACK_KNOBS)})")
        raw[key.strip()] = value.strip()
    try:
        return attack_knobs(raw)
    except ValueError as exc:
        raise SystemExit(f"--attack-option: {exc}") from exc


def _summary_line(report: dict) -> str:
    per = report["bytes_per_device_per_epoch"]
    return (
        f"{report['algorithm']:>9}: MAUA {report['maua']:.4f} after {report['epochs']} epochs | "
        f"per device per epoch: up {per['up'] / 1024:.1f} KiB, down {per['down'] / 1024:.1f} KiB | "
        f"registration up {report['bytes']['register_up'] / 1024:.1f} KiB in all | wall {report['wall_s']:.0f} s"
    )


SCENARIOS = Path(__file__).parent / "scenarios"


def _scenario_path(name: str) -> Path:
    """A shipped scenario by name (`steady`, `server_crash`, ...) or any trial file by path."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    shipped = SCENARIOS / f"{name.removesuffix('.toml')}.toml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    raise SystemExit(f"no scenario or trial file {name!r}; shipped scenarios: {', '.join(names)}")


def _print_invariants(report: dict) -> int:
    """One PASS/FAIL line per invariant and an overall line; returns how many failed."""
    invariants = report.get("invariants", {})
    if report.get("last_report_missing"):
        missing = ", ".join(report["last_report_missing"])
        print(f"  note: final report never arrived over MQTT, read from the device's state instead: {missing}")
    failed = 0
    for name, result in invariants.items():
        failed += not result["ok"]
        print(f"  {'PASS' if result['ok'] else 'FAIL'} {name}: {result['detail']}")
    if invariants:
        print(f"{'FAIL' if failed else 'PASS'}: {len(invariants) - failed} of {len(invariants)} invariants hold")
    return failed


def _run_spec(spec: TrialSpec, *, out: Path) -> int:
    """Run a parsed trial file; exit status 1 when an invariant failed."""
    if spec.description:
        print(f"== {spec.source}: {spec.description}", file=sys.stderr)
    report = run_trial(spec.settings, faults=spec.faults)
    print(_summary_line(report))
    if "faults" in report:
        print(f"faults: {report['faults']['mode']}, {len(report['faults']['events'])} events")
    failed = _print_invariants(report)
    print(f"report: {out / 'report.html'}  (report.json, timeseries.csv and the PNG plots beside it)")
    return 1 if failed else 0


def _load(path: Path, *, out: Path) -> TrialSpec:
    try:
        return load_spec(path, out=out)
    except SpecError as exc:
        raise SystemExit(f"invalid trial file: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m android_harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    trial = commands.add_parser("trial", help="run one local trial (broker, server, N device processes)")
    _add_trial_options(trial, epochs=3, devices=20)
    trial.add_argument(
        "--algorithm",
        default="fedcache",
        choices=["fedcache", "local", "fd", "fedavg"],
        help="fedcache; local (CE only, no network); fd (federated distillation of per-class logits); fedavg "
        "(synchronous parameter averaging, one architecture only). `python -m bench comparison` runs them all",
    )
    trial.add_argument("--out", type=Path, required=True, help="directory for report.json, plots and logs")
    add_attack_options(trial)
    trial.add_argument(
        "--spec", type=Path, help="a TOML trial file (docs/trials.md); the trial options above are then ignored"
    )
    scenario = commands.add_parser(
        "scenario", help="run a bench scenario (a shipped trial file or a path) and check its invariants"
    )
    scenario.add_argument(
        "name", help="steady, flaky_links, server_crash, broker_restart, late_joiners, secure_mixed, or a .toml"
    )
    scenario.add_argument("--out", type=Path, help="report directory (default runs/scenario-<name>)")
    faults = commands.add_parser("faults", help="a trial under injected faults, with invariants checked after")
    _add_trial_options(faults, epochs=3, devices=20)
    faults.add_argument("--out", type=Path, required=True)
    faults.add_argument("--offline", type=float, default=0.3, help="share of time each device is cut off (0-1)")
    faults.add_argument("--mean-outage", type=float, default=20.0, help="mean outage length in seconds")
    faults.add_argument("--loss", type=float, default=0.0, help="probability each packet of a device is dropped")
    faults.add_argument("--server-kill-at", type=float, nargs="*", default=[], help="seconds at which to kill -9")
    faults.add_argument("--server-down", type=float, default=5.0, help="seconds before the killed server restarts")
    faults.add_argument("--broker-restart-at", type=float, nargs="*", default=[], help="seconds of broker restarts")
    add_demo_parser(commands)
    add_flash_parser(commands)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "flash":
        return run_flash(args)
    if args.command == "provision":
        return run_provision(args)
    if args.command == "revoke":
        return run_revoke(args)

    if args.command == "trial" and args.spec is not None:
        return _run_spec(_load(args.spec, out=args.out), out=args.out)

    if args.command == "scenario":
        path = _scenario_path(args.name)
        out = args.out or Path("runs") / f"scenario-{path.stem}"
        return _run_spec(_load(path, out=out), out=out)

    if args.command == "trial":
        report = run_trial(_attacked(_settings(args, algorithm=args.algorithm, out=args.out), args))
        print(_summary_line(report))
        if report["attackers"]:
            print(f"honest MAUA {report['maua_honest']:.4f} without the {len(report['attackers'])} attackers")
        failed = _print_invariants(report)
        print(f"report: {args.out / 'report.json'}  page: {args.out / 'report.html'}  plots beside them")
        return 1 if failed else 0

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
        return 1 if _print_invariants(report) else 0

    return run_demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
