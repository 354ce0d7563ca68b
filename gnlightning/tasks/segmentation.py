"""SegmentationTask: semantic segmentation with cross-entropy, mIoU and per-class IoU."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from gnlightning.tasks.base import Task

__all__ = ["SegmentationLogic", "SegmentationTask"]


class SegmentationLogic(Task):
    """Train any model that maps ``[N, 3, H, W]`` images to ``[N, C, H, W]`` logits (or torchvision's
    ``{"out": ..., "aux": ...}``) on ``(images, masks)`` batches, masks ``[N, H, W]`` of class indices with
    ``ignore_index`` for unlabelled pixels.

    Logs ``train/loss`` every step and, per epoch and synchronised across ranks (torchmetrics), ``val/mIoU`` (mean
    over the classes present in targets or predictions) and ``val/IoU/<class>``; ``test/`` likewise. Other
    arguments: see :class:`gnlightning.tasks.base.Task`.
    """

    def __init__(self, *args: Any, ignore_index: int = 255, aux_weight: float = 0.5, **kwargs: Any) -> None:
        self.ignore_index = ignore_index
        super().__init__(*args, **kwargs)
        self.hparams.update(ignore_index=ignore_index, aux_weight=aux_weight)

    def make_metric(self) -> MulticlassJaccardIndex:
        return MulticlassJaccardIndex(num_classes=self.hparams.num_classes, average="none",
                                      ignore_index=self.ignore_index, zero_division=float("nan"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out["out"] if isinstance(out, dict) else out

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        self.check_finite(images, batch_idx)
        with self.explain_batch_errors(len(images)):
            out = self.model(images)
        logits = out["out"] if isinstance(out, dict) else out
        if logits.shape[1] != self.hparams.num_classes:
            raise ValueError(f"the model predicts {logits.shape[1]} classes but the task has num_classes="
                             f"{self.hparams.num_classes}; build the model with num_classes={self.hparams.num_classes}")
        loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        if isinstance(out, dict) and out.get("aux") is not None:
            loss = loss + self.hparams.aux_weight * F.cross_entropy(out["aux"], masks, ignore_index=self.ignore_index)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def update_metric(self, batch, metric: MulticlassJaccardIndex) -> None:
        images, masks = batch
        metric.update(self(images).argmax(dim=1), masks)

    def log_metric(self, metric: MulticlassJaccardIndex, stage: str) -> None:
        # compute() already gathered every rank's counts, so the values agree across ranks; sync_dist averages
        # equal numbers and tells Lightning (which warns otherwise) that epoch-level values are global.
        per_class = metric.compute()
        self.log(f"{stage}/mIoU", per_class.nanmean(), prog_bar=stage == "val", sync_dist=True)
        for name, value in zip(self.class_names, per_class):
            if not torch.isnan(value):
                self.log(f"{stage}/IoU/{name}", value, sync_dist=True)


class SegmentationTask(SegmentationLogic, L.LightningModule):
    __doc__ = SegmentationLogic.__doc__  # a lightning.pytorch LightningModule; gnlightning.pl has the other one
