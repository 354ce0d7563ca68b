"""PreciseBN: recompute BatchNorm's running statistics as a true average before validation.

With 1-2 images per device, BatchNorm's exponential moving average is dominated by the last few, very noisy,
batch statistics, and evaluation suffers even when training went fine. Averaging the statistics of many batches with
the final weights (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021; detectron2's PreciseBN hook) is the
cheapest way to rescue BN's eval statistics: no retraining, a few hundred forward passes without gradients.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning.distributed import all_reduce_sum, group_world_size
from gnlightning.lightning.compat import bases

__all__ = ["PreciseBN", "update_bn_stats"]

log = logging.getLogger("gnlightning")

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def default_forward(module: nn.Module, batch: Any) -> Any:
    """Feed a batch to the model: the first element of a tuple/list batch (inputs, targets...), else the batch."""
    return module(batch[0] if isinstance(batch, (list, tuple)) else batch)


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    batches: Any,
    num_batches: int,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    bn_layers: list[_BatchNorm] | None = None,
) -> int:
    """Set the running statistics of ``bn_layers`` (default: every BatchNorm in training mode with running
    statistics) to the average of their batch statistics over ``num_batches`` batches of ``batches``.

    Only those layers see training mode during the passes; everything else (dropout included) is in eval mode, and
    every module's mode, each layer's momentum and ``num_batches_tracked`` are restored afterwards. Under
    torch.distributed the averages are also averaged over all ranks (one collective), so every rank ends with
    identical buffers. Returns the number of batches used.
    """
    if bn_layers is None:
        bn_layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    if not bn_layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, {k: v.clone() for k, v in bn.state_dict().items() if k in _STATS}) for bn in bn_layers]
    used, completed = 0, False
    try:
        model.eval()
        for bn in bn_layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: batch statistics weighted equally
            bn.train()
        for batch in itertools.islice(batches, num_batches):
            forward(model, batch)
            used += 1
        completed = used > 0
    finally:
        for module, training in modes:
            module.training = training
        for bn, momentum, stats in saved:
            bn.momentum = momentum
            for name, value in stats.items():  # the statistics too if nothing was averaged, or on error
                if name == "num_batches_tracked" or not completed:
                    getattr(bn, name).copy_(value)
    if completed and group_world_size() > 1:
        flat = torch.cat([torch.cat([bn.running_mean, bn.running_var]) for bn in bn_layers]).float()
        all_reduce_sum(flat).div_(group_world_size())
        offset = 0
        for bn in bn_layers:
            for buffer in (bn.running_mean, bn.running_var):
                buffer.copy_(flat[offset: offset + buffer.numel()])
                offset += buffer.numel()
    return used


class PreciseBN(*bases("callbacks.Callback")):
    """Before validation, replace every BatchNorm's running statistics by their true average over ``num_batches``
    training batches (every ``every_n_epochs`` epochs, once per epoch, not during the sanity check).

    No gradients, no optimizer state, no dropout; modes and momenta restored (see :func:`update_bn_stats`).
    Under DDP, every rank runs the same number of batches of its own shard and the statistics are averaged over
    ranks. A model without BatchNorm (e.g. after a GN swap) gets one info line and nothing else.

    Args:
        num_batches: training batches to average over (the average over fewer if the loader is shorter).
        every_n_epochs: run before the validations of every n-th epoch.
        forward: how to feed a batch to the LightningModule, ``forward(pl_module, batch)``; the default calls
            ``pl_module(batch[0])`` for tuple/list batches and ``pl_module(batch)`` otherwise.
    """

    def __init__(self, num_batches: int = 200, every_n_epochs: int = 1,
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        if num_batches < 1 or every_n_epochs < 1:
            raise ValueError(f"PreciseBN needs num_batches >= 1 and every_n_epochs >= 1, got num_batches="
                             f"{num_batches}, every_n_epochs={every_n_epochs}")
        self.num_batches = num_batches
        self.every_n_epochs = every_n_epochs
        self.forward = forward or default_forward
        self.last_epoch = -1
        self._bn_layers: list[_BatchNorm] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The BN layers that train are only known while training: by on_validation_start Lightning has put the
        # whole model in eval mode. One list comprehension per step is noise next to a forward pass.
        self._bn_layers = [m for m in pl_module.modules()
                           if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]

    def on_validation_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or epoch == self.last_epoch or (epoch + 1) % self.every_n_epochs:
            return
        self.last_epoch = epoch
        if not self._bn_layers:
            if trainer.is_global_zero:
                log.info("PreciseBN: the model has no BatchNorm layer in training mode; nothing to recompute")
            return
        loader = trainer.train_dataloader
        batches = (trainer.strategy.batch_to_device(batch) for batch in loader)
        used = update_bn_stats(pl_module, batches, self.num_batches, self.forward, self._bn_layers)
        if trainer.is_global_zero:
            log.info("PreciseBN: recomputed %d BatchNorm layers over %d batches", len(self._bn_layers), used)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]
