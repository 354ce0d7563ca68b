"""SyncBatchNormPlugin: Lightning's LayerSync hook, with gnlightning's SyncBatchNorm."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from gnlightning.convert import convert_with_report, revert_sync_batchnorm
from gnlightning.lightning.compat import bases
from gnlightning.norm_spec import NormSpec

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(*bases("plugins.layer_sync.TorchSyncBatchNorm")):
    """Synchronise every BatchNorm across processes during ``fit``, on CPU (gloo) and GPU (NCCL) alike.

    Lightning's built-in ``sync_batchnorm=True`` uses ``torch.nn.SyncBatchNorm``, which refuses CPU tensors; this
    plugin uses ``gnlightning.SyncBatchNorm`` instead. Write it as::

        Trainer(strategy="ddp", plugins=[SyncBatchNormPlugin()])

    with or without ``sync_batchnorm=True`` (what many projects' DDP configs set): Lightning accepts a LayerSync
    plugin together with that flag only when it is a ``TorchSyncBatchNorm``, so this class derives from that one (of
    both Lightning namespaces) and replaces its apply/revert. Lightning calls :meth:`apply` inside each process after
    the process group exists, before DDP wraps the model and before ``configure_optimizers`` (parameters are handed
    over, not copied), and :meth:`revert` when fit ends. On a single device Lightning calls neither and BatchNorm stays as it is.

    Only BatchNorm layers are synchronised: frozen BN and GroupNorm layers have nothing to share.

    Args:
        sync_group_size: synchronise within consecutive blocks of this many ranks instead of the whole world
            (e.g. the GPUs of one node); ``None`` for all ranks.
    """

    def __init__(self, sync_group_size: int | None = None) -> None:
        self.spec = NormSpec("syncbn", sync_group_size=sync_group_size)  # checked now, not inside each process

    @property
    def sync_group_size(self) -> int | None:
        return self.spec.sync_group_size

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        converted, _ = convert_with_report(model, self.spec, only=(_BatchNorm,))
        return converted

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sync_group_size={self.sync_group_size})"
