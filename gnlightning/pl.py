"""gnlightning's LightningModules and LightningDataModules for the standalone ``pytorch_lightning`` package.

A ``pytorch_lightning`` Trainer refuses the ``lightning.pytorch`` classes of :mod:`gnlightning.tasks` and
:mod:`gnlightning.data` (and vice versa), so each of them also exists here, built from the same logic on
``pytorch_lightning``'s base classes::

    import pytorch_lightning as pl
    from gnlightning.pl import SegmentationTask, ShapesDataModule

    pl.Trainer(max_epochs=1).fit(SegmentationTask(model, num_classes=4), datamodule=ShapesDataModule())

Callbacks and plugins (NormSwap, PreciseBN, NormAdvisor, SyncBatchNormPlugin, AtomicCheckpointIO) need no copy:
they work with either Trainer as they are.
"""

from __future__ import annotations

import pytorch_lightning as pl

from gnlightning.data.coco import COCOLogic
from gnlightning.data.shapes import ShapesLogic
from gnlightning.data.voc import VOCLogic
from gnlightning.tasks.detection import DetectionLogic
from gnlightning.tasks.segmentation import SegmentationLogic

__all__ = ["COCODataModule", "DetectionTask", "SegmentationTask", "ShapesDataModule", "VOCDataModule"]


class SegmentationTask(SegmentationLogic, pl.LightningModule):
    __doc__ = SegmentationLogic.__doc__


class DetectionTask(DetectionLogic, pl.LightningModule):
    __doc__ = DetectionLogic.__doc__


class ShapesDataModule(ShapesLogic, pl.LightningDataModule):
    __doc__ = ShapesLogic.__doc__


class COCODataModule(COCOLogic, pl.LightningDataModule):
    __doc__ = COCOLogic.__doc__


class VOCDataModule(VOCLogic, pl.LightningDataModule):
    __doc__ = VOCLogic.__doc__
