"""The default hash encoder: a fixed, seeded, untrained feature map exported to ONNX, needing no download.

Devices turn private samples into hashes with it, so the server can match neighbours without ever seeing
pixels. Every device builds the same encoder from (kind, input_shape, dim, seed) alone, hence no weights
ship and no data is needed. Two kinds (measured in docs/encoder.md, `python -m bench.encoder_quality`):

* "pixel": SimHash of pixels - each image is centred and L2-normalised, then multiplied by a Gaussian
  random projection.
* "conv" (default): a random-feature conv net - 64 seeded zero-sum 5x5 kernels, ReLU, average pooling,
  square root (a Hellinger-style compression), per-sample centring and L2 normalisation, then the
  Gaussian random projection. Zero-sum kernels ignore flat background, pooling adds shift tolerance.

Outputs are D features of roughly unit variance, near zero-centred without any data (per-sample
centring); `calibration` images optionally subtract the per-feature median so every sign bit splits
data 50/50 (worth about one point of neighbour-label agreement, see docs/encoder.md).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.files import write_atomic

ENCODER_KINDS = ("pixel", "conv")
DEFAULT_ENCODER_KIND = "conv"
DEFAULT_DIM = 256
ONNX_OPSET = 17
ENCODER_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "features"
_CONV_CHANNELS = 64
_CONV_KERNEL = 5
_EPS = 1e-6
_CALIBRATION_BATCH = 1024


def _normalise_rows(z: torch.Tensor) -> torch.Tensor:
    """Centre each sample's feature vector and scale it to unit L2 norm, so brightness/contrast drop out."""
    z = z - z.mean(dim=1, keepdim=True)
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(_EPS)


class HashFeatureEncoder(nn.Module):
    """Base of the frozen encoders: a seeded projection to `dim` features minus a (calibrated) offset.

    All tensors are buffers, not parameters, so nothing is trainable and they travel in the state dict.
    """

    kind: str = ""
    # Buffers (register_buffer), declared for the type checker.
    offset: torch.Tensor
    projection: torch.Tensor

    def __init__(self, *, input_shape: tuple[int, int, int], dim: int, seed: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.input_shape = tuple(int(n) for n in input_shape)
        self.dim = dim
        self.seed = seed
        self.register_buffer("offset", torch.zeros(dim))

    def _project_init(self, generator: torch.Generator, features: int) -> None:
        # Unit-variance entries: with L2-normalised inputs each output is ~N(0, 1), comfortable for float16.
        self.register_buffer("projection", torch.randn(features, self.dim, generator=generator))

    def prefeatures(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised (N, K) vector that the random projection maps to `dim` features."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefeatures(x) @ self.projection - self.offset

    @torch.no_grad()
    def calibrate(self, images: np.ndarray | torch.Tensor) -> None:
        """Set the offset to the per-feature median over `images`, balancing every sign bit on that data.

        Only calibrate on data every device can use identically (e.g. a public set); a per-device
        calibration would make the same image hash differently on different devices.
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape or len(x) == 0:
            raise ValueError(f"calibration images must be (N>0, {self.input_shape}), got {tuple(x.shape)}")
        self.offset.zero_()
        feats = torch.cat([self(x[i : i + _CALIBRATION_BATCH]) for i in range(0, len(x), _CALIBRATION_BATCH)])
        self.offset.copy_(feats.median(dim=0).values)


class PixelHashEncoder(HashFeatureEncoder):
    """SimHash of pixels: per-image centred, L2-normalised pixels times a Gaussian projection."""

    kind = "pixel"

    def __init__(self, *, input_shape: tuple[int, int, int], dim: int = DEFAULT_DIM, seed: int = 0) -> None:
        super().__init__(input_shape=input_shape, dim=dim, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        self._project_init(generator, int(np.prod(self.input_shape)))

    def prefeatures(self, x: torch.Tensor) -> torch.Tensor:
        return _normalise_rows(x.flatten(1))


class ConvHashEncoder(HashFeatureEncoder):
    """Random-feature conv net: zero-sum 5x5 kernels, ReLU, average pool, sqrt, normalise, project."""

    kind = "conv"
    kernels: torch.Tensor

    def __init__(self, *, input_shape: tuple[int, int, int], dim: int = DEFAULT_DIM, seed: int = 0) -> None:
        super().__init__(input_shape=input_shape, dim=dim, seed=seed)
        channels, height, width = self.input_shape
        if min(height, width) < 2:
            raise ValueError(f"conv encoder needs images of at least 2x2, got {height}x{width}")
        generator = torch.Generator().manual_seed(seed)
        kernels = torch.randn(_CONV_CHANNELS, channels, _CONV_KERNEL, _CONV_KERNEL, generator=generator)
        kernels = kernels - kernels.mean(dim=(1, 2, 3), keepdim=True)  # zero response on flat regions
        kernels = kernels / torch.linalg.vector_norm(kernels.flatten(1), dim=1).view(-1, 1, 1, 1)
        self.register_buffer("kernels", kernels)
        # Pool to roughly 7x7 on 28x28 images (4x4 pooling), 4x4 on 8x8 images (2x2 pooling).
        self.pool = 4 if min(height, width) >= 16 else 2
        self._project_init(generator, _CONV_CHANNELS * (height // self.pool) * (width // self.pool))

    def prefeatures(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(F.conv2d(x, self.kernels, padding=_CONV_KERNEL // 2))
        z = torch.sqrt(F.avg_pool2d(z, self.pool))
        return _normalise_rows(z.flatten(1))


_KINDS: dict[str, type[HashFeatureEncoder]] = {"pixel": PixelHashEncoder, "conv": ConvHashEncoder}


def build_encoder(
    kind: str = DEFAULT_ENCODER_KIND,
    *,
    input_shape: tuple[int, int, int],
    dim: int = DEFAULT_DIM,
    seed: int = 0,
    calibration: np.ndarray | None = None,
) -> HashFeatureEncoder:
    """The frozen encoder module (eval mode): the same arguments give the same encoder on every machine."""
    if kind not in _KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {', '.join(ENCODER_KINDS)}")
    encoder = _KINDS[kind](input_shape=input_shape, dim=dim, seed=seed).eval()
    if calibration is not None:
        encoder.calibrate(calibration)
    return encoder


def export_encoder_onnx(
    path: Path | str,
    *,
    input_shape: tuple[int, int, int],
    dim: int = DEFAULT_DIM,
    seed: int = 0,
    kind: str = DEFAULT_ENCODER_KIND,
    calibration: np.ndarray | None = None,
    opset: int = ONNX_OPSET,
) -> Path:
    """Export the encoder to ONNX (input "images" (N, C, H, W) float32 -> "features" (N, dim) float32).

    The batch axis is dynamic. It uses the TorchScript exporter (dynamo=False) because the dynamo one
    needs onnxscript, which the stack does not ship. The file is written atomically (temp file + rename)
    since many device processes may export the default encoder at once; its metadata records the
    encoder's arguments so a loader can check what it got.
    """
    import onnx

    path = Path(path)
    encoder = build_encoder(kind, input_shape=input_shape, dim=dim, seed=seed, calibration=calibration)
    example = torch.zeros(2, *encoder.input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            encoder,
            (example,),
            buffer,  # type: ignore[arg-type]  # torch's stub names paths only; a binary file object works
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "fedcache.encoder.format": str(ENCODER_FORMAT_VERSION),
        "fedcache.encoder.kind": kind,
        "fedcache.encoder.dim": str(dim),
        "fedcache.encoder.seed": str(seed),
        "fedcache.encoder.input_shape": ",".join(str(n) for n in encoder.input_shape),
        "fedcache.encoder.calibrated": "1" if calibration is not None else "0",
    }
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    write_atomic(path, model.SerializeToString())
    return path


__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_ENCODER_KIND",
    "ENCODER_KINDS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ConvHashEncoder",
    "HashFeatureEncoder",
    "PixelHashEncoder",
    "build_encoder",
    "export_encoder_onnx",
]
