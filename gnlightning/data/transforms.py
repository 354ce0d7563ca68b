"""Joint image / mask / box transforms and the collate functions every data module shares.

One pipeline serves both tasks because ``torchvision.transforms.v2`` moves an image, its class mask, its instance
masks and its boxes together; the only task-specific choices are what padding means for a mask (``255`` = ignore
for a class mask, ``0`` = "not this object" for an instance mask) and whether degenerate boxes must be dropped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "TASKS", "build_transforms", "check_task", "collate_fn_for",
    "detection_collate", "segmentation_collate", "to_size",
]

#: Class-mask value that losses and metrics skip (VOC's object borders, padding, COCO crowd regions).
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TASKS = ("segmentation", "detection")


def check_task(task: str) -> str:
    """Fail at construction (i.e. when Hydra instantiates the config), not at the first batch."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def to_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``64`` or ``(48, 64)`` -> ``(h, w)``; ``None`` stays ``None`` (keep each image's own size)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def build_transforms(
    task: str,
    train: bool,
    image_size: int | Sequence[int] | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    normalize: bool = False,
) -> v2.Compose:
    """The pipeline for one split. Inputs may be PIL images or tv_tensors; outputs are float images in [0, 1].

    Train: horizontal flip, then scale jitter as in torchvision's segmentation recipe (shorter side resized to
    ``scale * min(image_size)``, then a random ``image_size`` crop, padded where the image is smaller), so every
    batch has one fixed size. Eval: a plain resize to ``image_size`` -- no crop, so metrics see every pixel.
    With ``image_size=None`` nothing is resized (detection models resize internally; segmentation batches are
    padded by :func:`segmentation_collate`) and train keeps only the flip.

    ``normalize`` applies ImageNet mean/std; leave it off for torchvision detection models, which normalize
    inside ``GeneralizedRCNNTransform``.
    """
    check_task(task)
    size = to_size(image_size)
    steps: list[Any] = [v2.ToImage()]
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    if size is not None:
        if train:
            low, high = scale_range
            base = min(size)
            steps.append(v2.RandomResize(max(1, int(base * low)), max(2, int(base * high) + 1)))
            mask_fill = IGNORE_INDEX if task == "segmentation" else 0
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: mask_fill}
            steps.append(v2.RandomCrop(size, pad_if_needed=True, fill=fill))
        else:
            steps.append(v2.Resize(size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    if task == "detection":
        # Crops and resizes can shrink a box to nothing; torchvision's detection losses reject those.
        steps.append(v2.SanitizeBoundingBoxes(min_size=1))
    return v2.Compose(steps)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # tv_tensor subclasses carry metadata the models do not need and slow down every op; hand out plain tensors.
    return tensor.as_subclass(torch.Tensor)


def segmentation_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(image [3,H,W], mask [H,W]), ...]`` -> ``(images [N,3,H,W] float, masks [N,H,W] long)``.

    Equal sizes stack exactly as ``default_collate`` would. Unequal sizes (``image_size=None``) are padded at the
    bottom / right to the largest one: images with 0, masks with ``IGNORE_INDEX`` so the padding never counts.
    """
    images = [_plain(image) for image, _ in batch]
    masks = [_plain(mask).long() for _, mask in batch]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    if any(image.shape[-2:] != (height, width) for image in images):
        images = [F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in images]
        masks = [
            F.pad(mask, (0, width - mask.shape[-1], 0, height - mask.shape[-2]), value=IGNORE_INDEX) for mask in masks
        ]
    return torch.stack(images), torch.stack(masks)


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``, the two lists torchvision detectors take.

    Images keep their own sizes (detectors batch them internally). Targets are normalised to the dtypes the
    detectors expect: ``boxes`` float32 [K,4] xyxy, ``labels`` int64 [K], ``masks`` uint8 [K,H,W].
    """
    images: list[torch.Tensor] = []
    targets: list[dict[str, Any]] = []
    for image, target in batch:
        images.append(_plain(image))
        out = dict(target)
        out["boxes"] = _plain(target["boxes"]).float().reshape(-1, 4)
        out["labels"] = _plain(target["labels"]).long()
        if "masks" in target:
            out["masks"] = _plain(target["masks"]).to(torch.uint8)
        targets.append(out)
    return images, targets


def collate_fn_for(task: str):
    """The collate function that gives ``task``'s batch shape."""
    return segmentation_collate if check_task(task) == "segmentation" else detection_collate
