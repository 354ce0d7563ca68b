"""Norm names to layers: the name resolution and the two factories on top of the registry (timm's
``create_norm_layer`` / ``get_norm_layer`` idea).

Model builders, ``convert_norms`` and the configs all resolve norm names here, so an alias accepted in one place
is accepted everywhere and an unknown name fails the same way everywhere.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Callable

import torch
from torch import nn

from gnlightning.layers.group_norm import resolve_num_groups
from gnlightning.layers.registry import NORMS, REGISTRY, LayerOptions, NormEntry

__all__ = ["NORMS", "resolve_norm_name", "create_norm", "get_norm_layer", "entry_groups"]

_ALIASES = {alias: entry.name for entry in REGISTRY.values()
            for alias in (re.sub(r"[^a-z0-9]", "", entry.name), *entry.aliases)}


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
            "(case-insensitive; aliases such as BN, SyncBN, GN, GN+WS, FrozenBN, LN, IN, FRN are accepted)"
        )
    return _ALIASES[key]


def entry_groups(entry: NormEntry, num_channels: int, num_groups: int | None, group_size: int | None,
                 strict: bool, layer_name: str, policy: Callable[..., int] = resolve_num_groups) -> int | None:
    """The group count ``entry`` gets over ``num_channels`` channels (None for norms without groups); ``policy``
    resolves the GN family's request (convert_norms passes a stricter one for ``(N, C)`` features)."""
    if entry.groups == "one":
        return 1
    if entry.groups == "each":
        return num_channels
    if entry.groups == "policy":
        return policy(num_channels, num_groups, group_size, strict=strict, layer_name=layer_name)
    return None


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
    shift, with ``affine``) the BatchNorm and GroupNorm families (frozen_bn's scale and shift are fixed buffers;
    evonorm_s0 and frn always learn theirs, so asking them for no affine is an error).
    ``layer_name`` only makes group-policy messages name the layer being built.
    """
    entry = REGISTRY[resolve_norm_name(norm)]
    if entry.always_affine and not (affine and bias):
        raise ValueError(f"{entry.name} always learns a per-channel scale and shift; affine=False or bias=False "
                         f"cannot be honoured ({layer_name or 'create_norm'}): use gn or ln for a norm without them")
    groups = entry_groups(entry, num_channels, num_groups, group_size, strict, layer_name)
    options = LayerOptions(eps=eps, momentum=momentum, affine=affine, bias=bias,
                           track_running_stats=track_running_stats, process_group=process_group, bn_class=bn_class,
                           device=device, dtype=dtype)
    return entry.build(num_channels, groups, options)


def get_norm_layer(norm: str, **options: Any) -> Callable[[int], nn.Module]:
    """A ``norm_layer=`` argument for model constructors (torchvision's and timm's take a callable of the channel
    count): ``resnet50(norm_layer=get_norm_layer("gn", num_groups=32))``. ``options`` are create_norm's keywords,
    checked now, so a typo fails here rather than inside the model's constructor."""
    name = resolve_norm_name(norm)
    unknown = set(options) - set(create_norm.__kwdefaults__)
    if unknown:
        raise TypeError(f"get_norm_layer({norm!r}): unknown option(s) {sorted(unknown)}; valid: "
                        f"{sorted(create_norm.__kwdefaults__)}")
    return functools.partial(create_norm, name, **options)
