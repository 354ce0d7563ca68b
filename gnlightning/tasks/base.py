"""What SegmentationTask and DetectionTask share: the wrapped model, optimisation, and one metric object per
evaluation stage (torchmetrics synchronises it across ranks when it is computed)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as L
from torch import nn

from gnlightning.tasks.optim import build_optimizers

__all__ = ["Task"]


class Task(L.LightningModule):
    """Subclasses define ``training_step``, ``make_metric()``, ``update_metric(batch, metric)`` and
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
        # class_names also lives in data modules' hparams, which Lightning merges with these for loggers
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "class_names"])
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={num_classes}")
        self.val_metric = self.make_metric()
        self.test_metric = self.make_metric()

    def make_metric(self) -> Any:
        raise NotImplementedError

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
