"""convert_norms on every torchvision segmentation and detection builder and a few timm models.

For each model and each norm: no layer of another kind is left, the model runs forward in train and eval mode,
and the BN round trips (bn -> syncbn -> bn, bn -> frozen_bn -> bn) give back every value bit for bit.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from gnlightning import SyncBatchNorm, convert_norms, revert_sync_batchnorm
from gnlightning.convert import norm_kind
from gnlightning.layers import NORMS
from tests.helpers import assert_same_state, randomized_statistics

SEGMENTATION = ["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "fcn_resnet50",
                "fcn_resnet101", "lraspp_mobilenet_v3_large"]
DETECTION = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
TIMM = ["resnet18", "efficientnet_b0", "resnetv2_50x1_bit"]


def build(name):
    torch.manual_seed(0)
    if name in SEGMENTATION:
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
    if name in DETECTION:
        if "rcnn" in name:  # few proposals and detections: the norm layers are what is tested here
            small = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                         rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, box_detections_per_img=10)
        else:
            small = dict(topk_candidates=100, detections_per_img=10)
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3,
                                            min_size=96, max_size=96, **small)
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=3)


def run_forward(name, model):
    """A training forward (with its loss) and an eval forward on tiny inputs."""
    torch.manual_seed(1)
    model.train()
    if name in DETECTION:
        images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
        targets = []
        for _ in images:
            target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
            if "maskrcnn" in name:
                target["masks"] = torch.zeros(1, 96, 96, dtype=torch.uint8)
                target["masks"][0, 12:60, 10:50] = 1
            targets.append(target)
        losses = model(images, targets)
        assert losses and all(torch.isfinite(v) for v in losses.values()), losses
        model.eval()
        with torch.no_grad():
            assert isinstance(model(images), list)
        return
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    assert torch.isfinite(out).all()


def kinds_after(model, norm, original_types):
    """Every norm layer's kind must be the target's; GN-family group counts as the norm demands."""
    for name, module in model.named_modules():
        kind = norm_kind(module)
        if kind is None:
            continue
        if norm == "bn":
            assert kind == "bn" and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)), name
        elif norm == "syncbn":
            assert isinstance(module, SyncBatchNorm), name
        elif norm == "frozen_bn":  # GroupNorm has no statistics to freeze: it stays
            assert kind == "frozen_bn" or (kind == "gn" and isinstance(original_types[name], nn.GroupNorm)), name
        elif norm in ("evonorm_s0", "frn"):  # no form keeps a fused activation: timm's norm+act layers stay (loudly)
            assert kind == norm or isinstance(getattr(original_types[name], "act", None), nn.Module), name
        else:
            assert kind == "gn", name
            if norm == "ln":
                assert module.num_groups == 1, name
            if norm == "in":
                assert module.num_groups == module.num_channels, name


# The torchvision detectors and the ResNet-101s take 3-7 s each (seven conversions, each with a training and an eval
# forward): slow.
HEAVY = {*DETECTION, "deeplabv3_resnet101", "fcn_resnet101"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name
                                  for name in SEGMENTATION + DETECTION + TIMM])
def test_every_norm_on_model(name):
    original = build(name)
    original_types = dict(original.named_modules())
    for norm in NORMS:
        model = convert_norms(copy.deepcopy(original), norm)
        kinds_after(model, norm, original_types)
        run_forward(name, model)

    # Round trips start from an all-BN model (some builders ship GroupNorm heads).
    bn_model = randomized_statistics(convert_norms(copy.deepcopy(original), "bn"))  # so that a copy mistake shows
    reference = copy.deepcopy(bn_model)
    back = revert_sync_batchnorm(convert_norms(copy.deepcopy(bn_model), "syncbn"))
    assert_same_state(back, reference)
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]
    back = convert_norms(convert_norms(copy.deepcopy(bn_model), "frozen_bn"), "bn")
    assert_same_state(back, reference)
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]
