"""Model builders for torchvision / timm segmentation and detection models."""

from gnlightning.models.builders import DETECTION_MODELS, SEGMENTATION_MODELS, build_model, task_of
from gnlightning.models.timm_segmentation import TimmSegmentation
from gnlightning.models.weights import load_weights

__all__ = ["DETECTION_MODELS", "SEGMENTATION_MODELS", "TimmSegmentation", "build_model", "load_weights", "task_of"]
