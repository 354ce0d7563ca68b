"""COCO-format data (instances json + an image folder) for detection, instance and semantic segmentation.

Built on ``torchvision.datasets.CocoDetection`` and ``wrap_dataset_for_transforms_v2``, which already turn COCO
annotations into v2 ``BoundingBoxes`` / ``Mask`` targets. What this module adds is what a training run needs on top:
labels made contiguous (COCO's category ids have gaps; detectors want ``1..K``), crowd regions handled (dropped
for detection, ignored for segmentation), empty images kept, class masks rasterized for semantic segmentation, and
annotation files checked up front so that a bad file fails with its name and the problem, not with a ``KeyError``
deep inside pycocotools on some worker.

pycocotools is an optional extra (``pip install gnlightning[coco]``); it is imported only when COCO data is used.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors

import lightning.pytorch as L

from gnlightning.data.base import SplitDataModule
from gnlightning.data.transforms import IGNORE_INDEX, build_transforms, check_task

__all__ = ["COCOLogic", "COCODataModule", "COCOSplit", "load_coco_annotations", "require_pycocotools"]

_MAX_REPORTED_PROBLEMS = 5
# The way out of a missing or misplaced data set, appended to every layout message.
_GET_DATA = ("fix: point root at a directory with this layout (gnl-train: data.root=/path); "
             "gnlightning.data.{writer}(directory) writes a small synthetic set in it, and gnl-train data=shapes "
             "trains on built-in data with no files")


def require_pycocotools() -> None:
    """Import pycocotools or explain how to get it (it is the ``[coco]`` extra, not a core dependency)."""
    try:
        import pycocotools.coco  # noqa: F401
        import pycocotools.mask  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "COCO-format data needs pycocotools, an optional extra: pip install gnlightning[coco] "
            "(or pip install pycocotools)"
        ) from error


def load_coco_annotations(path: str | os.PathLike, layout_hint: str = "") -> dict[str, Any]:
    """Read a COCO instances json and check what training relies on; returns the parsed dict.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file and the (first few)
    problems otherwise: invalid or truncated JSON, a missing or non-list ``images`` / ``annotations`` /
    ``categories``, duplicate ids, an annotation whose image or category does not exist, a bbox that is not four
    finite numbers or has negative width / height. Checking everything here is cheap next to training and means
    a broken file is reported once, clearly, instead of crashing a worker mid-epoch. A missing ``iscrowd`` is
    filled in as 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}{layout_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "the file may be truncated or corrupt: copy, download or export it again"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images / annotations / categories, "
                         f"got {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{path}: missing or not a list: {', '.join(repr(key) for key in missing)} "
                         "(a COCO instances file has 'images', 'annotations' and 'categories' lists)")

    problems: list[str] = []
    image_ids = _check_ids(data["images"], "image", ("id", "file_name"), problems)
    category_ids = _check_ids(data["categories"], "category", ("id", "name"), problems)
    annotation_ids: set[Any] = set()
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            problems.append(f"annotations[{position}] is not an object")
            continue
        name = f"annotation {annotation.get('id', f'#{position}')}"
        if "id" not in annotation:
            problems.append(f"{name} has no 'id'")
        elif annotation["id"] in annotation_ids:
            problems.append(f"{name}: duplicate id")
        else:
            annotation_ids.add(annotation["id"])
        if annotation.get("image_id") not in image_ids:
            problems.append(f"{name}: image_id {annotation.get('image_id')!r} is not an image in this file")
        if annotation.get("category_id") not in category_ids:
            problems.append(f"{name}: category_id {annotation.get('category_id')!r} is not a category in this file")
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite_number(v) for v in bbox)):
            problems.append(f"{name}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
        elif bbox[2] < 0 or bbox[3] < 0:
            problems.append(f"{name}: bbox {bbox} has negative width or height")
        # Hand-made files often omit it; pycocotools and torchvision's wrapper expect it on every annotation.
        annotation.setdefault("iscrowd", 0)
    if problems:
        shown = "; ".join(problems[:_MAX_REPORTED_PROBLEMS])
        more = f" (and {len(problems) - _MAX_REPORTED_PROBLEMS} more)" if len(problems) > _MAX_REPORTED_PROBLEMS else ""
        raise ValueError(f"{path}: {len(problems)} problem(s) in the annotations: {shown}{more}")
    return data


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ids(entries: list[Any], kind: str, required: Sequence[str], problems: list[str]) -> set[Any]:
    ids: set[Any] = set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(key not in entry for key in required):
            problems.append(f"{kind} entry #{position} must be an object with {', '.join(map(repr, required))}")
            continue
        if entry["id"] in ids:
            problems.append(f"{kind} id {entry['id']!r} appears twice")
        ids.add(entry["id"])
    return ids


class _PreloadedCocoDetection(datasets.CocoDetection):
    """CocoDetection over an already parsed and checked annotation dict (its own ``__init__`` would re-read the
    file, which for COCO train is 450 MB of JSON)."""

    def __init__(self, root: str | os.PathLike, annotations: dict[str, Any]) -> None:
        datasets.VisionDataset.__init__(self, root)
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO()
            coco.dataset = annotations
            coco.createIndex()
        self.coco = coco
        self.ids = sorted(coco.imgs.keys())


class COCOSplit(Dataset):
    """One split of a COCO-format set, as ``(image, target)`` for detection or ``(image, mask)`` for segmentation.

    Detection targets: ``boxes`` BoundingBoxes [K,4] xyxy, ``labels`` int64 [K] in ``1..num_classes-1``,
    ``masks`` Mask uint8 [K,H,W] (if ``with_masks``), ``image_id``; crowd annotations are left out, as in
    torchvision's detection references. An image without annotations gives ``boxes`` of shape [0,4].

    Segmentation masks: long [H,W], 0 = background, instance masks painted in annotation order (a later
    annotation wins where two overlap), crowd regions ``IGNORE_INDEX`` unless an object is painted over them.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotations: dict[str, Any],
        label_of_category: dict[int, int],
        task: str = "detection",
        with_masks: bool = True,
        transforms: Any = None,
    ) -> None:
        self.task = check_task(task)
        self.with_masks = with_masks or task == "segmentation"
        self.label_of_category = label_of_category
        self.transforms = transforms
        keys = {"image_id", "labels", "iscrowd"} | ({"masks"} if self.with_masks else set())
        if task == "detection":
            keys.add("boxes")
        self.coco = _PreloadedCocoDetection(image_dir, annotations)
        self.dataset = datasets.wrap_dataset_for_transforms_v2(self.coco, target_keys=keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        with warnings.catch_warnings():
            # pycocotools' mask decoder predates NumPy 2's __array__(copy=...) protocol; harmless, and noisy.
            warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword",
                                    category=DeprecationWarning)
            image, raw = self.dataset[index]
        height, width = image.height, image.width
        labels = torch.tensor([self.label_of_category[c] for c in raw.get("labels", torch.zeros(0)).tolist()],
                              dtype=torch.int64)
        crowd = torch.tensor(raw.get("iscrowd", []), dtype=torch.bool).reshape(-1)
        masks = raw.get("masks", tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)))
        if self.task == "detection":
            keep = ~crowd
            boxes = raw.get("boxes")
            if boxes is None:
                boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            target: dict[str, Any] = {
                "boxes": tv_tensors.wrap(boxes[keep], like=boxes),
                "labels": labels[keep],
                "image_id": raw["image_id"],
            }
            if self.with_masks:
                target["masks"] = tv_tensors.Mask(masks[keep])
            sample: tuple[Any, Any] = (image, target)
        else:
            sample = (image, tv_tensors.Mask(_rasterize(masks, labels, crowd, height, width)))
        if self.transforms is not None:
            sample = self.transforms(*sample)
        return sample


def _rasterize(masks: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor, height: int, width: int
               ) -> torch.Tensor:
    """Instance masks -> one class mask. Crowd first (as ignore), objects after, so labelled pixels win."""
    semantic = torch.zeros(height, width, dtype=torch.long)
    for is_crowd in (True, False):
        for mask, label, flag in zip(masks, labels.tolist(), crowd.tolist()):
            if flag == is_crowd:
                semantic[mask.bool()] = IGNORE_INDEX if flag else label
    return semantic


class COCOLogic(SplitDataModule):
    """A COCO-format dataset: ``root/train_ann`` + ``root/train_images``, ``root/val_ann`` + ``root/val_images``.

    Paths may also be absolute. Default layout (what ``scripts/write_shapes_dataset.py --layout coco`` writes)::

        root/annotations/instances_train.json   root/train/<file_name of each image>
        root/annotations/instances_val.json     root/val/<file_name of each image>

    Batches: ``task="detection"`` gives ``(images: list of [3,H,W] float, targets: list of dicts)`` with
    ``boxes`` / ``labels`` / ``masks`` (``with_masks``) / ``image_id``; ``task="segmentation"`` gives
    ``(images [N,3,H,W], masks [N,H,W] long)`` with 255 = ignore (padding when sizes differ, crowd regions).

    Categories: the train file's category ids, sorted, become labels ``1..K`` (``category_ids[k-1]`` is label
    ``k``'s COCO id); ``num_classes = K + 1`` counts the background; ``class_names[0] = "background"``. The val /
    test files must not use categories that train lacks. These attributes read the train annotations on first
    use, so a model config can take ``num_classes`` from the data module before ``setup``.

    ``image_size=None`` keeps every image's size (detectors resize internally); an int or (h, w) resizes, and with
    ``augment`` the train split gets flip + scale jitter (``scale_range``) + crop to that size.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train_ann: str | None = "annotations/instances_train.json",
        val_ann: str = "annotations/instances_val.json",
        train_images: str = "train",
        val_images: str = "val",
        batch_size: int = 2,
        num_workers: int = 0,
        task: str = "detection",
        image_size: int | Sequence[int] | None = None,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        with_masks: bool = True,
        normalize: bool = False,
        test_ann: str | None = None,
        test_images: str | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        require_pycocotools()
        self.save_hyperparameters()
        self.root = Path(root)
        self.task = check_task(task)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._files = {
            "train": (train_ann, train_images),
            "val": (val_ann, val_images),
            "test": (test_ann or val_ann, test_images or val_images),
        }
        self._annotations: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, COCOSplit] = {}
        self._categories: list[dict[str, Any]] | None = None

    # ----------------------------------------------------------------------------------------------- categories
    def layout_hint(self) -> str:
        """The layout this module expects, with the configured names, for error messages."""
        lines = [f"\nexpected layout under root {self.root}:"]
        for split, (ann, images) in self._files.items():
            if ann is not None and (split != "test" or self.hparams.test_ann):
                lines.append(f"  {ann}  (COCO instances json of the {split} split)")
                lines.append(f"  {images}/<file_name of each image in {ann}>")
        lines.append(_GET_DATA.format(writer="write_coco"))
        return "\n".join(lines)

    def _path(self, relative: str) -> Path:
        return Path(relative) if os.path.isabs(relative) else self.root / relative

    def annotations(self, split: str) -> dict[str, Any]:
        """The checked annotation dict of ``split`` (read once)."""
        if split not in self._annotations:
            ann, _ = self._files[split]
            if ann is None:
                raise ValueError(f"COCODataModule: no annotation file configured for the {split} split")
            if not self.root.is_dir():
                raise FileNotFoundError(f"COCO root directory not found: {self.root}{self.layout_hint()}")
            self._annotations[split] = load_coco_annotations(self._path(ann), self.layout_hint())
        return self._annotations[split]

    @property
    def categories(self) -> list[dict[str, Any]]:
        """COCO category entries in label order (from the train file, or val when no train file is set)."""
        if self._categories is None:
            source = "train" if self._files["train"][0] is not None else "val"
            self._categories = sorted(self.annotations(source)["categories"], key=lambda c: c["id"])
        return self._categories

    @property
    def category_ids(self) -> list[int]:
        return [category["id"] for category in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories) + 1

    @property
    def class_names(self) -> list[str]:
        return ["background", *(str(category["name"]) for category in self.categories)]

    # ----------------------------------------------------------------------------------------------- datasets
    def dataset(self, split: str) -> COCOSplit:
        """The dataset of ``split`` ("train", "val" or "test"), with that split's transforms."""
        if split == "test" and self._files["test"] == self._files["val"]:
            return self.dataset("val")  # no separate test files: test on val, without loading it twice
        if split not in self._datasets:
            annotations = self.annotations(split)
            label_of_category = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
            unknown = sorted({c["id"] for c in annotations["categories"]} - set(label_of_category))
            if unknown:
                raise ValueError(
                    f"{self._path(self._files[split][0])}: category ids {unknown} are not in the train "
                    f"annotations ({self._path(self._files['train'][0] or '')}); the splits must share categories"
                )
            needs_masks = self.task == "segmentation" or self.hparams.with_masks
            if needs_masks:
                bare = [a.get("id") for a in annotations["annotations"] if "segmentation" not in a]
                if bare:
                    raise ValueError(
                        f"{self._path(self._files[split][0])}: annotations {bare[:5]} have no 'segmentation', "
                        f"needed for {'class masks' if self.task == 'segmentation' else 'instance masks'} "
                        "(for box-only data use task='detection', with_masks=False)"
                    )
            image_dir = self._image_dir(split, annotations)
            train = split == "train"
            hp = self.hparams
            self._datasets[split] = COCOSplit(
                image_dir,
                annotations,
                label_of_category,
                task=self.task,
                with_masks=hp.with_masks,
                transforms=build_transforms(
                    self.task,
                    train=train and hp.augment,
                    image_size=hp.image_size,
                    scale_range=tuple(hp.scale_range),
                    hflip=train and hp.augment,
                    normalize=hp.normalize,
                ),
            )
        return self._datasets[split]

    def _image_dir(self, split: str, annotations: dict[str, Any]) -> Path:
        image_dir = self._path(self._files[split][1])
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory of the {split} split not found: {image_dir}"
                                    f"{self.layout_hint()}")
        # One existence check catches the usual mistake (images_dir pointing one level off) before any worker runs.
        if annotations["images"]:
            first = image_dir / annotations["images"][0]["file_name"]
            if not first.is_file():
                raise FileNotFoundError(f"image {first} (listed in {self._path(self._files[split][0])}) not found"
                                        f"{self.layout_hint()}")
        return image_dir


class COCODataModule(COCOLogic, L.LightningDataModule):
    __doc__ = COCOLogic.__doc__  # a lightning.pytorch LightningDataModule; gnlightning.pl has the other one
