"""The comparison benchmark's arithmetic: MAUA against cumulative bytes, bytes to a target and speed-ups."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from android_harness.report import build_report
from android_harness.trial import TrialSettings
from bench.comparison import (
    HEADERS,
    METHODS,
    SETTINGS,
    Outcome,
    applicable,
    bytes_curve,
    bytes_to_target,
    comparison_rows,
    default_target,
    headers,
    maua_by_arch,
    plot,
    reusable_report,
)
from fedwire import TeacherForm


def _metrics(device: str, t: float, accuracy: float, up: int, down: int) -> dict:
    return {
        "device": device,
        "trial_time_s": t,
        "accuracy": accuracy,
        "bytes": {"up": up, "down": down, "register_up": 9},
    }


def test_curve_starts_once_every_device_reported_and_sums_latest_totals() -> None:
    history = [
        _metrics("b", 2.0, 0.4, 10, 20),
        _metrics("a", 1.0, 0.2, 0, 0),  # out of order on purpose: the curve follows trial time
        _metrics("a", 3.0, 0.6, 100, 50),
        _metrics("b", 4.0, 0.8, 30, 40),
    ]
    curve = bytes_curve(history, devices=2)
    assert curve == [(30, (0.2 + 0.4) / 2), (180, (0.6 + 0.4) / 2), (220, (0.6 + 0.8) / 2)]
    assert bytes_to_target(curve, 0.5) == 180
    assert bytes_to_target(curve, 0.71) is None


def _outcome(method: str, maua: float, curve: list[tuple[int, float]]) -> Outcome:
    return Outcome(
        method=method,
        maua=maua,
        training_bytes=curve[-1][0] if curve else 0,
        register_bytes=2048,
        wall_s=1.0,
        curve=curve,
    )


def test_rows_give_speed_up_against_the_costliest_method_and_plot_is_written(tmp_path: Path) -> None:
    outcomes = [
        _outcome("cheap", 0.8, [(1024, 0.5), (2048, 0.8)]),
        _outcome("costly", 0.7, [(4096, 0.6), (8192, 0.7)]),
        _outcome("local", 0.4, []),
    ]
    target = default_target(outcomes)
    assert target == 0.7  # the lowest final MAUA of the methods that communicate
    rows = {row[0]: row for row in comparison_rows(outcomes, target=target, devices=2, epochs=2)}
    assert rows["costly"][5] == "8.0" and rows["costly"][6] == "1.0x"
    assert rows["cheap"][5] == "2.0" and rows["cheap"][6] == "4.0x"
    assert rows["local"][5] == "no traffic" and rows["local"][6] == "-"
    assert rows["cheap"][4] == "2.0"  # registration shown apart
    path = tmp_path / "comparison.png"
    plot(outcomes, target=target, path=path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_method_reaches_its_own_final_maua_despite_summation_order() -> None:
    from bench.comparison import bytes_to_target

    curve = [(100, 0.25), (300, 0.5338871087705184)]
    assert bytes_to_target(curve, 0.5338871087705185) == 300  # the report summed the same accuracies in another order
    assert bytes_to_target(curve, 0.54) is None


def test_heterogeneous_rows_add_one_maua_column_per_architecture() -> None:
    devices = [
        {"arch": "resnet8", "accuracy": 0.5},
        {"arch": "resnet20", "accuracy": 0.7},
        {"arch": "resnet8", "accuracy": 0.7},
    ]
    by_arch = maua_by_arch(devices)
    assert by_arch == {"resnet20": 0.7, "resnet8": pytest.approx(0.6)}
    outcome = Outcome("fedcache", 0.6333, 2048, 0, 1.0, [(2048, 0.6333)], maua_by_arch=by_arch)
    archs = ("resnet8", "resnet16", "resnet20")
    columns = headers(archs)
    assert columns[:5] == ("method", "MAUA", "MAUA resnet16", "MAUA resnet20", "MAUA resnet8")
    (row,) = comparison_rows([outcome], target=0.6, devices=3, epochs=1, archs=archs)
    assert len(row) == len(columns)
    assert row[2:5] == ["-", "0.7000", "0.6000"]  # no resnet16 device in this outcome
    assert headers(("resnet20",)) == HEADERS  # one architecture: no extra columns


def test_fedavg_is_not_applicable_among_different_models() -> None:
    fedavg = next(m for m in METHODS if m.algorithm == "fedavg")
    raw = next(m for m in METHODS if m.name == "fedcache raw R")
    assert applicable(fedavg, ("resnet20",)) and applicable(fedavg, ("resnet20", "resnet20"))
    assert not applicable(fedavg, SETTINGS["heterogeneous"])
    assert applicable(raw, SETTINGS["heterogeneous"])
    assert raw.extra_train == {"teacher_form": TeacherForm.RAW}


def test_a_report_is_reused_only_when_made_with_the_same_settings(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path / "a", epochs=3, archs=("resnet20",), extra_train={"teacher_form": "raw"})
    path = tmp_path / "report.json"
    assert reusable_report(path, asdict(settings)) is None  # nothing there yet
    report = build_report(settings=asdict(settings), latest={}, curve=[], history=[], wall_s=1.0)
    path.write_text(json.dumps(report, default=str))
    moved = replace(settings, out=tmp_path / "elsewhere", timeout_s=5.0)  # where and how long do not matter
    assert reusable_report(path, asdict(moved)) is not None
    for changed in (replace(settings, epochs=4), replace(settings, archs=("cnn",)), replace(settings, extra_train={})):
        assert reusable_report(path, asdict(changed)) is None


def _report(maua: float, accuracies: dict[str, float]) -> dict:
    return {"maua": maua, "devices": [{"id": d, "accuracy": a} for d, a in accuracies.items()]}


def test_seed_summary_averages_each_devices_gain_over_the_seeds_before_taking_the_worst() -> None:
    from bench.comparison import seed_rows, seed_summary

    local = {0: _report(0.70, {"d0": 0.70, "d1": 0.70}), 1: _report(0.60, {"d0": 0.60, "d1": 0.60})}
    # d1 loses 3 points on seed 0 and gains 1 on seed 1: -1.0 on average, not below -1; d0 gains on both.
    fedcache = {
        0: _report(0.72, {"d0": 0.77, "d1": 0.67}),
        1: _report(0.63, {"d0": 0.65, "d1": 0.61}),
        2: _report(0.99, {"d0": 0.99, "d1": 0.99}),  # no local run on seed 2: in the MAUA only
    }
    summary = seed_summary("fedcache", fedcache, local)
    assert summary.seeds == (0, 1, 2)
    assert summary.maua_mean == pytest.approx((0.72 + 0.63 + 0.99) / 3)
    assert (summary.maua_min, summary.maua_max) == (0.63, 0.99)
    assert summary.gain_over_local == pytest.approx(((0.72 - 0.70) + (0.63 - 0.60)) / 2 * 100)
    assert summary.worst_device_gain == pytest.approx(-1.0)
    assert summary.devices_below_local == 0
    worse = seed_summary("fedcache", {0: _report(0.70, {"d0": 0.75, "d1": 0.68})}, local)
    assert worse.worst_device_gain == pytest.approx(-2.0) and worse.devices_below_local == 1
    alone = seed_summary("local", local, local)
    assert alone.gain_over_local is None and alone.devices_below_local is None
    (row,) = seed_rows([summary])
    assert row[:4] == ["fedcache", "0,1,2", f"{summary.maua_mean:.4f}", "0.6300 - 0.9900"]
    assert row[4:] == ["+2.50", "-1.00", "0"]
    with pytest.raises(ValueError):
        seed_summary("fd", {}, local)


def test_a_run_that_is_not_reused_starts_from_an_empty_directory(tmp_path: Path) -> None:
    from bench.comparison import clear_stale_run

    stale = tmp_path / "fd"
    (stale / "devices" / "dev000").mkdir(parents=True)
    (stale / "devices" / "dev000" / "checkpoint.pt").write_bytes(b"half a run")
    clear_stale_run(stale)
    assert not stale.exists()
    clear_stale_run(stale)  # nothing there: nothing to do
