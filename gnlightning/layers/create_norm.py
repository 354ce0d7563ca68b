"""One place that turns a norm name into a layer (timm's ``create_norm_layer`` idea).

Model builders, ``convert_norms`` and the configs all resolve norm names here, so an alias accepted in one place
is accepted everywhere and an unknown name fails the same way everywhere.
"""

from __future__ import annotations

import difflib
import re

import torch
from torch import nn

from gnlightning.layers.frozen_bn import FrozenBatchNorm2d
from gnlightning.layers.group_norm import resolve_num_groups
from gnlightning.layers.sync_batchnorm import SyncBatchNorm

__all__ = ["NORMS", "resolve_norm_name", "create_norm"]

NORMS = ("bn", "syncbn", "gn", "gn_ws", "frozen_bn", "ln", "in")

_ALIASES = {
    "bn": "bn", "batchnorm": "bn",
    "syncbn": "syncbn", "syncbatchnorm": "syncbn",
    "gn": "gn", "groupnorm": "gn",
    "gnws": "gn_ws", "groupnormws": "gn_ws",
    "frozenbn": "frozen_bn", "frozenbatchnorm": "frozen_bn",
    "ln": "ln", "layernorm": "ln",
    "in": "in", "instancenorm": "in",
}


def resolve_norm_name(norm: str) -> str:
    """Canonical name for ``norm``: case, ``_``, ``-``, ``+`` and spaces are ignored (``GN+WS`` -> ``gn_ws``)."""
    if not isinstance(norm, str):
        raise TypeError(f"norm must be a string, one of {', '.join(NORMS)}; got {norm!r} ({type(norm).__name__})")
    key = re.sub(r"[^a-z0-9]", "", norm.lower())
    if key not in _ALIASES:
        close = difflib.get_close_matches(key, _ALIASES, n=1, cutoff=0.6)
        guess = f"did you mean {_ALIASES[close[0]]!r}? " if close else ""
        raise ValueError(
            f"unknown norm {norm!r}; {guess}valid names are {', '.join(NORMS)} "
            "(case-insensitive; aliases such as BN, SyncBN, GN, GN+WS, FrozenBN, LN, IN are accepted)"
        )
    return _ALIASES[key]


def create_norm(
    norm: str,
    num_channels: int,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    strict: bool = False,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    bias: bool = True,
    track_running_stats: bool = True,
    process_group: torch.distributed.ProcessGroup | None = None,
    bn_class: type[nn.Module] = nn.BatchNorm2d,
    layer_name: str = "",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A fresh norm layer over ``num_channels`` channels (channels first, like every norm in timm).

    ``gn_ws`` gives the GroupNorm half of GN+WS; the WS half lives in the convolution (``WSConv2d``).
    ``momentum`` and ``track_running_stats`` concern the BatchNorm family only; ``affine`` and ``bias`` (a learnt
    shift, with ``affine``) all but frozen_bn (whose scale and shift are fixed buffers).
    ``layer_name`` only makes group-policy messages name the layer being built.
    """
    norm = resolve_norm_name(norm)
    factory = {"device": device, "dtype": dtype}
    # ``bias`` only when False, so torch versions predating the keyword still work with the default.
    no_bias = {} if bias else {"bias": False}
    batch_norm = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track_running_stats,
                  **no_bias}
    if norm == "bn":
        return bn_class(num_channels, **batch_norm, **factory)
    if norm == "syncbn":
        return SyncBatchNorm(num_channels, **batch_norm, process_group=process_group, **factory)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(num_channels, eps=eps, **factory)
    if norm == "ln":
        groups = 1
    elif norm == "in":
        groups = num_channels
    else:
        groups = resolve_num_groups(num_channels, num_groups, group_size, strict=strict, layer_name=layer_name)
    return nn.GroupNorm(groups, num_channels, eps=eps, affine=affine, **no_bias, **factory)
