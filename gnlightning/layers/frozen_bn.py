"""FrozenBatchNorm2d: a fixed affine map built from stored BatchNorm statistics.

Detection models fine-tune ImageNet backbones at 1-2 images per GPU, where batch statistics are noise; the
common answer (Detectron, torchvision's detection builders) is to freeze BN into ``y = x * scale + shift``.
The map is per channel, so the same layer freezes BatchNorm1d (``(N, C)`` features, ``(N, C, L)``) and BatchNorm3d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from gnlightning.layers.optional_timm import timm_layers

if TYPE_CHECKING:
    from gnlightning.layers.norm_source import NormSource

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (no parameters, never updated, same output in train and eval), plus a
    ``num_batches_tracked`` buffer.

    Why the subclass: with that buffer its state-dict keys are exactly those of ``nn.BatchNorm2d``, so a model
    converted ``bn -> frozen_bn`` saves and loads the same checkpoints as before, and the round trip
    ``bn -> frozen_bn -> bn`` keeps every value. Checkpoints written by torchvision's class (no such key) still
    load: the missing counter keeps its current value.

    Unlike torchvision's, it takes any ``(N, C, *)`` input (the affine map broadcasts over the trailing dims), so
    BatchNorm1d and BatchNorm3d freeze into it too.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__(num_features, eps)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        # Filled by from_source so that reverting restores the exact original layer: its class and the
        # constructor options that a frozen layer has no use for (a BatchNorm without affine, or without bias, must
        # come back without those parameters).
        self._source_class: type | None = None
        self._source_momentum: float | None = 0.1
        self._source_affine: bool = True
        self._source_bias: bool = True

    @classmethod
    def from_source(cls, source: NormSource, groups: int | None, eps: float, process_group: Any = None) -> nn.Module:
        """The frozen layer that replaces ``source`` (timm's FrozenBatchNormAct2d for a fused norm+act source),
        remembering the BatchNorm it froze for the way back."""
        if source.fused:
            layer = timm_layers("a fused norm+act layer").FrozenBatchNormAct2d(source.channels, eps=eps,
                                                                              apply_act=False, **source.factory)
        else:
            layer = cls(source.channels, eps=eps, **source.factory)
        layer._source_class, layer._source_momentum = source.bn_class, source.momentum
        layer._source_affine, layer._source_bias = source.affine, source.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects an (N, C, *) input, got shape {tuple(x.shape)}")
        # As torchvision's, except that the affine map is applied in the input's dtype: torchvision multiplies by a
        # float32 scale, which promotes bf16/fp16 activations under autocast to float32 (twice the memory for every
        # activation after a frozen layer). Scale and shift are still computed in the buffers' float32.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)

    @property
    def num_features(self) -> int:
        return self.weight.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone()
        # Skip torchvision's override (it drops the counter); load every buffer as nn.Module does.
        torch.nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
