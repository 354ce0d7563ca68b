"""Data modules: the synthetic generator's invariants, writer -> loader round trips, and the errors users see.

Sizes are tiny (32x32 / 40x48, a handful of images) so the whole file runs in seconds.
"""

import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gnlightning.data import (
    COCODataModule, ShapesDataModule, ShapesDataset, VOCDataModule, segmentation_collate, write_coco, write_folder,
    write_voc,
)
from gnlightning.data.shapes import split_seed
from gnlightning.data.transforms import detection_collate
from tests.helpers import REPO

SIZE = (40, 48)  # deliberately not square: catches (h, w) / (w, h) mix-ups
WRITE = dict(num_train=6, num_val=5, image_size=SIZE, seed=3)


def generated(split: str, **overrides) -> ShapesDataset:
    """The generator the writers use for ``split`` with the WRITE settings."""
    return ShapesDataset(WRITE[f"num_{split}"], SIZE, seed=split_seed(WRITE["seed"], split), **overrides)


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------ shapes generator
def test_shapes_same_index_same_sample_across_instances():
    first, second = ShapesDataset(10, 32, seed=7), ShapesDataset(10, 32, seed=7)
    for index in (0, 3, 9):
        a, b = first.render(index), second.render(index)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # Order of access must not matter (no shared generator state).
    assert torch.equal(first.render(5)["image"], ShapesDataset(10, 32, seed=7).render(5)["image"])
    assert not torch.equal(first.render(0)["image"], first.render(1)["image"])
    assert not torch.equal(first.render(0)["image"], ShapesDataset(10, 32, seed=8).render(0)["image"])


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_shapes_loader_identical_with_and_without_workers(task):
    def batches(workers):
        dm = ShapesDataModule(image_size=32, num_val=12, batch_size=4, num_workers=workers, task=task, seed=1)
        dm.setup("validate")
        return list(dm.val_dataloader())

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 3
    for (images_a, targets_a), (images_b, targets_b) in zip(single, multi):
        if task == "segmentation":
            assert images_a.shape == (4, 3, 32, 32) and targets_a.shape == (4, 32, 32)
            assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b)
        else:
            for image_a, image_b, target_a, target_b in zip(images_a, images_b, targets_a, targets_b):
                assert torch.equal(image_a, image_b)
                for key in ("boxes", "labels", "masks"):
                    assert torch.equal(target_a[key], target_b[key])


def test_shapes_splits_differ_and_module_matches_dataset():
    dm = ShapesDataModule(image_size=32, num_train=4, num_val=4, num_test=4, seed=2)
    dm.setup()
    images = {split: dm.dataset(split).render(0)["image"] for split in ("train", "val", "test")}
    assert not torch.equal(images["train"], images["val"])
    assert not torch.equal(images["val"], images["test"])
    assert dm.num_classes == 4 and dm.class_names == ["background", "circle", "rectangle", "triangle"]
    images_batch, masks_batch = next(iter(dm.val_dataloader()))
    assert images_batch.dtype == torch.float32 and masks_batch.dtype == torch.int64
    assert torch.equal(images_batch[0], images["val"])


@pytest.mark.parametrize("num_classes", [4, 6])
def test_shapes_masks_boxes_labels_consistent(num_classes):
    dataset = ShapesDataset(40, SIZE, num_classes=num_classes, max_shapes=6, seed=11)
    seen_occlusion = False
    for index in range(len(dataset)):
        s = dataset.render(index)
        image, semantic, boxes, labels, masks, amodal = (
            s["image"], s["semantic"], s["boxes"], s["labels"], s["masks"], s["amodal_masks"])
        k = labels.numel()
        assert image.shape == (3, *SIZE) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert semantic.shape == SIZE and semantic.dtype == torch.int64
        assert boxes.shape == (k, 4) and boxes.dtype == torch.float32
        assert masks.shape == (k, *SIZE) and masks.dtype == torch.uint8 and labels.dtype == torch.int64
        assert ((labels >= 1) & (labels < num_classes)).all()
        visible = masks.bool()
        assert (visible.sum(dim=(1, 2)) >= dataset.min_visible_pixels).all()
        # Box = bounding box of the visible mask, COCO pixel-edge convention (x2 = last column + 1).
        if k:
            expected = torchvision.ops.masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            torch.testing.assert_close(boxes, expected, rtol=0, atol=0)
        # Painting full shapes bottom-first gives the class mask: later shapes occlude earlier ones ...
        painted = torch.zeros(SIZE, dtype=torch.long)
        for shape, label in zip(amodal, labels):
            painted[shape] = label
        assert torch.equal(painted, semantic)
        # ... and each visible mask is its shape minus everything drawn above it.
        for i in range(k):
            above = amodal[i + 1:].any(dim=0) if i + 1 < k else torch.zeros(SIZE, dtype=torch.bool)
            assert torch.equal(visible[i], amodal[i] & ~above)
            seen_occlusion |= bool((amodal[i] & above).any())
        # The class mask is the union of the (disjoint) visible masks by label.
        assert (visible.sum(dim=0) <= 1).all()
        union = (visible.long() * labels.view(-1, 1, 1)).sum(dim=0) if k else torch.zeros(SIZE, dtype=torch.long)
        assert torch.equal(union, semantic)
    assert seen_occlusion, "no sample had overlapping shapes: occlusion is not exercised"


def test_shapes_class_balance_and_colour_not_tied_to_class():
    dataset = ShapesDataset(300, 32, seed=5)
    instances = torch.zeros(4)
    pixels = torch.zeros(4)
    colour_sum = torch.zeros(4, 3)
    for index in range(len(dataset)):
        s = dataset.render(index)
        instances += torch.bincount(s["labels"], minlength=4)
        pixels += torch.bincount(s["semantic"].flatten(), minlength=4)
        for label in range(4):
            colour_sum[label] += s["image"][:, s["semantic"] == label].sum(dim=1)
    shares = instances[1:] / instances[1:].sum()
    assert (shares > 0.25).all() and (shares < 0.42).all(), shares
    pixel_shares = pixels / pixels.sum()
    assert 0.45 < pixel_shares[0] < 0.9, pixel_shares  # mostly background, but shapes are not specks
    assert (pixel_shares[1:] > 0.04).all(), pixel_shares
    mean_colour = colour_sum / pixels.view(4, 1)
    spread = (mean_colour[1:] - mean_colour[1:].mean(dim=0)).abs().max()
    assert spread < 0.05, f"class mean colours differ by {spread:.3f}: colour would give the class away"


def test_shapes_generation_is_fast():
    dataset = ShapesDataset(200, 64)
    dataset.render(0)
    start = time.perf_counter()
    for index in range(100):
        dataset.render(index)
    per_sample = (time.perf_counter() - start) / 100
    assert per_sample < 0.02, f"{per_sample * 1e3:.1f} ms per 64x64 sample"  # ~1 ms on one idle core


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_shapes_train_augmentation_keeps_targets_consistent(task):
    dm = ShapesDataModule(image_size=SIZE, num_train=16, batch_size=4, task=task, augment=True, seed=4)
    dm.setup("fit")
    torch.manual_seed(0)
    flipped_or_scaled = False
    for images, targets in dm.train_dataloader():
        if task == "segmentation":
            assert images.shape == (4, 3, *SIZE) and targets.shape == (4, *SIZE)
            assert set(targets.unique().tolist()) <= {0, 1, 2, 3, 255}
            continue
        for image, target in zip(images, targets):
            assert image.shape == (3, *SIZE)
            boxes, masks = target["boxes"], target["masks"]
            assert masks.shape == (len(boxes), *SIZE) and target["labels"].shape == (len(boxes),)
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= SIZE[1]).all()
            assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= SIZE[0]).all()
            original = dm.dataset("train").render(target["image_id"])
            flipped_or_scaled |= not torch.equal(image, original["image"])
    if task == "detection":
        assert flipped_or_scaled


def test_shapes_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_classes"):
        ShapesDataset(4, 32, num_classes=9)
    with pytest.raises(ValueError, match="task"):
        ShapesDataModule(task="classification")
    with pytest.raises(ValueError, match="min_shapes"):
        ShapesDataset(4, 32, min_shapes=3, max_shapes=2)


def test_segmentation_collate_pads_with_ignore():
    small = (torch.ones(3, 4, 5), torch.ones(4, 5, dtype=torch.long))
    large = (torch.ones(3, 6, 3), torch.full((6, 3), 2, dtype=torch.long))
    images, masks = segmentation_collate([small, large])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == 255).all() and (masks[1, :, 3:] == 255).all() and (images[0, :, 4:] == 0).all()


# ------------------------------------------------------------------------------------------------ COCO
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), **WRITE)


def copy_coco(source: Path, target: Path, edit=None, split="val") -> Path:
    """A copy of a written COCO set whose ``split`` json went through ``edit(document)``."""
    import shutil

    shutil.copytree(source, target)
    path = target / "annotations" / f"instances_{split}.json"
    if edit is not None:
        document = json.loads(path.read_text())
        edit(document)
        path.write_text(json.dumps(document))
    return target


def written_and_generated(dm):
    """``(index, (image, target), rendered)`` for every sample of ``dm``'s train and val sets, next to what
    ShapesDataset renders for the same split and index (the sets written from it must be as long, and not empty)."""
    for split in ("train", "val"):
        reference = generated(split)
        dataset = dm.dataset(split)
        assert len(dataset) == len(reference) == WRITE[f"num_{split}"]
        for index in range(len(dataset)):
            yield index, dataset[index], reference.render(index)


def test_coco_round_trip_detection(coco_root):
    dm = COCODataModule(coco_root, task="detection", augment=False, batch_size=2)
    assert dm.num_classes == 4 and dm.class_names == ["background", "circle", "rectangle", "triangle"]
    dm.setup("fit")
    for index, (image, target), expected in written_and_generated(dm):
        assert torch.equal(as_uint8(image), as_uint8(expected["image"]))  # PNG: exact up to 8-bit quantization
        assert torch.equal(target["labels"], expected["labels"])
        assert torch.equal(torch.as_tensor(target["masks"]), expected["masks"])
        torch.testing.assert_close(torch.as_tensor(target["boxes"]), expected["boxes"], rtol=0, atol=1e-4)
        assert target["image_id"] == index + 1
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, *SIZE)
    assert targets[0]["boxes"].dtype == torch.float32 and targets[0]["masks"].dtype == torch.uint8
    assert type(targets[0]["boxes"]) is torch.Tensor  # plain tensors, not tv_tensors


def test_coco_round_trip_segmentation(coco_root):
    dm = COCODataModule(coco_root, task="segmentation", augment=False, batch_size=5)
    dm.setup("validate")
    images, masks = next(iter(dm.val_dataloader()))
    reference = generated("val")
    assert images.shape == (5, 3, *SIZE) and masks.shape == (5, *SIZE) and masks.dtype == torch.int64
    for index in range(5):
        assert torch.equal(masks[index], reference.render(index)["semantic"])


def test_coco_category_ids_mapped_to_contiguous_labels(coco_root, tmp_path):
    new_id = {1: 17, 2: 5, 3: 90}  # gaps and a different order, as in real COCO

    def remap(document):
        for category in document["categories"]:
            category["id"] = new_id[category["id"]]
        for annotation in document["annotations"]:
            annotation["category_id"] = new_id[annotation["category_id"]]

    root = copy_coco(coco_root, tmp_path / "coco", remap, split="train")
    copy_val = root / "annotations" / "instances_val.json"
    document = json.loads(copy_val.read_text())
    remap(document)
    copy_val.write_text(json.dumps(document))
    dm = COCODataModule(root, task="detection", augment=False)
    assert dm.category_ids == [5, 17, 90]
    assert dm.class_names == ["background", "rectangle", "circle", "triangle"]
    _, target = dm.dataset("val")[0]
    old_labels = generated("val").render(0)["labels"]
    expected = torch.tensor([{1: 2, 2: 1, 3: 3}[label] for label in old_labels.tolist()])
    assert torch.equal(target["labels"], expected)


def test_coco_image_without_objects(coco_root, tmp_path):
    root = copy_coco(coco_root, tmp_path / "coco", lambda d: d.update(
        annotations=[a for a in d["annotations"] if a["image_id"] != 2]))
    dm = COCODataModule(root, task="detection", augment=False, batch_size=5)
    _, target = dm.dataset("val")[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, *SIZE)
    dm.setup("validate")
    images, targets = next(iter(dm.val_dataloader()))
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].dtype == torch.int64
    assert targets[0]["boxes"].shape[0] > 0
    segmentation = COCODataModule(root, task="segmentation", augment=False)
    _, mask = segmentation.dataset("val")[1]
    assert mask.shape == SIZE and (mask == 0).all()


def test_coco_crowd_regions_are_ignored_for_segmentation_and_dropped_for_detection(coco_root, tmp_path):
    def make_first_crowd(document):
        document["annotations"][0]["iscrowd"] = 1

    root = copy_coco(coco_root, tmp_path / "coco", make_first_crowd)
    first = json.loads((root / "annotations" / "instances_val.json").read_text())["annotations"][0]
    index = first["image_id"] - 1
    expected = generated("val").render(index)
    _, target = COCODataModule(root, augment=False).dataset("val")[index]
    assert len(target["labels"]) == len(expected["labels"]) - 1
    _, mask = COCODataModule(root, task="segmentation", augment=False).dataset("val")[index]
    crowd = expected["masks"][0].bool()
    assert (mask[crowd] == 255).all() and torch.equal(mask[~crowd], expected["semantic"][~crowd])


def test_coco_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    dm = COCODataModule(missing)
    with pytest.raises(FileNotFoundError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(missing) in message and "annotations/instances_train.json" in message and "train/" in message


def test_coco_missing_image_dir_names_it(coco_root, tmp_path):
    root = copy_coco(coco_root, tmp_path / "coco")
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"image directory.*val"):
        COCODataModule(root).setup("fit")


def test_coco_truncated_json_names_file(coco_root, tmp_path):
    root = copy_coco(coco_root, tmp_path / "coco")
    path = root / "annotations" / "instances_train.json"
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(ValueError) as error:
        COCODataModule(root).num_classes
    assert str(path) in str(error.value) and "not valid JSON" in str(error.value)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d["annotations"][0].update(category_id=99), "category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=12345), "image_id 12345"),
        (lambda d: d["annotations"][0].update(bbox=[1.0, 2.0, -3.0, 4.0]), "negative width or height"),
        (lambda d: d.pop("categories"), "'categories'"),
    ],
    ids=["unknown-category", "unknown-image", "negative-bbox", "no-categories"],
)
def test_coco_inconsistent_annotations_name_file_and_problem(coco_root, tmp_path, edit, problem):
    root = copy_coco(coco_root, tmp_path / "coco", edit)
    dm = COCODataModule(root)
    dm.num_classes  # the train file is fine
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    assert "instances_val.json" in str(error.value) and problem in str(error.value)


def test_coco_without_pycocotools_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install gnlightning\[coco\]"):
        COCODataModule(tmp_path)


# ------------------------------------------------------------------------------------------------ VOC / folders
@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc"), **WRITE)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"), **WRITE)


@pytest.mark.parametrize("layout", ["voc", "folder"])
def test_voc_round_trip(layout, voc_root, folder_root):
    root = voc_root if layout == "voc" else folder_root
    dm = VOCDataModule(root, layout=layout, num_classes=4, augment=False, batch_size=3)
    dm.setup("fit")
    for _, (image, mask), expected in written_and_generated(dm):
        assert torch.equal(torch.as_tensor(mask), expected["semantic"])  # PNG masks: exact
        if layout == "folder":  # PNG images: exact up to 8-bit quantization
            assert torch.equal(as_uint8(image), as_uint8(expected["image"]))
        else:  # VOC keeps JPEG images: close, not exact
            assert (image - expected["image"]).abs().mean() < 0.04
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, *SIZE) and masks.shape == (3, *SIZE) and masks.dtype == torch.int64


def test_voc_masks_are_palette_and_folder_masks_grayscale(voc_root, folder_root):
    voc_mask = next((voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"))
    folder_mask = next((folder_root / "masks" / "train").glob("*.png"))
    assert Image.open(voc_mask).mode == "P" and Image.open(folder_mask).mode == "L"


def test_voc_augmented_batches_have_fixed_size(folder_root):
    dm = VOCDataModule(folder_root, layout="folder", num_classes=4, image_size=32, batch_size=3)
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_voc_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        VOCDataModule(tmp_path / "nowhere", layout="voc").setup("fit")
    assert str(tmp_path / "nowhere") in str(error.value) and "SegmentationClass" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        VOCDataModule(tmp_path / "nowhere", layout="folder").setup("fit")
    assert str(tmp_path / "nowhere") in str(error.value) and "masks/<split>" in str(error.value)


def test_folder_missing_split_dir(folder_root):
    dm = VOCDataModule(folder_root, layout="folder", num_classes=4, val_split="validation")
    with pytest.raises(FileNotFoundError) as error:
        dm.setup("fit")
    assert str(folder_root / "images" / "validation") in str(error.value) and "expected layout" in str(error.value)


def test_folder_image_without_mask(folder_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(folder_root, tmp_path / "folder"))
    (root / "masks" / "val" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        VOCDataModule(root, layout="folder", num_classes=4).setup("fit")
    message = str(error.value)
    assert str(root / "images" / "val" / "000002.png") in message
    assert str(root / "masks" / "val" / "000002.png") in message


def test_folder_bad_masks_are_explained(folder_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(folder_root, tmp_path / "folder"))
    mask_path = root / "masks" / "val" / "000000.png"
    mask = np.array(Image.open(mask_path))
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(mask_path)  # colour mask
    dm = VOCDataModule(root, layout="folder", num_classes=4)
    dm.setup("validate")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        dm.dataset("val")[0]
    mask_path = root / "masks" / "val" / "000001.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 7
    Image.fromarray(mask).save(mask_path)
    with pytest.raises(ValueError, match=r"000001.png contains class index 7.*num_classes=4"):
        dm.dataset("val")[1]


def test_detection_collate_gives_two_lists():
    image = torch.zeros(3, 4, 4)
    target = {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int32)}
    images, targets = detection_collate([(image, target), (image, target)])
    assert isinstance(images, list) and len(targets) == 2
    assert targets[0]["boxes"].dtype == torch.float32 and targets[0]["labels"].dtype == torch.int64


def test_write_script_cli(tmp_path):
    # In-process (a subprocess would spend seconds re-importing torch): the script's own main() with argv.
    script = runpy.run_path(str(REPO / "scripts" / "write_shapes_dataset.py"), run_name="write_shapes_dataset")
    script["main"](["--out", str(tmp_path), "--layout", "all", "--num-train", "2", "--num-val", "1",
                    "--image-size", "24x32", "--seed", "1"])
    assert (tmp_path / "coco" / "annotations" / "instances_val.json").is_file()
    assert len(list((tmp_path / "coco" / "train").glob("*.png"))) == 2
    assert (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text() \
        == "train_000000\ntrain_000001\n"
    assert Image.open(tmp_path / "folder" / "images" / "val" / "000000.png").size == (32, 24)


# ------------------------------------------------------------------------------------------------ consumers
def test_detection_batch_trains_torchvision_mask_rcnn(coco_root):
    """The detection batch format is exactly what torchvision's detectors take, empty images included."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 16
    model = MaskRCNN(  # the real Mask R-CNN code path, with a backbone small enough for a unit test
        backbone, num_classes=4, min_size=48, max_size=48,
        rpn_anchor_generator=AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
    )
    shapes = ShapesDataModule(image_size=SIZE, num_train=4, batch_size=2, task="detection", augment=True)
    shapes.setup("fit")
    images, targets = next(iter(shapes.train_dataloader()))
    targets[1] = {**targets[1], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, *SIZE, dtype=torch.uint8)}
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= losses.keys()
    assert all(torch.isfinite(value) for value in losses.values())
    coco = COCODataModule(coco_root, batch_size=2, image_size=SIZE)
    coco.setup("fit")
    images, targets = next(iter(coco.train_dataloader()))
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= losses.keys()
    assert all(torch.isfinite(value) for value in losses.values())


def test_segmentation_datamodule_runs_in_a_lightning_trainer(tmp_path):
    import lightning.pytorch as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 4, 3, padding=1)

        def training_step(self, batch, batch_idx):
            images, masks = batch
            return torch.nn.functional.cross_entropy(self.net(images), masks, ignore_index=255)

        def validation_step(self, batch, batch_idx):
            images, masks = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(images), masks, ignore_index=255))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=3, limit_val_batches=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    data = ShapesDataModule(image_size=32, num_train=12, num_val=4, batch_size=4, augment=True)
    trainer.fit(Tiny(), datamodule=data)
    assert trainer.global_step == 3 and "val_loss" in trainer.callback_metrics
