"""DetectionTask: torchvision detection models with their own losses, and COCO mAP from torchmetrics."""

from __future__ import annotations

import lightning.pytorch as L
import torch

from gnlightning.tasks.base import Task

__all__ = ["DetectionLogic", "DetectionTask"]


class DetectionLogic(Task):
    """Train a torchvision detection model on ``(images, targets)`` batches: lists of ``[3, H, W]`` images of any
    sizes and of dicts with ``boxes`` (xyxy), ``labels`` (1..num_classes-1) and, for Mask R-CNN, ``masks``. Images
    without objects are allowed (``boxes`` of shape ``[0, 4]``).

    Logs ``train/loss`` and each loss term, and per epoch the box ``val/mAP``, ``val/mAP_50``, ``val/mAP_75`` (and
    ``val/segm_mAP`` ... for models that predict masks) from torchmetrics' MeanAveragePrecision
    (pycocotools backend, the ``[coco]`` extra). Other arguments: see :class:`gnlightning.tasks.base.Task`.
    """

    def make_metric(self):
        try:
            from torchmetrics.detection import MeanAveragePrecision

            return MeanAveragePrecision(iou_type=("bbox", "segm") if self.with_masks else "bbox")
        except ModuleNotFoundError as error:
            raise ImportError("DetectionTask's mAP needs pycocotools: pip install 'gnlightning[coco]'") from error

    @property
    def with_masks(self) -> bool:
        return getattr(getattr(self.model, "roi_heads", None), "has_mask", lambda: False)()

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        self.check_finite(images, batch_idx)
        with self.explain_batch_errors(len(images)):
            losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        return loss

    def update_metric(self, batch, metric) -> None:
        images, targets = batch
        predictions = self(list(images))
        if self.with_masks:
            for prediction in predictions:
                prediction["masks"] = prediction["masks"].squeeze(1) > 0.5
            targets = [{**t, "masks": t["masks"].bool()} for t in targets]
        metric.update(predictions, list(targets))

    def log_metric(self, metric, stage: str) -> None:
        results = metric.compute()
        for iou_type in ("bbox", "segm") if self.with_masks else ("bbox",):
            source = f"{iou_type}_" if self.with_masks else ""  # torchmetrics prefixes keys only for several types
            target = "" if iou_type == "bbox" else "segm_"
            for key in ("map", "map_50", "map_75"):
                self.log(f"{stage}/{target}{key.replace('map', 'mAP')}", results[f"{source}{key}"],
                         prog_bar=key == "map", sync_dist=True)  # equal on all ranks, see SegmentationTask


class DetectionTask(DetectionLogic, L.LightningModule):
    __doc__ = DetectionLogic.__doc__  # a lightning.pytorch LightningModule; gnlightning.pl has the other one
