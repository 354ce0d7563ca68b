"""The light timm detectors: norms per part (backbone, FPN, heads), short fits under every norm, frozen BN that stays
frozen, and the detection metrics on perfect and empty predictions."""

import math

import pytest
import torch
from torch import nn

from gnlightning.convert import describe_norms
from gnlightning.layers import NORMS
from gnlightning.models import build_model
from gnlightning.models.parts import norm_parts
from gnlightning.tasks import DetectionTask
from gnlightning.tasks.detection import detection_metrics
from tests.helpers import TINY, script_module

SIZE = 64
# What each norm puts in every part of a detector: (norm layer type, GroupNorm groups of a 64-channel layer, WS)
EXPECTED = {
    "bn": ("BatchNorm2d", None, False),
    "syncbn": ("SyncBatchNorm", None, False),
    "gn": ("GroupNorm", 32, False),
    "gn_ws": ("GroupNorm", 32, True),
    "frozen_bn": ("FrozenBatchNorm2d", None, False),
    "ln": ("GroupNorm", 1, False),
    "in": ("GroupNorm", 64, False),
    "evonorm_s0": ("EvoNorm2dS0", 32, False),
    "frn": ("FilterResponseNormTlu2d", None, False),
}
# Norm layers per part with the default options (ResNet-18 up to stage 3 (P2-P4), or 4 for Mask R-CNN; FPN of 3 or
# 4 levels, 2 layers each; 2 convs per head tower, the two towers of FCOS / RetinaNet, or the box and mask heads of
# Mask R-CNN).
PARTS = {
    ("timm_detection", "fcos"): {"backbone": 15, "fpn": 6, "heads": 4},
    ("timm_detection", "retinanet"): {"backbone": 15, "fpn": 6, "heads": 8},  # RetinaNet's towers: 4 convs each
    ("timm_maskrcnn", None): {"backbone": 20, "fpn": 8, "heads": 4},
}


def batch(size: int, count: int):
    """``count`` shapes images with their boxes, labels and masks, as the data module's loader gives them."""
    from gnlightning.data.shapes import ShapesDataset
    from gnlightning.data.transforms import detection_collate

    data = ShapesDataset(count, image_size=size, task="detection", size_range=(0.1, 0.35), min_shapes=1, seed=3)
    return detection_collate([data[index] for index in range(count)])


def detector(name, head, norm):
    options = {"head": head} if head else {}
    return build_model(name, 4, norm=norm, image_size=SIZE, **options)


@pytest.mark.parametrize("name, head", list(PARTS))
@pytest.mark.parametrize("norm", NORMS)
def test_norm_layers_of_backbone_fpn_and_heads_follow_norm(name, head, norm):
    model = detector(name, head, norm)
    kind, groups, ws = EXPECTED[norm]
    parts = norm_parts(model)
    assert list(parts) == ["backbone", "fpn", "heads"]
    for part, count in PARTS[(name, head)].items():
        expected = {kind: count, **({"WSConv2d": count} if ws else {})}
        assert dict(parts[part]) == expected, part
    if groups is not None:  # every FPN and head norm is 64 channels wide
        rows = [row for row in describe_norms(model) if not row.ws and not row.name.startswith("backbone.body")]
        assert rows and {row.groups for row in rows} == {groups}


def test_torchvision_r50_detectors_report_their_parts():
    # torchvision's v2 RetinaNet has GroupNorm in its head and no norm in the FPN; the parts say so per part
    parts = norm_parts(build_model("retinanet_resnet50_fpn_v2", 3, norm="gn_ws", image_size=SIZE))
    assert dict(parts["backbone"]) == {"WSConv2d": 53, "GroupNorm": 53}
    assert dict(parts["fpn"]) == {} and dict(parts["heads"]) == {"WSConv2d": 8, "GroupNorm": 8}


def test_unknown_head_and_levels_are_refused():
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("timm_detection", 3, head="ssd")
    with pytest.raises(ValueError, match="extra_levels"):
        build_model("timm_detection", 3, extra_levels="p6")


def train_steps(model: nn.Module, images, targets, steps: int, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("images_per_batch", [1, 2])
@pytest.mark.parametrize("norm", NORMS)
def test_light_detector_trains_with_finite_falling_loss(norm, images_per_batch):
    torch.manual_seed(0)
    images, targets = batch(SIZE, images_per_batch)
    losses = train_steps(detector("timm_detection", "fcos", norm), images, targets, steps=8)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert min(losses[-3:]) < losses[0], losses


@pytest.mark.slow
def test_light_mask_rcnn_trains_with_finite_falling_loss():
    torch.manual_seed(0)
    images, targets = batch(SIZE, 2)
    model = detector("timm_maskrcnn", None, "gn_ws")
    losses = train_steps(model, images, targets, steps=8)
    assert all(math.isfinite(loss) for loss in losses) and min(losses[-3:]) < losses[0], losses
    model.eval()
    with torch.no_grad():
        prediction = model(images[:1])[0]
    assert prediction["masks"].shape[1:] == (1, SIZE, SIZE)  # masks at the image's own size


def test_frozen_bn_buffers_and_scales_do_not_move_in_training():
    torch.manual_seed(0)
    model = detector("timm_detection", "fcos", "frozen_bn")
    frozen = {name: module for name, module in model.named_modules() if type(module).__name__ == "FrozenBatchNorm2d"}
    assert len(frozen) == 25
    # a non-trivial state, as pretrained statistics would be, so that "unchanged" is not "still at its default"
    for module in frozen.values():
        module.running_mean.normal_(0, 0.1)
    before = {f"{name}.{key}": value.clone() for name, module in frozen.items()
              for key, value in module.state_dict().items()}
    images, targets = batch(SIZE, 2)
    train_steps(model, images, targets, steps=2, lr=1e-2)
    after = {f"{name}.{key}": value for name, module in frozen.items() for key, value in module.state_dict().items()}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert not any(p.requires_grad for module in frozen.values() for p in module.parameters())


class Fixed(nn.Module):
    """A 'detector' that returns given predictions, to check the metrics."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return [dict(p) for p in self.predictions[: len(images)]]


def hand_example():
    """Two images: three objects of two classes with their masks, and an image without objects."""
    masks = torch.zeros(3, 32, 32, dtype=torch.uint8)
    masks[0, 2:14, 2:14] = 1
    masks[1, 16:30, 4:28] = 1
    masks[2, 4:12, 18:30] = 1
    boxes = torch.tensor([[2.0, 2.0, 14.0, 14.0], [4.0, 16.0, 28.0, 30.0], [18.0, 4.0, 30.0, 12.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}]
    perfect = [{"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.9, 0.8, 0.7]),
                "masks": masks[:, None].float()},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
                "masks": torch.zeros(0, 1, 32, 32)}]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, 32, 32)} for _ in targets]
    return targets, perfect, empty


@pytest.mark.parametrize("with_masks", [False, True])
def test_detection_metrics_of_perfect_and_empty_predictions(with_masks):
    pytest.importorskip("pycocotools")
    targets, perfect, empty = hand_example()
    images = [torch.zeros(3, 32, 32)] * 2
    names = ["background", "circle", "rectangle", "triangle"]  # no triangle in the images: it gets no AP
    expected_keys = {"mAP", "mAP_50", "mAP_75", "AP/circle", "AP/rectangle", "AP_50/circle", "AP_50/rectangle"}
    if with_masks:
        expected_keys |= {f"segm_{key}" for key in expected_keys}
    for predictions, value in ((perfect, 1.0), (empty, 0.0)):
        task = DetectionTask(Fixed(predictions), num_classes=4, class_names=names, with_masks=with_masks)
        task.update_metric((images, targets), task.test_metric)
        metrics = detection_metrics(task.test_metric.compute(), task.iou_types, task.class_names)
        assert set(metrics) == expected_keys
        assert {key: float(metric) for key, metric in metrics.items()} == pytest.approx(
            dict.fromkeys(expected_keys, value))


def test_detection_task_infers_masks_from_the_model():
    assert DetectionTask(build_model("timm_maskrcnn", 3), num_classes=3).iou_types == ("bbox", "segm")
    assert DetectionTask(build_model("timm_detection", 3), num_classes=3).iou_types == ("bbox",)


def test_gnl_inspect_shows_the_norms_of_backbone_fpn_and_heads(train_config):
    from gnlightning.inspect_norms import report

    text = report(train_config(["norm=frozen_bn", "model=timm_detection"]))
    assert "backbone  15 FrozenBatchNorm2d" in text and "heads     4 FrozenBatchNorm2d" in text
    text = report(train_config(["norm=gn_ws", "model=fcos_resnet50_fpn"]))
    assert "heads     8 WSConv2d, 8 GroupNorm" in text and "fpn       none" in text


@pytest.mark.slow
def test_detection_recipe_end_to_end_prints_per_class_ap(gnl_train):
    result = gnl_train("experiment=shapes_det_gn_ws", *TINY, "data.image_size=64", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("test/mAP ", "test/mAP_50", "test/mAP_75", "test/AP/", "test/AP_50/"):
        assert key in result.stdout, key


def test_detection_study_runs_the_recipe_with_scaled_learning_rates(tmp_path):
    import argparse

    with script_module("small_batch_study") as study:
        protocol = study.PROTOCOLS["detection"]
        assert protocol.variants == ("frozen_bn", "bn", "syncbn", "gn", "gn_ws") and protocol.batches == (1, 2, 4, 8)
        args = argparse.Namespace(protocol=protocol, quick=False, base_batch=8, base_lr=2e-3, lr_scaling="sqrt",
                                  images=protocol.images, num_train=protocol.num_train, warmup_images=256)
        single = study.overrides(study.Run("gn", 2, 0), args, tmp_path)
        synced = study.overrides(study.Run("syncbn", 2, 0), args, tmp_path)  # 2 processes: total batch 4
        assert single[0] == "experiment=shapes_det_gn_ws" and "norm=gn" in single and "trainer=ddp_cpu" in synced
        assert "optim.optimizer.lr=0.001" in single and "optim.optimizer.lr=0.00141421" in synced
        assert "trainer.max_epochs=3" in single and "data.num_train=512" in single
