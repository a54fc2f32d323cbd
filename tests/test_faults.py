"""Fault injection on real processes: outages, server kill -9 and a broker restart; the invariants must hold."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from android_harness.faults import FaultPlan, outage_schedule
from android_harness.netns import netns_unavailable_reason
from android_harness.trial import TrialSettings, run_trial


def test_outage_schedule_has_the_requested_share_of_offline_time() -> None:
    outages = outage_schedule(fraction=0.3, mean_outage_s=10, rng=np.random.default_rng(0))
    horizon = outages[-1][1]
    offline = sum(end - start for start, end in outages)
    assert offline / horizon == pytest.approx(0.3, abs=0.03)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(outages))


def test_nothing_acknowledged_is_lost_through_outages_server_kill_and_broker_restart(tmp_path: Path) -> None:
    # Scheduled (not random) faults, timed from the moment every device trains, so that each one lands
    # while training goes on whatever the machine's load: two link cuts, a server kill -9, a broker restart.
    plan = FaultPlan(
        outages=((0, 0.5, 3.0), (2, 1.0, 2.0)), server_kill_at_s=(1.0,), server_down_s=2, broker_restart_at_s=(4.5,)
    )
    settings = TrialSettings(out=tmp_path, dataset="digits", devices=3, epochs=20, timeout_s=400)
    report = run_trial(settings, progress=False, faults=plan)
    events = [e["event"] for e in report["faults"]["events"]]
    assert {"server kill -9", "server restarted", "broker restarted"} <= set(events)
    assert "link down" in events
    reason = netns_unavailable_reason()
    # Without root the harness pauses processes instead of cutting links, and says so.
    assert report["faults"]["mode"] == ("netns" if reason is None else "process-pause")
    for name, result in report["invariants"].items():
        assert result["ok"], f"{name}: {result['detail']}"
    if reason is None:
        # Training went on while links were cut, as read from the devices' progress beacons (not over MQTT).
        assert sum(o["steps_trained"] for o in report["faults"]["outages"]) > 0
    assert report["maua"] > 0.6
    # Every device left on its own with nothing owed (0), none was killed after reporting done.
    assert report["exit_status"] == {f"dev{i:03d}": 0 for i in range(3)}
    assert json.loads((tmp_path / "report.json").read_text())["invariants"] == report["invariants"]
