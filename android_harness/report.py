"""A trial's report: report.json (MAUA, its curve, bytes, per-device figures), timeseries.csv, plots, report.html."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from android_harness.plots import plot_accuracy, write_figures

__all__ = [
    "build_report",
    "maua_by_epoch",
    "plot_accuracy",
    "startup_phases",
    "write_report",
    "write_timeseries",
]


def build_report(
    *,
    settings: dict[str, Any],
    latest: dict[str, dict[str, Any]],
    curve: list[list[float]],
    history: list[dict[str, Any]],
    wall_s: float,
    attackers: Sequence[str] = (),
) -> dict[str, Any]:
    """Summarise the devices' final metrics; MAUA is the unweighted mean of their test accuracies.

    `maua_honest` is the same mean over the devices not in `attackers` (docs/robustness.md), `attackers` the
    malicious devices' ids.
    """
    devices = [
        {
            "id": device,
            "arch": m["arch"],
            "accuracy": m["accuracy"],
            "epochs": m["epoch"],
            "bytes_up": m["bytes"]["up"],
            "bytes_down": m["bytes"]["down"],
            "bytes_register_up": m["bytes"]["register_up"],
            "teacher_coverage": m["teacher_coverage"],
            "latency_ms_p50": m["latency_ms_p50"],
            "train_samples": m["train_samples"],
            "test_samples": m["test_samples"],
        }
        for device, m in sorted(latest.items())
    ]
    count = max(len(devices), 1)
    epochs = max((d["epochs"] for d in devices), default=0)
    totals = {
        "register_up": sum(d["bytes_register_up"] for d in devices),
        "up": sum(d["bytes_up"] for d in devices),
        "down": sum(d["bytes_down"] for d in devices),
    }
    per_device_epoch = {k: v / count / max(epochs, 1) for k, v in totals.items() if k != "register_up"}
    honest = [d["accuracy"] for d in devices if d["id"] not in set(attackers)]
    return {
        "algorithm": settings["algorithm"],
        "dataset": settings["dataset"],
        "maua": sum(d["accuracy"] for d in devices) / count,
        "maua_honest": sum(honest) / len(honest) if honest else None,
        "attackers": sorted(attackers),
        "maua_curve": curve,
        "bytes": totals,
        "bytes_per_device_per_epoch": per_device_epoch,
        "wall_s": wall_s,
        "epochs": epochs,
        "devices": devices,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "history": history,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write report.json, timeseries.csv, the PNG figures and report.html into the trial directory."""
    from android_harness.html_report import write_html

    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    write_timeseries(report["history"], out / "timeseries.csv")
    figures = write_figures(report, out)
    write_html(report, figures=figures, path=out / "report.html")


# One row per metrics message: (column, how to read it from the message).
TIMESERIES_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("trial_time_s", lambda m: round(m["trial_time_s"], 3)),
    ("device", lambda m: m["device"]),
    ("arch", lambda m: m.get("arch")),
    ("epoch", lambda m: m["epoch"]),
    ("step", lambda m: m.get("step")),
    ("accuracy", lambda m: m["accuracy"]),
    ("bytes_register_up", lambda m: m.get("bytes", {}).get("register_up", 0)),
    ("bytes_up", lambda m: m.get("bytes", {}).get("up", 0)),
    ("bytes_down", lambda m: m.get("bytes", {}).get("down", 0)),
    ("wasted_bytes", lambda m: m.get("wasted_bytes", 0)),
    ("offline_s", lambda m: m.get("offline_s", 0.0)),
    ("offline_steps", lambda m: m.get("offline_steps", 0)),
    ("outbox", lambda m: m.get("outbox", 0)),
    ("teacher_coverage", lambda m: m.get("teacher_coverage", 0.0)),
    ("teachers_received", lambda m: m.get("teachers_received", 0)),
    ("latency_ms_p50", lambda m: m.get("latency_ms_p50")),
    ("done", lambda m: int(bool(m.get("done")))),
)


def write_timeseries(history: list[dict[str, Any]], path: Path) -> None:
    """timeseries.csv: every metrics message every device sent, in arrival order (for spreadsheets, pandas)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in TIMESERIES_COLUMNS])
        for metrics in sorted(history, key=lambda m: m["trial_time_s"]):
            writer.writerow(["" if (v := read(metrics)) is None else v for _, read in TIMESERIES_COLUMNS])


def maua_by_epoch(report: dict[str, Any]) -> list[tuple[int, float]]:
    """(epoch, MAUA) from each device's report at the end of that epoch (epoch 0: before training).

    Only epochs every device reported count, so two trials of the same devices compare at equal epochs
    (the `maua_curve` is over trial time instead, where devices stand at different epochs).
    """
    devices = {d["id"] for d in report["devices"]}
    at: dict[int, dict[str, float]] = {}
    for entry in sorted(report["history"], key=lambda e: e["trial_time_s"]):
        at.setdefault(int(entry["epoch"]), {})[entry["device"]] = float(entry["accuracy"])
    return [
        (epoch, sum(accuracies.values()) / len(accuracies))
        for epoch, accuracies in sorted(at.items())
        if devices and set(accuracies) >= devices
    ]


def startup_phases(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per start-up phase (the devices' `startup_s`, edge.runtime.StartupClock) its median and maximum over
    devices, plus `first_report` (trial seconds from launch to each device's first report)."""
    first: dict[str, dict[str, Any]] = {}
    for entry in sorted(report["history"], key=lambda e: e["trial_time_s"]):
        first.setdefault(entry["device"], entry)
    launches = report.get("launches", {})
    values: dict[str, list[float]] = {}
    for device, entry in first.items():
        for phase, seconds in entry.get("startup_s", {}).items():
            values.setdefault(phase, []).append(float(seconds))
        values.setdefault("first_report", []).append(entry["trial_time_s"] - launches.get(device, 0.0))
    return {phase: {"median": statistics.median(v), "max": max(v)} for phase, v in values.items()}
