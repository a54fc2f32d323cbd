"""FD and FedAvg end to end on sklearn digits through the real broker and server: knowledge and weights flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from android_harness.trial import TrialSettings, run_trial


def _final(report: dict) -> dict[str, dict]:
    """The last metrics message of every device."""
    final: dict[str, dict] = {}
    for metrics in report["history"]:
        final[metrics["device"]] = metrics
    return final


def test_fd_devices_distil_from_the_global_per_class_teacher(tmp_path: Path) -> None:
    settings = TrialSettings(
        out=tmp_path,
        dataset="digits",
        devices=3,
        epochs=2,
        algorithm="fd",
        archs=("cnn", "resnet8"),  # FD, like FedCache, lets architectures differ
        extra_train={"fd_every_batches": 10},
        timeout_s=240,
    )
    report = run_trial(settings, progress=False)
    assert report["algorithm"] == "fd"
    assert report["maua"] > 0.5  # ten classes: chance is 0.1
    assert report["bytes"]["up"] > 0 and report["bytes"]["down"] > 0
    final = _final(report)
    for device, metrics in final.items():
        assert metrics["done"] and metrics["epoch"] == 2, device
        assert metrics["fd_globals_received"] >= 2, metrics  # a teacher table came back more than once
    # Devices start unevenly (a fast one may finish before the others' first upload), but every other device
    # waits for its final upload's answer before leaving, so the last to finish has everybody's classes.
    last = max(final.values(), key=lambda m: m["trial_time_s"])
    assert last["fd_teacher_classes"] >= 8, last  # others' samples cover (almost) every class
    assert last["teacher_coverage"] > 0.5, last
    # Per-class tables are tiny next to FedCache's per-sample logits: well under 10 KiB per device here.
    assert all(d["bytes_up"] < 10 * 1024 for d in report["devices"])


def test_fedavg_devices_end_each_round_with_identical_weights(tmp_path: Path) -> None:
    settings = TrialSettings(out=tmp_path, dataset="digits", devices=3, epochs=2, algorithm="fedavg", timeout_s=240)
    report = run_trial(settings, progress=False)
    assert report["algorithm"] == "fedavg"
    by_round: dict[tuple[str, int], set[str]] = {}
    for metrics in report["history"]:
        if metrics.get("fedavg_round") is not None:
            by_round.setdefault(("round", metrics["fedavg_round"]), set()).add(metrics["model_digest"])
    assert set(by_round) == {("round", 0), ("round", 1)}
    assert all(len(digests) == 1 for digests in by_round.values()), by_round  # every device loaded one average
    final = _final(report)
    assert {m["fedavg_participants"] for m in final.values()} == {3}  # nobody was left out of the last round
    # Round 0 averages meaningfully only if every device started from the same global initial model.
    assert len({m["start_model_digest"] for m in final.values()}) == 1, final
    # Evaluated right after loading the same global model, on each device's own test split.
    assert report["maua"] > 0.3  # ten classes: chance is 0.1
    model_bytes = 4 * 19756  # the cnn's float state: one upload and one download per round at least
    for device in report["devices"]:
        assert device["bytes_up"] >= 2 * model_bytes and device["bytes_down"] >= 2 * model_bytes, device


def test_fedavg_refuses_heterogeneous_architectures(tmp_path: Path) -> None:
    settings = TrialSettings(
        out=tmp_path, dataset="digits", devices=2, epochs=1, algorithm="fedavg", archs=("cnn", "resnet8")
    )
    with pytest.raises(ValueError, match="one architecture"):
        run_trial(settings, progress=False)
