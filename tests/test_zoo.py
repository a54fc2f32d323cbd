"""Tests of the model zoo: every architecture builds, runs, trains and exports for 28x28 and 8x8 inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.zoo import ARCHITECTURES, build_model, count_parameters


@pytest.mark.parametrize("side", [28, 8])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_and_one_training_step(arch: str, side: int) -> None:
    model = build_model(arch, classes=10, in_channels=1, seed=0)
    x = torch.randn(4, 1, side, side, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 9])
    before = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 10)


def test_parameter_counts_grow_with_resnet_depth() -> None:
    counts = {a: count_parameters(build_model(a, classes=10, in_channels=1)) for a in ARCHITECTURES}
    assert counts["resnet8"] < counts["resnet16"] < counts["resnet20"]
    assert counts["cnn"] < counts["resnet8"]
    assert all(n > 0 for n in counts.values())


def test_seed_gives_same_weights_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("resnet8", classes=10, in_channels=3, seed=7)
    assert torch.equal(torch.rand(1), expected)
    b = build_model("resnet8", classes=10, in_channels=3, seed=7)
    c = build_model("resnet8", classes=10, in_channels=3, seed=8)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", classes=10, in_channels=1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exports_to_onnx_and_torch_export(arch: str, tmp_path: Path) -> None:
    model = build_model(arch, classes=10, in_channels=1, seed=0).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{arch}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x5).numpy()
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        exported = program.module()(x5).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x5.numpy()})[0], expected, atol=1e-4)
    np.testing.assert_allclose(exported, expected, atol=1e-5)
