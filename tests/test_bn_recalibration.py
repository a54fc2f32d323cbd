"""train.bn_recalibration: batch-norm statistics recomputed over a device's training samples before each evaluation."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from android_harness.demo import DemoSettings
from android_harness.native import prepare_native_device
from android_harness.spec import SpecError, parse_spec
from android_harness.trial import TrialSettings
from edge.backends import TorchBackendTrainer, make_trainer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_from_dict, config_to_toml
from edge.runtime import DeviceRuntime, recalibration_samples
from models.loss import LossSettings
from tests.trial_options import cli_settings, device_trains, file_trains


def _trainer(arch: str = "resnet8", *, seed: int = 0) -> TorchBackendTrainer:
    trainer = make_trainer(
        backend="torch", arch=arch, classes=10, in_channels=1, seed=seed, lr=0.05, momentum=0.9, weight_decay=5e-4,
        loss=LossSettings(), artifacts_dir=Path("unused"),
    )  # fmt: skip
    assert isinstance(trainer, TorchBackendTrainer)
    return trainer


def _train_a_little(trainer: TorchBackendTrainer, steps: int = 6) -> None:
    """A few steps, so the running statistics are the momentum average training leaves, not the initial 0/1."""
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = rng.normal(size=(8, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 8)
        trainer.step(x, y, np.zeros((8, 10), np.float32), np.zeros(8, bool))


def _samples(count: int) -> np.ndarray:
    return (np.random.default_rng(2).normal(size=(count, 1, 28, 28)) * 1.5 + 0.3).astype(np.float32)


def _batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _direct_statistics(model: nn.Module, x: np.ndarray, *, chunk: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every batch-norm layer's input over all of `x`, captured whole from train-mode passes of `chunk` samples
    on a copy (each layer normalising by its chunk, as in training), then torch.mean and torch.var over it."""
    twin = copy.deepcopy(model).train()
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in _batchnorms(twin)}
    for name, layer in _batchnorms(twin).items():
        layer.track_running_stats = False
        layer.register_forward_pre_hook(lambda _m, inputs, name=name: captured[name].append(inputs[0].double()))
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            twin(torch.from_numpy(x[start : start + chunk]))
    statistics = {}
    for name, pieces in captured.items():
        values = torch.cat(pieces).transpose(0, 1).reshape(pieces[0].shape[1], -1)
        statistics[name] = (values.mean(dim=1), values.var(dim=1, unbiased=True))
    return statistics


@pytest.mark.parametrize("chunk", [256, 16])
def test_recalibrated_statistics_are_the_exact_mean_and_variance_of_each_layers_input(chunk: int) -> None:
    trainer = _trainer()
    _train_a_little(trainer)
    x = _samples(40)
    expected = _direct_statistics(trainer.model, x, chunk=chunk)
    before = {name: layer.running_mean.clone() for name, layer in _batchnorms(trainer.model).items()}  # type: ignore[union-attr]
    trainer.recalibrate_batchnorm(x, chunk=chunk)
    layers = _batchnorms(trainer.model)
    assert len(layers) == len(expected) > 5
    for name, layer in layers.items():
        mean, variance = expected[name]
        assert layer.running_mean is not None and layer.running_var is not None
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), variance, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(layer.running_mean, before[name])  # the statistics training left were replaced


def test_one_pass_matches_torchs_own_cumulative_average() -> None:
    """With all samples in one chunk the statistics are what torch records with momentum None over one pass."""
    trainer = _trainer("resnet20")
    _train_a_little(trainer)
    x = _samples(50)
    reference = copy.deepcopy(trainer.model)
    for layer in _batchnorms(reference).values():
        layer.reset_running_stats()
        layer.momentum = None
    with torch.no_grad():
        reference.train()(torch.from_numpy(x))
    trainer.recalibrate_batchnorm(x)
    ours, theirs = trainer.model.state_dict(), reference.state_dict()
    for name in ours:
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


def test_recalibration_touches_only_the_running_statistics_and_training_goes_on_alike() -> None:
    recalibrated, plain = _trainer(), _trainer()
    _train_a_little(recalibrated)
    _train_a_little(plain)
    state_before = {k: v.clone() for k, v in recalibrated.model.state_dict().items()}
    optimiser_before = recalibrated.optimizer.state_dict()
    recalibrated.model.eval()
    recalibrated.recalibrate_batchnorm(_samples(30), chunk=8)
    assert not recalibrated.model.training  # the mode it was in comes back
    state_after = recalibrated.model.state_dict()
    changed = {k for k in state_before if not torch.equal(state_before[k], state_after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    optimiser_after = recalibrated.optimizer.state_dict()
    assert optimiser_after["param_groups"] == optimiser_before["param_groups"]
    for index, entry in optimiser_before["state"].items():
        assert torch.equal(optimiser_after["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    # The next step's logits (the knowledge a FedCache device uploads) and weights are the plain trainer's.
    x = _samples(8)
    y, teacher, mask = np.arange(8) % 10, np.zeros((8, 10), np.float32), np.zeros(8, bool)
    np.testing.assert_array_equal(recalibrated.step(x, y, teacher, mask), plain.step(x, y, teacher, mask))
    for name, parameter in recalibrated.model.named_parameters():
        assert torch.equal(parameter, dict(plain.model.named_parameters())[name])


def test_recalibration_samples_are_a_fixed_subset_all_or_none() -> None:
    chosen = recalibration_samples(100, wanted=40, seed=3)
    assert len(chosen) == len(set(chosen.tolist())) == 40 and np.all(np.diff(chosen) > 0) and chosen.max() < 100
    np.testing.assert_array_equal(chosen, recalibration_samples(100, wanted=40, seed=3))
    assert not np.array_equal(chosen, recalibration_samples(100, wanted=40, seed=4))
    np.testing.assert_array_equal(recalibration_samples(100, wanted=250, seed=3), np.arange(100))
    assert recalibration_samples(100, wanted=0, seed=3).size == 0


def _device(state: Path, *, recalibration: int) -> DeviceConfig:
    return DeviceConfig(
        id="recal",
        broker="mqtt://127.0.0.1:1",  # never connected: a local device trains without the network
        state_dir=str(state),
        data=DataConfig(dataset="digits", num_devices=4, index=1),
        train=TrainConfig(algorithm="local", arch="resnet8", epochs=2, max_samples=60, bn_recalibration=recalibration),
        hash=HashConfig(dim=64),
    )


def _train(config: DeviceConfig) -> tuple[DeviceRuntime, TorchBackendTrainer, dict[str, object]]:
    runtime = DeviceRuntime(config)
    assert isinstance(runtime.trainer, TorchBackendTrainer)
    try:
        return runtime, runtime.trainer, runtime.train()
    finally:
        runtime.state.close()


def test_a_device_evaluates_checkpoints_and_resumes_with_the_recomputed_statistics(tmp_path: Path) -> None:
    on, trainer_on, final_on = _train(_device(tmp_path / "on", recalibration=40))
    off, trainer_off, final_off = _train(_device(tmp_path / "off", recalibration=0))
    assert on.recalibration.size == 40 and off.recalibration.size == 0
    weights_on, weights_off = trainer_on.model.state_dict(), trainer_off.model.state_dict()
    running = {k for k in weights_on if k.endswith(("running_mean", "running_var"))}
    assert running
    for name in weights_on:  # the same training, step for step: only the evaluated statistics differ
        assert torch.equal(weights_on[name], weights_off[name]) == (name not in running), name

    # What the device kept is the recomputation over its chosen samples with the final weights ...
    twin = copy.deepcopy(trainer_on)
    twin.recalibrate_batchnorm(on.shard.x_train[on.recalibration])
    for name in running:
        torch.testing.assert_close(weights_on[name], twin.model.state_dict()[name], rtol=0, atol=0)
    # ... what it reported is that model's accuracy, and the plain device's is the momentum average's.
    assert final_on["accuracy"] == trainer_on.accuracy(on.shard.x_test, on.shard.y_test)
    assert final_off["accuracy"] == trainer_off.accuracy(off.shard.x_test, off.shard.y_test)

    # The checkpoint carries them, and a restarted device starts from them.
    resumed = DeviceRuntime(_device(tmp_path / "on", recalibration=40))
    try:
        assert resumed.position == len(resumed.schedule) and isinstance(resumed.trainer, TorchBackendTrainer)
        for name, tensor in resumed.trainer.model.state_dict().items():
            assert torch.equal(tensor, weights_on[name]), name
    finally:
        resumed.state.close()


@pytest.mark.parametrize("bad", [-1, True, 2.5, "all"])
def test_bad_values_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="bn_recalibration must be >= 0"):
        config_from_dict({"device": {"id": "d"}, "train": {"bn_recalibration": bad}})


def test_the_setting_round_trips_and_stays_out_of_files_that_do_not_use_it() -> None:
    config = DeviceConfig(id="d", train=TrainConfig(bn_recalibration=250))
    text = config_to_toml(config)
    assert "bn_recalibration = 250" in text
    assert config_from_dict(tomllib.loads(text)) == config
    assert "bn_recalibration" not in config_to_toml(DeviceConfig(id="d"))  # native devices read such files as before


def test_backends_without_recalibration_refuse_it_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch backend only, not for backend 'executorch'"):
        DeviceConfig(id="d", train=TrainConfig(backend="executorch", bn_recalibration=8))
    DeviceConfig(id="d", train=TrainConfig(backend="executorch", bn_recalibration=0))  # off: allowed
    with pytest.raises(ValueError, match="not for the native device"):
        prepare_native_device(DeviceConfig(id="d", train=TrainConfig(bn_recalibration=8)), artifacts=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    mixed = TrialSettings(out=tmp_path, backends=("torch", "native"), extra_train={"bn_recalibration": 8})
    with pytest.raises(ValueError, match=r"torch backend only, not for \['native'\]"):
        mixed.check()
    exported = {"count": 2, "backend": "executorch"}
    with pytest.raises(SpecError, match=r"\[trial\]\.bn_recalibration: .*\['executorch'\]"):
        parse_spec({"trial": {"bn_recalibration": 8}, "devices": [exported]}, out=tmp_path)


def test_trials_the_demo_and_trial_files_hand_the_setting_to_every_device(tmp_path: Path) -> None:
    flagged = cli_settings(tmp_path, ["--bn-recalibration", "250"], algorithm="local")
    assert [t.bn_recalibration for t in device_trains(flagged, tmp_path)] == [250, 250]
    assert cli_settings(tmp_path, [], algorithm="local").extra_train == {}
    with pytest.raises(SystemExit, match="--bn-recalibration -1"):
        cli_settings(tmp_path, ["--bn-recalibration", "-1"], algorithm="local")
    demo = DemoSettings(out=tmp_path, bn_recalibration=250)
    for method in ("fedcache", "local"):
        assert demo.trial(method).extra_train["bn_recalibration"] == 250
    assert "bn_recalibration" not in DemoSettings(out=tmp_path).trial("local").extra_train
    assert [t.bn_recalibration for t in file_trains(tmp_path, {"bn_recalibration": 40})] == [40, 40]
    with pytest.raises(SpecError, match=r"\[trial\]\.bn_recalibration: -3 must be >= 0"):
        parse_spec({"trial": {"bn_recalibration": -3}, "devices": [{"count": 2}]}, out=tmp_path)
