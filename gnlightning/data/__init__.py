"""LightningDataModules for segmentation and detection: synthetic shapes (no files), COCO format, VOC / folders.

Every module gives the same batch shapes for a task -- segmentation: ``(images [N,3,H,W] float, masks [N,H,W]
long, 255 = ignore)``; detection: ``(list of images [3,H,W], list of target dicts with boxes / labels / masks)``
-- so a task module never needs to know where its data came from. ``COCODataModule`` needs the ``[coco]`` extra
(pycocotools), imported only when it is instantiated.
"""

from gnlightning.data.coco import COCODataModule
from gnlightning.data.export import write_coco, write_folder, write_voc
from gnlightning.data.shapes import ShapesDataModule, ShapesDataset
from gnlightning.data.transforms import IGNORE_INDEX, build_transforms, detection_collate, segmentation_collate
from gnlightning.data.voc import VOCDataModule

__all__ = [
    "COCODataModule", "IGNORE_INDEX", "ShapesDataModule", "ShapesDataset", "VOCDataModule", "build_transforms",
    "detection_collate", "segmentation_collate", "write_coco", "write_folder", "write_voc",
]
