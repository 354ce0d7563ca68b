"""SyncBatchNorm fused with an activation, for timm models built from norm+act layers.

timm's own ``SyncBatchNormAct`` subclasses ``torch.nn.SyncBatchNorm`` and so inherits its CPU refusal; this
is the same layer on top of gnlightning's SyncBatchNorm. The other fused targets are timm's own classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from gnlightning.layers.sync_batchnorm import SyncBatchNorm

__all__ = ["SyncBatchNormAct"]


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm -> drop -> act, with timm's ``act`` / ``drop`` attribute names (so weights and the
    activation carried over from a timm ``BatchNormAct2d`` keep their names)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))
