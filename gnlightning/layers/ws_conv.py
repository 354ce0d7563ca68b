"""Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", 2019).

GroupNorm alone trails large-batch BatchNorm by about half a point on ImageNet; standardizing every conv filter
(zero mean, unit variance over in_channels x kH x kW) smooths the loss landscape and closes that gap without
touching the batch dimension, so it keeps GN's independence from the per-device batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WSConv2d", "standardize_weight"]


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """Standardize each output filter of a conv weight ``[out, in/groups, kH, kW]``.

    Moments are taken in float32 whatever the weight's dtype (a half-precision variance of a few hundred
    small values underflows), and ``eps`` sits inside the square root as in timm's ``StdConv2d``.
    """
    flat = weight.float().flatten(1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight).to(weight.dtype)


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
        built before the swap still points at them)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            eps=eps, device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
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
