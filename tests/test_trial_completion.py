"""How a trial knows its devices completed: newest report wins, and a lost final report is read from disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from android_harness.trial import TrialSettings, _Collector, _complete_from_state
from edge.state import DeviceState, read_last_report


def _report(device: str, *, epoch: int, done: bool, wall_time: float) -> dict[str, object]:
    return {"device": device, "epoch": epoch, "done": done, "wall_time": wall_time, "accuracy": 0.5 + epoch / 10}


def test_a_redelivered_older_report_never_replaces_a_newer_one() -> None:
    collector = _Collector(devices=["dev000"], started=time.monotonic())
    collector.add("dev000", _report("dev000", epoch=2, done=True, wall_time=200.0))
    collector.add("dev000", _report("dev000", epoch=1, done=False, wall_time=100.0))  # QoS 1 redelivery
    assert collector.latest["dev000"]["epoch"] == 2 and collector.all_done()
    assert len(collector.history) == 2


def test_a_final_report_lost_on_the_wire_is_taken_from_the_device_state(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path, devices=2, epochs=2)
    collector = _Collector(devices=["dev000", "dev001"], started=time.monotonic())
    collector.add("dev000", _report("dev000", epoch=2, done=True, wall_time=10.0))
    collector.add("dev001", _report("dev001", epoch=1, done=False, wall_time=5.0))
    state = DeviceState(tmp_path / "devices" / "dev001", classes=10)
    state.write_last_report(_report("dev001", epoch=2, done=True, wall_time=12.0))
    state.close()

    _complete_from_state(settings, collector, grace_s=0.1)

    assert collector.all_done() and collector.latest["dev001"]["epoch"] == 2
    assert collector.read_from_disk == ["dev001"]
    assert read_last_report(tmp_path / "devices" / "dev000") is None


def test_a_device_that_never_finished_fails_the_trial_by_name(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path, devices=2, epochs=2)
    collector = _Collector(devices=["dev000", "dev001"], started=time.monotonic())
    collector.add("dev000", _report("dev000", epoch=2, done=True, wall_time=10.0))
    state = DeviceState(tmp_path / "devices" / "dev001", classes=10)
    state.write_last_report(_report("dev001", epoch=1, done=False, wall_time=5.0))
    state.close()

    with pytest.raises(RuntimeError, match="without reporting completion: dev001"):
        _complete_from_state(settings, collector, grace_s=0.1)
    assert collector.read_from_disk == []
