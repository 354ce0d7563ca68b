"""Write the synthetic shapes set to disk in the COCO, VOCdevkit and plain-folder layouts.

Why: the file-based data modules (:class:`~gnlightning.data.coco.COCODataModule`,
:class:`~gnlightning.data.voc.VOCDataModule`) need data to be tested and demonstrated on, and no data set can be
downloaded here. The files hold exactly what :class:`~gnlightning.data.shapes.ShapesDataModule` generates for the
same ``seed`` (images quantized to 8 bits), so a run on the written files can be compared with a run on the
generator, and a loader round trip can be checked pixel for pixel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from gnlightning.data.shapes import ShapesDataset, split_seed

__all__ = ["LAYOUTS", "voc_palette", "write_coco", "write_folder", "write_voc"]

LAYOUTS = ("coco", "voc", "folder")


def voc_palette() -> list[int]:
    """VOC's 256-colour palette (flat RGB list), so written class masks look like VOC's in an image viewer."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


def _samples(
    split: str, count: int, image_size: int | Sequence[int], seed: int, num_classes: int, min_shapes: int,
    max_shapes: int,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    # Same per-split seeds as ShapesDataModule, so the files equal the generator's output for this seed.
    dataset = ShapesDataset(count, image_size, num_classes, min_shapes, max_shapes, seed=split_seed(seed, split))
    for index in range(count):
        yield index, dataset.render(index)


def _image_array(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _mask_image(semantic: torch.Tensor, palette: bool) -> Image.Image:
    mask = Image.fromarray(semantic.to(torch.uint8).numpy())  # 2-D uint8 -> mode "L"
    if palette:
        mask.putpalette(voc_palette())  # "L" -> "P" with the same indices, shown in VOC's colours
    return mask


def write_coco(
    out: str | os.PathLike,
    num_train: int = 16,
    num_val: int = 8,
    image_size: int | Sequence[int] = 64,
    seed: int = 0,
    num_classes: int = 4,
    min_shapes: int = 1,
    max_shapes: int = 5,
) -> Path:
    """COCO layout: ``out/annotations/instances_{train,val}.json`` and ``out/{train,val}/<index:06d>.png``.

    Instance masks are stored as compressed RLE (``pycocotools.mask.encode``), which is exact, so loading them
    back gives the generator's masks pixel for pixel. Category ids are ``1..num_classes-1`` in shape-kind order;
    image ids are ``index + 1``; ``bbox`` / ``area`` come from the RLE, as COCO's own tools compute them.
    """
    from gnlightning.data.coco import require_pycocotools

    require_pycocotools()
    from pycocotools import mask as mask_utils

    root = Path(out)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    names = ShapesDataset(0, image_size, num_classes).class_names
    categories = [{"id": label, "name": name, "supercategory": "shape"} for label, name in enumerate(names) if label]
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index, sample in _samples(split, count, image_size, seed, num_classes, min_shapes, max_shapes):
            file_name = f"{index:06d}.png"
            Image.fromarray(_image_array(sample["image"])).save(root / split / file_name)
            height, width = sample["semantic"].shape
            images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
            for mask, label in zip(sample["masks"], sample["labels"].tolist()):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                })
        document = {
            "info": {"description": f"gnlightning synthetic shapes, {split} split, seed {seed}"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def write_voc(
    out: str | os.PathLike,
    num_train: int = 16,
    num_val: int = 8,
    image_size: int | Sequence[int] = 64,
    seed: int = 0,
    num_classes: int = 4,
    min_shapes: int = 1,
    max_shapes: int = 5,
    year: str = "2012",
) -> Path:
    """torchvision's VOCdevkit layout under ``out``: ``VOCdevkit/VOC<year>/JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNG of class indices) and ``ImageSets/Segmentation/{train,val,
    trainval}.txt``. Ids are ``<split>_<index:06d>`` because both splits share one image folder.
    Images are JPEG as in VOC, hence not bit-exact; masks are.
    """
    root = Path(out)
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    all_ids: list[str] = []
    for split, count in (("train", num_train), ("val", num_val)):
        ids = []
        for index, sample in _samples(split, count, image_size, seed, num_classes, min_shapes, max_shapes):
            sample_id = f"{split}_{index:06d}"
            Image.fromarray(_image_array(sample["image"])).save(
                base / "JPEGImages" / f"{sample_id}.jpg", quality=95, subsampling=0  # no chroma subsampling
            )
            _mask_image(sample["semantic"], palette=True).save(base / "SegmentationClass" / f"{sample_id}.png")
            ids.append(sample_id)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        all_ids += ids
    (base / "ImageSets" / "Segmentation" / "trainval.txt").write_text("".join(f"{i}\n" for i in all_ids))
    return root


def write_folder(
    out: str | os.PathLike,
    num_train: int = 16,
    num_val: int = 8,
    image_size: int | Sequence[int] = 64,
    seed: int = 0,
    num_classes: int = 4,
    min_shapes: int = 1,
    max_shapes: int = 5,
) -> Path:
    """Plain folder layout: ``out/images/{train,val}/<index:06d>.png`` and ``out/masks/{train,val}/<index:06d>.png``
    (grayscale PNG of class indices). Everything is PNG, so images and masks read back bit-exact.
    """
    root = Path(out)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for index, sample in _samples(split, count, image_size, seed, num_classes, min_shapes, max_shapes):
            name = f"{index:06d}.png"
            Image.fromarray(_image_array(sample["image"])).save(root / "images" / split / name)
            _mask_image(sample["semantic"], palette=False).save(root / "masks" / split / name)
    return root
