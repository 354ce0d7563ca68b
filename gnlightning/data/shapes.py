"""Synthetic "shapes" data: textured images with coloured, overlapping shapes, for segmentation and detection.

Why a synthetic set: the project's claims (BN degrades at 1-4 images per device, GN does not) must be checkable on
a CPU in minutes, with no download. The images are built so that those claims can show up at all:

- the class is the *shape* (circle, rectangle, triangle, ...), never the colour: shape and background colours are
  drawn independently, so a model must learn geometry;
- backgrounds are textured (smooth noise, stripes, gradients, checkerboards) with varying contrast and brightness,
  so per-batch statistics differ from image to image, which is what makes tiny-batch BN noisy;
- shapes vary in size, count and rotation and occlude each other (later shapes are drawn on top).

Every sample is a pure function of ``(seed, index)``: its generator is seeded from both, so every DDP rank and
every DataLoader worker draws the same image for the same index, and nothing is stored.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

import lightning.pytorch as L

from gnlightning.data.base import SplitDataModule
from gnlightning.data.transforms import build_transforms, check_task, to_size

__all__ = ["SHAPE_KINDS", "ShapesDataset", "ShapesLogic", "ShapesDataModule", "sample_seed", "split_seed"]

#: Shape kinds in label order: label ``k`` (1-based) is ``SHAPE_KINDS[k - 1]``; ``num_classes - 1`` of them are used.
SHAPE_KINDS = ("circle", "rectangle", "triangle", "ring", "cross")

#: Each split draws from its own seed so that train, val and test never share an image.
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}

_BACKGROUNDS = ("noise", "stripes", "gradient", "checker")


def split_seed(seed: int, split: str) -> int:
    """The dataset seed of ``split`` for a data module seeded with ``seed``: ``3*seed + 0/1/2``, so that the
    splits never share an image and different module seeds never share a split."""
    return seed * 3 + SPLIT_OFFSETS[split]


#: Knuth's multiplicative-hash constant (2**32 / golden ratio): seeds up to 300 apart start >8 million indices apart.
_SEED_STRIDE = 2_654_435_761


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a dataset seeded with ``seed``.

    Only 32 bits: torch's CPU generator (mt19937) ignores the upper half of its seed, so ``(seed << 32) + index``
    would give every seed the same images. Within one seed, indices map one-to-one; two seeds that differ by a
    small amount (the train / val / test splits use ``3*seed + 0/1/2``) collide only beyond 8 million samples.
    """
    return (seed * _SEED_STRIDE + index) % 2**32


class ShapesDataset(Dataset):
    """``num_samples`` synthetic images of ``image_size``, generated on the fly from ``(seed, index)``.

    ``dataset[i]`` is, for ``task="segmentation"``, ``(image, mask)``: ``tv_tensors.Image`` float [3,H,W] in [0, 1]
    and ``tv_tensors.Mask`` long [H,W] (0 = background, ``k`` = ``SHAPE_KINDS[k-1]``). For ``task="detection"`` it
    is ``(image, target)`` with ``target = {"boxes": BoundingBoxes float [K,4] xyxy, "labels": int64 [K] in
    1..num_classes-1, "masks": Mask uint8 [K,H,W], "image_id": index}``. ``transforms`` (a v2 transform) is
    applied jointly to that pair. :meth:`render` gives everything at once, before any transform.

    Boxes follow COCO's pixel-area convention: a box covers whole pixels, ``x2 = last column + 1``, so a one-pixel
    object has a 1x1 box. Instance masks are the *visible* parts; a shape whose visible part is tiny
    (``< min_visible_pixels`` or ``< min_visible_fraction`` of its own area) is not drawn at all, so the image, the
    class mask and the instance list always agree.

    Knobs: ``num_classes`` counts the background (2..6: the first ``num_classes - 1`` of ``SHAPE_KINDS``);
    ``min_shapes`` / ``max_shapes`` bound the shapes drawn per image (before dropping hidden ones);
    ``size_range`` is a shape's radius as a fraction of the image's short side; ``noise_std`` is per-pixel
    Gaussian noise; ``min_contrast`` keeps shape colours distinguishable from the background colours.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int | Sequence[int] = 64,
        num_classes: int = 4,
        min_shapes: int = 1,
        max_shapes: int = 5,
        seed: int = 0,
        task: str = "segmentation",
        transforms: Any = None,
        noise_std: float = 0.03,
        min_contrast: float = 0.35,
        size_range: tuple[float, float] = (0.09, 0.25),
        min_visible_pixels: int = 8,
        min_visible_fraction: float = 0.2,
    ) -> None:
        if not 2 <= num_classes <= len(SHAPE_KINDS) + 1:
            raise ValueError(
                f"num_classes counts the background: 2..{len(SHAPE_KINDS) + 1} (shape kinds: {SHAPE_KINDS}), "
                f"got {num_classes}"
            )
        if not 0 <= min_shapes <= max_shapes:
            raise ValueError(f"need 0 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.image_size = to_size(image_size)
        self.num_classes = num_classes
        self.min_shapes = min_shapes
        self.max_shapes = max_shapes
        self.seed = seed
        self.task = check_task(task)
        self.transforms = transforms
        self.noise_std = noise_std
        self.min_contrast = min_contrast
        self.size_range = (float(size_range[0]), float(size_range[1]))
        self.min_visible_pixels = min_visible_pixels
        self.min_visible_fraction = min_visible_fraction
        height, width = self.image_size
        # Pixel centres, reused by every shape test.
        self._ys = (torch.arange(height, dtype=torch.float32) + 0.5).view(height, 1).expand(height, width)
        self._xs = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, width).expand(height, width)

    @property
    def class_names(self) -> list[str]:
        return ["background", *SHAPE_KINDS[: self.num_classes - 1]]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        sample = self.render(index)
        image = tv_tensors.Image(sample["image"])
        if self.task == "segmentation":
            out: tuple[Any, Any] = (image, tv_tensors.Mask(sample["semantic"]))
        else:
            target = {
                "boxes": tv_tensors.BoundingBoxes(sample["boxes"], format="XYXY", canvas_size=self.image_size),
                "labels": sample["labels"],
                "masks": tv_tensors.Mask(sample["masks"]),
                "image_id": index,
            }
            out = (image, target)
        if self.transforms is not None:
            out = self.transforms(*out)
        return out

    # ----------------------------------------------------------------------------------------------- generation
    def render(self, index: int) -> dict[str, torch.Tensor]:
        """Everything about sample ``index``, untransformed, as plain tensors.

        Keys: ``image`` float [3,H,W] in [0,1]; ``semantic`` long [H,W]; ``boxes`` float [K,4] xyxy;
        ``labels`` int64 [K]; ``masks`` uint8 [K,H,W] (visible parts, in drawing order, bottom first);
        ``amodal_masks`` bool [K,H,W] (each drawn shape's full extent inside the image, for tests and debugging).
        """
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index))
        height, width = self.image_size
        image, background_colours = self._background(generator)

        count = int(torch.randint(self.min_shapes, self.max_shapes + 1, (), generator=generator))
        kinds = torch.randint(1, self.num_classes, (count,), generator=generator).tolist()
        params = torch.rand(count, 12, generator=generator).tolist()
        shapes = [self._shape_mask(kind, p) for kind, p in zip(kinds, params)]

        # Decide visibility top-down: a shape is covered only by shapes above it that are actually drawn.
        covered = torch.zeros(height, width, dtype=torch.bool)
        keep: list[int] = []
        visible: dict[int, torch.Tensor] = {}
        for i in reversed(range(count)):
            mask = shapes[i]
            seen = mask & ~covered
            area = int(seen.sum())
            if area >= max(self.min_visible_pixels, self.min_visible_fraction * int(mask.sum())) and area > 0:
                keep.append(i)
                visible[i] = seen
                covered |= mask
        keep.reverse()

        semantic = torch.zeros(height, width, dtype=torch.long)
        for i in keep:  # bottom first, so later shapes overwrite earlier ones
            image = torch.where(shapes[i], self._shape_colour(params[i], background_colours, generator), image)
            semantic[shapes[i]] = kinds[i]
        image = (image + self.noise_std * torch.randn(3, height, width, generator=generator)).clamp_(0, 1)

        masks = torch.stack([visible[i] for i in keep]) if keep else torch.zeros(0, height, width, dtype=torch.bool)
        return {
            "image": image,
            "semantic": semantic,
            "boxes": _mask_boxes(masks),
            "labels": torch.tensor([kinds[i] for i in keep], dtype=torch.int64),
            "masks": masks.to(torch.uint8),
            "amodal_masks": torch.stack([shapes[i] for i in keep]) if keep else masks.clone(),
        }

    def _background(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A two-colour texture (and its two colours [2,3,1,1]); random colours, so none means "background"."""
        height, width = self.image_size
        kind = _BACKGROUNDS[int(torch.randint(len(_BACKGROUNDS), (), generator=generator))]
        colours = torch.rand(2, 3, 1, 1, generator=generator)
        u = torch.rand(4, generator=generator).tolist()
        angle = math.pi * u[0]
        along = self._xs * math.cos(angle) + self._ys * math.sin(angle)
        period = (0.12 + 0.3 * u[1]) * min(height, width)
        if kind == "noise":
            cells = 2 + int(u[2] * 6)
            coarse = torch.rand(1, 1, cells, cells, generator=generator)
            t = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
        elif kind == "stripes":
            t = 0.5 + 0.5 * torch.sin(along * (2 * math.pi / period) + 2 * math.pi * u[2])
        elif kind == "gradient":
            t = (along - along.min()) / (along.max() - along.min()).clamp_min(1e-6)
        else:  # checker: hard edges that look locally like rectangle corners
            t = ((self._xs // period + self._ys // period) % 2).float()
        contrast = 0.2 + 0.5 * u[3]
        t = 0.5 + contrast * (t - 0.5)
        return colours[0] * (1 - t) + colours[1] * t, colours

    def _shape_colour(self, p: list[float], background: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random colour with a gentle linear shading, so shapes are not perfectly flat either.

        The colour says nothing about the class, but it differs from both background colours by at least
        ``min_contrast`` in some channel (first of 8 draws that does): a shape invisible against its background
        would only teach the model to guess. Shapes may still match each other's colour.
        """
        candidates = torch.rand(8, 3, 1, 1, generator=generator)
        # Distance of each candidate to the nearer background colour (max over channels).
        distance = (candidates[:, None] - background[None]).abs().amax(dim=(2, 3, 4)).amin(dim=1)
        colour = candidates[int(torch.argmax((distance >= self.min_contrast).int()))]
        height, width = self.image_size
        angle = 2 * math.pi * p[10]
        ramp = (self._xs * math.cos(angle) + self._ys * math.sin(angle)) / max(height, width)
        return (colour + 0.25 * (p[11] - 0.5) * ramp).clamp(0, 1)

    def _shape_mask(self, kind: int, p: list[float]) -> torch.Tensor:
        """Boolean [H,W] coverage of one shape; ``p`` holds its uniform draws (centre, size, angle, ...)."""
        height, width = self.image_size
        side = min(height, width)
        cy, cx = (0.05 + 0.9 * p[0]) * height, (0.05 + 0.9 * p[1]) * width
        low, high = self.size_range
        radius = (low + (high - low) * p[2]) * side
        angle = math.pi * p[3]
        dy, dx = self._ys - cy, self._xs - cx
        # Coordinates in the shape's own rotated frame.
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        name = SHAPE_KINDS[kind - 1]
        if name == "circle":
            return dx * dx + dy * dy <= radius * radius
        if name == "rectangle":
            half_h = radius * (0.45 + 0.45 * p[4])
            return (u.abs() <= radius * 1.05) & (v.abs() <= half_h)
        if name == "triangle":
            # Jittered vertex angles give scalene triangles; ordered angles keep the polygon convex.
            r = radius * 1.3
            corners = [2 * math.pi * (p[3] + k / 3) + 0.5 * (p[5 + k] - 0.5) for k in range(3)]
            points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
            inside = torch.ones(height, width, dtype=torch.bool)
            for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]):
                inside &= (x2 - x1) * (self._ys - y1) - (y2 - y1) * (self._xs - x1) >= 0
            return inside
        if name == "ring":
            outer = radius * 1.1
            inner = outer * (0.4 + 0.25 * p[4])
            d2 = dx * dx + dy * dy
            return (d2 <= outer * outer) & (d2 >= inner * inner)
        # cross
        arm = radius * 1.1
        half_width = radius * (0.22 + 0.15 * p[4])
        return ((u.abs() <= arm) & (v.abs() <= half_width)) | ((u.abs() <= half_width) & (v.abs() <= arm))


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes enclosing each mask, in pixel-edge coordinates (last column + 1), as COCO's ``toBbox`` does."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = masks.shape[1:]
    y_index = torch.arange(height)
    x_index = torch.arange(width)
    y1 = torch.where(rows, y_index, height).amin(dim=1)
    y2 = torch.where(rows, y_index, -1).amax(dim=1) + 1
    x1 = torch.where(cols, x_index, width).amin(dim=1)
    x2 = torch.where(cols, x_index, -1).amax(dim=1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


class ShapesLogic(SplitDataModule):
    """Train / val / test splits of :class:`ShapesDataset`, with disjoint seeds (``seed*3 + 0/1/2``).

    A batch is, for ``task="segmentation"``, ``(images [N,3,H,W] float, masks [N,H,W] long)``; for
    ``task="detection"``, ``(images: list of [3,H,W], targets: list of dicts with boxes / labels / masks /
    image_id)``. ``batch_size`` is per device: under DDP Lightning gives each rank its own shard.

    ``augment=True`` adds a joint horizontal flip and a small scale jitter (``scale_range``, crop / pad back to
    ``image_size``) to the training split only. The train loader drops its last incomplete batch, since a batch
    of one sample would make BatchNorm's batch statistics degenerate.

    ``size_range`` is a shape's radius as a fraction of the image's short side (see :class:`ShapesDataset`); a wide
    range (the detection recipe's ``[0.05, 0.4]``) gives objects small and large enough to need several pyramid
    levels.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        num_classes: int = 4,
        min_shapes: int = 1,
        max_shapes: int = 5,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        seed: int = 0,
        batch_size: int = 4,
        num_workers: int = 0,
        task: str = "segmentation",
        augment: bool = False,
        scale_range: tuple[float, float] = (0.75, 1.33),
        normalize: bool = False,
        pin_memory: bool = False,
        drop_last: bool = True,
        size_range: tuple[float, float] = (0.09, 0.25),
    ) -> None:
        super().__init__()
        # a plain tuple, not Hydra's ListConfig: checkpoints hold the hyper-parameters and load with weights_only
        size_range = (float(size_range[0]), float(size_range[1]))
        self.save_hyperparameters()
        self.image_size = to_size(image_size)
        self.num_classes = num_classes
        self.task = check_task(task)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.class_names = ShapesDataset(0, self.image_size, num_classes, min_shapes, max_shapes).class_names
        self._datasets: dict[str, ShapesDataset] = {}

    def dataset(self, split: str) -> ShapesDataset:
        """The dataset of ``split`` ("train", "val" or "test"), with that split's transforms."""
        if split not in self._datasets:
            hp = self.hparams
            train = split == "train"
            needs_transforms = (train and hp.augment) or hp.normalize
            transforms = build_transforms(
                self.task,
                train=train and hp.augment,
                image_size=self.image_size if train and hp.augment else None,
                scale_range=tuple(hp.scale_range),
                hflip=train and hp.augment,
                normalize=hp.normalize,
            ) if needs_transforms else None
            self._datasets[split] = ShapesDataset(
                num_samples={"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}[split],
                image_size=self.image_size,
                num_classes=self.num_classes,
                min_shapes=hp.min_shapes,
                max_shapes=hp.max_shapes,
                seed=split_seed(hp.seed, split),
                task=self.task,
                transforms=transforms,
                size_range=hp.size_range,
            )
        return self._datasets[split]


class ShapesDataModule(ShapesLogic, L.LightningDataModule):
    __doc__ = ShapesLogic.__doc__  # a lightning.pytorch LightningDataModule; gnlightning.pl has the other one
