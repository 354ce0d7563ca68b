"""A BatchNorm that accepts any input rank, for when the original BatchNorm class is unknown."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BatchNormXd"]


class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, *) inputs of any rank.

    Reverting a SyncBatchNorm or converting a GroupNorm to BN loses which of BatchNorm1d/2d/3d the layer once was
    (GroupNorm never knew); choosing one would reject the inputs of the others, so this accepts them all, as
    Lightning's and mmcv's revert helpers do.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")
