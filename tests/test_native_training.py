"""The native (C++) device trains the exported .train.pte like PyTorch does: same weights after N steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from android_harness.native import (
    TRAIN_CHECK_BINARY,
    ensure_built,
    read_weights,
    training_record,
    write_batches,
    write_names,
    write_weights,
)
from edge.backends import make_trainer
from models.loss import LossSettings
from models.manifest import read_manifest

SHAPE = (1, 8, 8)
SETTINGS = {"classes": 10, "in_channels": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The session's cnn training program (exported if missing, as the ExecuTorch backend's tests do)."""
    ensure_built()
    artifacts = tmp_path_factory.getbasetemp() / "artifacts"
    make_trainer(
        backend="executorch",
        arch="cnn",
        seed=0,
        loss=LossSettings(),
        artifacts_dir=artifacts,
        input_shape=SHAPE,
        **SETTINGS,
    )
    record = next(
        r
        for r in read_manifest(artifacts)
        if r.kind == "executorch-training" and r.architecture == "cnn" and tuple(r.input_shape) == SHAPE
    )
    path = artifacts / record.path
    return path, training_record(artifacts, path)


def _batches(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (8, 8, 5, 8, 1, 8, 8, 3, 8, 8):  # smaller tail batches: the program's batch is dynamic
        out.append(
            (
                rng.standard_normal((n, *SHAPE)).astype(np.float32),
                rng.integers(0, 10, n),
                rng.standard_normal((n, 10)).astype(np.float32) * 3,
                (rng.random(n) < 0.5).astype(np.float32),
            )
        )
    return out


def _run(program: Path, tmp_path: Path, record: dict, init: dict, batches: list) -> subprocess.CompletedProcess:
    write_weights(tmp_path / "init.fcw", init)
    write_names(tmp_path / "names.txt", record["metadata"])
    write_batches(tmp_path / "batches", batches)
    return subprocess.run(
        [
            str(TRAIN_CHECK_BINARY),
            "--program",
            str(program),
            "--names",
            str(tmp_path / "names.txt"),
            "--weights",
            str(tmp_path / "init.fcw"),
            "--batches",
            str(tmp_path / "batches"),
            "--out",
            str(tmp_path / "out.fcw"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_native_steps_equal_pytorch_within_the_export_tolerance(program: tuple[Path, dict], tmp_path: Path) -> None:
    path, record = program
    torch_trainer = make_trainer(
        backend="torch", arch="cnn", seed=11, loss=LossSettings(), artifacts_dir=path.parent, **SETTINGS
    )
    start = torch_trainer.state_dict()
    batches = _batches(1)
    result = _run(path, tmp_path, record, start, batches)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == len(batches)
    for x, y, teacher, mask in batches:
        torch_trainer.step(x, y, teacher, mask.astype(bool))
    expected, native = torch_trainer.state_dict(), read_weights(tmp_path / "out.fcw")
    assert native.keys() == expected.keys()
    tolerance = float(record["parity"]["tolerance"])  # the export's stated bound, as its parity check measures it
    errors = {
        k: float(np.abs(native[k] - expected[k]).max()) / max(1.0, float(np.abs(expected[k]).max())) for k in expected
    }
    assert max(errors.values()) <= tolerance, errors
    moved = max(float(np.abs(expected[k] - start[k]).max()) for k in expected if "weight" in k)
    assert moved > 100 * tolerance  # the weights really moved, so equality is not the start's
    counters = [k for k in expected if k.endswith("num_batches_tracked")]
    assert counters and all(int(native[k]) == len(batches) for k in counters)
    assert np.isfinite(summary["loss"])


def test_wrong_weights_are_a_clear_error(program: tuple[Path, dict], tmp_path: Path) -> None:
    path, record = program
    bad = {"fc.weight": np.zeros((3, 3), np.float32)}
    result = _run(path, tmp_path, record, bad, _batches(2)[:1])
    assert result.returncode == 2
    assert "fc.weight: shape differs" in result.stderr


def test_a_file_that_is_no_program_is_a_clear_error(program: tuple[Path, dict], tmp_path: Path) -> None:
    _, record = program
    fake = tmp_path / "fake.train.pte"
    fake.write_bytes(b"not a program at all")
    result = _run(fake, tmp_path, record, {}, _batches(3)[:1])
    assert result.returncode == 2
    assert "cannot load the program" in result.stderr
