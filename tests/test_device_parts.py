"""The device's pieces without a broker: the FedCache loss, teacher cache, outbox, batch schedule, config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge.config import DeviceConfig, config_to_toml, load_config
from edge.knowledge import BatchSchedule, TeacherCache
from fedwire import TeacherForm
from models.loss import LossSettings, fedcache_loss


def test_loss_is_ce_plus_scaled_kl_and_mask_removes_the_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    settings = LossSettings(kd_alpha=1.5, temperature=3.0)
    full = fedcache_loss(student, labels, teacher, torch.ones(8), settings)
    kl = F.kl_div(F.log_softmax(student / 3, 1), F.softmax(teacher / 3, 1), reduction="batchmean")
    assert full.item() == pytest.approx((F.cross_entropy(student, labels) + 1.5 * 9 * kl).item(), rel=1e-5)
    none = fedcache_loss(student, labels, teacher, torch.zeros(8), settings)
    assert none.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    same = fedcache_loss(student, labels, student.clone(), torch.ones(8), settings)
    assert same.item() == pytest.approx(F.cross_entropy(student, labels).item(), abs=1e-5)


def test_teacher_cache_keeps_only_rows_with_contributors() -> None:
    cache = TeacherCache(samples=6, classes=3)
    cache.store(
        np.array([1, 2, 4], np.uint32), np.array([2, 0, 1], np.uint16), np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    )
    logits, mask = cache.lookup(np.array([1, 2, 4]))
    assert mask.tolist() == [True, False, True]
    np.testing.assert_array_equal(logits[[0, 2]], [[1, 2, 3], [4, 5, 6]])
    assert cache.coverage() == pytest.approx(2 / 6)


def test_schedule_covers_every_sample_once_per_epoch() -> None:
    schedule = BatchSchedule(samples=21, batch_size=8, epochs=2, seed=3)
    assert len(schedule) == 6
    for epoch in range(2):
        ids = np.concatenate([b for b, e in zip(schedule.batches, schedule.epoch_of, strict=True) if e == epoch])
        assert sorted(ids.tolist()) == list(range(21))
    assert schedule.ids_between(0, 100).size == 21  # unique across the epoch boundary


def test_config_round_trips_through_toml_and_rejects_typos(tmp_path: Path) -> None:
    config = DeviceConfig(id="pi-07", broker="mqtt://10.0.0.2:1883")
    path = tmp_path / "device.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config
    raw = replace(config, train=replace(config.train, teacher_form=TeacherForm.RAW))
    path.write_text(config_to_toml(raw))
    assert load_config(path).train.teacher_form is TeacherForm.RAW
    path.write_text(config_to_toml(raw).replace('"raw"', '"median"'))
    with pytest.raises(ValueError, match="median"):
        load_config(path)
    path.write_text(config_to_toml(config))
    path.write_text(config_to_toml(config).replace("epochs", "epochz"))
    with pytest.raises(ValueError, match="epochz"):
        load_config(path)
    with pytest.raises(ValueError, match="device id"):
        DeviceConfig(id="bad/id")


def _batches(steps: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((8, 1, 8, 8), dtype=np.float32),
            rng.integers(0, 10, 8),
            rng.standard_normal((8, 10), dtype=np.float32),
            rng.random(8) < 0.7,
        )
        for _ in range(steps)
    ]


def test_sgd_is_torch_optim_sgd_bit_for_bit_and_checkpoints_cross_restore() -> None:
    from edge.trainer import TorchTrainer
    from models.zoo import build_model

    settings = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "loss": LossSettings()}
    ours = TorchTrainer(model=build_model("resnet8", classes=10, in_channels=1, seed=3), **settings)
    model = build_model("resnet8", classes=10, in_channels=1, seed=3)
    reference = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = _batches(6)
    for x, y, teacher, mask in batches:
        ours.step(x, y, teacher, mask)
        model.train()
        student = model(torch.from_numpy(x))
        loss = fedcache_loss(
            student, torch.from_numpy(y), torch.from_numpy(teacher), torch.from_numpy(mask.astype(np.float32)),
            LossSettings(),
        )  # fmt: skip
        reference.zero_grad(set_to_none=True)
        loss.backward()
        reference.step()
    for (name, mine), theirs in zip(ours.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    # Our checkpoint restores into torch.optim.SGD and back, momentum buffers included.
    reference.load_state_dict(ours.checkpoint_state()["optimizer"])
    restored = TorchTrainer(model=build_model("resnet8", classes=10, in_channels=1, seed=3), **settings)
    restored.restore_checkpoint_state({"model": model.state_dict(), "optimizer": reference.state_dict()})
    x, y, teacher, mask = batches[0]
    assert np.array_equal(restored.step(x, y, teacher, mask), ours.step(x, y, teacher, mask))
    after = zip(restored.model.state_dict().values(), ours.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in after)


def test_a_torch_device_never_imports_torch_dynamo() -> None:
    """torch.optim imports torch._dynamo (1.4 s of CPU per device process); the device's trainer must not."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from edge.backends import make_trainer\n"
        "from models.loss import LossSettings\n"
        "t = make_trainer(backend='torch', arch='cnn', classes=10, in_channels=1, seed=0, lr=0.01, momentum=0.9,\n"
        "    weight_decay=5e-4, loss=LossSettings(), artifacts_dir='.', input_shape=(1, 8, 8), batch_size=8)\n"
        "x = np.zeros((8, 1, 8, 8), np.float32)\n"
        "t.step(x, np.zeros(8, np.int64), np.zeros((8, 10), np.float32), np.ones(8, bool))\n"
        "t.accuracy(x, np.zeros(8, np.int64)); t.restore_checkpoint_state(t.checkpoint_state())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
