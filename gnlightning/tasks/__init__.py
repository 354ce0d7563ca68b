"""LightningModules for semantic segmentation and detection."""

from gnlightning.tasks.detection import DetectionTask
from gnlightning.tasks.segmentation import SegmentationTask

__all__ = ["DetectionTask", "SegmentationTask"]
