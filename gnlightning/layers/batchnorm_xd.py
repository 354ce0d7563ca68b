"""A BatchNorm that accepts any input rank, for when the original BatchNorm class is unknown."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from gnlightning.layers.optional_timm import timm_layers

if TYPE_CHECKING:
    from gnlightning.layers.norm_source import NormSource

__all__ = ["BatchNormXd", "PLAIN_BN", "batchnorm_from"]


class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, *) inputs of any rank.

    Reverting a SyncBatchNorm or converting a GroupNorm to BN loses which of BatchNorm1d/2d/3d the layer once was
    (GroupNorm never knew); choosing one would reject the inputs of the others, so this accepts them all, as
    Lightning's and mmcv's revert helpers do.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")


#: BatchNorm classes whose constructor is the standard one, so a reverted layer can be rebuilt as exactly that class.
PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormXd)


def batchnorm_from(source: NormSource, groups: int | None, eps: float, process_group: Any = None) -> nn.Module:
    """The trainable BatchNorm that replaces ``source``: the BatchNorm class it once was (a reverted SyncBN or frozen
    layer remembers it; ``BatchNormXd`` when nobody knows), or timm's BatchNormAct2d for a fused norm+act source."""
    if source.fused:
        return timm_layers("a fused norm+act layer").BatchNormAct2d(
            source.channels, eps=eps, momentum=source.momentum, affine=source.affine,
            track_running_stats=source.track_running_stats, apply_act=False, **source.factory)
    return (source.bn_class or BatchNormXd)(source.channels, eps=eps, momentum=source.momentum, affine=source.affine,
                                           track_running_stats=source.track_running_stats, **source.no_bias,
                                           **source.factory)
