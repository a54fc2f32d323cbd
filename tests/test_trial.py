"""End to end on sklearn digits: broker, server and device processes; knowledge demonstrably flows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from android_harness.trial import TrialSettings, run_trial

REQUIRED_KEYS = {"algorithm", "maua", "maua_curve", "bytes", "devices"}


@pytest.fixture(scope="module")
def fedcache_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fedcache")
    settings = TrialSettings(out=out, dataset="digits", devices=4, epochs=4, archs=("cnn", "resnet8"), timeout_s=240)
    return run_trial(settings, progress=False) | {"out": str(out)}


def test_knowledge_reaches_devices_and_accuracy_is_well_above_chance(fedcache_report: dict) -> None:
    assert fedcache_report["maua"] > 0.6  # ten classes: chance is 0.1
    for device in fedcache_report["devices"]:
        assert device["epochs"] == 4
        assert device["teacher_coverage"] > 0.5, device  # teachers with contributors > 0 arrived
        assert device["bytes_down"] > 0 and device["bytes_up"] > 0 and device["bytes_register_up"] > 0
    archs = {d["arch"] for d in fedcache_report["devices"]}
    assert archs == {"cnn", "resnet8"}  # heterogeneous models share one cache


def test_report_files_have_the_promised_shape(fedcache_report: dict) -> None:
    out = Path(fedcache_report["out"])
    on_disk = json.loads((out / "report.json").read_text())
    assert REQUIRED_KEYS <= on_disk.keys()
    assert on_disk["algorithm"] == "fedcache"
    assert {"register_up", "up", "down"} <= on_disk["bytes"].keys()
    assert all({"id", "accuracy", "epochs", "bytes_up", "bytes_down"} <= d.keys() for d in on_disk["devices"])
    times = [t for t, _ in on_disk["maua_curve"]]
    assert times == sorted(times) and len(times) >= 4
    assert on_disk["maua_curve"][-1][1] == pytest.approx(on_disk["maua"])
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_local_baseline_exchanges_no_knowledge(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path, dataset="digits", devices=2, epochs=2, algorithm="local", timeout_s=120)
    report = run_trial(settings, progress=False)
    assert report["algorithm"] == "local"
    assert report["bytes"] == {"register_up": 0, "up": 0, "down": 0}
    assert all(d["teacher_coverage"] == 0 for d in report["devices"])
    assert report["maua"] > 0.3
