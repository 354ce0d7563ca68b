"""Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", 2019).

GroupNorm alone trails large-batch BatchNorm by about half a point on ImageNet; standardizing every conv filter
(zero mean, unit variance over in_channels x kH x kW) smooths the loss landscape and closes that gap without
touching the batch dimension, so it keeps GN's independence from the per-device batch size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["WSConv2d", "standardize_weight"]


def _standardize(weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Standardized filters as rows ``[out, in/groups * kH * kW]`` in float32 (or wider), with each filter's mean
    and ``1 / sqrt(var + eps)``.

    Computed by the batch-norm kernel on the weight seen as ``(1, out, n)``, as timm's StdConv2d does: one fused,
    vectorized pass for the moments and one for the output, where ``var_mean`` plus elementwise ops took ~4x as
    long on CPU for ResNet's largest filters (bandwidth-bound passes over the whole weight).
    """
    rows = weight.to(torch.promote_types(weight.dtype, torch.float32)).reshape(1, weight.shape[0], -1)
    standardized, mean, rstd = torch.native_batch_norm(rows, None, None, None, None, True, 0.0, eps)
    return standardized[0], mean, rstd


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """Standardize each output filter of a conv weight ``[out, in/groups, kH, kW]``.

    Moments are taken in float32 whatever the weight's dtype (a half-precision variance of a few hundred
    small values underflows), and ``eps`` sits inside the square root as in timm's ``StdConv2d``.
    """
    return _standardize(weight, eps)[0].view_as(weight).to(weight.dtype)


def _conv_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` would compute in: autocast's lower precision when it is on, else the weight's."""
    device = input.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _WSConv2dFunction(torch.autograd.Function):
    """Standardize-then-convolve as one autograd node that keeps only what a plain convolution keeps.

    Why not plain autograd over ``standardize_weight`` + ``conv2d``: that graph saves two weight-sized tensors per
    layer for backward (the centred filters and the standardized weight) on top of the convolution's input. With
    the small inputs of detection/segmentation training at 1-2 images per device, weights are a large share of
    what a step keeps alive (docs/bench: a weight copy per layer, 151 MB on a DeepLabV3-R50 step). Here backward
    recomputes the standardized weight from the weight (a parameter, alive anyway) and two numbers per filter,
    which costs one pass over the weights, and saves only the input, like ``nn.Conv2d``.

    Gradients are exact: for ``w_hat = (w - mean) * rstd`` per filter of ``n`` values,
    ``dL/dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat))`` with ``g = dL/dw_hat``, in float32 -- the batch-norm
    backward formula, so the batch-norm backward kernel computes it in one fused pass.
    Under autocast, the convolution runs in autocast's dtype on the float32-standardized weight, exactly as
    ``F.conv2d(x, standardize_weight(w))`` would. No double backward (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, eps: float,  # type: ignore[override]
                stride: tuple, padding: tuple, dilation: tuple, groups: int) -> Tensor:
        dtype = _conv_dtype(input, weight)
        rows, mean, rstd = _standardize(weight, eps)
        standardized = rows.view_as(weight).to(dtype)
        x = input.to(dtype)
        with torch.autocast(input.device.type, enabled=False):
            out = F.conv2d(x, standardized, None if bias is None else bias.to(dtype), stride, padding, dilation,
                           groups)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.eps = eps
        ctx.input_dtype = input.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_rows = weight.to(mean.dtype).reshape(1, weight.shape[0], -1)
        # (w - mean) * rstd again, in one fused pass: cheaper than keeping a weight-sized tensor alive until now.
        standardized = torch.addcmul((-mean * rstd).unsqueeze(1), weight_rows[0], rstd.unsqueeze(1))
        grad_input, grad_standardized, grad_bias = torch.ops.aten.convolution_backward(
            grad_output.to(x.dtype), x, standardized.view_as(weight).to(x.dtype),
            None if ctx.bias_dtype is None else [weight.shape[0]],
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_input, need_weight, need_bias and ctx.bias_dtype is not None],
        )
        grad_weight = None
        if need_weight:
            grad_rows = grad_standardized.to(mean.dtype).reshape(weight_rows.shape)
            grad_weight = torch.ops.aten.native_batch_norm_backward(
                grad_rows, weight_rows, None, None, None, mean, rstd, True, ctx.eps, [True, False, False])[0]
            grad_weight = grad_weight.view_as(weight).to(weight.dtype)
        if grad_input is not None:
            grad_input = grad_input.to(ctx.input_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class WSConv2d(nn.Conv2d):
    """A ``Conv2d`` whose filters are standardized on every forward pass.

    A subclass of ``nn.Conv2d`` with the same parameters, so a plain conv's state dict (e.g. ImageNet weights)
    loads into it unchanged, and ``convert_norms`` can swap it in with :meth:`from_conv`.

    In eval mode with no gradient flowing to the weight, the standardized weight is computed once and reused
    until the weight tensor changes (tracked through its version counter, which every in-place update such as
    an optimizer step or ``load_state_dict`` bumps) or the module returns to train mode: inference then costs
    exactly a plain convolution. :meth:`to_conv2d` folds the standardization into a plain ``nn.Conv2d`` for
    export.
    """

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self._cached_weight: Tensor | None = None
        self._cache_key: tuple | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, eps: float = 1e-6) -> "WSConv2d":
        """A ``WSConv2d`` sharing ``conv``'s settings and holding its parameters (same tensors, so an optimizer
        built before the swap still points at them).

        Built without running ``Conv2d.__init__``: that would initialise a throw-away weight (kaiming, even on the
        meta device), which was half of ``convert_norms(model, "gn_ws")``'s time on Mask R-CNN. The settings copied
        are the conv's declared constants plus the two attributes ``_ConvNd`` derives from them."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in (*nn.Conv2d.__constants__, "transposed", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        new.register_parameter("weight", conv.weight)
        new.register_parameter("bias", conv.bias)
        new.eps = eps
        new._cached_weight = new._cache_key = None
        new.train(conv.training)
        return new

    def standardized_weight(self) -> Tensor:
        """The weight the convolution actually uses."""
        use_cache = not self.training and not (torch.is_grad_enabled() and self.weight.requires_grad)
        if not use_cache:
            self._cached_weight = self._cache_key = None
            return standardize_weight(self.weight, self.eps)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device, self.eps)
        if self._cache_key != key:
            with torch.no_grad():
                self._cached_weight = standardize_weight(self.weight, self.eps)
            self._cache_key = key
        return self._cached_weight

    def train(self, mode: bool = True) -> "WSConv2d":
        self._cached_weight = self._cache_key = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        needs_graph = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if needs_graph and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            # Training: one node that saves what nn.Conv2d saves (see _WSConv2dFunction). String paddings and
            # padding modes other than zeros take the plain autograd path below.
            return _WSConv2dFunction.apply(x, self.weight, self.bias, self.eps, self.stride, self.padding,
                                           self.dilation, self.groups)
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """An equivalent plain ``nn.Conv2d`` with the standardization folded into its weight (for export)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight.copy_(standardize_weight(self.weight, self.eps))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
