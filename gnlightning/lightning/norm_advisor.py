"""NormAdvisor: say so when BatchNorm is about to be trained on too few samples per device."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning.layers.sync_batchnorm import SyncBatchNorm
from gnlightning.lightning.compat import bases

__all__ = ["NormAdvisor", "per_device_batch_size"]

log = logging.getLogger("gnlightning")


def per_device_batch_size(loader: Any) -> int | None:
    """The batch size of a DataLoader (or of the first of several), None when it cannot be told."""
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    flattened = getattr(loader, "flattened", None)  # Lightning's CombinedLoader
    if flattened:
        loader = flattened[0]
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:
        batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return batch_size


def _unsynced_bn(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm))
            and m.training and m.track_running_stats]


class NormAdvisor(*bases("callbacks.Callback")):
    """Warn once, when fit starts training, if unsynchronised BatchNorm trains on fewer than ``min_batch`` samples per
    device, naming the batch size and the fixes (``norm=syncbn`` across devices, ``norm=gn_ws``, or PreciseBN).
    Silent when everything is fine (no BN, synchronised BN over a large enough total batch, or a large per-device
    batch).

    With ``log_health=True`` it also logs, after every validation, two figures per model to the active logger:
    ``norm/bn_log_var_spread`` (standard deviation of log running variance over all BN channels: very large values
    mean some channels' statistics are off) and ``norm/dead_gamma_fraction`` (share of norm channels whose scale is
    below 1e-3).
    """

    def __init__(self, min_batch: int = 16, log_health: bool = False) -> None:
        self.min_batch = min_batch
        self.log_health = log_health
        self._warned = False

    def on_train_start(self, trainer, pl_module) -> None:  # the train dataloader exists from here on
        names = _unsynced_bn(pl_module)
        if not names or self._warned:
            return
        batch_size = per_device_batch_size(trainer.train_dataloader)
        if batch_size is None or batch_size >= self.min_batch:
            return
        devices = trainer.world_size
        fixes = ["norm=gn_ws (NormSwap('gn_ws')): GroupNorm + Weight Standardization, independent of the batch"]
        if devices > 1:
            fixes.insert(0, f"norm=syncbn (SyncBatchNormPlugin()): statistics over all {devices} devices, "
                            f"{batch_size * devices} samples")
        fixes.append("PreciseBN(): recompute the running statistics over many batches before validation")
        message = (f"NormAdvisor: {len(names)} BatchNorm layers (e.g. {names[0]!r}) train unsynchronised on "
                   f"{batch_size} samples per device (fewer than {self.min_batch}); their batch statistics are noisy "
                   "and eval accuracy suffers. Fixes: " + "; ".join(fixes))
        self._warned = True
        if trainer.is_global_zero:
            log.warning(message)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.log_health or trainer.sanity_checking or not trainer.loggers:
            return
        figures = health(pl_module)
        if figures and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)


@torch.no_grad()
def health(module: nn.Module) -> dict[str, float]:
    """The figures NormAdvisor logs (see the class docstring)."""
    variances, gammas = [], []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.running_var is not None:
            variances.append(m.running_var.float().clamp_min(1e-12).log())
        weight = getattr(m, "weight", None)
        if isinstance(m, (_BatchNorm, nn.GroupNorm)) and isinstance(weight, torch.Tensor):
            gammas.append(weight.detach().float().abs())
    figures = {}
    if variances:
        figures["norm/bn_log_var_spread"] = torch.cat(variances).std().item() if sum(map(len, variances)) > 1 else 0.0
    if gammas:
        figures["norm/dead_gamma_fraction"] = (torch.cat(gammas) < 1e-3).float().mean().item()
    return {k: v for k, v in figures.items() if math.isfinite(v)}
