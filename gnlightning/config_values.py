"""Strict reading of integer options that arrive from configs.

Why a module of its own: group sizes and group counts reach the layers from Hydra configs, the command line and
Python alike, as ints, numpy or OmegaConf integers -- or by mistake as floats, strings or booleans. Each option
that needs an integer must accept the first kind and reject the second the same way; this is the one place that
decides which is which. It imports nothing from the package, so layers/ and distributed.py can both use it.
"""

from __future__ import annotations

import operator

__all__ = ["as_int", "divisors"]


def as_int(value: object) -> int | None:
    """``value`` as a plain int if it is an integer of any kind, else ``None``.

    ``operator.index`` accepts exactly the types that promise to be integers (int, numpy and OmegaConf integer
    nodes) and refuses floats and strings, which would otherwise round silently or fail later in an unrelated
    comparison. ``bool`` is an int subclass, but ``group_size=True`` is always a mistake, so it is refused too.
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def divisors(n: int) -> list[int]:
    """The sizes that divide ``n`` evenly: the valid choices error messages list for group counts, channels per
    group and ranks per SyncBN group."""
    return [d for d in range(1, n + 1) if n % d == 0]
