"""Fault injection for trials (outages, packet loss, server kill -9, broker restarts) and the invariants after."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from android_harness.netns import NetnsLab
from android_harness.processes import server_main
from edge.state import Progress

log = logging.getLogger(__name__)

SCHEDULE_HORIZON_S = 6 * 3600.0
# One slot per device; None while a late joiner has not been launched yet.
Processes = list[subprocess.Popen[bytes] | None]
RECOVERY_TOLERANCE = 0.02


@dataclass(frozen=True)
class FaultPlan:
    """What goes wrong during a trial; times are seconds since every device began training (registered and
    reported its first metrics), so a plan means the same on a fast machine and a loaded one."""

    offline_fraction: float = 0.0
    mean_outage_s: float = 10.0
    # Per-device share of time offline (device index -> fraction), overriding `offline_fraction` for that device.
    offline_fractions: tuple[tuple[int, float], ...] = ()
    # Scheduled outages on top of the random ones: (device index, start s, length s).
    outages: tuple[tuple[int, float, float], ...] = ()
    loss: float = 0.0
    server_kill_at_s: tuple[float, ...] = ()
    server_down_s: float = 5.0
    broker_restart_at_s: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.offline_fraction < 1:
            raise ValueError("offline_fraction must be in [0, 1)")
        if any(not 0 <= fraction < 1 for _, fraction in self.offline_fractions):
            raise ValueError("every per-device offline fraction must be in [0, 1)")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")

    @property
    def touches_links(self) -> bool:
        return self.has_outages or self.loss > 0

    @property
    def has_outages(self) -> bool:
        """Whether any device is ever cut off (random or scheduled)."""
        return self.offline_fraction > 0 or bool(self.outages) or any(f > 0 for _, f in self.offline_fractions)

    def fraction_for(self, index: int) -> float:
        """The share of time device `index` is offline: its own override, else the plan-wide fraction."""
        return dict(self.offline_fractions).get(index, self.offline_fraction)


def outage_schedule(*, fraction: float, mean_outage_s: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Random (start, end) outages: exponential lengths whose long-run share of time is `fraction`."""
    if fraction <= 0:
        return []
    mean_online = mean_outage_s * (1 - fraction) / fraction
    outages, now = [], float(rng.exponential(mean_online))
    while now < SCHEDULE_HORIZON_S:
        length = float(rng.exponential(mean_outage_s))
        outages.append((now, now + length))
        now += length + float(rng.exponential(mean_online))
    return outages


@dataclass
class FaultDriver:
    """Applies a plan as time passes: call `tick(elapsed, ...)` from the trial's follow loop.

    With namespaces a device's link is cut (`ip link set down`); without them (not root) the device
    process is paused with SIGSTOP instead, which also pauses its training — the report says which.
    """

    plan: FaultPlan
    devices: int
    lab: NetnsLab | None
    kill_server: Callable[[], None]
    start_server: Callable[[], None]
    restart_broker: Callable[[], None]
    progress_of: Callable[[int], Progress | None] = lambda _index: None
    events: list[dict[str, Any]] = field(default_factory=list)
    outages_seen: list[dict[str, Any]] = field(default_factory=list)
    _open_outage: dict[int, dict[str, Any]] = field(default_factory=dict)
    _outages: list[list[tuple[float, float]]] = field(default_factory=list)
    _down: set[int] = field(default_factory=set)
    _exempt: set[int] = field(default_factory=set)
    _server_kills: list[float] = field(default_factory=list)
    _server_back_at: float | None = None
    _broker_restarts: list[float] = field(default_factory=list)
    _origin: float | None = None

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.plan.seed)
        self._outages = [
            outage_schedule(fraction=self.plan.fraction_for(index), mean_outage_s=self.plan.mean_outage_s, rng=rng)
            for index in range(self.devices)
        ]
        for index, start, length in self.plan.outages:
            if not 0 <= index < self.devices:
                raise ValueError(f"scheduled outage for device {index}, but the trial has {self.devices} devices")
            self._outages[index] = sorted([*self._outages[index], (start, start + length)])
        self._server_kills = sorted(self.plan.server_kill_at_s)
        self._broker_restarts = sorted(self.plan.broker_restart_at_s)

    @property
    def mode(self) -> str:
        """How link faults are applied: cut links in namespaces, paused processes without them, or not at all."""
        if self.lab is not None:
            return "netns"
        return "process-pause" if self.plan.touches_links else "no link faults"

    def start(self) -> None:
        """Nothing is applied before the plan's clock starts (see `begin`); kept for callers that call it."""

    def exempt(self, index: int, processes: Processes) -> None:
        """No more outages for this device (it is in its final epoch, so its final flush can be checked)."""
        if index not in self._exempt:
            self._exempt.add(index)
            if index in self._down:
                self._set_link(index, up=True, processes=processes, elapsed=None)

    def begin(self, elapsed: float) -> None:
        """Start the plan's clock (the trial calls this once every device is training)."""
        if self._origin is None:
            self._origin = elapsed
            self.events.append({"t": elapsed, "event": "fault plan started"})
            # Packet loss starts with the clock, like every other fault: a lossy link from the first second
            # stalls registration in TCP backoff for minutes, so the plan would start arbitrarily late.
            if self.lab is not None and self.plan.loss > 0:
                for index in range(self.devices):
                    self.lab.lossy(index, self.plan.loss)

    def tick(self, elapsed: float, processes: Processes) -> None:
        """Apply what the plan says for now; `elapsed` is the trial's clock, recorded in the events."""
        if self._origin is None:
            return
        now = elapsed - self._origin
        self._note_progress_after_cuts()
        for index, outages in enumerate(self._outages):
            offline = index not in self._exempt and any(start <= now < end for start, end in outages)
            if offline != (index in self._down):
                self._set_link(index, up=not offline, processes=processes, elapsed=elapsed)
        if self._server_kills and now >= self._server_kills[0]:
            self._server_kills.pop(0)
            self.kill_server()
            self._server_back_at = now + self.plan.server_down_s
            self.events.append({"t": elapsed, "event": "server kill -9"})
        if self._server_back_at is not None and now >= self._server_back_at:
            self._server_back_at = None
            self.start_server()
            self.events.append({"t": elapsed, "event": "server restarted"})
        if self._broker_restarts and now >= self._broker_restarts[0]:
            self._broker_restarts.pop(0)
            self.restart_broker()
            self.events.append({"t": elapsed, "event": "broker restarted"})

    def _set_link(self, index: int, *, up: bool, processes: Processes, elapsed: float | None) -> None:
        process = processes[index] if index < len(processes) else None
        if self.lab is not None:
            (self.lab.restore if up else self.lab.cut)(index)
        elif process is not None and process.poll() is None:
            # A late joiner not launched yet has no process to pause; the trial pauses it at launch if still down.
            os.kill(process.pid, signal.SIGCONT if up else signal.SIGSTOP)
        (self._down.discard if up else self._down.add)(index)
        self.events.append({"t": elapsed, "event": "link up" if up else "link down", "device": index})
        if up:
            self._close_outage(index)
        else:
            self._open_outage[index] = {"device": index, "start": time.time(), "position_after_cut": None}

    def _note_progress_after_cuts(self) -> None:
        for index, outage in self._open_outage.items():
            self._note_first_progress_after_cut(index, outage)

    def _note_first_progress_after_cut(self, index: int, outage: dict[str, Any]) -> None:
        """The first position the device wrote after its link was cut: no step before the cut is counted."""
        if outage["position_after_cut"] is None:
            seen = self.progress_of(index)
            if seen is not None and seen.wall_time >= outage["start"]:
                outage["position_after_cut"] = seen.position

    def _close_outage(self, index: int) -> None:
        """Steps the device trained between the cut and now, read from its progress beacon (no network needed)."""
        outage = self._open_outage.pop(index, None)
        if outage is None:
            return
        self._note_first_progress_after_cut(index, outage)
        seen = self.progress_of(index)
        after_cut = outage.pop("position_after_cut")
        steps = seen.position - after_cut if seen is not None and after_cut is not None else 0
        self.outages_seen.append({**outage, "end": time.time(), "steps_trained": steps})

    def is_down(self, index: int) -> bool:
        """Whether the plan has this device offline now (a late joiner launched now must start paused)."""
        return index in self._down

    def release_all(self, processes: Processes) -> None:
        for index in list(self._down):
            self._set_link(index, up=True, processes=processes, elapsed=None)
        if self.lab is not None and self.plan.loss > 0:
            for index in range(self.devices):
                self.lab.clear_loss(index)

    def describe(self) -> dict[str, Any]:
        planned = [sum(min(e, 1e9) - s for s, e in o if s < 1e9) for o in self._outages]
        return {
            "plan": asdict(self.plan),
            "mode": self.mode,
            "events": self.events,
            "devices_with_outages": sum(1 for p in planned if p > 0),
            "outages": self.outages_seen,
        }


# ---------------------------------------------------------------- invariants


def server_holdings(server_data_dir: Path, devices: list[str]) -> dict[str, dict[str, Any]]:
    """Per device, what the server's durable state holds, read through the server's own read-only command
    (`python broker_server/main.py inspect --json`), not by opening its store."""
    command = [sys.executable, str(server_main()), "inspect", "--data-dir", str(server_data_dir), "--json"]
    for device in devices:
        command += ["--device", device]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    holdings: dict[str, dict[str, Any]] = json.loads(done.stdout)["devices"]
    return holdings


def _digests(logits: np.ndarray) -> list[str]:
    """The inspect command's row digests: sha256 of each row as little-endian float32 bytes."""
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in np.ascontiguousarray(logits, dtype="<f4")]


def check_invariants(
    *, server_data_dir: Path, device_dirs: dict[str, Path], classes: int, latest: dict[str, dict[str, Any]],
    curve: list[list[float]], fault_times: list[float], expect_offline_training: bool,
    outages: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """What must hold after faults: nothing acknowledged lost, the table equals a replay, training went on."""
    from edge.state import DeviceState

    lost, mismatched, unflushed = 0, 0, []
    acked_total = 0
    holdings = server_holdings(server_data_dir, sorted(device_dirs))
    for device, directory in device_dirs.items():
        state = DeviceState(directory, classes=classes)
        try:
            ids, versions, logits = state.acked()
            pending = state.outbox_size()
        finally:
            state.close()
        acked_total += ids.size
        if pending:
            unflushed.append(device)
        if not ids.size:
            continue
        held = holdings.get(device, {})
        held_at = {int(i): k for k, i in enumerate(held.get("ids", []))}
        held_versions, held_digests = held.get("versions", []), held.get("digests", [])
        for sample, version, digest in zip(ids.tolist(), versions.tolist(), _digests(logits), strict=True):
            k = held_at.get(int(sample))
            if k is None or held_versions[k] < version:
                lost += 1
                mismatched += not pending
            elif not pending and (held_versions[k] != version or held_digests[k] != digest):
                mismatched += 1
        if not pending:
            # Samples holding knowledge the device never had acknowledged.
            mismatched += int(held.get("with_knowledge", 0)) - len(held_at.keys() & set(ids.tolist()))
    done = all(m.get("done") for m in latest.values()) and len(latest) == len(device_dirs)
    # Measured from outside: steps each device wrote to its progress beacon while its link was cut.
    steps_while_cut = sum(o["steps_trained"] for o in outages)
    outages_with_training = sum(1 for o in outages if o["steps_trained"] > 0)
    before = [maua for t, maua in curve if fault_times and t <= max(fault_times)]
    final = curve[-1][1] if curve else 0.0
    best_before = max(before) if before else float("nan")
    results = {
        "acknowledged_updates_present": {
            "ok": lost == 0, "detail": f"{acked_total} acknowledged updates checked, {lost} missing or older"},
        "table_equals_replay": {
            "ok": mismatched == 0 and not unflushed,
            "detail": f"{mismatched} rows differ from each device's newest acknowledged update; "
            f"devices with unflushed outboxes: {unflushed or 'none'}"},
        "devices_kept_training": {
            "ok": done and (not expect_offline_training or steps_while_cut > 0),
            "detail": f"all devices finished: {done}; batches trained while links were cut: {steps_while_cut} "
            f"({outages_with_training} of {len(outages)} outages saw training)"},
        "accuracy_recovered": {
            "ok": not before or final >= max(before) - RECOVERY_TOLERANCE,
            "detail": f"final MAUA {final:.4f} vs best before the last fault {best_before:.4f}"},
    }  # fmt: skip
    return results


def check_knowledge_flow(
    *, latest: dict[str, dict[str, Any]], late_joiners: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """What a trial without faults (and one with late joiners) must show: teachers reached the devices.

    A late joiner registers into a relation that already exists; it must still be served neighbours'
    knowledge, read from the `teachers_received` / `teacher_coverage` each device reports.
    """
    untaught = sorted(d for d, m in latest.items() if not m.get("teachers_received"))
    results = {
        "teachers_reached_every_device": {
            "ok": bool(latest) and not untaught,
            "detail": f"{len(latest) - len(untaught)} of {len(latest)} devices received teachers; "
            f"without: {untaught or 'none'}",
        }
    }
    if late_joiners:
        missing = [d for d in late_joiners if d not in latest]
        unregistered = [d for d in late_joiners if latest.get(d, {}).get("bytes", {}).get("register_up", 0) <= 0]
        untaught_late = [d for d in late_joiners if not latest.get(d, {}).get("teachers_received")]
        coverage = {d: round(float(latest.get(d, {}).get("teacher_coverage", 0.0)), 3) for d in late_joiners}
        results["late_joiners_registered_and_taught"] = {
            "ok": not missing and not unregistered and not untaught_late,
            "detail": f"late joiners {list(late_joiners)}: not reporting {missing or 'none'}, "
            f"not registered {unregistered or 'none'}, no teachers {untaught_late or 'none'}; coverage {coverage}",
        }
    return results
