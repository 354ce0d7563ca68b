"""How many groups a GroupNorm gets: the group policy of the GN family.

The GN paper uses 32 groups (or, equivalently for some widths, 16 channels per group); LayerNorm and
InstanceNorm are its two ends (one group; one group per channel). Real models contain widths that 32 does not
divide (e.g. 24 or 40 in MobileNet), so the policy must pick something sensible there, say what it picked, and
let strict users refuse instead.
"""

from __future__ import annotations

import logging

from gnlightning.config_values import as_int

__all__ = ["resolve_num_groups", "divisors"]

log = logging.getLogger(__name__)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
        group_size = _positive_int(group_size, "group_size", "channels per group, e.g. group_size=16")
        requested, asked = max(1, num_channels // group_size), f"group_size={group_size}"
        exact = num_channels % group_size == 0
    else:
        num_groups = _positive_int(num_groups, "num_groups", "groups per layer, e.g. num_groups=32 as in the GN paper")
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


def _positive_int(value, option: str, meaning: str) -> int:
    """``value`` as an int, or an error naming the option, the value and an example (a float or a string from a
    config would otherwise fail later with an unrelated comparison error, or silently round)."""
    number = as_int(value)
    if number is None:
        raise TypeError(f"{option} must be a positive integer number of {meaning}; got {value!r} "
                        f"({type(value).__name__})")
    if number < 1:
        raise ValueError(f"{option} must be a positive integer number of {meaning}; got {value!r}")
    return number
