"""Shared helpers of the benchmarks: medians of repeated timings and markdown tables."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T], *, repeats: int) -> tuple[float, T]:
    """Median wall time of `repeats` calls and the last call's result.

    A median, not a mean, because the benchmark host is shared: one descheduled run must not move the figure.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times: list[float] = []
    result: T
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table, so the printed output can be pasted into docs/benchmarks.md unchanged."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """What the figures were measured on; timings are meaningless without it."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores (shared; load average {load} at start), Python {platform.python_version()}"
