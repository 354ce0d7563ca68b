"""How many groups a GroupNorm gets: the group policy of the GN family.

The GN paper uses 32 groups (or, equivalently for some widths, 16 channels per group); LayerNorm and
InstanceNorm are its two ends (one group; one group per channel). Real models contain widths that 32 does not
divide (e.g. 24 or 40 in MobileNet), so the policy must pick something sensible there, say what it picked, and
let strict users refuse instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from gnlightning.config_values import as_int, divisors
from gnlightning.layers.optional_timm import timm_layers

if TYPE_CHECKING:
    from gnlightning.layers.norm_source import NormSource

__all__ = ["resolve_num_groups", "divisors", "feature_groups", "degenerate_message", "GroupSizeCheck",
           "MIN_VALUES_PER_GROUP", "FEATURE_GROUP_SIZE", "positive_int", "group_norm_from"]

log = logging.getLogger(__name__)

#: Below this many values per group a GroupNorm erases much of what it sees: normalizing n values removes their mean
#: and scale, 2 of n degrees of freedom (2 values always come out as +-1; 1 value leaves only the bias).
MIN_VALUES_PER_GROUP = 8
#: Channels per group for ``(N, C)`` features, where each channel is one value: the GN paper's other default
#: spelling (16 channels per group) instead of 32 groups, which would leave 2 values per group at width 64.
FEATURE_GROUP_SIZE = 16


def resolve_num_groups(
    num_channels: int,
    num_groups: int | None = 32,
    group_size: int | None = None,
    strict: bool = False,
    layer_name: str = "",
) -> int:
    """Number of groups for a GroupNorm over ``num_channels`` channels.

    ``group_size`` (channels per group), when given, takes precedence over ``num_groups``. If the request does not
    divide the channel count, the largest divisor of ``num_channels`` not above the requested group count is used
    and logged; with ``strict=True`` a ValueError names the layer, its channel count and the valid choices.
    """
    if num_channels < 1:
        raise ValueError(f"GroupNorm needs at least one channel, got num_channels={num_channels} ({layer_name!r})")
    where = f"layer {layer_name!r} " if layer_name else ""
    if group_size is not None:
        group_size = positive_int(group_size, "group_size", "channels per group, e.g. group_size=16")
        requested, asked = max(1, num_channels // group_size), f"group_size={group_size}"
        exact = num_channels % group_size == 0
    else:
        num_groups = positive_int(num_groups, "num_groups", "groups per layer, e.g. num_groups=32 as in the GN paper")
        requested, asked = num_groups, f"num_groups={num_groups}"
        exact = num_channels % num_groups == 0
    if exact:
        return requested
    if strict:
        valid = divisors(num_channels)
        choice = (f"valid num_groups: {valid}" if group_size is None
                  else f"valid group_size: {[num_channels // d for d in reversed(valid)]}")
        raise ValueError(
            f"GroupNorm for {where}with {num_channels} channels cannot use {asked}: {num_channels} is not divisible "
            f"by {group_size if group_size is not None else num_groups}. "
            f"Choose one of the {choice}, or pass strict=False to use the nearest divisor."
        )
    chosen = max(d for d in divisors(num_channels) if d <= requested)
    log.info("GroupNorm for %swith %d channels: %s does not divide it, using %d groups",
             where, num_channels, asked, chosen)
    return chosen


def positive_int(value, option: str, meaning: str) -> int:
    """``value`` as an int, or an error naming the option, the value and an example (a float or a string from a
    config would otherwise fail later with an unrelated comparison error, or silently round)."""
    number = as_int(value)
    if number is None:
        raise TypeError(f"{option} must be a positive integer number of {meaning}; got {value!r} "
                        f"({type(value).__name__})")
    if number < 1:
        raise ValueError(f"{option} must be a positive integer number of {meaning}; got {value!r}")
    return number


def feature_groups(num_channels: int, num_groups: int | None = 32, group_size: int | None = None,
                   strict: bool = False, layer_name: str = "") -> int:
    """Groups for a GroupNorm over ``(N, C)`` features (one value per channel, e.g. after ``nn.Linear``).

    An explicit ``group_size`` is honoured; otherwise ``num_groups`` is an upper bound and groups get at least
    :data:`FEATURE_GROUP_SIZE` channels where the width allows (a narrower layer gets one group, LayerNorm)."""
    if group_size is not None:
        return resolve_num_groups(num_channels, None, group_size, strict=strict, layer_name=layer_name)
    requested = resolve_num_groups(num_channels, num_groups, None, strict=strict, layer_name=layer_name)
    cap = max(1, num_channels // FEATURE_GROUP_SIZE)
    if requested <= cap:
        return requested
    chosen = max(d for d in divisors(num_channels) if d <= cap)
    log.info("GroupNorm for layer %r over %d features (one value per channel): %d groups of %d channels instead of "
             "%d groups of %d values", layer_name, num_channels, chosen, num_channels // chosen, requested,
             num_channels // requested)
    return chosen


def degenerate_message(layer_name: str, values: int, num_groups: int, num_channels: int, shape: str) -> str:
    """What to tell a user whose GroupNorm normalizes ``values`` numbers per group (see MIN_VALUES_PER_GROUP)."""
    fewer = "fewer groups for it (num_groups=, group_size=, or norm='ln'), or " if num_groups > 1 else ""
    effect = ("its output is the bias alone, whatever the input" if values == 1 else
              "every output is +-1" if values == 2 else
              f"normalizing {values} values removes 2 of their {values} degrees of freedom")
    return (f"GroupNorm {layer_name!r} ({num_groups} groups over {num_channels} channels, input {shape}) normalizes "
            f"only {values} value(s) per group (fewer than {MIN_VALUES_PER_GROUP}): {effect}. Fix: {fewer}leave "
            f"it out with exclude=[{layer_name!r}] (it keeps its current norm)")


class GroupSizeCheck:
    """A forward pre-hook that checks, at a GroupNorm's (or EvoNorm-S0's) first call, how many values each group
    normalizes.

    Why a hook: for most converted layers that count depends on the input's spatial size, known only at run time
    (a GroupNorm after global pooling, or on BatchNorm1d's ``(N, C)`` input, sees one value per channel). It warns
    once, or raises with ``strict``, then removes itself, so later calls cost nothing. A module-level class rather
    than a closure, so that models holding it still pickle (spawned DDP workers, ``torch.save(model)``).
    """

    def __init__(self, layer_name: str, strict: bool = False) -> None:
        self.layer_name = layer_name
        self.strict = strict

    def __call__(self, module, args) -> None:
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is self:
                del module._forward_pre_hooks[key]
        x = args[0] if args else None
        if x is None or x.dim() < 2 or x.numel() == 0:
            return
        # nn.GroupNorm's names, else timm's EvoNorm-S0 (groups) or FRN (one group per channel, over H x W)
        channels = getattr(module, "num_channels", None) or module.weight.shape[0]
        groups = getattr(module, "num_groups", None) or getattr(module, "groups", None) or channels
        values = channels // groups
        for size in x.shape[2:]:
            values *= size
        if values < MIN_VALUES_PER_GROUP:
            message = degenerate_message(self.layer_name, values, groups, channels, f"shape {tuple(x.shape)}")
            if self.strict:
                raise ValueError(message + " (raised because strict=True)")
            log.warning(message)


def group_norm_from(source: NormSource, groups: int | None, eps: float, process_group: Any = None) -> nn.Module:
    """The GroupNorm with ``groups`` groups (LN: 1, IN: one per channel) that replaces ``source``, with or without
    its affine scale and shift as the source had them; timm's GroupNormAct for a fused norm+act source."""
    if source.fused:
        return timm_layers("a fused norm+act layer").GroupNormAct(source.channels, num_groups=groups, eps=eps,
                                                                  affine=source.affine, apply_act=False,
                                                                  **source.factory)
    return nn.GroupNorm(groups, source.channels, eps=eps, affine=source.affine, **source.no_bias, **source.factory)
