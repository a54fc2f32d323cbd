"""The zoo of heterogeneous device models: CIFAR ResNet-8/16/20, a small CNN and a MobileNetV3-small-like net.

FedCache lets every device train its own architecture; all nets here take (N, C, H, W) images of any size
>= 8x8 (global average pooling, no fixed flatten size) and use only ops that torch.export and the ONNX
exporter handle (conv, batch norm, relu, hardswish, hardsigmoid, max pool, mean, linear).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ARCHITECTURES = ("resnet8", "resnet16", "resnet20", "cnn", "mobilenet")

# Blocks per stage. Depth counts the stem conv, two 3x3 convs per BasicBlock and the final linear layer
# (the 1x1 projection shortcuts are not counted, as in He et al. 2016): 2 + 2 * sum(blocks).
_RESNET_BLOCKS: dict[str, tuple[int, int, int]] = {
    "resnet8": (1, 1, 1),  # 2 + 2*3 = 8
    "resnet16": (2, 2, 3),  # 2 + 2*7 = 16; the extra block goes to the widest (64-channel) stage
    "resnet20": (3, 3, 3),  # 2 + 2*9 = 20
}
MIN_INPUT_SIDE = 8


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut, or a 1x1 conv+BN projection where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, sec. 4.2) used by FedCache: 16-channel stem, stages 16/32/64."""

    def __init__(self, blocks: tuple[int, int, int], *, classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        channels = 16
        for width, count, stride in zip((16, 32, 64), blocks, (1, 2, 2), strict=True):
            for i in range(count):
                layers.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.fc(features)


class SmallCNN(nn.Module):
    """Two conv layers and a linear head: the cheapest model, for the slowest devices."""

    def __init__(self, *, classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor` (never below 90% of it), as MobileNet does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    """Channel attention: global mean, bottleneck 1x1 convs, hard-sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _make_divisible(channels / 4)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise kxk, optional squeeze-excite, 1x1 linear project."""

    def __init__(
        self,
        in_channels: int,
        *,
        kernel: int,
        expanded: int,
        out_channels: int,
        squeeze_excite: bool,
        activation: Callable[[], nn.Module],
        stride: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers += [nn.Conv2d(in_channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation()]
        layers += [
            nn.Conv2d(expanded, expanded, kernel, stride=stride, padding=kernel // 2, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            activation(),
        ]
        if squeeze_excite:
            layers.append(SqueezeExcite(expanded))
        layers += [nn.Conv2d(expanded, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (kernel, expanded, out, squeeze-excite, hardswish, stride): MobileNetV3-small's first six blocks, with
# three stride-2 stages instead of five so an 8x8 input still leaves a 1x1 map.
_MOBILENET_BLOCKS = (
    (3, 16, 16, True, False, 2),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 120, 40, True, True, 1),
    (5, 144, 48, True, True, 1),
)


class MobileNetSmall(nn.Module):
    """A small MobileNetV3-small-like net: stride-1 3x3 stem (small images), inverted residuals, SE, hardswish."""

    def __init__(self, *, classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(inplace=True),
        ]
        channels = 16
        for kernel, expanded, out, se, hswish, stride in _MOBILENET_BLOCKS:
            activation: Callable[[], nn.Module] = nn.Hardswish if hswish else nn.ReLU
            layers.append(
                InvertedResidual(
                    channels,
                    kernel=kernel,
                    expanded=expanded,
                    out_channels=out,
                    squeeze_excite=se,
                    activation=activation,
                    stride=stride,
                )
            )
            channels = out
        last = 6 * channels
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(last, 256), nn.Hardswish(inplace=True), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _init_weights(model: nn.Module) -> None:
    """He init for convs (fan-out, as torchvision's ResNet/MobileNet), unit/zero BN, small-normal linear."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def _construct(arch: str, *, classes: int, in_channels: int) -> nn.Module:
    if arch in _RESNET_BLOCKS:
        return CifarResNet(_RESNET_BLOCKS[arch], classes=classes, in_channels=in_channels)
    if arch == "cnn":
        return SmallCNN(classes=classes, in_channels=in_channels)
    if arch == "mobilenet":
        return MobileNetSmall(classes=classes, in_channels=in_channels)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_model(arch: str, *, classes: int, in_channels: int, seed: int | None = None) -> nn.Module:
    """Build a freshly initialised zoo model; inputs must be at least 8x8.

    With `seed`, initialisation uses a forked RNG, so the same seed gives the same weights on every
    device without disturbing the caller's global torch RNG; with None it draws from the global RNG.
    """
    if classes < 1 or in_channels < 1:
        raise ValueError("classes and in_channels must be >= 1")
    if seed is None:
        model = _construct(arch, classes=classes, in_channels=in_channels)
        _init_weights(model)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(arch, classes=classes, in_channels=in_channels)
        _init_weights(model)
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter scalars (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ARCHITECTURES", "MIN_INPUT_SIDE", "build_model", "count_parameters"]
