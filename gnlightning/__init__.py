"""gnlightning: normalization layers for training with 1-4 images per device.

``convert_norms`` and the layers need only PyTorch; the Lightning pieces (``NormSwap``, ``PreciseBN``,
``NormAdvisor``, ``SyncBatchNormPlugin``, ``AtomicCheckpointIO``) are imported on first use, so a user of
``convert_norms`` on a plain nn.Module never imports Lightning.

Importing the package sets up the ``"gnlightning"`` logger (see :mod:`gnlightning.log`): INFO lines are shown, once,
by global rank 0, through the app's own logging configuration if it has one and formatted on stderr otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

from gnlightning.convert import convert_norms, describe_norms, revert_sync_batchnorm
from gnlightning.export import prepare_for_export
from gnlightning.layers import FrozenBatchNorm2d, SyncBatchNorm, WSConv2d, create_norm, get_norm_layer
from gnlightning.log import install as _install_logging
from gnlightning.norm_spec import NormSpec

_install_logging()  # every entry point imports this package first; nothing above logs at import

__version__ = "0.1.0"

_LAZY = {
    "NormSwap": "gnlightning.lightning.norm_swap",
    "PreciseBN": "gnlightning.lightning.precise_bn",
    "NormAdvisor": "gnlightning.lightning.norm_advisor",
    "SyncBatchNormPlugin": "gnlightning.lightning.layer_sync",
    "AtomicCheckpointIO": "gnlightning.lightning.checkpoint_io",
}

__all__ = [
    "convert_norms", "create_norm", "describe_norms", "get_norm_layer", "prepare_for_export", "revert_sync_batchnorm",
    "FrozenBatchNorm2d", "NormSpec", "SyncBatchNorm", "WSConv2d",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gnlightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
