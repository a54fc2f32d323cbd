"""Graph choices for ExecuTorch training programs: decompositions that make them run, correct and fast on 1.5.1.

Why each exists (measured in docs/export.md, `python -m bench.executorch_speed`):

* BatchNorm in training mode exports as `_native_batch_norm_legit_functional`, which ExecuTorch has no kernel
  for ("Missing out variants"); it is rewritten as means and elementwise ops (two-pass variance) plus the
  running-statistics update PyTorch does (momentum, unbiased variance). Required, not an option.
* The portable `max_pool2d_with_indices_backward` kernel of 1.5.1 scatters into memory it never zeroes, so
  gradients below a max pool are garbage (fixed upstream later); it is rewritten as scatter_add into zeros.
  Required for correctness.
* Convolutions and their backward (portable kernels: naive loops, 95% of a step) become im2col + GEMM: the
  input gradient is the convolution of the dilated, padded output gradient with the flipped, transposed
  kernel, the weight gradient a GEMM with the same im2col matrix. Depthwise convolutions become
  window products. Every op here (slice, cat, permute, view, mm, mul, sum) is one XNNPACK can run.
* ReLU's backward (`where(out <= 0, 0, g)`, portable) becomes `g * ceil(clamp(out, 0, 1))`: exact, and XNNPACK.
* Non-overlapping max pooling is a chain of XNNPACK maxima over window slices (first maximum wins, like ATen).

Padding is built with `cat` of zeros, not `constant_pad_nd`, whose fake kernel specialises a dynamic batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class TrainingGraphOptions:
    """Which optional speed choices a training program uses; the default is the fastest correct one."""

    gemm_convolution: bool = True
    relu_mask_backward: bool = True
    window_max_pool: bool = True
    xnnpack: bool = True
    dynamic_weight_gemm: bool = True
    common_subexpressions: bool = True

    def describe(self) -> str:
        """A short label for tables and the manifest."""
        parts = [name for name, on in vars(self).items() if on]
        return "+".join(parts) if parts else "portable"


PORTABLE = TrainingGraphOptions(
    gemm_convolution=False,
    relu_mask_backward=False,
    window_max_pool=False,
    xnnpack=False,
    dynamic_weight_gemm=False,
    common_subexpressions=False,
)


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[-1])) if len(value) else (1, 1)


def batch_norm_training(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Training-mode BatchNorm from elementwise ops and means, with PyTorch's running-statistics update.

    The variance is two-pass (mean of squared deviations): ExecuTorch's `_native_batch_norm_legit.no_stats`
    kernel lost precision on deep ResNets (80x PyTorch's float32 noise after 5 steps of resnet16).
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims)
    centred = x - mean.view(shape)
    variance = (centred * centred).mean(dim=dims)
    invstd = torch.rsqrt(variance + eps)
    scale = invstd if weight is None else invstd * weight
    out = centred * scale.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    count = x.numel() // x.shape[1]
    unbiased = variance * (count / torch.sym_max(count - 1, 1))
    new_mean = running_mean * (1.0 - momentum) + mean * momentum
    new_var = running_var * (1.0 - momentum) + unbiased * momentum
    return out, mean, invstd, new_mean, new_var


def max_pool2d_backward_scatter(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Max-pool gradient by scatter_add into explicit zeros (the 1.5.1 kernel reads unzeroed memory)."""
    n, c = x.shape[0], x.shape[1]
    flat = x.new_zeros(n, c, x.shape[2] * x.shape[3])
    return flat.scatter_add(2, indices.flatten(2), grad.flatten(2)).view(x.shape)


def _zero_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Zero padding by concatenation: XNNPACK runs it and it keeps a dynamic batch symbolic."""
    n, c, h, w = x.shape
    if left or right:
        parts = [x.new_zeros(n, c, h, left)] if left else []
        parts.append(x)
        if right:
            parts.append(x.new_zeros(n, c, h, right))
        x = torch.cat(parts, dim=3)
        w = w + left + right
    if top or bottom:
        parts = [x.new_zeros(n, c, top, w)] if top else []
        parts.append(x)
        if bottom:
            parts.append(x.new_zeros(n, c, bottom, w))
        x = torch.cat(parts, dim=2)
    return x


def _windows(x: torch.Tensor, kh: int, kw: int, sh: int, sw: int) -> torch.Tensor:
    """(N, C, H, W) -> (kh*kw, N, C, Ho, Wo): every kernel offset's strided slice, stacked first.

    Stacking on a new leading axis copies whole slices; stacking last would interleave single floats
    (XNNPACK's copy then dominated the step).
    """
    ho = (x.shape[2] - kh) // sh + 1
    wo = (x.shape[3] - kw) // sw + 1
    slices = [
        x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)
    ]
    return torch.stack(slices, dim=0)


def _im2col(x: torch.Tensor, kh: int, kw: int, sh: int, sw: int) -> tuple[torch.Tensor, int, int]:
    """Padded (N, C, H, W) -> the (N*Ho*Wo, C*kh*kw) matrix whose GEMM with the kernel is the convolution."""
    n, c = x.shape[0], x.shape[1]
    if kh == 1 and kw == 1:
        if sh != 1 or sw != 1:
            x = x[:, :, ::sh, ::sw]
        ho, wo = x.shape[2], x.shape[3]
        return x.permute(0, 2, 3, 1).reshape(n * ho * wo, c), ho, wo
    u = _windows(x, kh, kw, sh, sw)
    ho, wo = u.shape[3], u.shape[4]
    return u.permute(1, 3, 4, 2, 0).reshape(n * ho * wo, c * kh * kw), ho, wo


def _conv_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], groups: int
) -> torch.Tensor:
    """Convolution of an already padded input: GEMM for dense kernels, window products for depthwise ones."""
    sh, sw = stride
    cout, cin_per_group, kh, kw = weight.shape
    n = x.shape[0]
    if groups == 1:
        cols, ho, wo = _im2col(x, kh, kw, sh, sw)
        out = cols @ weight.reshape(cout, cin_per_group * kh * kw).t()
        if bias is not None:
            out = out + bias
        return out.view(n, ho, wo, cout).permute(0, 3, 1, 2).contiguous()
    u = _windows(x, kh, kw, sh, sw)
    out = (u * weight.view(cout, kh * kw).t().reshape(kh * kw, 1, cout, 1, 1)).sum(dim=0)
    if bias is not None:
        out = out + bias.view(1, cout, 1, 1)
    return out


def _gemm_supported(
    weight_shape: Sequence[int],
    x_shape: Sequence[Any],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    groups: int,
) -> bool:
    """Dense or depthwise 2-D convolutions without dilation and with padding below the kernel size."""
    if transposed or len(weight_shape) != 4 or any(d != 1 for d in dilation):
        return False
    cout, cin_per_group, kh, kw = weight_shape
    ph, pw = _pair(padding)
    if ph > kh - 1 or pw > kw - 1:
        return False
    return groups == 1 or (cin_per_group == 1 and groups == x_shape[1] == cout)


def convolution_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> Any:
    """aten.convolution as im2col + GEMM (NotImplemented keeps the native op for other shapes)."""
    if not _gemm_supported(weight.shape, x.shape, padding, dilation, transposed, groups):
        return NotImplemented
    ph, pw = _pair(padding)
    return _conv_gemm(_zero_pad(x, ph, ph, pw, pw), weight, bias, _pair(stride), groups)


def _dilate(grad: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """Insert stride-1 zeros between output-gradient elements (the transposed convolution's input)."""
    n, c, ho, wo = grad.shape
    if sw > 1:
        grad = torch.cat([grad.unsqueeze(-1), grad.new_zeros(n, c, ho, wo, sw - 1)], dim=-1)
        grad = grad.reshape(n, c, ho, wo * sw)[..., : (wo - 1) * sw + 1]
    if sh > 1:
        width = grad.shape[3]
        grad = torch.cat([grad.unsqueeze(3), grad.new_zeros(n, c, ho, sh - 1, width)], dim=3)
        grad = grad.reshape(n, c, ho * sh, width)[:, :, : (ho - 1) * sh + 1]
    return grad


def convolution_backward_gemm(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> Any:
    """aten.convolution_backward by GEMMs: input grad = conv(dilated grad, flipped kernel), weight grad from im2col."""
    if not _gemm_supported(weight.shape, x.shape, padding, dilation, transposed, groups):
        return NotImplemented
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    cout, cin_per_group, kh, kw = weight.shape
    n, _, height, width = x.shape
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        rest_h = (height + 2 * ph - kh) % sh  # input rows no output window reached
        rest_w = (width + 2 * pw - kw) % sw
        dilated = _zero_pad(_dilate(grad, sh, sw), kh - 1 - ph, kh - 1 - ph + rest_h, kw - 1 - pw, kw - 1 - pw + rest_w)
        flipped = weight.flip(2, 3)
        kernel = flipped.transpose(0, 1) if groups == 1 else flipped
        grad_input = _conv_gemm(dilated, kernel, None, (1, 1), groups)
    if output_mask[1]:
        padded = _zero_pad(x, ph, ph, pw, pw)
        if groups == 1:
            cols, ho, wo = _im2col(padded, kh, kw, sh, sw)
            grad_rows = grad.permute(0, 2, 3, 1).reshape(n * ho * wo, cout)
            grad_weight = (grad_rows.t() @ cols).view(cout, cin_per_group, kh, kw).clone()
        else:
            u = _windows(padded, kh, kw, sh, sw)
            grad_weight = (u * grad.unsqueeze(0)).sum(dim=(1, 3, 4)).t().reshape(cout, 1, kh, kw)
    if output_mask[2]:
        grad_bias = grad.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


def relu_mask_backward(grad: torch.Tensor, out: torch.Tensor, threshold: float) -> Any:
    """threshold_backward at 0 as grad * ceil(clamp(out, 0, 1)): exactly 1 where out > 0, else 0."""
    if threshold != 0:
        return NotImplemented
    return grad * torch.ceil(torch.clamp(out, 0.0, 1.0))


def window_max_pool(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> Any:
    """Non-overlapping max pooling as a max over stacked window slices, with ATen's flat argmax indices."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride) if len(stride) else (kh, kw)
    if any(p != 0 for p in padding) or any(d != 1 for d in dilation) or ceil_mode or (kh, kw) != (sh, sw):
        return NotImplemented
    width = x.shape[3]
    ho, wo = (x.shape[2] - kh) // sh + 1, (width - kw) // sw + 1
    slices = [
        x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)
    ]
    values = slices[0]
    for window in slices[1:]:
        values = torch.maximum(values, window)
    # The first offset holding the maximum wins, as in ATen's kernel (ties are common: flat image regions).
    # is_max = 1 - ceil(clamp(max - v, 0, 1)) is 1 exactly where v == max (portable where/eq cost 3x more);
    # it could only err if two values differed by less than the smallest normal float (flushed to zero).
    arg = torch.full_like(values, float(len(slices) - 1))
    for offset in range(len(slices) - 2, -1, -1):
        is_max = 1.0 - torch.ceil(torch.clamp(values - slices[offset], 0.0, 1.0))
        arg = arg + is_max * (offset - arg)
    arg = arg.to(torch.long)
    base = (torch.arange(ho) * (sh * width)).view(ho, 1) + (torch.arange(wo) * sw).view(1, wo)
    return values, base + torch.div(arg, kw, rounding_mode="floor") * width + torch.remainder(arg, kw)


def training_decompositions(options: TrainingGraphOptions) -> dict[Any, Callable[..., Any]]:
    """The decomposition table for `_export_forward_backward`: core ATen plus this module's rewrites."""
    from torch._decomp import core_aten_decompositions

    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    table[aten._native_batch_norm_legit_functional.default] = batch_norm_training
    table[aten.max_pool2d_with_indices_backward.default] = max_pool2d_backward_scatter
    if options.gemm_convolution:
        table[aten.convolution.default] = convolution_gemm
        table[aten.convolution_backward.default] = convolution_backward_gemm
    if options.relu_mask_backward:
        table[aten.threshold_backward.default] = relu_mask_backward
    if options.window_max_pool:
        table[aten.max_pool2d_with_indices.default] = window_max_pool
    return table


def inference_decompositions(options: TrainingGraphOptions) -> dict[Any, Callable[..., Any]]:
    """Decompositions for a predict method whose weights are inputs (so XNNPACK cannot pack them)."""
    from torch._decomp import core_aten_decompositions

    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    if options.gemm_convolution:
        table[aten.convolution.default] = convolution_gemm
    return table


__all__ = [
    "PORTABLE",
    "TrainingGraphOptions",
    "batch_norm_training",
    "convolution_backward_gemm",
    "convolution_gemm",
    "inference_decompositions",
    "max_pool2d_backward_scatter",
    "relu_mask_backward",
    "training_decompositions",
    "window_max_pool",
]
