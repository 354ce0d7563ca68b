"""What a conversion reads off the layer it replaces, and how that layer's state moves into the new one.

Each layer family builds its replacement for a :class:`NormSource` next to its own class
(``SyncBatchNorm.from_source``, ``FrozenBatchNorm2d.from_source``, ``batchnorm_from``, ``group_norm_from``; the
registry names them per norm); :func:`finish` then does what every family shares: the fused activation, the
parameters and statistics, the train/eval mode. ``convert_norms`` only plans which layer gets which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gnlightning.layers.batchnorm_xd import PLAIN_BN

__all__ = ["NormSource", "finish", "carry_state", "has_act", "STATS"]

_AFFINE = ("weight", "bias")
#: A BatchNorm's running statistics (buffers).
STATS = ("running_mean", "running_var", "num_batches_tracked")


def has_act(module: nn.Module) -> bool:
    """timm's fused norm+act layers carry their activation and dropout as ``act`` and ``drop`` children."""
    return isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module)


@dataclass
class NormSource:
    """What a target layer needs to know about the layer it replaces (``kind`` as ``registry.norm_kind`` says).

    ``bn_class``: the BatchNorm class to come back to (a converted SyncBN or frozen layer remembers it);
    ``affine`` / ``bias`` / ``momentum`` of a frozen layer are those of the BatchNorm it froze, so that
    ``bn -> frozen_bn -> bn`` gains and loses nothing."""

    name: str
    module: nn.Module
    kind: str
    channels: int
    eps: float
    affine: bool
    bias: bool
    momentum: float | None
    track_running_stats: bool
    bn_class: type[nn.Module] | None
    groups: int | None

    @classmethod
    def read(cls, name: str, module: nn.Module, kind: str) -> "NormSource":
        bias = getattr(module, "bias", None) is not None
        if kind in ("evonorm_s0", "frn"):  # timm's layers: always a weight and a bias, no statistics
            return cls(name, module, kind, module.weight.shape[0], module.eps, True, True, 0.1, True, nn.BatchNorm2d,
                       getattr(module, "groups", None))
        if kind == "gn":
            return cls(name, module, kind, module.num_channels, module.eps, module.affine, bias, 0.1, True, None,
                       module.num_groups)
        if kind == "frozen_bn":  # a frozen layer always holds weight and bias buffers; the source may not have
            return cls(name, module, kind, module.weight.shape[0], module.eps,
                       getattr(module, "_source_affine", True), getattr(module, "_source_bias", True),
                       getattr(module, "_source_momentum", 0.1), True, getattr(module, "_source_class", None), None)
        bn_class = type(module) if type(module) in PLAIN_BN else getattr(module, "_source_class", None)
        return cls(name, module, kind, module.num_features, module.eps, module.affine, bias, module.momentum,
                   module.track_running_stats, bn_class, None)

    @property
    def fused(self) -> bool:
        return has_act(self.module)

    @property
    def factory(self) -> dict[str, Any]:
        """``device`` and ``dtype`` of the layer's tensors, to build the new one alike."""
        for tensor in (*self.module.parameters(recurse=False), *self.module.buffers(recurse=False)):
            if tensor.is_floating_point():
                return {"device": tensor.device, "dtype": tensor.dtype}
        return {"device": None, "dtype": None}

    @property
    def no_bias(self) -> dict[str, bool]:
        """``bias=False`` only when the source has none, so torch versions predating the keyword work."""
        return {} if self.bias else {"bias": False}


def finish(source: NormSource, new: nn.Module) -> nn.Module:
    """Give ``new`` the source's fused activation and dropout, its parameters and statistics, and its mode."""
    if source.fused:
        new.act, new.drop = source.module.act, source.module.drop
    carry_state(source.module, new)
    return new.train(source.module.training)


def carry_state(old: nn.Module, new: nn.Module) -> None:
    """Move affine values and running statistics from ``old`` to ``new``.

    Trainable -> trainable hands over the Parameter objects themselves (keeping requires_grad and any optimizer
    reference), and buffers are handed over too; frozen <-> trainable copies values between buffers and fresh
    Parameters."""
    with torch.no_grad():
        for name in _AFFINE:
            value = getattr(old, name, None)
            if value is None:
                continue
            if new._parameters.get(name) is not None:
                if isinstance(value, nn.Parameter):
                    setattr(new, name, value)
                else:
                    setattr(new, name, nn.Parameter(value.detach().clone().to(new._parameters[name])))
            elif new._buffers.get(name) is not None:
                new._buffers[name].copy_(value)
        for name in STATS:
            value = getattr(old, name, None)
            if isinstance(value, torch.Tensor) and new._buffers.get(name) is not None:
                new._buffers[name] = value
