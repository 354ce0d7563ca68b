"""Normalization layers and the pieces that choose them. Pure PyTorch: nothing here imports Lightning or Hydra."""

from gnlightning.layers.batchnorm_xd import BatchNormXd
from gnlightning.layers.create_norm import NORMS, create_norm, get_norm_layer, resolve_norm_name
from gnlightning.layers.frozen_bn import FrozenBatchNorm2d
from gnlightning.layers.group_norm import resolve_num_groups
from gnlightning.layers.registry import REGISTRY, is_norm, norm_kind
from gnlightning.layers.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct
from gnlightning.layers.ws_conv import WSConv2d, standardize_weight

__all__ = [
    "BatchNormXd", "FrozenBatchNorm2d", "NORMS", "REGISTRY", "SyncBatchNorm", "SyncBatchNormAct", "WSConv2d",
    "create_norm", "get_norm_layer", "is_norm", "norm_kind", "resolve_norm_name", "resolve_num_groups",
    "standardize_weight",
]
