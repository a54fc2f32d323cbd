"""FedCache's knowledge schedule (train.knowledge_every_epochs, knowledge_every_batches, knowledge_warmup_epochs):
devices exchange knowledge in every K-th epoch only after W epochs of local training, and every B batches in one
message each way (issue 17's bytes)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from android_harness.native import device_command, prepare_native_device
from android_harness.spec import SpecError, parse_spec
from android_harness.trial import TrialSettings, run_trial
from edge.config import (
    KNOWLEDGE_SCHEDULE,
    DataConfig,
    DeviceConfig,
    HashConfig,
    TrainConfig,
    config_from_dict,
    config_to_toml,
)
from tests.trial_options import cli_settings, device_trains, file_trains


@pytest.mark.parametrize("name", sorted(KNOWLEDGE_SCHEDULE))
def test_the_setting_round_trips_and_bad_values_are_refused_by_name(name: str) -> None:
    config = DeviceConfig(id="d", train=TrainConfig(**{name: 3}))
    text = config_to_toml(config)
    assert f"{name} = 3" in text
    assert config_from_dict(tomllib.loads(text)) == config
    least = KNOWLEDGE_SCHEDULE[name].minimum
    for bad in (least - 1, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"train\.{name} must be an integer >= {least} \({least} = "):
            DeviceConfig(id="d", train=TrainConfig(**{name: bad}))
    for algorithm in ("fd", "fedavg", "local"):
        with pytest.raises(ValueError, match=f"fedcache devices only; a {algorithm} device"):
            DeviceConfig(id="d", train=TrainConfig(algorithm=algorithm, **{name: 2}))


@pytest.mark.parametrize("name", sorted(KNOWLEDGE_SCHEDULE))
def test_the_cli_and_trial_files_hand_it_to_every_device(tmp_path: Path, name: str) -> None:
    option = "--" + name.replace("_", "-")
    flagged = cli_settings(tmp_path, [option, "2"])
    assert [getattr(t, name) for t in device_trains(flagged, tmp_path)] == [2, 2]
    assert cli_settings(tmp_path, []).extra_train == {}
    with pytest.raises(ValueError, match="applies to fedcache devices only; a fd device"):
        cli_settings(tmp_path, [option, "2"], algorithm="fd").check()
    least = KNOWLEDGE_SCHEDULE[name].minimum
    with pytest.raises(SystemExit, match=f"{option} {least - 1}: {least} "):
        cli_settings(tmp_path, [option, str(least - 1)])
    assert [getattr(t, name) for t in file_trains(tmp_path, {name: 3})] == [3, 3]
    for bad in (least - 1, "2", 1.5):
        with pytest.raises(SpecError, match=rf"\[trial\]\.{name}"):
            parse_spec({"trial": {name: bad}, "devices": [{"count": 2}]}, out=tmp_path)


@pytest.mark.parametrize("name", sorted(KNOWLEDGE_SCHEDULE))
def test_the_native_device_reads_it_and_refuses_a_bad_value(tmp_path: Path, native_artifacts: Path, name: str) -> None:
    config = DeviceConfig(
        id="native-k",
        broker="mqtt://127.0.0.1:9",
        state_dir=str(tmp_path / "state"),
        data=DataConfig(dataset="digits", num_devices=2, alpha=1.0, index=0),
        train=TrainConfig(arch="cnn", backend="executorch", epochs=1),
        hash=HashConfig(dim=256),
    )
    least = KNOWLEDGE_SCHEDULE[name].minimum
    path = prepare_native_device(config, artifacts=native_artifacts)
    assert f"{name} = {least}" in path.read_text()
    path.write_text(path.read_text().replace(f"{name} = {least}", f"{name} = {least - 1}"))
    result = subprocess.run(device_command(path), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"train.{name} must be >= {least}" in result.stderr


def test_a_warm_up_epoch_and_the_epoch_between_exchanges_send_next_to_nothing(
    native_artifacts: Path, tmp_path: Path
) -> None:
    """A real trial, a torch and a native device: 1 warm-up epoch, then knowledge every 2nd epoch of 3 (so only in
    the second); each device's uplink in the first and third epochs is a small fraction of the second's (the
    prefetch of the next exchanging epoch's first batches only)."""
    shutil.copytree(native_artifacts, tmp_path / "artifacts", dirs_exist_ok=True)
    settings = TrialSettings(
        out=tmp_path, dataset="digits", devices=2, epochs=3, backends=("torch", "native"),
        extra_train={"knowledge_warmup_epochs": 1, "knowledge_every_epochs": 2},
    )  # fmt: skip
    report = run_trial(settings, progress=False)
    assert report["exit_status"] == {"dev000": 0, "dev001": 0}
    for device in ("dev000", "dev001"):
        up = {m["epoch"]: m["bytes"]["up"] for m in report["history"] if m["device"] == device}
        per_epoch = [up[epoch] - up[epoch - 1] for epoch in (1, 2, 3)]
        assert per_epoch[1] > 10 * per_epoch[0] and per_epoch[1] > 10 * per_epoch[2], (device, per_epoch)
        assert "knowledge_warmup_epochs = 1" in (tmp_path / "devices" / device / "device.toml").read_text()
