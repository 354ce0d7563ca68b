"""A light segmentation model on a timm backbone: fast CPU runs, and any timm backbone for those who want one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnlightning.layers.create_norm import create_norm

__all__ = ["TimmSegmentation"]


class TimmSegmentation(nn.Module):
    """timm ``features_only`` backbone + a small FPN-style decoder (1x1 laterals, top-down sum, one 3x3 conv + norm
    + ReLU, 1x1 classifier), returning ``{"out": logits}`` at input resolution like torchvision's segmentation models
    so that tasks and metrics treat both alike.

    The decoder's norm is built with ``create_norm(norm)``; the backbone's norms are converted afterwards by the
    model builder like any other model's.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        out_indices: tuple[int, ...] = (0, 1, 2),
        decoder_channels: int = 64,
        norm: str = "bn",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ImportError("TimmSegmentation needs timm: pip install 'gnlightning[timm]'") from error
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=out_indices)
        channels = self.backbone.feature_info.channels()
        self.laterals = nn.ModuleList(nn.Conv2d(c, decoder_channels, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            create_norm(norm, decoder_channels, num_groups=num_groups, layer_name="fuse.1"),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        y = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            y = lateral(feature) + F.interpolate(y, size=feature.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(y))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}
