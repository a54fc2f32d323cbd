"""The ExecuTorch training backend: same start and same steps as PyTorch, learns digits, mixes with torch devices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.backends import ArtifactNotFoundError, TorchBackendTrainer, make_trainer
from edge.data import load_dataset
from edge.et_trainer import ExecuTorchTrainer
from models.loss import LossSettings

SHAPE = (1, 8, 8)
SETTINGS = {"classes": 10, "in_channels": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's artifact directory (test_export.py's CLI run fills it; make_trainer exports what is missing)."""
    return tmp_path_factory.getbasetemp() / "artifacts"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_dataset("digits")
    return data.x_train, data.y_train, data.x_test, data.y_test


def _pair(artifacts: Path, arch: str, seed: int, eval_backend: str = "executorch") -> tuple:
    common = {"arch": arch, "seed": seed, "loss": LossSettings(), "artifacts_dir": artifacts, "input_shape": SHAPE}
    torch_trainer = make_trainer(backend="torch", **common, **SETTINGS)
    et_trainer = make_trainer(backend="executorch", eval_backend=eval_backend, **common, **SETTINGS)
    return torch_trainer, et_trainer


def test_backends_start_equal_and_step_alike_on_digits(artifacts: Path, digits: tuple) -> None:
    x, y, x_test, _ = digits
    torch_trainer, et_trainer = _pair(artifacts, "cnn", seed=5)
    assert isinstance(torch_trainer, TorchBackendTrainer) and isinstance(et_trainer, ExecuTorchTrainer)
    start_torch, start_et = torch_trainer.state_dict(), et_trainer.state_dict()
    assert start_torch.keys() == start_et.keys()
    assert all(np.array_equal(start_torch[k], start_et[k]) for k in start_torch)
    rng = np.random.default_rng(0)
    for size in (8, 8, 5, 8, 1, 8):  # the tail batches of an epoch are smaller; the program's batch is dynamic
        ids = rng.choice(len(x), size, replace=False)
        teacher = rng.standard_normal((size, 10)).astype(np.float32)
        mask = rng.random(size) < 0.5
        np.testing.assert_allclose(
            et_trainer.step(x[ids], y[ids], teacher, mask), torch_trainer.step(x[ids], y[ids], teacher, mask), atol=1e-4
        )
    after_torch, after_et = torch_trainer.state_dict(), et_trainer.state_dict()
    assert max(float(np.abs(after_torch[k] - after_et[k]).max()) for k in after_torch) < 1e-4
    np.testing.assert_allclose(et_trainer.predict(x_test[:50]), torch_trainer.predict(x_test[:50]), atol=1e-4)


def test_executorch_backend_learns_digits(artifacts: Path, digits: tuple) -> None:
    x, y, x_test, y_test = digits
    trainer = make_trainer(
        backend="executorch",
        arch="cnn",
        seed=0,
        loss=LossSettings(),
        artifacts_dir=artifacts,
        input_shape=SHAPE,
        **SETTINGS,
    )
    before = trainer.accuracy(x_test, y_test)
    rng = np.random.default_rng(0)
    losses = []
    no_teacher = (np.zeros((8, 10), np.float32), np.zeros(8, bool))
    for _ in range(2):
        order = rng.permutation(len(x))[: len(x) // 8 * 8]
        for start in range(0, len(order), 8):
            ids = order[start : start + 8]
            trainer.step(x[ids], y[ids], *no_teacher)
            losses.append(trainer.last_loss)
    after = trainer.accuracy(x_test, y_test)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after > 0.85 > before


def test_onnxruntime_evaluation_sees_the_trained_weights(artifacts: Path, digits: tuple) -> None:
    x, y, x_test, _ = digits
    _, et_ort = _pair(artifacts, "cnn", seed=1, eval_backend="onnxruntime")
    rng = np.random.default_rng(2)
    for _ in range(5):
        ids = rng.choice(len(x), 8, replace=False)
        et_ort.step(x[ids], y[ids], np.zeros((8, 10), np.float32), np.zeros(8, bool))
    executorch_logits = ExecuTorchTrainer.predict.__get__(et_ort)  # the same trainer through its ET method
    et_ort.eval_backend = "executorch"
    via_et = executorch_logits(x_test[:40])
    et_ort.eval_backend = "onnxruntime"
    np.testing.assert_allclose(et_ort.predict(x_test[:40]), via_et, atol=1e-4)


def test_mixed_backends_share_one_knowledge_cache(artifacts: Path, digits: tuple) -> None:
    """A torch resnet8 and an ExecuTorch cnn train on one data set through a shared per-sample logit cache."""
    x, y, x_test, y_test = digits
    x, y = x[:800], y[:800]
    torch_device = make_trainer(
        backend="torch", arch="resnet8", seed=1, loss=LossSettings(), artifacts_dir=artifacts, **SETTINGS
    )
    _, et_device = _pair(artifacts, "cnn", seed=2)
    cache = np.zeros((len(x), 10), np.float32)
    cached = np.zeros(len(x), bool)
    used_teachers = {"torch": 0, "executorch": 0}
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(len(x))
        for start in range(0, len(order), 8):
            ids = order[start : start + 8]
            for name, device in (("torch", torch_device), ("executorch", et_device)):
                teacher, mask = cache[ids].copy(), cached[ids].copy()
                used_teachers[name] += int(mask.sum())
                logits = device.step(x[ids], y[ids], teacher, mask)
                cache[ids] = 0.5 * cache[ids] + 0.5 * logits if name == "executorch" else logits
                cached[ids] = True
    assert used_teachers["executorch"] > len(x) and used_teachers["torch"] >= len(x)
    assert et_device.accuracy(x_test, y_test) > 0.6 and torch_device.accuracy(x_test, y_test) > 0.6


def test_missing_program_is_reported_without_an_input_shape(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError, match="python -m export"):
        make_trainer(backend="executorch", arch="cnn", seed=0, loss=LossSettings(), artifacts_dir=tmp_path, **SETTINGS)


def test_a_trial_mixes_torch_and_executorch_devices_through_the_cache_server(artifacts: Path, tmp_path: Path) -> None:
    """A real trial (Mosquitto, cache server, device processes): a torch resnet8 and an ExecuTorch cnn device."""
    import shutil

    from android_harness.trial import TrialSettings, run_trial

    # The cnn program exported by the tests above serves (the trial exports only what its directory lacks).
    shutil.copytree(artifacts, tmp_path / "artifacts")
    exported_before = sorted(p.name for p in (tmp_path / "artifacts").glob("*.train.pte"))
    assert any(name.startswith("cnn-c10-1x8x8") for name in exported_before)
    settings = TrialSettings(
        out=tmp_path, dataset="digits", devices=2, epochs=3, archs=("resnet8", "cnn"), backends=("torch", "executorch")
    )
    report = run_trial(settings, progress=False)
    configs = {
        d.name: (tmp_path / "devices" / d.name / "device.toml").read_text() for d in (tmp_path / "devices").iterdir()
    }
    assert 'backend = "executorch"' in configs["dev001"] and 'backend = "torch"' in configs["dev000"]
    for device in report["devices"]:
        assert device["teacher_coverage"] > 0.5, device  # knowledge reached both backends through the server
        assert device["accuracy"] > 0.6, device
    assert sorted(p.name for p in (tmp_path / "artifacts").glob("*.train.pte")) == exported_before
