"""The trial report's PNG figures: accuracy, MAUA, per-device accuracy, cumulative bytes and the fault timeline.

Every figure is drawn from report.json alone (its `history`, `maua_curve`, `faults`, `launches`), so a report
can be re-plotted later without rerunning the trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

# The figures write_figures draws, in the order a report page shows them.
FIGURES = ("accuracy.png", "maua.png", "devices.png", "bytes.png", "timeline.png")
_X_LABEL = "seconds since devices started"


def write_figures(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw every figure of FIGURES into `out`; returns their paths."""
    drawers: dict[str, Callable[[dict[str, Any], Path], None]] = {
        "accuracy.png": plot_accuracy,
        "maua.png": plot_maua,
        "devices.png": plot_devices,
        "bytes.png": plot_bytes,
        "timeline.png": plot_timeline,
    }
    paths = []
    for name in FIGURES:
        drawers[name](report, out / name)
        paths.append(out / name)
    return paths


def _by_device(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_device: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(history, key=lambda e: e["trial_time_s"]):
        by_device.setdefault(entry["device"], []).append(entry)
    return dict(sorted(by_device.items()))


def _save(fig: plt.Figure, ax: Axes, path: Path, *, title: str, ylabel: str) -> None:
    ax.set_xlabel(_X_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """MAUA over time, with every device's own accuracy faintly behind it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for entries in _by_device(report["history"]).values():
        ax.plot([e["trial_time_s"] for e in entries], [e["accuracy"] for e in entries], color="grey", alpha=0.25)
    if report["maua_curve"]:
        xs, ys = zip(*report["maua_curve"], strict=True)
        ax.plot(xs, ys, color="tab:blue", linewidth=2, label=f"MAUA ({report['algorithm']})")
        ax.legend(loc="lower right")
    title = f"{report['dataset']}: {len(report['devices'])} devices, final MAUA {report['maua']:.4f}"
    _save(fig, ax, path, title=title, ylabel="test accuracy")


def plot_maua(report: dict[str, Any], path: Path) -> None:
    """MAUA alone (mean over all devices, once every device has reported), with fault events marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if report["maua_curve"]:
        xs, ys = zip(*report["maua_curve"], strict=True)
        ax.plot(xs, ys, color="tab:blue", linewidth=2, marker=".", label="MAUA")
    _mark_trial_events(ax, report)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="lower right", fontsize="small")
    _save(fig, ax, path, title=f"MAUA over time, final {report['maua']:.4f}", ylabel="MAUA")


def plot_devices(report: dict[str, Any], path: Path) -> None:
    """Each device's test accuracy over time, one labelled line per device (late joiners dashed)."""
    late = set(report.get("late_joiners", {}))
    by_device = _by_device(report["history"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for device, entries in by_device.items():
        ax.plot(
            [e["trial_time_s"] for e in entries],
            [e["accuracy"] for e in entries],
            linestyle="--" if device in late else "-",
            marker=".",
            label=device + (" (late)" if device in late else ""),
        )
    if by_device and len(by_device) <= 20:
        ax.legend(loc="lower right", fontsize="x-small", ncol=2)
    _save(fig, ax, path, title="per-device test accuracy", ylabel="test accuracy")


def plot_bytes(report: dict[str, Any], path: Path) -> None:
    """Cumulative bytes over all devices (registration, uplink, downlink) as their metrics arrived."""
    latest: dict[str, dict[str, int]] = {}
    series: dict[str, list[tuple[float, float]]] = {"register_up": [], "up": [], "down": []}
    for entry in sorted(report["history"], key=lambda e: e["trial_time_s"]):
        latest[entry["device"]] = entry.get("bytes", {})
        for kind, points in series.items():
            points.append((entry["trial_time_s"], sum(b.get(kind, 0) for b in latest.values()) / 1024))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, ys, where="post", label=kind)
    if report["history"]:
        ax.legend(loc="upper left")
    _save(fig, ax, path, title="cumulative bytes, all devices", ylabel="KiB")


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    """One row per device: its training span, offline stretches from the fault events, launches of late joiners;
    server kills and broker restarts as vertical lines."""
    by_device = _by_device(report["history"])
    devices = sorted({*by_device, *report.get("launches", {}), *(d["id"] for d in report["devices"])})
    row = {device: n for n, device in enumerate(devices)}
    end = max((e["trial_time_s"] for e in report["history"]), default=1.0)
    fig, ax = plt.subplots(figsize=(8.5, 1.6 + 0.35 * max(len(devices), 1)))
    for device in devices:
        start = report.get("launches", {}).get(device)
        entries = by_device.get(device, [])
        first = start if start is not None else (entries[0]["trial_time_s"] if entries else 0.0)
        last = entries[-1]["trial_time_s"] if entries else first
        ax.broken_barh([(first, max(last - first, 0.01))], (row[device] - 0.3, 0.6), color="tab:green", alpha=0.6)
    for device, spans in offline_spans(report, devices=devices, end=end).items():
        ax.broken_barh([(s, e - s) for s, e in spans], (row[device] - 0.3, 0.6), color="tab:red", alpha=0.8)
    _mark_trial_events(ax, report)
    ax.set_yticks(range(len(devices)), devices)
    ax.set_ylim(-0.7, len(devices) - 0.3)
    ax.plot([], [], color="tab:green", linewidth=6, alpha=0.6, label="running")
    if any(offline_spans(report, devices=devices, end=end).values()):
        ax.plot([], [], color="tab:red", linewidth=6, alpha=0.8, label="offline")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")  # beside the rows, not on them
    _save(fig, ax, path, title="device timeline", ylabel="device")


def offline_spans(report: dict[str, Any], *, devices: list[str], end: float) -> dict[str, list[tuple[float, float]]]:
    """(start, end) trial times each device was cut off, paired from the fault plan's link down/up events.

    Events carry a device *index*; device ids are `dev{index:03d}` as the trial names them. A link brought
    back without a time (the trial releasing it at the end) closes at `end`.
    """
    spans: dict[str, list[tuple[float, float]]] = {d: [] for d in devices}
    opened: dict[str, float] = {}
    for event in report.get("faults", {}).get("events", []):
        if "device" not in event:
            continue
        device = f"dev{int(event['device']):03d}"
        if event["event"] == "link down" and event["t"] is not None:
            opened[device] = float(event["t"])
        elif event["event"] == "link up" and device in opened:
            stop = float(event["t"]) if event["t"] is not None else end
            spans.setdefault(device, []).append((opened.pop(device), stop))
    for device, start in opened.items():
        spans.setdefault(device, []).append((start, end))
    return spans


_EVENT_STYLE = {
    "server kill -9": ("tab:red", "-"),
    "server restarted": ("tab:orange", ":"),
    "broker restarted": ("tab:purple", "--"),
    "fault plan started": ("grey", ":"),
}


def _mark_trial_events(ax: Axes, report: dict[str, Any]) -> None:
    """Vertical lines for trial-wide events (server kills and restarts, broker restarts, the plan's start)."""
    labelled: set[str] = set()
    for event in report.get("faults", {}).get("events", []):
        style = _EVENT_STYLE.get(event["event"])
        if style is None or event["t"] is None:
            continue
        label = event["event"] if event["event"] not in labelled else None
        labelled.add(event["event"])
        ax.axvline(event["t"], color=style[0], linestyle=style[1], linewidth=1.2, label=label)


# Colours of the methods a comparison draws (the demo's FedCache and local runs), by report `algorithm`.
_METHOD_COLOURS = {"fedcache": "tab:blue", "local": "tab:orange", "fd": "tab:green", "fedavg": "tab:red"}


def plot_maua_comparison(
    *,
    by_epoch: Mapping[str, Sequence[tuple[int, float]]],
    over_time: Mapping[str, Sequence[Sequence[float]]],
    path: Path,
    title: str,
) -> None:
    """MAUA of several trials on one figure: per local epoch (left: equal epochs, the fair comparison) and over
    trial time (right: what each run cost in seconds), one colour per method."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, points in by_epoch.items():
        if points:
            epochs, maua = zip(*points, strict=True)
            left.plot(epochs, maua, marker="o", color=_METHOD_COLOURS.get(method), label=method)
    for method, curve in over_time.items():
        if curve:
            xs, ys = zip(*((p[0], p[1]) for p in curve), strict=True)
            right.plot(xs, ys, color=_METHOD_COLOURS.get(method), linewidth=2, label=method)
    left.set_xlabel("local epochs")
    left.set_ylabel("MAUA")
    left.set_title("MAUA after each epoch")
    right.set_xlabel(_X_LABEL)
    right.set_title("MAUA over time")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_device_gains(*, gains: Sequence[tuple[str, str, float]], path: Path, title: str) -> None:
    """One bar per device (id, arch, accuracy difference in points), coloured by architecture, mean as a line."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * len(gains) + 2), 4))
    archs = sorted({arch for _, arch, _ in gains})
    colours = {arch: f"C{n}" for n, arch in enumerate(archs)}
    for n, (_, arch, gain) in enumerate(gains):
        ax.bar(n, gain, color=colours[arch], label=arch)
    if gains:
        mean = sum(g for _, _, g in gains) / len(gains)
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:+.2f}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(gains)), [device for device, _, _ in gains], rotation=60, fontsize="small")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per architecture
    if unique:
        ax.legend(unique.values(), unique.keys(), loc="best", fontsize="small")
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
