"""What a trial's options and trial files hand each device's [train]: the one path the per-setting tests share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from android_harness import __main__ as cli
from android_harness.spec import parse_spec
from android_harness.trial import TrialSettings, _device_configs
from edge.config import TrainConfig
from fedwire.mqtt import BrokerAddress


def cli_settings(tmp_path: Path, args: list[str], *, algorithm: str = "fedcache") -> TrialSettings:
    """`trial ARGS`' settings for two devices (raises SystemExit where the command line is refused)."""
    parser = argparse.ArgumentParser()
    cli._add_trial_options(parser, epochs=1, devices=2)
    return cli._settings(parser.parse_args(args), algorithm=algorithm, out=tmp_path)


def device_trains(settings: TrialSettings, tmp_path: Path) -> list[TrainConfig]:
    """Each device's [train] as the trial would write it."""
    return [c.train for c in _device_configs(settings, BrokerAddress("h", 1), tmp_path / "encoder.onnx")]


def file_trains(tmp_path: Path, trial: dict[str, Any]) -> list[TrainConfig]:
    """Each device's [train] for a digits trial file with this [trial] table and two devices."""
    spec = parse_spec({"trial": {"dataset": "digits", **trial}, "devices": [{"count": 2}]}, out=tmp_path)
    return device_trains(spec.settings, tmp_path)
