"""train.teacher_gate: FedCache devices distil only from teachers whose top class is the sample's own label."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from android_harness.native import prepare_native_device
from android_harness.spec import SpecError, parse_spec
from android_harness.trial import TrialSettings
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_from_dict, config_to_toml
from edge.runtime import DeviceRuntime
from models.loss import LossSettings, TeacherGate, fedcache_loss
from tests.trial_options import cli_settings, device_trains, file_trains

GATED = LossSettings(teacher_gate=TeacherGate.LABEL)


def test_the_gate_drops_exactly_the_teachers_that_rank_a_wrong_class_first() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = teacher.argmax(dim=1).clone()
    labels[[1, 4]] = (labels[[1, 4]] + 1) % 4  # the teacher is wrong on samples 1 and 4
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # sample 3 has no teacher at all
    kept = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    expected = fedcache_loss(student, labels, teacher, kept, LossSettings())
    assert fedcache_loss(student, labels, teacher, mask, GATED).item() == pytest.approx(expected.item(), rel=1e-6)
    # Without the gate the wrong teachers count, so the loss differs.
    assert fedcache_loss(student, labels, teacher, mask, LossSettings()).item() > expected.item()


def test_a_gated_wrong_teacher_leaves_the_gradient_of_cross_entropy_alone() -> None:
    student = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    wrong_teacher = torch.tensor([[-3.0, 5.0, 0.0]])
    labels = torch.tensor([0])
    fedcache_loss(student, labels, wrong_teacher, torch.ones(1), GATED).backward()  # type: ignore[no-untyped-call]
    gated = student.grad.clone()  # type: ignore[union-attr]
    reference = student.detach().clone().requires_grad_(True)
    F.cross_entropy(reference, labels).backward()  # type: ignore[no-untyped-call]
    assert torch.allclose(gated, reference.grad)  # type: ignore[arg-type]


def test_the_setting_round_trips_and_stays_out_of_files_that_do_not_use_it() -> None:
    config = DeviceConfig(id="d", train=TrainConfig(teacher_gate=TeacherGate.LABEL))
    text = config_to_toml(config)
    assert 'teacher_gate = "label"' in text
    assert config_from_dict(tomllib.loads(text)) == config
    assert "teacher_gate" not in config_to_toml(DeviceConfig(id="d"))  # native devices read such files as before
    with pytest.raises(ValueError, match="'sometimes' is not a valid TeacherGate"):
        config_from_dict({"device": {"id": "d"}, "train": {"teacher_gate": "sometimes"}})


def test_backends_that_bake_the_loss_in_refuse_the_gate_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.teacher_gate: implemented for the torch backend only"):
        DeviceConfig(id="d", train=TrainConfig(backend="executorch", teacher_gate=TeacherGate.LABEL))
    with pytest.raises(ValueError, match="teacher_gate is implemented for the torch backend only, not for the native"):
        prepare_native_device(
            DeviceConfig(id="d", train=TrainConfig(teacher_gate=TeacherGate.LABEL)), artifacts=tmp_path
        )
    assert not list(tmp_path.iterdir())
    mixed = TrialSettings(
        out=tmp_path, backends=("torch", "executorch"), extra_train={"teacher_gate": TeacherGate.LABEL}
    )
    with pytest.raises(
        ValueError, match=r"teacher_gate: implemented for the torch backend only, not for \['executorch'\]"
    ):
        mixed.check()
    exported = {"count": 2, "backend": "native"}
    with pytest.raises(SpecError, match=r"\[trial\]\.teacher_gate: .*\['native'\]"):
        parse_spec({"trial": {"teacher_gate": "label"}, "devices": [exported]}, out=tmp_path)


def test_the_cli_and_trial_files_hand_the_gate_to_every_device(tmp_path: Path) -> None:
    flagged = cli_settings(tmp_path, ["--teacher-gate", "label"])
    assert [t.teacher_gate for t in device_trains(flagged, tmp_path)] == [TeacherGate.LABEL] * 2
    assert cli_settings(tmp_path, []).extra_train == {}
    assert [t.teacher_gate for t in file_trains(tmp_path, {"teacher_gate": "label"})] == [TeacherGate.LABEL] * 2
    with pytest.raises(SpecError, match="teacher_gate"):
        parse_spec({"trial": {"teacher_gate": "maybe"}, "devices": [{"count": 2}]}, out=tmp_path)


def test_a_device_trains_with_the_gate_its_file_names(tmp_path: Path) -> None:
    for gate in TeacherGate:
        config = DeviceConfig(
            id="gated",
            broker="mqtt://127.0.0.1:1",  # never connected: building the runtime needs no broker
            state_dir=str(tmp_path / gate.value),
            data=DataConfig(dataset="digits", num_devices=4, index=1),
            train=TrainConfig(algorithm="fedcache", arch="cnn", epochs=1, max_samples=40, teacher_gate=gate),
            hash=HashConfig(dim=64),
        )
        runtime = DeviceRuntime(config)
        try:
            assert runtime.trainer.loss_settings.teacher_gate is gate  # type: ignore[attr-defined]
        finally:
            runtime.state.close()
