"""The norms gnlightning knows, as one table: name -> layer class, how to build one, and how to build one in place
of an existing norm layer (timm's create_norm idea; each family's converter lives next to its layer class).

Everything that needs to know "which norms exist" or "is this module a norm" reads this table: ``create_norm`` and
``get_norm_layer`` build from it, ``convert_norms`` plans with it, and the Lightning callbacks, the optimizer's
weight-decay split and the export checks ask :func:`norm_kind` / :func:`is_norm`. Adding a norm is one
:class:`NormEntry` in :data:`REGISTRY`; a batch-independent one needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning.layers.batchnorm_xd import batchnorm_from
from gnlightning.layers.frozen_bn import FrozenBatchNorm2d
from gnlightning.layers.group_norm import group_norm_from
from gnlightning.layers.norm_source import NormSource
from gnlightning.layers.optional_timm import timm_layers
from gnlightning.layers.sync_batchnorm import SyncBatchNorm

__all__ = ["NormEntry", "LayerOptions", "REGISTRY", "NORMS", "norm_kind", "is_norm", "updates_running_stats",
           "timm_layers"]


@dataclass(frozen=True)
class LayerOptions:
    """What a builder may take from the caller or from the layer being replaced (each builder reads its part)."""

    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    process_group: Any = None
    bn_class: type[nn.Module] = nn.BatchNorm2d
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @property
    def factory(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype}

    @property
    def no_bias(self) -> dict[str, bool]:
        """``bias=False`` only when asked, so torch versions predating the keyword work with the default."""
        return {} if self.bias else {"bias": False}

    @property
    def batch_norm(self) -> dict[str, Any]:
        return {"eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats, **self.no_bias, **self.factory}


@dataclass(frozen=True)
class NormEntry:
    """One norm: how to build it over ``num_channels`` channels and how it groups them.

    ``groups``: ``"policy"`` (the GN family's group policy, see ``group_norm.resolve_num_groups``), ``"one"``
    (LayerNorm as GN with one group), ``"each"`` (InstanceNorm: one group per channel) or None (no groups).
    ``spatial_only``: the layer takes ``(N, C, H, W)`` input only (timm's EvoNorm / FRN), so 1-d and 3-d sources are
    skipped. ``always_affine``: it always learns a scale and shift, so a source without them cannot map onto it
    without gaining parameters. ``requires``: the extra that provides the layer class.
    ``convert(source, groups, eps, process_group)``: the layer that replaces the norm layer ``source`` (a
    :class:`NormSource`), before its parameters and statistics move in (``norm_source.finish``).
    """

    name: str
    build: Callable[[int, int | None, LayerOptions], nn.Module]
    layer: Callable[[], type[nn.Module]]
    convert: Callable[[NormSource, int | None, float, Any], nn.Module]
    aliases: tuple[str, ...] = ()
    groups: str | None = None
    batch_dependent: bool = False
    spatial_only: bool = False
    always_affine: bool = False
    requires: str | None = None


def _group_norm(num_channels: int, groups: int | None, options: LayerOptions) -> nn.Module:
    return nn.GroupNorm(groups, num_channels, eps=options.eps, affine=options.affine, **options.no_bias,
                        **options.factory)


def _evonorm_s0(num_channels: int, groups: int | None, options: LayerOptions) -> nn.Module:
    return timm_layers("evonorm_s0").EvoNorm2dS0(num_channels, groups=groups, eps=options.eps, **options.factory)


def _frn(num_channels: int, groups: int | None, options: LayerOptions) -> nn.Module:
    return timm_layers("frn").FilterResponseNormTlu2d(num_channels, eps=options.eps, **options.factory)


def _timm_from(build: Callable[[int, int | None, LayerOptions], nn.Module]):
    """timm's EvoNorm / FRN in place of a norm layer: only channels, groups, eps, device and dtype carry over (the
    planner skips sources these layers cannot stand in for)."""
    return lambda source, groups, eps, process_group=None: build(source.channels, groups,
                                                                 LayerOptions(eps=eps, **source.factory))


_GN = lambda: nn.GroupNorm  # noqa: E731  (the table's layer classes are looked up lazily, timm's need an import)

REGISTRY: dict[str, NormEntry] = {entry.name: entry for entry in (
    NormEntry("bn", lambda c, g, o: o.bn_class(c, **o.batch_norm), lambda: _BatchNorm, batchnorm_from,
              ("batchnorm",), batch_dependent=True),
    NormEntry("syncbn", lambda c, g, o: SyncBatchNorm(c, **o.batch_norm, process_group=o.process_group),
              lambda: SyncBatchNorm, SyncBatchNorm.from_source, ("syncbatchnorm",), batch_dependent=True),
    NormEntry("gn", _group_norm, _GN, group_norm_from, ("groupnorm",), groups="policy"),
    NormEntry("gn_ws", _group_norm, _GN, group_norm_from, ("gnws", "groupnormws"), groups="policy"),
    NormEntry("frozen_bn", lambda c, g, o: FrozenBatchNorm2d(c, eps=o.eps, **o.factory), lambda: FrozenBatchNorm2d,
              FrozenBatchNorm2d.from_source, ("frozenbn", "frozenbatchnorm")),
    NormEntry("ln", _group_norm, _GN, group_norm_from, ("layernorm",), groups="one"),
    NormEntry("in", _group_norm, _GN, group_norm_from, ("instancenorm",), groups="each"),
    NormEntry("evonorm_s0", _evonorm_s0, lambda: timm_layers("evonorm_s0").EvoNorm2dS0, _timm_from(_evonorm_s0),
              ("evonorms0", "evonorm"), groups="policy", spatial_only=True, always_affine=True, requires="timm"),
    NormEntry("frn", _frn, lambda: timm_layers("frn").FilterResponseNormTlu2d, _timm_from(_frn),
              ("filterresponsenorm", "frntlu"), spatial_only=True, always_affine=True, requires="timm"),
)}

NORMS = tuple(REGISTRY)


def _frozen_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (torchvision.ops.FrozenBatchNorm2d,)
    layers = timm_layers()
    if layers is not None and hasattr(layers, "FrozenBatchNormAct2d"):
        types += (layers.FrozenBatchNormAct2d,)  # timm freezes with torchvision's class, except for its fused one
    return types


def norm_kind(module: nn.Module) -> str | None:
    """The family of a normalization layer that ``convert_norms`` can replace: ``"bn"`` (any BatchNorm, SyncBN
    included), ``"frozen_bn"``, ``"gn"`` (GroupNorm, hence LN and IN as GN's ends), ``"evonorm_s0"`` or ``"frn"``;
    None for anything else.

    LayerNorm over the channel axis of each position (transformers, ConvNeXt's LayerNorm2d) is not the GN paper's LN
    (one group over C, H, W) and is not a kind here: convert_norms leaves it alone (see :func:`is_norm`)."""
    if isinstance(module, _BatchNorm):
        return "bn"
    if isinstance(module, _frozen_types()):
        return "frozen_bn"
    if isinstance(module, nn.GroupNorm):
        return "gn"
    layers = timm_layers()
    if layers is not None:
        for name in ("evonorm_s0", "frn"):
            if isinstance(module, REGISTRY[name].layer()):
                return name
    return None


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes activations: every :func:`norm_kind`, plus ``nn.LayerNorm`` (which
    convert_norms leaves alone but which, like every norm, e.g. takes no weight decay)."""
    return norm_kind(module) is not None or isinstance(module, nn.LayerNorm)


def updates_running_stats(module: nn.Module) -> bool:
    """A BatchNorm (SyncBN included) that, in its current mode, normalizes with batch statistics and folds them into
    its running statistics: what PreciseBN recomputes and NormAdvisor watches."""
    return isinstance(module, _BatchNorm) and module.training and module.track_running_stats
