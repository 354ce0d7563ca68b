"""NormAdvisor: say so when BatchNorm is about to be trained on too few samples per normalisation."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from gnlightning.config_values import as_int
from gnlightning.distributed import group_world_size
from gnlightning.layers.registry import is_norm, norm_kind
from gnlightning.layers.sync_batchnorm import SyncBatchNorm
from gnlightning.lightning.compat import bases

if TYPE_CHECKING:  # either Lightning namespace's classes at run time (see compat)
    import lightning.pytorch as pl

__all__ = ["NormAdvisor", "per_device_batch_size", "synchronised_ranks"]

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


_SYNCED = (SyncBatchNorm, nn.SyncBatchNorm)


def synchronised_ranks(layer: nn.Module) -> int:
    """How many ranks' batches ``layer`` normalises over in training: the size of its process group for
    gnlightning's and torch's SyncBatchNorm (``process_group=None`` is the world), 1 for any other layer.

    It asks torch.distributed, not the Trainer: a SyncBN layer may sync over a sub-group (``group_size`` of
    SyncBatchNormPlugin / convert_norms), and without a process group both SyncBN classes normalise over the local
    batch alone, exactly like BatchNorm.
    """
    return group_world_size(layer.process_group) if isinstance(layer, _SYNCED) else 1


def _training_bn(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers that normalise by batch statistics during fit (the ones a small batch hurts)."""
    return [(name, m) for name, m in module.named_modules() if norm_kind(m) == "bn" and m.training]


def _has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class NormAdvisor(*bases("callbacks.Callback")):
    """Warn once, when fit starts training, if BatchNorm normalises over fewer than ``min_batch`` samples, naming
    that number and the fixes. Silent when everything is fine (no BN in training mode, or enough samples).

    The number is the batch each layer actually computes its statistics over: the per-device batch for BatchNorm,
    and the per-device batch times the ranks of the layer's process group for synchronised BN
    (``gnlightning.SyncBatchNorm``, ``torch.nn.SyncBatchNorm``) -- SyncBN over 2 processes x 2 images normalises
    over 4 samples, which is as noisy as BN on 4 images on one device.

    The fixes offered fit the model: ``norm=syncbn`` where devices are there to sync over, ``norm=gn_ws``
    (GroupNorm + Weight Standardization, independent of the batch) for models with ``nn.Conv2d`` layers, and
    ``norm=gn`` / ``norm=ln`` for models without (WS standardises convolution filters, so gn_ws would degrade to gn
    there with a warning), and PreciseBN for better eval statistics.

    With ``log_health=True`` it also logs, after every validation, two figures per model to the active logger:
    ``norm/bn_log_var_spread`` (standard deviation of log running variance over all BN channels: very large values
    mean some channels' statistics are off) and ``norm/dead_gamma_fraction`` (share of norm channels whose scale is
    below 1e-3).

    Args:
        min_batch: the smallest number of samples per normalisation deemed enough (16: the GroupNorm paper's
            ResNet-50 BN error is flat from 32 to 16 images per GPU and rises below).
        log_health: log the two health figures after every validation.
    """

    def __init__(self, min_batch: int = 16, log_health: bool = False) -> None:
        number = as_int(min_batch)
        if number is None or number < 1:
            raise ValueError(f"NormAdvisor(min_batch={min_batch!r}): min_batch must be a positive integer number of "
                             "samples per normalisation, e.g. min_batch=16")
        if not isinstance(log_health, bool):
            raise TypeError(f"NormAdvisor(log_health={log_health!r}): log_health must be True or False")
        self.min_batch = number
        self.log_health = log_health
        self._warned = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # the train dataloader exists from here on
        if self._warned:
            return
        layers = _training_bn(pl_module)
        batch_size = per_device_batch_size(trainer.train_dataloader) if layers else None
        if batch_size is None:
            return
        # the layers whose normalisation batch is too small, by the number of ranks they sync over
        small: dict[int, list[str]] = {}
        for name, layer in layers:
            ranks = synchronised_ranks(layer)
            if batch_size * ranks < self.min_batch:
                small.setdefault(ranks, []).append(name)
        if not small:
            return
        self._warned = True
        if trainer.is_global_zero:
            log.warning(self._message(small, batch_size, trainer.world_size, _has_conv2d(pl_module)))

    def _message(self, small: dict[int, list[str]], batch_size: int, devices: int, has_conv: bool) -> str:
        findings = []
        for ranks, names in sorted(small.items()):
            which = f"{len(names)} BatchNorm layers (e.g. {names[0]!r})"
            if ranks == 1:  # plain BN, or SyncBN with nobody to sync with (it then is plain BN)
                findings.append(f"{which} train unsynchronised on {batch_size} samples per device")
            else:
                findings.append(f"{which} train synchronised over {ranks} processes x {batch_size} samples per "
                                f"device = {ranks * batch_size} samples")
        narrowest = min(small)
        fixes = []
        if devices > narrowest:
            fixes.append(f"norm=syncbn (SyncBatchNormPlugin()) over all {devices} devices: "
                         f"{batch_size * devices} samples")
        fixes.append(f"a per-device batch of at least {math.ceil(self.min_batch / narrowest)}")
        if has_conv:
            fixes.append("norm=gn_ws (NormSwap('gn_ws')): GroupNorm + Weight Standardization, independent of the batch")
        else:
            fixes.append("norm=gn or norm=ln (NormSwap('gn') / NormSwap('ln')): statistics per sample, independent "
                         "of the batch (Weight Standardization, the other half of GN+WS, needs Conv2d layers, and this "
                         "model has none)")
        fixes.append("PreciseBN(): recompute the running statistics over many batches before validation")
        return (f"NormAdvisor: {'; '.join(findings)} (fewer than min_batch={self.min_batch}); their batch statistics "
                "are noisy and eval accuracy suffers. Fixes: " + "; ".join(fixes))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        if norm_kind(m) == "bn" and m.running_var is not None:
            variances.append(m.running_var.float().clamp_min(1e-12).log())
        weight = getattr(m, "weight", None)
        if is_norm(m) and isinstance(weight, torch.Tensor):
            gammas.append(weight.detach().float().abs())
    figures = {}
    if variances:
        figures["norm/bn_log_var_spread"] = torch.cat(variances).std().item() if sum(map(len, variances)) > 1 else 0.0
    if gammas:
        figures["norm/dead_gamma_fraction"] = (torch.cat(gammas) < 1e-3).float().mean().item()
    return {k: v for k, v in figures.items() if math.isfinite(v)}
