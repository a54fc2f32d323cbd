"""Exports: the CLI's artifacts and manifest, parity of every runtime, GEMM decompositions, weights coming back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from edge.backends import make_trainer
from export import et_graph
from export.__main__ import main
from export.onnx_export import model_to_onnx_bytes
from export.parity import INFERENCE_TOLERANCE, TRAINING_TOLERANCE
from export.weights import load_weights, model_from_weights, save_weights
from models.loss import LossSettings
from models.manifest import read_manifest, sha256_file, verify

SHAPE = (1, 8, 8)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI run shared by the session (test_et_backend.py reuses the same directory)."""
    out = tmp_path_factory.getbasetemp() / "artifacts"
    manifest = out / "manifest.json"
    if not manifest.exists() or not any(r.kind == "onnx" and r.architecture == "cnn" for r in read_manifest(out)):
        assert main(["--arch", "cnn", "--classes", "10", "--input-shape", "1,8,8", "--out", str(out)]) == 0
    return out


def test_cli_writes_each_kind_with_a_truthful_manifest(artifacts: Path) -> None:
    records = [r for r in read_manifest(artifacts) if r.architecture == "cnn"]
    assert {r.kind for r in records} == {"onnx", "executorch-inference", "executorch-training"}
    data = json.loads((artifacts / "manifest.json").read_text())
    assert data["environment"]["executorch"] == "1.5.1"
    for record in records:
        path = artifacts / record.path
        assert record.sha256 == sha256_file(path)
        assert record.size_bytes == path.stat().st_size > 0
        assert record.input_shape == SHAPE and record.classes == 10
        assert verify(artifacts, record) == path
    onnx_record = next(r for r in records if r.kind == "onnx")
    assert onnx_record.version == "17"
    assert onnx.load(str(artifacts / onnx_record.path)).opset_import[0].version == 17


def test_runtimes_agree_with_pytorch(artifacts: Path) -> None:
    records = {r.kind: r for r in read_manifest(artifacts) if r.architecture == "cnn"}
    for kind in ("onnx", "executorch-inference"):
        assert records[kind].parity["max_abs_diff"] <= INFERENCE_TOLERANCE
    train = records["executorch-training"].parity
    assert train["steps"] >= 5 and train["counters_equal"]
    assert max(train["max_param_diff"], train["max_running_stat_diff"], train["max_logit_diff"]) <= TRAINING_TOLERANCE
    assert train["max_param_change"] > 100 * max(train["max_param_diff"], 1e-7)  # the steps really moved weights
    # The ONNX batch axis is dynamic: any batch runs.
    model = model_from_weights("cnn", classes=10, in_channels=1, state=_seeded_state("cnn", 0)).eval()
    session = ort.InferenceSession(str(artifacts / records["onnx"].path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((13, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"images": x})[0] - expected).max() <= INFERENCE_TOLERANCE


def _seeded_state(arch: str, seed: int) -> dict[str, np.ndarray]:
    from models.zoo import build_model

    return {k: v.numpy() for k, v in build_model(arch, classes=10, in_channels=1, seed=seed).state_dict().items()}


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding", "groups", "side"),
    [
        (1, 32, 3, 1, 1, 1, 12),
        (16, 32, 3, 2, 1, 1, 9),
        (16, 32, 1, 2, 0, 1, 7),
        (16, 16, 3, 2, 1, 16, 8),
        (24, 24, 5, 1, 2, 24, 9),
    ],
)
def test_gemm_convolution_and_its_backward_equal_aten(
    cin: int, cout: int, kernel: int, stride: int, padding: int, groups: int, side: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, side, side, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(cout, cin // groups, kernel, kernel, dtype=torch.float64, generator=gen, requires_grad=True)
    args = ([stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups)
    expected = F.conv2d(x, w, None, stride, padding, 1, groups)
    got = et_graph.convolution_gemm(x, w, None, *args)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    gx, gw = torch.autograd.grad(expected, (x, w), grad)
    gi, gwt, gb = et_graph.convolution_backward_gemm(grad, x.detach(), w.detach(), [cout], *args, [True, True, True])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(gi, gx)
    torch.testing.assert_close(gwt, gw)
    torch.testing.assert_close(gb, grad.sum(dim=(0, 2, 3)))


def test_window_max_pool_routes_ties_like_aten() -> None:
    x = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    x[0, 0, :4, :4] = 0.5  # flat regions tie; ATen picks the first maximum
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    got_values, got_indices = et_graph.window_max_pool(x, [2, 2], [2, 2])
    assert torch.equal(values, got_values) and torch.equal(indices, got_indices)


def test_onnx_initializers_carry_state_dict_names() -> None:
    from models.zoo import build_model

    model = build_model("resnet8", classes=10, in_channels=1, seed=0)
    proto = onnx.load_from_string(model_to_onnx_bytes(model, input_shape=SHAPE))
    names = {i.name for i in proto.graph.initializer}
    expected = {n for n, t in model.state_dict().items() if t.is_floating_point()}
    assert names == expected  # no merged duplicates, so ORT can override each by name


def test_trained_weights_come_back_and_export_again(artifacts: Path, tmp_path: Path) -> None:
    trainer = make_trainer(
        backend="executorch",
        arch="cnn",
        classes=10,
        in_channels=1,
        seed=3,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        loss=LossSettings(),
        artifacts_dir=artifacts,
        input_shape=SHAPE,
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((8, *SHAPE), dtype=np.float32)
        trainer.step(x, rng.integers(0, 10, 8), np.zeros((8, 10), np.float32), np.zeros(8, bool))
    path = save_weights(tmp_path / "device.npz", trainer.state_dict())
    state = load_weights(path)
    model = model_from_weights("cnn", classes=10, in_channels=1, state=state).eval()
    probe = rng.standard_normal((6, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(probe)).numpy()
    np.testing.assert_allclose(trainer.predict(probe), torch_logits, atol=1e-5)
    assert any(not np.array_equal(state[k], v) for k, v in _seeded_state("cnn", 3).items())
    # Export the personalised weights again through the CLI (ONNX + XNNPACK program, parity-checked).
    out = tmp_path / "again"
    args = ["--arch", "cnn", "--input-shape", "1,8,8", "--out", str(out), "--weights", str(path), "--no-training"]
    assert main(args) == 0
    onnx_record = next(r for r in read_manifest(out) if r.kind == "onnx")
    session = ort.InferenceSession(str(out / onnx_record.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": probe})[0], torch_logits, atol=1e-5)
