"""Light detectors on a timm backbone: torchvision's FCOS, RetinaNet and Mask R-CNN with their heads reused as they
are, sized for a CPU and for small images.

Why: the GroupNorm paper's strongest evidence is detection with GN in the FPN and the heads, but an R50-FPN at
800 px does not train on a laptop. These builders keep torchvision's detector classes, losses, heads and FPN and
replace only the parts that decide size: the backbone (any timm ``features_only`` model, ResNet-18 by default), the
FPN width, the number of head convolutions and the pyramid levels.

Norms: the FPN and the heads are built with ``nn.BatchNorm2d`` placeholders (torchvision's FCOS head would put a
fixed ``GroupNorm(32)`` there), so that the model builder's one ``convert_norms`` call turns backbone, FPN and heads
alike into the chosen norm: GN (+WS) heads as in the FCOS and detectron2 GN recipes, BN or SyncBN heads, and with
``frozen_bn`` frozen layers in the backbone and fixed identity maps in FPN and heads, i.e. detectron2's default of
no normalization outside the backbone.

Module names follow torchvision's R50-FPN detectors (``backbone.body``, ``backbone.fpn``, ``head`` or ``rpn`` /
``roi_heads``), so :func:`gnlightning.models.parts.norm_parts` and ``include`` / ``exclude`` globs treat both alike.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["DENSE_HEADS", "TimmFPN", "timm_detection", "timm_maskrcnn"]

#: The dense heads of :func:`timm_detection`.
DENSE_HEADS = ("fcos", "retinanet")

#: The placeholder norm of FPN and heads; ``convert_norms`` replaces it with the configured norm.
_PLACEHOLDER_NORM = nn.BatchNorm2d


class TimmFPN(nn.Module):
    """A timm ``features_only`` backbone (``body``) + torchvision's :class:`FeaturePyramidNetwork` (``fpn``).

    It is the ``backbone`` that torchvision's detectors take: ``out_channels`` is the width of every pyramid level and
    ``forward`` returns an ordered dict of levels, finest first. ``strides`` are the levels' strides in pixels,
    including those of the extra levels (``"p6p7"``: two strided 3x3 convolutions on P5 as in RetinaNet and FCOS;
    ``"pool"``: a max-pooled level as in Mask R-CNN; ``None``: no extra level).

    ``zero_init_last`` is turned off where the timm model has it: zero-initialised last norm scales of the
    residual blocks would stay zero for ever once frozen (``norm=frozen_bn``, from scratch), cutting every residual
    branch; every norm gets the same initialisation so that a comparison of norms compares only the norms.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3),
        channels: int = 64,
        extra_levels: str | None = None,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ImportError("the timm detectors need timm: pip install 'gnlightning[timm]'") from error
        if extra_levels not in (None, "p6p7", "pool"):
            raise ValueError(f"extra_levels must be None, 'p6p7' or 'pool', got {extra_levels!r}")
        options = dict(pretrained=False, features_only=True, out_indices=tuple(out_indices))
        try:
            self.body = timm.create_model(backbone, zero_init_last=False, **options)
        except TypeError:  # a model without zero-initialised residual norms
            self.body = timm.create_model(backbone, **options)
        in_channels = self.body.feature_info.channels()
        strides = list(self.body.feature_info.reduction())
        extra: nn.Module | None = None
        if extra_levels == "p6p7":
            extra = LastLevelP6P7(channels, channels)  # from P5, as torchvision's v2 RetinaNet and FCOS do
            strides += [strides[-1] * 2, strides[-1] * 4]
        elif extra_levels == "pool":
            extra = LastLevelMaxPool()
            strides += [strides[-1] * 2]
        self.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=extra, norm_layer=_PLACEHOLDER_NORM)
        self.out_channels = channels
        self.strides: tuple[int, ...] = tuple(strides)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(images)
        return self.fpn(OrderedDict((str(level), feature) for level, feature in enumerate(features)))


def _fcos_head(channels: int, num_classes: int, num_convs: int) -> FCOSHead:
    """torchvision's FCOS head with the placeholder norm in its towers (FCOSHead itself fixes GroupNorm(32))."""
    head = FCOSHead(channels, 1, num_classes, num_convs)
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs,
                                                      norm_layer=_PLACEHOLDER_NORM)
    head.regression_head = FCOSRegressionHead(channels, 1, num_convs, norm_layer=_PLACEHOLDER_NORM)
    return head


def timm_detection(
    num_classes: int,
    *,
    head: str = "fcos",
    backbone: str = "resnet18",
    out_indices: Sequence[int] = (1, 2, 3),
    extra_levels: str | None = None,
    channels: int = 64,
    head_convs: int = 2,
    anchor_scale: float = 0.5,
    image_size: int | None = None,
    **detector_options,
) -> nn.Module:
    """A one-stage detector: :class:`TimmFPN` + torchvision's FCOS or RetinaNet (``head``), background included in
    ``num_classes`` as for torchvision's detectors.

    Args:
        out_indices: the timm feature levels (ResNets: 1..4 are strides 4..32, i.e. P2..P5); the default P2..P4
            suits 64-256 px images (and leaves a ResNet's last stage out of the model).
        extra_levels: ``"p6p7"`` for the two coarse levels of the 800 px recipes; for small images leave it off
            (a 128 px image has a 1x1 P7, where a GroupNorm normalizes 2 values per group).
        channels: FPN and head width (torchvision: 256).
        head_convs: convolutions (+ norm + ReLU) in each head tower (torchvision: 4). RetinaNet's are fixed at 4.
        anchor_scale: the object size each level is responsible for, relative to the 800 px recipes. FCOS assigns
            an object to the level of stride ``s`` whose ``[4, 8] * anchor_scale * s`` range holds its largest
            centre-to-side distance (its centre sampling radius stays 1.5 strides); RetinaNet's anchors are
            ``4 * anchor_scale * s * 2**(k/3)`` for k = 0, 1, 2. With 0.5 on 128 px images, objects of 10-100 px
            spread over P2-P4 instead of all landing on the finest level (the default; 1.0 is torchvision's).
        image_size: the size images are resized to (torchvision's ``min_size`` / ``max_size``); give the data's own
            size so that nothing is rescaled twice.
        detector_options: passed to torchvision's FCOS / RetinaNet (``score_thresh``, ``detections_per_img`` ...).
    """
    if head not in DENSE_HEADS:
        raise ValueError(f"head must be one of {DENSE_HEADS}, got {head!r} (Mask R-CNN: model=timm_maskrcnn)")
    body = TimmFPN(backbone, out_indices, channels, extra_levels)
    if image_size is not None:
        detector_options = {"min_size": image_size, "max_size": image_size, **detector_options}
    if head == "fcos":
        anchors = AnchorGenerator(tuple((anchor_scale * s,) for s in body.strides), ((1.0,),) * len(body.strides))
        return FCOS(body, num_classes, anchor_generator=anchors, head=_fcos_head(channels, num_classes, head_convs),
                    center_sampling_radius=1.5 / anchor_scale, **detector_options)
    sizes = tuple(tuple(4 * anchor_scale * s * 2 ** (k / 3) for k in range(3)) for s in body.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    retina_head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes,
                                norm_layer=_PLACEHOLDER_NORM)
    return RetinaNet(body, num_classes, anchor_generator=anchors, head=retina_head, **detector_options)


def timm_maskrcnn(
    num_classes: int,
    *,
    backbone: str = "resnet18",
    out_indices: Sequence[int] = (1, 2, 3, 4),
    channels: int = 64,
    head_convs: int = 2,
    fc_channels: int = 256,
    anchor_scale: float = 0.5,
    image_size: int | None = None,
    **detector_options,
) -> nn.Module:
    """Mask R-CNN on :class:`TimmFPN` (P2..P5 + a pooled P6), with torchvision's v2 heads: a two-conv RPN head, a
    conv + FC box head and a conv mask head, their convolutions followed by the placeholder norm (the detectron2 /
    torchvision v2 layout). ``anchor_scale`` scales the RPN's anchors (``8 * anchor_scale * stride``, aspect ratios
    0.5, 1, 2); ``head_convs`` is the number of convolutions of the box head and of the mask head (torchvision: 4);
    other arguments as for :func:`timm_detection`, and ``detector_options`` go to torchvision's MaskRCNN.
    """
    body = TimmFPN(backbone, out_indices, channels, extra_levels="pool")
    if image_size is not None:
        detector_options = {"min_size": image_size, "max_size": image_size, **detector_options}
    sizes = tuple((8 * anchor_scale * s,) for s in body.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    rpn_head = RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * head_convs, [fc_channels],
                                  norm_layer=_PLACEHOLDER_NORM)
    mask_head = MaskRCNNHeads(channels, [channels] * head_convs, 1, norm_layer=_PLACEHOLDER_NORM)
    return MaskRCNN(body, None, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_head=box_head,
                    box_predictor=FastRCNNPredictor(fc_channels, num_classes), mask_head=mask_head,
                    mask_predictor=MaskRCNNPredictor(channels, channels, num_classes), **detector_options)
