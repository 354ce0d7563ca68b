"""VOC-style semantic segmentation: the torchvision VOCdevkit layout, or a plain images/ + masks/ folder pair.

Both layouts end in the same dataset: a list of ``(image file, mask file)`` pairs, decoded as RGB image + class
index mask (palette or grayscale PNG; 255 = ignore, as VOC marks object borders). The file lists are built and
checked when a split is first used, so a wrong root or a missing mask fails once with the path and the layout
this module expected, rather than on some worker in the middle of an epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors

import lightning.pytorch as L

from gnlightning.data.base import SplitDataModule
from gnlightning.data.coco import _GET_DATA
from gnlightning.data.transforms import IGNORE_INDEX, build_transforms

__all__ = [
    "IMAGE_SUFFIXES", "VOC_CLASS_NAMES", "SegmentationPairs", "VOCLogic", "VOCDataModule", "folder_pairs",
    "read_class_mask", "voc_base_dir", "voc_pairs",
]

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASK_MODES = ("P", "L", "1", "I", "I;16")


def voc_base_dir(year: str) -> str:
    """Where torchvision's VOCSegmentation looks below ``root`` for ``year`` (2011 has an extra level)."""
    return datasets.voc.DATASET_YEAR_DICT.get(year, {}).get("base_dir", os.path.join("VOCdevkit", f"VOC{year}"))


def _voc_layout(root: Path, year: str) -> str:
    base = root / voc_base_dir(year)
    return (
        f"\nexpected layout (layout='voc', as torchvision.datasets.VOCSegmentation reads it):\n"
        f"  {base}/JPEGImages/<id>.jpg\n"
        f"  {base}/SegmentationClass/<id>.png   (palette or grayscale class indices, 255 = ignore)\n"
        f"  {base}/ImageSets/Segmentation/<split>.txt   (one <id> per line; split = train, val or trainval)\n"
        + _GET_DATA.format(writer="write_voc")
    )


def _folder_layout(root: Path) -> str:
    return (
        f"\nexpected layout (layout='folder'):\n"
        f"  {root}/images/<split>/<name>.jpg|.jpeg|.png\n"
        f"  {root}/masks/<split>/<name>.png   (same <name>; palette or grayscale class indices, 255 = ignore)\n"
        + _GET_DATA.format(writer="write_folder")
    )


def voc_pairs(root: str | os.PathLike, year: str, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` files of a VOCdevkit split, via ``torchvision.datasets.VOCSegmentation``, all checked."""
    root = Path(root)
    base = root / voc_base_dir(year)
    layout = _voc_layout(root, year)
    if not root.is_dir():
        raise FileNotFoundError(f"VOC root directory not found: {root}{layout}")
    for needed in (base, base / "JPEGImages", base / "SegmentationClass"):
        if not needed.is_dir():
            raise FileNotFoundError(f"VOC directory not found: {needed}{layout}")
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"VOC split list not found: {split_file}{layout}")
    voc = datasets.VOCSegmentation(str(root), year=year, image_set=split, download=False)
    # A blank line in the list (a trailing one, say) becomes an image named ".jpg": skip it.
    pairs = [(Path(image), Path(mask)) for image, mask in zip(voc.images, voc.masks) if Path(image).name != ".jpg"]
    _check_exist(pairs, layout, f"listed in {split_file}")
    return pairs


def folder_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` files of ``root/images/<split>`` and ``root/masks/<split>``, matched by file stem."""
    root = Path(root)
    layout = _folder_layout(root)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation folder root not found: {root}{layout}")
    image_dir, mask_dir = root / "images" / split, root / "masks" / split
    for needed in (image_dir, mask_dir):
        if not needed.is_dir():
            raise FileNotFoundError(f"split directory not found: {needed}{layout}")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}{layout}")
    pairs = [(image, mask_dir / f"{image.stem}.png") for image in images]
    _check_exist(pairs, layout, f"for the images in {image_dir}")
    return pairs


def _check_exist(pairs: list[tuple[Path, Path]], layout: str, where: str) -> None:
    missing = [f"{image} (mask {mask})" if image.is_file() else f"{image}"
               for image, mask in pairs if not (image.is_file() and mask.is_file())]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} image(s) or mask(s) {where} missing: {'; '.join(missing[:5])}{more}{layout}"
        )


def read_class_mask(path: str | os.PathLike, num_classes: int) -> torch.Tensor:
    """A PNG of class indices -> long [H,W]; rejects colour masks and indices outside ``0..num_classes-1, 255``.

    The value check catches the two usual mix-ups early: masks saved as RGB colours, and a ``num_classes`` that
    does not match the data (CrossEntropyLoss would otherwise fail with a CUDA assert far from the cause).
    """
    with Image.open(path) as mask:
        if mask.mode not in _MASK_MODES:
            raise ValueError(f"mask {path} has PIL mode {mask.mode!r}; expected a palette (P) or grayscale (L) PNG "
                             "of class indices, not colours")
        values = torch.from_numpy(np.array(mask, dtype=np.int64))
    bad = (values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)
    if bad.any():
        raise ValueError(f"mask {path} contains class index {int(values[bad][0])}, outside 0..{num_classes - 1} "
                         f"and not {IGNORE_INDEX} (ignore); is num_classes={num_classes} right?")
    return values


class SegmentationPairs(Dataset):
    """``(image, mask)`` from a list of file pairs: Image uint8 [3,H,W] and Mask long [H,W], then ``transforms``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int, transforms: Any = None) -> None:
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image:
            image = tv_tensors.Image(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
        mask = tv_tensors.Mask(read_class_mask(mask_path, self.num_classes))
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {image_path} is {tuple(image.shape[-2:])} but mask {mask_path} is "
                             f"{tuple(mask.shape[-2:])} (height, width)")
        sample = (image, mask)
        if self.transforms is not None:
            sample = self.transforms(*sample)
        return sample


class VOCLogic(SplitDataModule):
    """Semantic segmentation from a VOCdevkit (``layout="voc"``) or an images/masks folder (``layout="folder"``).

    Batches are ``(images [N,3,H,W] float in [0,1] (ImageNet-normalized if ``normalize``), masks [N,H,W] long)``;
    255 marks pixels to ignore (VOC borders; padding when ``image_size=None`` and sizes differ). ``image_size``
    (int or (h, w)) resizes eval images and, with ``augment``, makes train crops of that size after a flip and a
    scale jitter (``scale_range``). ``num_classes`` counts the background (21 for VOC); mask values must be below
    it or 255. ``class_names`` defaults to VOC's names when ``num_classes == 21``.

    Splits: ``train_split`` / ``val_split`` / ``test_split`` (test defaults to val) name a VOC ImageSets list
    (train, val, trainval) or a sub-folder of ``images/`` and ``masks/``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        layout: str = "voc",
        year: str = "2012",
        num_classes: int = 21,
        class_names: Sequence[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        image_size: int | Sequence[int] | None = None,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        normalize: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if layout not in ("voc", "folder"):
            raise ValueError(f"layout must be 'voc' (VOCdevkit) or 'folder' (images/ + masks/), got {layout!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.layout = layout
        self.task = "segmentation"
        self.num_classes = num_classes
        if class_names is None:
            class_names = VOC_CLASS_NAMES if num_classes == len(VOC_CLASS_NAMES) else (
                "background", *(f"class_{i}" for i in range(1, num_classes)))
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.class_names = list(class_names)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self._datasets: dict[str, SegmentationPairs] = {}

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        """The checked ``(image, mask)`` files of ``split`` ("train", "val" or "test")."""
        name = self._splits[split]
        if self.layout == "voc":
            return voc_pairs(self.root, str(self.hparams.year), name)  # a YAML 2012 arrives as an int
        return folder_pairs(self.root, name)

    def dataset(self, split: str) -> SegmentationPairs:
        """The dataset of ``split`` ("train", "val" or "test"), with that split's transforms."""
        if split == "test" and self._splits["test"] == self._splits["val"]:
            return self.dataset("val")
        if split not in self._datasets:
            hp = self.hparams
            train = split == "train"
            transforms = build_transforms(
                "segmentation",
                train=train and hp.augment,
                image_size=hp.image_size,
                scale_range=tuple(hp.scale_range),
                hflip=train and hp.augment,
                normalize=hp.normalize,
            )
            self._datasets[split] = SegmentationPairs(self.pairs(split), self.num_classes, transforms)
        return self._datasets[split]


class VOCDataModule(VOCLogic, L.LightningDataModule):
    __doc__ = VOCLogic.__doc__  # a lightning.pytorch LightningDataModule; gnlightning.pl has the other one
