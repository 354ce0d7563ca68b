"""timm as an optional dependency: its layers are needed only for the norms and fused layers it provides."""

from __future__ import annotations

import sys

__all__ = ["timm_layers"]


def timm_layers(required_by: str | None = None):
    """timm's layers module. With ``required_by``, imports it (or says which extra to install); without, returns it
    only if timm is already imported (a model holding timm layers has imported it), else None: recognising layers
    must not import timm, which is slow and optional."""
    if required_by is None and "timm" not in sys.modules:
        return None
    try:
        import timm.layers
    except ImportError as error:
        raise ImportError(f"norm {required_by!r} uses timm's layer; install it with pip install 'gnlightning[timm]'"
                          ) from error
    return timm.layers
