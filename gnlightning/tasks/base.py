"""What SegmentationTask and DetectionTask share: the wrapped model, optimisation, and one metric object per
evaluation stage (torchmetrics synchronises it across ranks when it is computed)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from gnlightning.tasks.optim import build_optimizers

__all__ = ["Task"]


class Task:
    """The training logic shared by the tasks, mixed into the ``LightningModule`` of either Lightning package.

    Why a mixin: a ``pytorch_lightning`` Trainer refuses a ``lightning.pytorch`` LightningModule (and vice versa),
    and one class cannot derive from both (Lightning's hook-override checks then see the other package's methods).
    So every task is written once as logic and exists twice: ``gnlightning.tasks.SegmentationTask`` (built on
    ``lightning.pytorch``) and ``gnlightning.pl.SegmentationTask`` (built on ``pytorch_lightning``).

    Subclasses define ``training_step``, ``make_metric()``, ``update_metric(batch, metric)`` and
    ``log_metric(metric, stage)``."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        warmup_steps: int = 100,
        weight_decay: float = 1e-4,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # class_names and with_masks (a detection task's) also live in data modules' hparams, which Lightning
        # merges with these for loggers and refuses when the values differ
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "class_names", "with_masks"])
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={num_classes}")
        self.val_metric = self.make_metric()
        self.test_metric = self.make_metric()

    def make_metric(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def check_finite(images: torch.Tensor | Sequence[torch.Tensor], batch_idx: int) -> None:
        """Refuse a training batch holding NaN or Inf, before it reaches the model.

        One NaN pixel turns every BatchNorm's batch statistics (and, through the momentum update, its running
        statistics for all later batches) into NaN, and under SyncBN it spreads to every rank; the loss then says
        NaN steps later, far from the cause. One reduction and one host sync per step find it at the source."""
        if len(images) == 0:
            return
        if isinstance(images, torch.Tensor):
            finite = torch.isfinite(images).reshape(len(images), -1).all(dim=1)
        else:
            finite = torch.stack([torch.isfinite(image).all() for image in images])
        if bool(finite.all()):
            return
        bad = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"training batch {batch_idx}: image(s) {bad[:8]} of {len(finite)} contain NaN or Inf values. A single "
            "non-finite input poisons every norm layer's statistics, so training stops here. Check the data: a "
            "corrupt image file, normalization with a zero std, an augmentation that divides by zero; fix or drop "
            "those samples"
        )

    @contextlib.contextmanager
    def explain_batch_errors(self, batch_size: int) -> Iterator[None]:
        """Re-raise BatchNorm's "one value per channel" error of a training forward pass with the ways out.

        BatchNorm cannot compute batch statistics from one value per channel: a batch of one image reaching a
        layer after global pooling (DeepLabV3's ASPP pooling branch sees 1x1 maps) fails deep inside the model,
        with a message naming a shape but not the settings that produce it."""
        try:
            yield
        except ValueError as error:
            if "more than 1 value per channel" not in str(error):
                raise
            raise ValueError(
                f"{error}\nBatchNorm got one value per channel in a training batch of {batch_size} image(s) per "
                "device (layers after global pooling see 1x1 maps). Fix: at least 2 images per device "
                "(gnl-train: data.batch_size=2) with the incomplete last batch dropped (data.drop_last=true), or a "
                "norm that does not depend on the batch (norm=gn, norm=gn_ws or norm=frozen_bn)"
            ) from error

    def update_metric(self, batch: Any, metric: Any) -> None:
        raise NotImplementedError

    def log_metric(self, metric: Any, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.update_metric(batch, self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.update_metric(batch, self.test_metric)

    def on_validation_epoch_end(self) -> None:
        self.log_metric(self.val_metric, "val")
        self.val_metric.reset()

    def on_test_epoch_end(self) -> None:
        self.log_metric(self.test_metric, "test")
        self.test_metric.reset()

    def configure_optimizers(self):
        return build_optimizers(self.model, self.optimizer, self.scheduler, self.trainer.estimated_stepping_batches,
                                self.hparams.warmup_steps, self.hparams.weight_decay)
