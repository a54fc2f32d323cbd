"""MAUA with devices offline 0 %, 30 % and 60 % of the time (random outages), and the bytes wasted on retransmission."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from android_harness.faults import FaultPlan
from android_harness.trial import TrialSettings, run_trial

FRACTIONS = (0.0, 0.3, 0.6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench offline", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="digits, 4 devices, 4 epochs (about a minute or two)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--mean-outage", type=float, default=20.0, help="mean outage length, seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dataset, devices, epochs, outage = "fashion-mnist", args.devices, args.epochs, args.mean_outage
    if args.quick:
        dataset, devices, epochs, outage = "digits", 4, 4, 3.0
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-offline-"))
    rows = []
    for fraction in FRACTIONS:
        settings = TrialSettings(
            out=out / f"offline-{int(fraction * 100)}", dataset=dataset, devices=devices, epochs=epochs
        )
        plan = FaultPlan(offline_fraction=fraction, mean_outage_s=outage) if fraction else None
        report = run_trial(settings, faults=plan)
        invariants = report.get("invariants", {})
        rows.append(
            (
                fraction,
                report["maua"],
                report["bytes"]["up"] / devices / epochs,
                report["bytes"]["down"] / devices / epochs,
                report.get("wasted_bytes", 0) / devices,
                report.get("faults", {}).get("mode", "-"),
                all(r["ok"] for r in invariants.values()) if invariants else None,
                report["wall_s"],
            )
        )
    print(f"\n{dataset}, {devices} devices, {epochs} epochs, mean outage {outage:.0f} s; reports under {out}")
    print(
        f"{'offline':>8} {'MAUA':>7} {'up B/dev/ep':>12} {'down B/dev/ep':>14} {'wasted B/dev':>13} {'mode':>13} "
        f"{'invariants':>10} {'wall s':>7}"
    )
    for fraction, maua, up, down, wasted, mode, ok, wall in rows:
        print(
            f"{fraction:>8.0%} {maua:>7.4f} {up:>12.0f} {down:>14.0f} {wasted:>13.0f} {mode:>13} "
            f"{'-' if ok is None else ('pass' if ok else 'FAIL'):>10} {wall:>7.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
