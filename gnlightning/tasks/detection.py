"""DetectionTask: torchvision detection models with their own losses, and COCO mAP from torchmetrics."""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as L
import torch

from gnlightning.tasks.base import Task

__all__ = ["DetectionLogic", "DetectionTask", "detection_metrics"]


def detection_metrics(results: dict[str, Any], iou_types: Sequence[str],
                      class_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The numbers DetectionTask logs, from the ``compute()`` of a torchmetrics ``MeanAveragePrecision`` built with
    ``class_metrics=True, extended_summary=True``.

    Keys (per IoU type, ``segm_`` before the names of the mask metrics): ``mAP`` (COCO AP over IoU 0.5:0.95),
    ``mAP_50``, ``mAP_75``, and per class ``AP/<class>`` and ``AP_50/<class>`` (the precision of IoU 0.5 averaged
    over COCO's 101 recall points, as pycocotools does for ``mAP_50``). Classes without ground truth in the
    evaluated images have no AP (COCO's -1) and are left out rather than logged as a number.
    """
    metrics: dict[str, torch.Tensor] = {}
    for iou_type in iou_types:
        source = f"{iou_type}_" if len(iou_types) > 1 else ""  # torchmetrics prefixes keys only for several types
        target = "" if iou_type == "bbox" else f"{iou_type}_"
        for key in ("map", "map_50", "map_75"):
            metrics[f"{target}{key.replace('map', 'mAP')}"] = results[f"{source}{key}"]
        # precision: [IoU threshold, recall point, class, area range (0 = all), max detections (-1 = 100)]
        precision_50 = results[f"{source}precision"][0, :, :, 0, -1]
        per_class = results[f"{source}map_per_class"].reshape(-1)
        for index, label in enumerate(results["classes"].reshape(-1).tolist()):
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            if per_class[index] < 0:
                continue
            valid = precision_50[:, index][precision_50[:, index] > -1]
            metrics[f"{target}AP/{name}"] = per_class[index]
            metrics[f"{target}AP_50/{name}"] = valid.mean() if valid.numel() else torch.tensor(0.0)
    return metrics


class DetectionLogic(Task):
    """Train a torchvision detection model on ``(images, targets)`` batches: lists of ``[3, H, W]`` images of any
    sizes and of dicts with ``boxes`` (xyxy), ``labels`` (1..num_classes-1) and, for Mask R-CNN, ``masks``. Images
    without objects are allowed (``boxes`` of shape ``[0, 4]``).

    Logs ``train/loss`` and each loss term, and per epoch the box ``val/mAP``, ``val/mAP_50``, ``val/mAP_75`` and
    per class ``val/AP/<class>``, ``val/AP_50/<class>`` (and ``val/segm_mAP`` ... for models that predict masks)
    from torchmetrics' MeanAveragePrecision (pycocotools backend, the ``[coco]`` extra); see
    :func:`detection_metrics`. ``with_masks`` says whether the model predicts masks (default: whether it has a
    mask head, as torchvision's Mask R-CNN does). Evaluation images are given to the model as they come from the
    data: the detector resizes them to its own ``min_size`` / ``max_size``, which gnl-train sets to the data's image
    size, so nothing is rescaled twice and boxes come back in the images' own pixels. Other arguments: see
    :class:`gnlightning.tasks.base.Task`.
    """

    def __init__(self, *args: Any, with_masks: bool | None = None, **kwargs: Any) -> None:
        self._with_masks = with_masks
        super().__init__(*args, **kwargs)  # not a hyper-parameter: see Task's save_hyperparameters

    def make_metric(self):
        try:
            from torchmetrics.detection import MeanAveragePrecision

            return MeanAveragePrecision(iou_type=self.iou_types, class_metrics=True, extended_summary=True)
        except ModuleNotFoundError as error:
            raise ImportError("DetectionTask's mAP needs pycocotools: pip install 'gnlightning[coco]'") from error

    @property
    def with_masks(self) -> bool:
        if self._with_masks is not None:
            return self._with_masks
        return getattr(getattr(self.model, "roi_heads", None), "has_mask", lambda: False)()

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.with_masks else ("bbox",)

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
        metrics = detection_metrics(metric.compute(), self.iou_types, self.class_names)
        for name, value in metrics.items():
            # equal on all ranks (compute() gathered every rank's detections), see SegmentationTask
            self.log(f"{stage}/{name}", value, prog_bar=name == "mAP", sync_dist=True)


class DetectionTask(DetectionLogic, L.LightningModule):
    __doc__ = DetectionLogic.__doc__  # a lightning.pytorch LightningModule; gnlightning.pl has the other one
