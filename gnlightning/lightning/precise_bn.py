"""PreciseBN: recompute BatchNorm's running statistics as a true average before validation.

With 1-2 images per device, BatchNorm's exponential moving average is dominated by the last few, very noisy,
batch statistics, and evaluation suffers even when training went fine. Averaging the statistics of many batches with
the final weights (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021; detectron2's PreciseBN hook) is the
cheapest way to rescue BN's eval statistics: no retraining, a few hundred forward passes without gradients.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from gnlightning.config_values import as_int
from gnlightning.distributed import all_reduce_sum, group_world_size
from gnlightning.layers.norm_source import STATS
from gnlightning.layers.registry import updates_running_stats
from gnlightning.lightning.compat import bases

if TYPE_CHECKING:  # either Lightning namespace's classes at run time (see compat)
    import lightning.pytorch as pl

__all__ = ["PreciseBN", "overrides_forward", "update_bn_stats"]

log = logging.getLogger("gnlightning")


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
        bn_layers = [m for m in model.modules() if updates_running_stats(m)]
    if not bn_layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, {k: v.clone() for k, v in bn.state_dict().items() if k in STATS}) for bn in bn_layers]
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


def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines ``forward`` itself. The ``forward`` that LightningModule (of either
    namespace) and nn.Module provide only raises, and many projects never write one: they call ``self.net(x)`` in
    ``training_step``."""
    inherited = {nn.Module.forward, *(base.forward for base in bases("core.LightningModule"))}
    return type(module).forward not in inherited


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log`` / ``self.log_dict`` while PreciseBN replays ``training_step``."""


@contextlib.contextmanager
def _training_step_side_effects_undone(pl_module: nn.Module):
    """Keep a ``training_step`` replayed outside the training loop from leaving traces in what the run reports.

    ``self.log`` / ``self.log_dict`` become no-ops: called from a callback hook, Lightning's ``log`` does not raise
    but records the value under the hook being run, so the replayed batches would overwrite the logged training
    loss (``trainer.callback_metrics``, the loggers). torchmetrics ``Metric`` states updated in ``training_step``
    (``self.train_acc(preds, y)``) are put back afterwards, so the epoch's training metrics count training batches
    only. Any other side effect of the user's ``training_step`` (a list of losses it appends to, counters) happens.
    """
    patched = ("log", "log_dict")
    own = {name: pl_module.__dict__[name] for name in patched if name in pl_module.__dict__}
    for name in patched:
        object.__setattr__(pl_module, name, _ignore_log)  # an instance attribute hides the method
    metrics = _metric_states(pl_module)
    try:
        yield
    finally:
        for name in patched:
            if name in own:
                object.__setattr__(pl_module, name, own[name])
            else:
                del pl_module.__dict__[name]
        for metric, state in metrics:
            for name, value in state.items():
                setattr(metric, name, value)


def _metric_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """A copy of the state of every torchmetrics Metric in ``module``, to be set back with setattr."""
    try:
        from torchmetrics import Metric
    except ImportError:  # no torchmetrics, no Metric to protect
        return []
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state = {name: _copy_state(value) for name, value in metric.metric_state.items()}
            for name in ("_update_count", "_computed", "_forward_cache"):  # what update / forward also change
                if hasattr(metric, name):
                    state[name] = _copy_state(getattr(metric, name))
            saved.append((metric, state))
    return saved


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):  # "cat" states: lists of per-batch tensors, appended to in place
        return [_copy_state(item) for item in value]
    return value


class PreciseBN(*bases("callbacks.Callback")):
    """Before validation, replace every BatchNorm's running statistics by their true average over ``num_batches``
    training batches (every ``every_n_epochs`` epochs, once per epoch, during fit, not during the sanity check).

    No gradients, no optimizer state, no dropout; modes and momenta restored (see :func:`update_bn_stats`).
    Under DDP, every rank runs the same number of batches of its own shard and the statistics are averaged over
    ranks. A model without BatchNorm (e.g. after a GN swap) gets one info line and nothing else.

    How a batch reaches the model, by default:

    * a LightningModule that defines ``forward`` gets ``pl_module(batch[0])`` for tuple/list batches and
      ``pl_module(batch)`` otherwise;
    * one that does not (common: ``training_step`` calls ``self.net(x)``) has its own ``training_step`` replayed,
      as Lightning's StochasticWeightAveraging recomputes BN statistics with the training loop's forward pass:
      batches prepared as the training loop prepares them (precision plugin, batch-transfer hooks), under the
      precision plugin's training context and ``torch.no_grad``. The loss is discarded: nothing is backpropagated,
      no optimizer is touched, ``self.log`` / ``self.log_dict`` are no-ops meanwhile and torchmetrics states are
      restored afterwards (see :func:`_training_step_side_effects_undone`). A module with manual optimization
      (its ``training_step`` steps optimizers) or a ``dataloader_iter`` ``training_step`` cannot be replayed
      safely: fit then stops before training, asking for ``forward=``.

    Args:
        num_batches: training batches to average over (the average over fewer if the loader is shorter).
        every_n_epochs: run before the validations of every n-th epoch.
        forward: how to feed a batch to the LightningModule, ``forward(pl_module, batch)``, called under
            ``torch.no_grad``; overrides both defaults above, e.g.
            ``PreciseBN(forward=lambda module, batch: module.net(batch["image"]))``.
    """

    def __init__(self, num_batches: int = 200, every_n_epochs: int = 1,
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        counts = {"num_batches": as_int(num_batches), "every_n_epochs": as_int(every_n_epochs)}
        if any(count is None or count < 1 for count in counts.values()):
            raise ValueError(f"PreciseBN needs num_batches >= 1 and every_n_epochs >= 1 (integers), got num_batches="
                             f"{num_batches!r}, every_n_epochs={every_n_epochs!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"PreciseBN(forward={forward!r}): forward must be a function forward(pl_module, batch) "
                            "that feeds one training batch to the model, or None for the default")
        self.num_batches = counts["num_batches"]
        self.every_n_epochs = counts["every_n_epochs"]
        self.forward = forward
        self.last_epoch = -1
        self._bn_layers: list[_BatchNorm] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.forward is None and not overrides_forward(pl_module):
            _check_replayable(pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The BN layers that train are only known while training: by on_validation_start Lightning has put the
        # whole model in eval mode. One list comprehension per step is noise next to a forward pass.
        self._bn_layers = [m for m in pl_module.modules() if updates_running_stats(m)]

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (trainer.sanity_checking or trainer.state.fn != "fit" or epoch == self.last_epoch
                or (epoch + 1) % self.every_n_epochs):
            return
        self.last_epoch = epoch
        if not self._bn_layers:
            if trainer.is_global_zero:
                log.info("PreciseBN: the model has no BatchNorm layer in training mode; nothing to recompute")
            return
        loader = trainer.train_dataloader
        if self.forward is not None or overrides_forward(pl_module):
            batches = (trainer.strategy.batch_to_device(batch) for batch in loader)
            used = update_bn_stats(pl_module, batches, self.num_batches, self.forward or default_forward,
                                   self._bn_layers)
        else:
            with _training_step_side_effects_undone(pl_module):
                used = update_bn_stats(pl_module, _training_batches(trainer, pl_module, loader), self.num_batches,
                                       _replay_training_step(trainer, pl_module), self._bn_layers)
        if trainer.is_global_zero:
            log.info("PreciseBN: recomputed %d BatchNorm layers over %d batches", len(self._bn_layers), used)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]


def _check_replayable(pl_module: nn.Module) -> None:
    """Refuse, before training, a module without forward() whose training_step PreciseBN must not replay."""
    name = type(pl_module).__name__
    example = "e.g. PreciseBN(forward=lambda module, batch: module.net(batch[0]))"
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"PreciseBN: {name} defines no forward() and uses manual optimization, so its training_step steps "
            "optimizers itself and cannot be replayed just to recompute BatchNorm statistics. Pass forward=, a "
            f"function forward(pl_module, batch) that feeds one training batch to the model, {example}")
    if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
        raise ValueError(
            f"PreciseBN: {name} defines no forward() and its training_step takes a dataloader_iter, which PreciseBN "
            f"cannot replay batch by batch. Pass forward=, a function forward(pl_module, batch) that feeds one "
            f"training batch to the model, {example}")


def _training_batches(trainer, pl_module, loader: Any):
    """The loader's batches, prepared as Lightning's training loop prepares them for ``training_step``."""
    before_transfer = getattr(pl_module, "_on_before_batch_transfer", None)  # also runs a datamodule's hook
    for batch in loader:
        batch = trainer.precision_plugin.convert_input(batch)
        if before_transfer is not None:
            batch = before_transfer(batch, dataloader_idx=0)
        yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def _replay_training_step(trainer, pl_module) -> Callable[[nn.Module, Any], None]:
    """A ``forward(module, batch)`` for :func:`update_bn_stats` that runs ``pl_module.training_step`` as the
    training loop calls it (``batch_idx`` counting from 0 if the signature takes it), its output discarded."""
    parameters = inspect.signature(pl_module.training_step).parameters.values()
    takes_index = (any(p.kind is p.VAR_POSITIONAL for p in parameters)
                   or sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters) >= 2)
    batch_indices = itertools.count()

    def forward(module: nn.Module, batch: Any) -> None:
        with trainer.precision_plugin.train_step_context():
            if takes_index:
                module.training_step(batch, next(batch_indices))
            else:
                module.training_step(batch)

    return forward
