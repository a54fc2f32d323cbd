"""A trial's report: report.json with MAUA, its curve, bytes and per-device figures, plus a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def build_report(
    *,
    settings: dict[str, Any],
    latest: dict[str, dict[str, Any]],
    curve: list[list[float]],
    history: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Summarise the devices' final metrics; MAUA is the unweighted mean of their test accuracies."""
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
    return {
        "algorithm": settings["algorithm"],
        "dataset": settings["dataset"],
        "maua": sum(d["accuracy"] for d in devices) / count,
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
    """Write report.json and accuracy.png into the trial directory."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot_accuracy(report, out / "accuracy.png")


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """MAUA over time, with every device's own accuracy faintly behind it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    by_device: dict[str, list[tuple[float, float]]] = {}
    for entry in report["history"]:
        by_device.setdefault(entry["device"], []).append((entry["trial_time_s"], entry["accuracy"]))
    for points in by_device.values():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color="grey", alpha=0.25, linewidth=0.8)
    if report["maua_curve"]:
        xs, ys = zip(*report["maua_curve"], strict=True)
        ax.plot(xs, ys, color="tab:blue", linewidth=2, label=f"MAUA ({report['algorithm']})")
    ax.set_xlabel("seconds since devices started")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{report['dataset']}: {len(report['devices'])} devices, final MAUA {report['maua']:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
