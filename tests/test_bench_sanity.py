"""`python -m bench sanity`: a local trial's device accuracy against a plain PyTorch loop on its shard (digits)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from bench.__main__ import available
from bench.sanity import main, plain_accuracy, verdict
from edge.config import DataConfig, DeviceConfig, TrainConfig


def test_quick_check_trains_both_sides_identically_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The smoke run (digits, 2 devices, 1 epoch): a real trial, then the plain loop on each device's config."""
    assert "sanity" in available()
    status = main(["--quick", "--devices", "2", "--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = re.findall(
        r"^\| (dev00\d) \| (\w+) \| \d+ \| \d+ \| ([01]\.\d{4}) \| ([01]\.\d{4}) \| ([+-]\d+\.\d\d) \|", out, re.M
    )
    assert [r[0] for r in rows] == ["dev000", "dev001"] and [r[1] for r in rows] == ["resnet8", "cnn"]
    for _, _, trial, plain, difference in rows:
        assert float(trial) > 0.2 and float(plain) > 0.2  # one epoch of digits is well above chance (0.1)
        assert abs(float(difference)) <= 0.3
    assert "PASS: trial - plain" in out
    assert (tmp_path / "report.json").is_file() and (tmp_path / "devices" / "dev001" / "device.toml").is_file()


def test_plain_loop_is_seeded_by_the_config_and_moves_with_what_training_depends_on() -> None:
    """The comparison could fail: another batch order or a zero lr changes the plain accuracy."""
    config = DeviceConfig(
        id="dev001",
        data=DataConfig(dataset="digits", num_devices=3, index=1),
        train=TrainConfig(algorithm="local", arch="cnn", epochs=1),
    )
    base = plain_accuracy(config)
    assert plain_accuracy(config).accuracy == base.accuracy  # seeded: the same every run
    assert base.accuracy > 0.2
    assert plain_accuracy(config, order_seed=5).accuracy != base.accuracy
    untrained = replace(config, train=replace(config.train, lr=0.0))
    assert plain_accuracy(untrained).accuracy < base.accuracy - 0.1


def test_verdict_is_on_the_mean_difference() -> None:
    ok, line = verdict([0.0, 0.2, -0.1], tolerance=0.3)
    assert ok and line.startswith("PASS") and "+0.03 points" in line and "1 of 3 identical" in line
    worse, line = verdict([-0.5, -0.4, -0.2], tolerance=0.3)
    assert not worse and line.startswith("FAIL") and "largest single difference -0.50" in line
    assert verdict([], tolerance=0.3)[0] is False
