"""Models by name: torchvision's segmentation and detection builders and the light timm models, each followed by
the configured norm conversion."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import torchvision
from torch import nn

from gnlightning.convert import convert_norms
from gnlightning.norm_spec import NormSpec
from gnlightning.models.timm_detection import timm_detection, timm_maskrcnn
from gnlightning.models.timm_segmentation import TimmSegmentation
from gnlightning.models.weights import hub_weights, load_weights

__all__ = ["SEGMENTATION_MODELS", "DETECTION_MODELS", "build_model", "task_of"]

log = logging.getLogger("gnlightning")

SEGMENTATION_MODELS = (
    "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "fcn_resnet101",
    "lraspp_mobilenet_v3_large", "timm_segmentation",
)
DETECTION_MODELS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "timm_detection", "timm_maskrcnn",
)
# The light timm detectors: built here, and given the data's image size like torchvision's.
_TIMM_DETECTORS = {"timm_detection": timm_detection, "timm_maskrcnn": timm_maskrcnn}


def task_of(name: str) -> str:
    """``"segmentation"`` or ``"detection"`` for a model name."""
    if name in SEGMENTATION_MODELS:
        return "segmentation"
    if name in DETECTION_MODELS:
        return "detection"
    close = difflib.get_close_matches(str(name), SEGMENTATION_MODELS + DETECTION_MODELS, n=2, cutoff=0.5)
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {guess}segmentation: {', '.join(SEGMENTATION_MODELS)}; "
                     f"detection: {', '.join(DETECTION_MODELS)}")


def build_model(
    name: str,
    num_classes: int,
    *,
    norm: str | NormSpec | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    **model_options: Any,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes (background included), load ``weights``, convert norms.

    Args:
        norm: the norm to convert to, a name or a :class:`~gnlightning.NormSpec` with options (``None`` keeps the
            builder's own layers).
        weights: a local state dict / Lightning checkpoint path (loaded before the conversion, so BN-pretrained
            affine values initialise the new layers), or a torchvision weights name such as ``"DEFAULT"`` (used only
            when cached or reachable; never hangs offline).
        image_size: for detection models, the size images are resized to (torchvision's min_size / max_size).
        model_options: passed to the builder (e.g. ``backbone="resnet34"`` for ``timm_segmentation`` and the timm
            detectors).

    Every detector, torchvision's R50-FPN ones and the light timm ones alike, is named ``backbone.body`` /
    ``backbone.fpn`` / ``head`` (or ``rpn`` / ``roi_heads``): :func:`gnlightning.models.parts.norm_parts` counts the
    norm layers of each part after the conversion.
    """
    task = task_of(name)
    if name == "timm_segmentation":
        model = TimmSegmentation(num_classes, **model_options)
    elif name in _TIMM_DETECTORS:
        model = _TIMM_DETECTORS[name](num_classes, image_size=image_size, **model_options)
    else:
        if task == "detection" and image_size is not None:
            model_options = {"min_size": image_size, "max_size": image_size, **model_options}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                                             **model_options)
    if weights is not None:
        is_file = os.path.sep in weights or os.path.exists(weights) or weights.endswith((".pth", ".pt", ".ckpt"))
        load_weights(model, weights if is_file else hub_weights(name, weights).get_state_dict(progress=False))
    if norm is not None:
        model = convert_norms(model, norm)
    return model
