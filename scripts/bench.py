#!/usr/bin/env python
"""gnlightning's performance targets, measured in one run and reported as one table of ratios.

Why: every norm the package offers comes with a cost claim -- Weight Standardization is nearly free, SyncBN's
synchronization is cheap, convert_norms is instant next to building the model, GN+WS barely adds memory. Absolute
times mean little from one machine to the next, so each number here is a ratio of variants measured side by side
in the same run: a section times its variants in interleaved rounds (the order rotating from round to round, so
machine noise and frequency drift hit them alike) and reports medians over rounds.

Sections (``--only`` picks some; all run by default, gpu only where CUDA is):

* ws: ``WSConv2d`` vs ``nn.Conv2d`` vs timm's ``StdConv2d`` on the convolutions ``convert_norms(model, "gn_ws")``
  standardizes in the mission's workloads, read off the models themselves: DeepLabV3-R50 on 512 px crops at output
  stride 8, batch 2, and Mask R-CNN R50-FPN v2 in training at 800 x 1088, batch 1 and 2; then ResNet-50's ImageNet
  layer shapes at 224 px, batch 2, as the worst case (small convolutions next to the weight-sized passes of the
  standardization). Forward + backward in train mode, forward under no_grad in eval mode, and the bytes a training
  forward keeps for backward. The three compute the same output (checked before timing): the same weight and eps,
  the plain conv holding the weight already standardized. Targets: WS <= 1.05x Conv2d training and <= 1.01x eval
  on the mission's workloads, WS / timm <= 1.0x in time and in saved memory everywhere.
* syncbn: SyncBatchNorm vs BatchNorm and vs a naive synchronized BN (detectron2-style) training step under 2-process
  DDP on CPU, SyncBN on torch.distributed/gloo and on its opt-in loopback channel; and the layer's own forward + backward
  at DeepLabV3-R50 shapes in one process. Measured by ``bench_syncbn.py`` (see there). Targets: SyncBN <= 1.15x BN
  and <= 1.0x the naive peer at ResNet widths 64-256; synchronized code path over one rank <= 1.05x BN.
* norms: training step (forward, backward, SGD) of a segmentation model at batch 2 with each norm vs BN, NCHW and
  channels_last. No targets: the price of each norm, for reference.
* convert: ``convert_norms`` time vs building torchvision's Mask R-CNN R50-FPN v2 (a fresh model each time).
  Target < 5% (0.05x).
* memory: memory of one training step of the segmentation model with each norm vs BN (see ``step_memory`` for
  what is counted on CPU). Targets: GN+WS <= 1.10x GN, FrozenBN < BN.
* gpu (only where CUDA is; says so and skips otherwise): training step and peak memory of torchvision's
  DeepLabV3-R50 at 512x512, batch 2, with BN, GN, GN+WS, gnlightning's SyncBatchNorm and torch.nn.SyncBatchNorm
  (in a 1-rank NCCL group, each also with its synchronized path forced), in fp32, bf16 and fp16 autocast. No
  targets yet: nothing has been measured on a GPU.

Output: the markdown report on stdout and in ``<out>/bench.md``; ``<out>/bench.json`` holds the raw medians, the
ratios, targets, pass / fail and the machine. A missed target shows as MISS, but the exit code stays 0: this is a
report, not a test. The default run takes about 30 minutes on 2 cores (most of it the ws section's 512 and 800 px
workloads) and wants an otherwise idle machine (the load average is recorded); ``--quick`` shrinks every section to
smoke-test size (its numbers mean nothing).

Usage:  python scripts/bench.py [--only ws convert ...] [--threads N] [--out docs/bench] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from gnlightning import WSConv2d, convert_norms
from gnlightning.layers.ws_conv import standardize_weight
from gnlightning.models.builders import SEGMENTATION_MODELS, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_syncbn  # noqa: E402  (the sibling script, whose measurement is reused as is)

SECTIONS = ("ws", "syncbn", "norms", "convert", "memory", "gpu")
# gpu needs CUDA: part of the default run only where CUDA is (elsewhere it would only say it skipped).
DEFAULT_SECTIONS = SECTIONS if torch.cuda.is_available() else tuple(name for name in SECTIONS if name != "gpu")
# Interleaved rounds per timed section: many for cheap conv layers, few for whole-model training steps.
DEFAULT_ROUNDS = {"ws": 6, "syncbn": 32, "norms": 5}
# The 224 px worst case is cheap: many rounds of several calls, for a stable ratio of small times.
WORST_CASE_ROUNDS, WORST_CASE_CALLS = 15, 3
QUICK_ROUNDS = 2
DEFAULT_REPEATS = 7
BATCH = 2
NUM_CLASSES = 4
SEG_NORMS = ("bn", "frozen_bn", "gn", "gn_ws", "ln", "in")  # syncbn on one process is plain BN
CONVERSIONS = ("gn_ws", "gn", "syncbn")
WS_EPS = 1e-6  # WSConv2d's default; passed to timm's StdConv2d too so that both compute the same function

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Target:
    op: str  # "<=" or "<"
    value: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.value if self.op == "<=" else ratio < self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}x"


@dataclass
class Ratio:
    section: str
    case: str
    ratio: float
    target: Target | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ratio)

    def to_json(self) -> dict:
        return {"section": self.section, "case": self.case, "ratio": self.ratio,
                "target": None if self.target is None else str(self.target), "passed": self.passed}


@dataclass
class Section:
    name: str
    ratios: list[Ratio] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # markdown lines
    raw: dict = field(default_factory=dict)  # medians and counts, JSON-ready

    def add(self, case: str, ratio: float, target: Target | None = None) -> None:
        self.ratios.append(Ratio(self.name, case, ratio, target))

    def add_interval(self, case: str, ratio: tuple[float, float, float], target: float | None,
                     rounds: int) -> None:
        """A ``(median, low, high)`` ratio of per-round ratios, its interval in the case. Judged against an
        upper-bound ``target`` only where the interval does not contain it; otherwise the row is information and
        says it is undecided (the result column has no state for that)."""
        median, low, high = ratio
        # median_with_ci gives the full range below 6 values, a 95% interval only from 6 on.
        label = "95% CI" if rounds >= 6 else f"range of {rounds} rounds"
        case = f"{case} ({label} {low:.3f}-{high:.3f})"
        if target is None:
            self.add(case, median)
        elif bench_syncbn.interval_verdict(ratio, target) == "undecided":
            self.add(f"{case}: undecided, the interval contains {target:g} (target <= {target:g}x)", median)
        else:
            self.add(case, median, Target("<=", target))


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """``align``: one character per column, ``l`` or ``r``."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(cells)} |" for cells in (header, rule, *rows)]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ timing


def time_interleaved(
    steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int = 1, warmup: int = 1
) -> dict[str, float]:
    """Median over ``rounds`` of the mean ms per call of each variant (see :func:`time_rounds`)."""
    times = time_rounds(steps, rounds, steps_per_round, warmup)
    return {name: statistics.median(values) for name, values in times.items()}


def time_rounds(
    steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
    """Per variant, the mean ms per call in each of ``rounds`` rounds.

    Every round runs every variant; the order rotates from round to round, so no variant always runs first or
    always follows the same one."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            times[name].append((time.perf_counter() - start) / steps_per_round * 1e3)
    return times


def timed(function: Callable[[], T]) -> tuple[T, float]:
    """``function()``'s result and its wall time in ms."""
    start = time.perf_counter()
    result = function()
    return result, (time.perf_counter() - start) * 1e3


def _rounds(args: argparse.Namespace, section: str) -> int:
    return args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS[section])


# ---------------------------------------------------------------------------------------------------------- ws


@dataclass(frozen=True)
class ConvShape:
    """One convolution call: the layer's geometry and the input it sees."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    height: int
    width: int
    batch: int = BATCH
    dilation: int = 1
    padding: int | None = None  # None: "same" for odd kernels at stride 1, kernel // 2 * dilation

    @classmethod
    def of(cls, conv: nn.Conv2d, x: Tensor) -> "ConvShape":
        square = {name: getattr(conv, name) for name in ("kernel_size", "stride", "dilation", "padding")}
        if conv.groups != 1 or isinstance(conv.padding, str) or any(len(set(v)) != 1 for v in square.values()):
            raise ValueError(f"the ws section times square, ungrouped convolutions; got {conv}")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], x.shape[-2],
                   x.shape[-1], x.shape[0], conv.dilation[0], conv.padding[0])

    @property
    def geometry(self) -> dict:
        padding = self.kernel // 2 * self.dilation if self.padding is None else self.padding
        return {"kernel_size": self.kernel, "stride": self.stride, "padding": padding, "dilation": self.dilation,
                "bias": False}

    def __str__(self) -> str:
        stride = f" s{self.stride}" if self.stride > 1 else ""
        dilation = f" d{self.dilation}" if self.dilation > 1 else ""
        size = f"{self.height}" if self.height == self.width else f"{self.height}x{self.width}"
        return (f"{self.kernel}x{self.kernel} {self.in_channels}->{self.out_channels}{stride}{dilation} @{size}"
                f" n{self.batch}")


@dataclass(frozen=True)
class Workload:
    """The convolutions one training step of a model runs, as distinct shapes and how many layers share each."""

    name: str
    description: str
    shapes: dict[ConvShape, int]
    worst_case: bool = False  # ImageNet-size layers: the weight passes of WS weigh most against the convolution


RESNET50_CONVS = (
    ConvShape(3, 64, 7, 2, 224, 224),  # stem
    ConvShape(64, 64, 3, 1, 56, 56),
    ConvShape(256, 64, 1, 1, 56, 56),
    ConvShape(128, 128, 3, 1, 28, 28),
    ConvShape(256, 256, 3, 1, 14, 14),
    ConvShape(1024, 256, 1, 1, 14, 14),
    ConvShape(512, 512, 3, 1, 7, 7),
)
CONV, WS, TIMM, KEEP = "Conv2d", "WSConv2d", "timm StdConv2d", "WS keeping w_hat"


class _KeepStandardized(WSConv2d):
    """Diagnostic only: Weight Standardization by plain autograd, which keeps the standardized weight alive until
    backward as timm's StdConv2d does. Beside WSConv2d (which recomputes it in backward instead) it shows what
    that recompute costs on the worst-case shapes, and what it saves."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)


def ws_conv_shapes(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[ConvShape, int]:
    """The shapes of the convolutions ``convert_norms(model, "gn_ws")`` standardizes, as ``run(model)`` calls
    them (no gradients needed: the shapes are those of a training step)."""
    convert_norms(model, "gn_ws")
    shapes: dict[ConvShape, int] = {}

    def record(conv: nn.Module, args: tuple) -> None:
        shape = ConvShape.of(conv, args[0])
        shapes[shape] = shapes.get(shape, 0) + 1

    handles = [conv.register_forward_pre_hook(record) for conv in model.modules() if isinstance(conv, WSConv2d)]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def deeplab_workload(size: int, batch: int) -> Workload:
    """torchvision's DeepLabV3-R50 (output stride 8: dilated layer3 and layer4) on ``size`` px crops."""
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False).train()
    shapes = ws_conv_shapes(model, lambda m: m(torch.randn(batch, 3, size, size)))
    return Workload(f"DeepLabV3-R50 {size} px, batch {batch}",
                    f"torchvision `deeplabv3_resnet50`, output stride 8, {size}x{size} crops, batch {batch}", shapes)


def mask_rcnn_workload(height: int, width: int, batch: int, rois_per_image: int = 512) -> Workload:
    """torchvision's Mask R-CNN R50-FPN v2 in training on ``height`` x ``width`` images (no resizing), with
    eight ground-truth boxes and masks per image: backbone, FPN, RPN head and the RoI box and mask heads (the box
    head on ``rois_per_image`` sampled proposals, torchvision's default 512)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=min(height, width),
        max_size=max(height, width), box_batch_size_per_image=rois_per_image).train()
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        corner = torch.rand(8, 2, generator=generator) * torch.tensor([width, height]) * 0.7
        extent = (0.1 + 0.2 * torch.rand(8, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([corner, corner + extent], dim=1)
        masks = torch.zeros(8, height, width, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
            mask[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, height, width, generator=generator))
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (8,), generator=generator),
                        "masks": masks})
    shapes = ws_conv_shapes(model, lambda m: m(images, targets))
    return Workload(f"Mask R-CNN R50-FPN {height}x{width}, batch {batch}",
                    f"torchvision `maskrcnn_resnet50_fpn_v2` in training, {height}x{width} images, batch {batch}, "
                    "8 boxes per image", shapes)


def ws_workloads(quick: bool) -> list[Workload]:
    """The mission's workloads first (segmentation at 512 px, output stride 8; detection at 800 px, 1-2 images
    per device), then ResNet-50's ImageNet layer shapes at 224 px as the worst case: there the weight-sized
    passes of the standardization weigh most against the small convolutions."""
    if quick:
        workloads = [deeplab_workload(32, 1), mask_rcnn_workload(64, 96, 1, rois_per_image=8)]
        worst = (ConvShape(3, 8, 7, 2, 32, 32), ConvShape(16, 16, 3, 1, 8, 8))
    else:
        workloads = [deeplab_workload(512, 2), mask_rcnn_workload(800, 1088, 1), mask_rcnn_workload(800, 1088, 2)]
        worst = RESNET50_CONVS
    return workloads + [Workload("ResNet-50 224 px, batch 2 (worst case)",
                                 "ResNet-50 ImageNet layer shapes at 224 px, one of each, batch 2",
                                 dict.fromkeys(worst, 1), worst_case=True)]


def _std_conv_class() -> type[nn.Conv2d] | None:
    try:
        from timm.layers import StdConv2d
    except ImportError:
        return None
    return StdConv2d


def ws_convs(shape: ConvShape, keep: bool = False) -> dict[str, nn.Conv2d]:
    """The variants for one shape, all computing the same function: WSConv2d and StdConv2d standardize the same
    weight with the same eps; the plain Conv2d holds that weight already standardized. ``keep`` adds
    ``_KeepStandardized``."""
    torch.manual_seed(0)
    ws = WSConv2d(shape.in_channels, shape.out_channels, eps=WS_EPS, **shape.geometry)
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, **shape.geometry)
    with torch.no_grad():
        conv.weight.copy_(standardize_weight(ws.weight, WS_EPS))
    convs = {CONV: conv, WS: ws}
    std_conv = _std_conv_class()
    if std_conv is not None:
        convs[TIMM] = std_conv(shape.in_channels, shape.out_channels, eps=WS_EPS, **shape.geometry)
        convs[TIMM].load_state_dict(ws.state_dict())
    if keep:
        convs[KEEP] = _KeepStandardized(shape.in_channels, shape.out_channels, eps=WS_EPS, **shape.geometry)
        convs[KEEP].load_state_dict(ws.state_dict())
    return convs


def _assert_same_output(convs: dict[str, nn.Conv2d], x: Tensor) -> None:
    """Time equal work only: every variant must compute the plain conv's output."""
    with torch.no_grad():
        outputs = {name: conv(x) for name, conv in convs.items()}
    reference = outputs[CONV]
    atol = 1e-4 * reference.abs().max().item()
    for name, output in outputs.items():
        torch.testing.assert_close(output, reference, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _conv_train_step(conv: nn.Conv2d, x: Tensor, grad_output: Tensor) -> Callable[[], None]:
    def step() -> None:
        conv.weight.grad = x.grad = None
        conv(x).backward(grad_output)

    return step


def _conv_eval_step(conv: nn.Conv2d, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            conv(x)

    return step


def _saved_bytes(conv: nn.Conv2d, x: Tensor) -> int:
    """Bytes a training forward keeps for backward beyond the input and the parameters (alive anyway): what the
    layer adds to a step's memory."""
    alive = {_storage(tensor)[0] for tensor in (x, *conv.parameters())}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        pointer, nbytes = _storage(tensor)
        if pointer not in alive:
            saved[pointer] = max(nbytes, saved.get(pointer, 0))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        conv(x)
    return sum(saved.values())


def _time_shape(shape: ConvShape, rounds: int, steps_per_round: int, keep: bool) -> dict[str, dict[str, float]]:
    convs = ws_convs(shape, keep)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.in_channels, shape.height, shape.width, generator=generator)
    x.requires_grad_(shape.in_channels != 3)  # every layer but the stem passes a gradient back to its input
    with torch.no_grad():
        grad_output = torch.randn(convs[CONV](x).shape, generator=generator)
    medians: dict[str, dict] = {"rounds": {}}
    for mode in ("train", "eval"):
        for conv in convs.values():
            conv.train(mode == "train")
        _assert_same_output(convs, x)
        if mode == "train":
            medians["saved_bytes"] = {name: _saved_bytes(conv, x) for name, conv in convs.items()}
            steps = {name: _conv_train_step(conv, x, grad_output) for name, conv in convs.items()}
        else:
            steps = {name: _conv_eval_step(conv, x) for name, conv in convs.items()}
        medians["rounds"][mode] = time_rounds(steps, rounds, steps_per_round, warmup=2)
        medians[mode] = {name: statistics.median(times) for name, times in medians["rounds"][mode].items()}
    return medians


def _time_workload(workload: Workload, rounds: int, steps_per_round: int) -> dict:
    """Per distinct shape its medians; the workload's total, each shape's median times its layer count; and the
    workload's time in each round (round ``i`` of every shape summed alike), for ratios with an interval."""
    per_shape = {}
    for shape, count in workload.shapes.items():
        _log(f"ws: {workload.name}: {shape} (x{count})")
        per_shape[shape] = _time_shape(shape, rounds, steps_per_round, keep=workload.worst_case)
    first = next(iter(per_shape.values()))
    keys = [key for key in first if key != "rounds"]
    total = {key: {name: sum(medians[key][name] * workload.shapes[shape] for shape, medians in per_shape.items())
                   for name in first[key]} for key in keys}
    per_round = {mode: {name: [sum(medians["rounds"][mode][name][index] * workload.shapes[shape]
                                   for shape, medians in per_shape.items()) for index in range(rounds)]
                        for name in first["rounds"][mode]} for mode in first["rounds"]}
    return {"per_shape": per_shape, "total": total, "rounds": per_round}


def bench_ws(args: argparse.Namespace) -> Section:
    section = Section("ws")
    labels = {"train": "train (forward + backward)", "eval": "eval (no_grad forward)"}
    section.raw = {"workloads": {}}
    section.details = [
        (f"eps {WS_EPS:g}; per distinct layer shape the median of interleaved rounds (below), outputs checked "
         "equal before timing (the plain Conv2d holds the standardized weight); a workload's "
         "time is the sum over its shapes of time x layers of that shape. \"Saved\" is what a training forward "
         "keeps for backward beyond its input and the parameters. WS / Conv2d has targets on the mission's "
         "workloads; on the 224 px worst case it is information (weight-sized standardization passes next to "
         "small convolutions), WS / timm has its target everywhere. On the worst case a fourth, diagnostic "
         "variant standardizes by plain autograd and so keeps the standardized weight until backward, as timm does: "
         "the difference to WSConv2d is the price of recomputing it in backward, and its saved bytes what that "
         "recompute saves."),
    ]
    for workload in ws_workloads(args.quick):
        rounds, steps_per_round = _rounds(args, "ws"), 1
        if workload.worst_case and not args.quick:
            rounds, steps_per_round = args.rounds or WORST_CASE_ROUNDS, WORST_CASE_CALLS
        measured = _time_workload(workload, rounds, steps_per_round)
        total, per_round = measured["total"], measured["rounds"]
        variants = list(total["train"])

        def ratio(mode: str, reference: str) -> tuple[float, float, float]:
            return bench_syncbn.ratio_ci(per_round[mode][WS], per_round[mode][reference])

        for mode, target in (("train", 1.05), ("eval", 1.01)):
            section.add_interval(f"{workload.name}: {labels[mode]}, WSConv2d / Conv2d", ratio(mode, CONV),
                                 None if workload.worst_case else target, rounds)
            if TIMM in variants:
                section.add_interval(f"{workload.name}: {labels[mode]}, WSConv2d / timm StdConv2d",
                                     ratio(mode, TIMM), 1.0, rounds)
        if KEEP in variants:
            section.add_interval(f"{workload.name}: {labels['train']}, WSConv2d / WS keeping w_hat (diagnostic)",
                                 ratio("train", KEEP), None, rounds)
        if TIMM in variants:
            saved = total["saved_bytes"]
            section.add(f"{workload.name}: saved for backward, WSConv2d / timm StdConv2d",
                        saved[WS] / max(saved[TIMM], 1), Target("<=", 1.0))
        section.raw["workloads"][workload.name] = {
            "description": workload.description,
            "rounds": rounds,
            "steps_per_round": steps_per_round,
            "total": total,
            "rounds_ms": per_round,
            "shapes": [{"shape": str(shape), "layers": workload.shapes[shape], **medians}
                       for shape, medians in measured["per_shape"].items()],
        }
        header = ["shape", "layers", "mode", *(f"{name} (ms)" for name in variants), "WS / Conv2d"]
        header += ["WS / timm"] if TIMM in variants else []
        rows = []
        for shape, by_mode in [*measured["per_shape"].items(), ("total", total)]:
            layers = str(sum(workload.shapes.values())) if shape == "total" else str(workload.shapes[shape])
            for mode in ("train", "eval"):
                medians = by_mode[mode]
                row = [f"**{shape}**" if shape == "total" else str(shape), layers, mode,
                       *(f"{medians[name]:.2f}" for name in variants), f"{medians[WS] / medians[CONV]:.3f}x"]
                row += [f"{medians[WS] / medians[TIMM]:.3f}x"] if TIMM in medians else []
                rows.append(row)
        saved_line = ", ".join(f"{name} {total['saved_bytes'][name] / 2**20:.1f} MB" for name in variants)
        section.details += [
            "", f"#### {workload.name}", "",
            f"{workload.description}: {len(workload.shapes)} distinct shapes of {sum(workload.shapes.values())} "
            f"standardized convolutions; median of {rounds} rounds x {steps_per_round} calls. Saved for backward per "
            f"step: {saved_line}.", "",
            *markdown_table(header, rows, "lrl" + "r" * (len(header) - 3)),
        ]
    if _std_conv_class() is None:
        section.details.append("\ntimm is not installed: no StdConv2d column and no WS / timm target.")
    return section


# ------------------------------------------------------------------------------------------------------ syncbn


def bench_syncbn_section(args: argparse.Namespace) -> Section:
    """bench_syncbn.py's two parts, reused as they are: SyncBN under 2-process DDP against BN and the naive peer on
    each transport, and the layer's own cost in one process at DeepLabV3-R50 shapes (see that script's docstring)."""
    section = Section("syncbn")
    rounds = _rounds(args, "syncbn")
    argv = ["--channels", *map(str, args.syncbn_widths), "--rounds", str(rounds)]
    if args.quick:
        argv += ["--steps", "1", "--warmup", "1", "--warmup-rounds", "1", "--blocks", "2", "--size", "16",
                 "--layer-shapes", "smoke"]
    else:
        argv += ["--warmup", "3", "--warmup-rounds", "2"]
    syncbn_args = bench_syncbn.parse_args(argv)
    _log(f"syncbn: widths {' '.join(map(str, args.syncbn_widths))}, {syncbn_args.world_size} processes")
    results = bench_syncbn.measure(syncbn_args)
    _log(f"syncbn: layer costs, {syncbn_args.layer_shapes} shapes")
    layers = bench_syncbn.measure_layers(syncbn_args)
    section.raw = {
        "by_width": {
            width: {key: value for key, value in result.items() if key != "rounds_ms"}
            for width, result in results.items()
        },
        "layers": layers,
        "settings": {
            key: vars(syncbn_args)[key]
            for key in ("world_size", "blocks", "batch", "size", "warmup", "warmup_rounds", "rounds", "steps",
                        "round_ms", "pin", "layer_shapes")
        },
    }

    ms_keys, ratio_keys = bench_syncbn.RESULT_KEYS, bench_syncbn.RATIO_KEYS
    synced = {bench_syncbn.SYNC_GLOO: "SyncBN gloo", bench_syncbn.SYNC_LOOPBACK: "SyncBN loopback",
              bench_syncbn.NAIVE: "naive gloo"}  # the timed variants besides BN, as the table names them
    peer_target = bench_syncbn.PEER_TARGET_RATIO
    rows, diagnostics = [], []
    for width, result in results.items():
        targeted = width in bench_syncbn.TARGET_WIDTHS
        suffix = "" if targeted else " (information only)"
        for name in (bench_syncbn.SYNC_GLOO, bench_syncbn.SYNC_LOOPBACK):
            median, low, high = result[ratio_keys[name]]
            section.add(f"width {width}: {synced[name]} / BN training step (95% CI {low:.3f}-{high:.3f}){suffix}",
                        median, Target("<=", bench_syncbn.TARGET_RATIO) if targeted else None)
        peer = result[bench_syncbn.PEER_RATIO_KEY]
        section.add_interval(f"width {width}: SyncBN gloo / naive gloo training step{suffix}", peer,
                             peer_target if targeted else None, rounds)
        rows.append([str(width), *(f"{result[ms_keys[name]]:.2f}" for name in (bench_syncbn.BASELINE, *synced)),
                     *(bench_syncbn.format_ratio(result[ratio_keys[name]]) for name in synced),
                     bench_syncbn.format_ratio(peer) + ("" if targeted else " (info)")])
        one_rank = bench_syncbn.ONE_RANK
        diagnostics.append([str(width), str(result["steps"]), f"{result[ms_keys[one_rank]]:.2f}",
                            bench_syncbn.format_ratio(result[ratio_keys[one_rank]]), f"{result['latency_us']:.0f}",
                            f"{result['gloo_latency_us']:.0f}"])

    total = layers["total"]
    median, low, high = total["ratio"][bench_syncbn.LAYER_FORCED]
    where = f"the {total['layers']} norm layers of {bench_syncbn.LAYER_SHAPE_SETS[syncbn_args.layer_shapes]}"
    section.add(f"{where}: SyncBN synchronized code path over one rank / BN, forward + backward, one process "
                f"(95% CI {low:.3f}-{high:.3f})", median, Target("<=", bench_syncbn.LAYER_TARGET_RATIO))
    median, low, high = total["ratio"][bench_syncbn.LAYER_AS_USED]
    section.add(f"{where}: SyncBatchNorm with a group of one rank / BN, forward + backward, one process "
                f"(95% CI {low:.3f}-{high:.3f})", median)
    layer_names = (bench_syncbn.LAYER_BASELINE, bench_syncbn.LAYER_AS_USED, bench_syncbn.LAYER_FORCED)
    layer_rows = [
        [row["shape"], str(row["layers"]), *(f"{row['ms'][name]:.2f}" for name in layer_names),
         *(bench_syncbn.format_ratio(row["ratio"][name]) for name in layer_names[1:])]
        for row in [*layers["shapes"], {**total, "shape": "weighted total"}]
    ]

    section.details = [
        (f"{syncbn_args.world_size} DDP processes x 1 thread (gloo), "
         f"{'each pinned to its own core' if syncbn_args.pin else 'not pinned'}; {syncbn_args.blocks} x [conv3x3, "
         f"norm, ReLU] + pool + linear, batch {syncbn_args.batch}/rank, {syncbn_args.size}x{syncbn_args.size}; "
         f"median of {rounds} interleaved rounds, each variant running as many steps per round as fill about "
         f"{syncbn_args.round_ms:g} ms (at least 1, at most {syncbn_args.steps}; see the diagnostics); ratios are "
         "medians of per-round ratios, with a distribution-free 95% confidence interval. "
         "\"SyncBN gloo\" is gnlightning's SyncBatchNorm with its collectives on torch.distributed/gloo (forced in "
         "the benchmark process; the library's default), \"SyncBN loopback\" the same layer on its "
         "opt-in host-local loopback channel (GNLIGHTNING_HOST_ALL_REDUCE=1), \"naive gloo\" a naive peer in the "
         "style of detectron2's NaiveSyncBatchNorm (one differentiable all_reduce of mean and mean of squares, "
         "autograd for the rest) on gloo. Outputs, gradients, running statistics and the collectives per step "
         "(one all_reduce per norm layer in forward and one in backward) are checked before timing. Targets at "
         f"widths {', '.join(map(str, bench_syncbn.TARGET_WIDTHS))}: SyncBN / BN <= {bench_syncbn.TARGET_RATIO}x; "
         f"SyncBN gloo / naive gloo <= {peer_target:g}x, undecided while its interval contains {peer_target:g}. "
         "Details: `python scripts/bench_syncbn.py --help`."),
        "",
        *markdown_table(
            ["width", "BN (ms)", "SyncBN gloo (ms)", "SyncBN loopback (ms)", "naive gloo (ms)",
             "SyncBN gloo / BN", "SyncBN loopback / BN", "naive gloo / BN", "SyncBN gloo / naive gloo"],
            rows, "r" * 9,
        ),
        "",
        ("Diagnostics: \"group of one\" runs SyncBN's synchronized code path over a group of one rank (no "
         "collective), which splits SyncBN's overhead into the layer's arithmetic and its collectives; "
         "\"all_reduce\" is the idle latency of one collective of a SyncBN-sized payload on each transport."),
        "",
        *markdown_table(
            ["width", "steps / round", "group of one (ms)", "group of one / BN", "all_reduce loopback (us)",
             "all_reduce gloo (us)"],
            diagnostics, "r" * 6,
        ),
        "",
        (f"Layer costs of {where}, one process x 1 thread (a gloo world of one rank): forward + backward of one "
         f"norm layer alone, median of {rounds} interleaved rounds; \"weighted total\" sums the shapes weighted by "
         "how many of the model's layers see each. \"as used\" is SyncBatchNorm as a user gets it with a group of "
         "one rank (plain BN behind a few checks); \"sync path\" forces its synchronized code path over that group. "
         f"Target: sync path / BN <= {bench_syncbn.LAYER_TARGET_RATIO}x on the weighted total."),
        "",
        *markdown_table(
            ["input", "layers", "BN (ms)", "as used (ms)", "sync path (ms)", "as used / BN", "sync path / BN"],
            layer_rows, "lrrrrrr",
        ),
    ]
    return section


# -------------------------------------------------------------------------------------- segmentation model


def segmentation_model(args: argparse.Namespace, norm: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(args.seg_model, num_classes=NUM_CLASSES, norm=norm, weights=None).train()


def segmentation_batch(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, args.seg_size, args.seg_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, args.seg_size, args.seg_size), generator=generator)
    return images, labels


def segmentation_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    logits = model(images)
    if isinstance(logits, dict):  # torchvision's segmentation models return {"out": ..., ["aux": ...]}
        logits = logits["out"]
    return F.cross_entropy(logits, labels)


def _seg_train_step(model: nn.Module, images: Tensor, labels: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        segmentation_loss(model, images, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _seg_description(args: argparse.Namespace) -> str:
    return f"`{args.seg_model}`, {NUM_CLASSES} classes, batch {BATCH}, {args.seg_size}x{args.seg_size}"


# ------------------------------------------------------------------------------------------------------- norms


def bench_norms(args: argparse.Namespace) -> Section:
    section = Section("norms")
    rounds = _rounds(args, "norms")
    _log(f"norms: building {len(SEG_NORMS)} x {args.seg_model}")
    models = {norm: segmentation_model(args, norm) for norm in SEG_NORMS}
    images, labels = segmentation_batch(args)
    medians = {}
    for layout, memory_format in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        _log(f"norms: {layout}, {rounds} rounds")
        x = images.contiguous(memory_format=memory_format)
        steps = {norm: _seg_train_step(model.to(memory_format=memory_format), x, labels)
                 for norm, model in models.items()}
        medians[layout] = time_interleaved(steps, rounds, steps_per_round=1, warmup=1)
        for norm in SEG_NORMS[1:]:
            section.add(f"{norm} / bn training step, {layout}", medians[layout][norm] / medians[layout]["bn"])
    section.raw = {"ms": medians, "rounds": rounds, "model": args.seg_model, "size": args.seg_size, "batch": BATCH}

    rows = [
        [norm, *chain.from_iterable((f"{ms[norm]:.1f}", f"{ms[norm] / ms['bn']:.3f}x") for ms in medians.values())]
        for norm in SEG_NORMS
    ]
    section.details = [
        (f"Training step (forward, cross-entropy, backward, SGD with momentum) of {_seg_description(args)}; "
         f"median of {rounds} interleaved rounds; torch threads: {torch.get_num_threads()}."),
        "",
        *markdown_table(["norm", "NCHW (ms)", "vs bn", "channels_last (ms)", "vs bn"], rows, "lrrrr"),
    ]
    return section


# ----------------------------------------------------------------------------------------------------- convert


def _mask_rcnn() -> nn.Module:
    return torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)


def bench_convert(args: argparse.Namespace) -> Section:
    section = Section("convert")
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    build_ms: list[float] = []
    convert_ms: dict[str, list[float]] = {norm: [] for norm in CONVERSIONS}
    _log(f"convert: {repeats} x {len(CONVERSIONS)} Mask R-CNN builds")
    for repeat in range(repeats):
        shift = repeat % len(CONVERSIONS)
        for norm in CONVERSIONS[shift:] + CONVERSIONS[:shift]:
            gc.collect()  # keep the previous model's collection out of the timings
            torch.manual_seed(0)
            model, milliseconds = timed(_mask_rcnn)
            build_ms.append(milliseconds)
            _, milliseconds = timed(functools.partial(convert_norms, model, norm))
            convert_ms[norm].append(milliseconds)
            del model
    build = statistics.median(build_ms)
    converts = {norm: statistics.median(values) for norm, values in convert_ms.items()}
    for norm, milliseconds in converts.items():
        section.add(f"convert_norms(model, {norm!r}) / building the model", milliseconds / build, Target("<", 0.05))
    section.raw = {"build_ms": build, "convert_ms": converts, "repeats": repeats}
    section.details = [
        (f"torchvision `maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)`, a fresh model for every "
         f"conversion; medians of {repeats} x {len(CONVERSIONS)} builds and {repeats} conversions each."),
        "",
        *markdown_table(
            ["step", "median (ms)", "vs build"],
            [["build the model", f"{build:.1f}", "1.000x"]]
            + [[f"convert_norms(model, {norm!r})", f"{ms:.1f}", f"{ms / build:.3f}x"] for norm, ms in converts.items()],
            "lrr",
        ),
    ]
    return section


# ------------------------------------------------------------------------------------------------------ memory


@dataclass
class StepMemory:
    """Bytes one training step holds (see ``step_memory``)."""

    saved: int  # distinct storages autograd keeps for backward, parameters and buffers excluded
    parameters: int
    gradients: int
    buffers: int

    @property
    def total(self) -> int:
        return self.saved + self.parameters + self.gradients + self.buffers


def _storage(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def step_memory(model: nn.Module, loss: Callable[[], Tensor]) -> StepMemory:
    """What one training step of ``model`` (forward via ``loss()``, then backward) holds at its peak, by count.

    CPU allocators keep no peak counter, so instead of a peak this counts what the norm layer changes: the tensors
    autograd saves for backward (the activations alive when backward starts; each underlying storage counted once,
    since views, in-place results and a tensor saved by two ops share one), plus parameters, their gradients and
    buffers. Storages of parameters and buffers are counted as such, not as saved activations. Short-lived
    temporaries of the forward pass and optimizer state are not counted.
    """
    persistent = {_storage(tensor)[0] for tensor in chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        pointer, nbytes = _storage(tensor)
        if pointer not in persistent:
            saved[pointer] = max(nbytes, saved.get(pointer, 0))
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = loss()
    result.backward()
    parameters = list(model.parameters())
    memory = StepMemory(
        saved=sum(saved.values()),
        parameters=sum(parameter.nbytes for parameter in parameters),
        gradients=sum(parameter.grad.nbytes for parameter in parameters if parameter.grad is not None),
        buffers=sum(buffer.nbytes for buffer in model.buffers()),
    )
    model.zero_grad(set_to_none=True)
    return memory


def cuda_peak_bytes(model: nn.Module, loss: Callable[[], Tensor]) -> int:
    """torch.cuda.max_memory_allocated over one forward + backward, after an unmeasured warm-up step."""
    loss().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated()


def bench_memory(args: argparse.Namespace) -> Section:
    section = Section("memory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = (tensor.to(device) for tensor in segmentation_batch(args))
    raw: dict[str, dict[str, int]] = {}
    for norm in SEG_NORMS:
        _log(f"memory: {norm}")
        model = segmentation_model(args, norm).to(device)
        loss = functools.partial(segmentation_loss, model, images, labels)
        if device.type == "cuda":
            raw[norm] = {"total": cuda_peak_bytes(model, loss)}
        else:
            memory = step_memory(model, loss)
            raw[norm] = {**asdict(memory), "total": memory.total}
        del model
        gc.collect()
    totals = {norm: counts["total"] for norm, counts in raw.items()}
    section.add("gn_ws / gn", totals["gn_ws"] / totals["gn"], Target("<=", 1.10))
    for norm in SEG_NORMS[1:]:
        section.add(f"{norm} / bn", totals[norm] / totals["bn"], Target("<", 1.0) if norm == "frozen_bn" else None)
    section.raw = {"bytes": raw, "device": device.type, "model": args.seg_model, "size": args.seg_size}

    if device.type == "cuda":
        method = "peak of torch.cuda.max_memory_allocated over forward + backward"
        header, keys = ["norm", "peak (MB)", "vs bn"], ["total"]
    else:
        method = ("CPU: bytes autograd saves for backward (distinct storages) + parameters + gradients + buffers, "
                  "counted with saved_tensors_hooks; the CPU allocator has no peak counter")
        header, keys = ["norm", "saved (MB)", "params (MB)", "grads (MB)", "buffers (MB)", "total (MB)", "vs bn"], [
            "saved", "parameters", "gradients", "buffers", "total"]
    rows = [[norm, *(f"{raw[norm][key] / 2**20:.1f}" for key in keys), f"{totals[norm] / totals['bn']:.3f}x"]
            for norm in SEG_NORMS]
    section.details = [
        f"One training step of {_seg_description(args)}; {method}.",
        "",
        *markdown_table(header, rows, "l" + "r" * (len(header) - 1)),
    ]
    if device.type == "cpu":
        extra = raw["gn_ws"]["saved"] - raw["gn"]["saved"]
        section.details.append(
            f"\ngn_ws saves {extra / 2**20:.1f} MB more than gn for backward, {extra / raw['gn']['parameters']:.2f}x "
            "the parameter bytes: tensors of the weight standardization, which do not grow with the input."
        )
    return section


# --------------------------------------------------------------------------------------------------------- gpu

GPU_VARIANTS = ("bn", "gn", "gn_ws", "syncbn", "syncbn_sync", "torch_syncbn", "torch_syncbn_sync")
GPU_PRECISIONS = ("fp32", "bf16", "fp16")
GPU_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
GPU_ROUNDS = 8
GPU_DESCRIPTIONS = {
    "bn": "torchvision's BatchNorm2d",
    "gn": "`convert_norms(model, 'gn')`",
    "gn_ws": "`convert_norms(model, 'gn_ws')`",
    "syncbn": "gnlightning SyncBatchNorm in the 1-rank group: BN's path, no collective (as in any 1-GPU run)",
    "syncbn_sync": "gnlightning SyncBatchNorm's synchronized path forced, its two all_reduces per layer and step issued "
                   "on the 1-rank group: SyncBN's per-GPU cost in multi-GPU training, minus waiting for other ranks and "
                   "the wire",
    "torch_syncbn": "torch.nn.SyncBatchNorm in the same group: falls back to F.batch_norm",
    "torch_syncbn_sync": "torch.nn.SyncBatchNorm's synchronized path forced (its private autograd Function, "
                         "all_gather + all_reduce per layer) on the same group: the peer of syncbn_sync",
}


def _forced_collectives():
    """Inside: gnlightning's SyncBatchNorm issues its all_reduces even in a 1-rank group (which it normally skips),
    on that group's real backend, so that a 1-GPU run times the collective path."""
    import contextlib

    import torch.distributed as dist
    from gnlightning.layers import sync_batchnorm

    def all_reduce_on_group(tensor: Tensor, group: object = None) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @contextlib.contextmanager
    def forced():
        original = sync_batchnorm.all_reduce_sum
        sync_batchnorm.all_reduce_sum = all_reduce_on_group
        try:
            yield
        finally:
            sync_batchnorm.all_reduce_sum = original

    return forced()


def _torch_sync_path_class() -> type[nn.Module]:
    """torch.nn.SyncBatchNorm taking its synchronized path in any group (the module skips it for one rank)."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # private: the variant fails if it moves

    class TorchSyncPathBatchNorm(nn.SyncBatchNorm):
        def forward(self, input: Tensor) -> Tensor:
            if not self.training:
                return super().forward(input)
            self.num_batches_tracked.add_(1)
            group = self.process_group or dist.group.WORLD
            return sync_batch_norm.apply(input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                         self.momentum, group, dist.get_world_size(group))

    return TorchSyncPathBatchNorm


def _gpu_model(args: argparse.Namespace, variant: str) -> nn.Module:
    """The segmentation model with ``variant``'s norm layers, on the CPU (seeded: every variant starts alike)."""
    from gnlightning import SyncBatchNorm

    if variant in ("bn", "gn", "gn_ws"):
        return segmentation_model(args, variant)
    if variant in ("syncbn", "syncbn_sync"):
        model = segmentation_model(args, "syncbn")
        if variant == "syncbn_sync":
            for module in model.modules():
                if type(module) is SyncBatchNorm:
                    module.__class__ = bench_syncbn._SyncBatchNormWithoutCollectives
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(segmentation_model(args, "bn"))
    if variant == "torch_syncbn_sync":
        forced_class = _torch_sync_path_class()
        for module in model.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = forced_class
    return model


def _gpu_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_loss(model: nn.Module, images: Tensor, labels: Tensor, precision: str) -> Callable[[], Tensor]:
    dtype = GPU_AUTOCAST.get(precision)

    def loss() -> Tensor:
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            return segmentation_loss(model, images, labels)

    return loss


def _gpu_train_step(model: nn.Module, loss: Callable[[], Tensor], precision: str, variant: str,
                    device: torch.device) -> Callable[[], None]:
    """Forward, loss, backward and SGD step, synchronized: host timers then measure the GPU's work. fp16 scales the
    loss with a GradScaler, as Lightning's "16-mixed" does."""
    import contextlib

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    forced = variant == "syncbn_sync"

    def step() -> None:
        with _forced_collectives() if forced else contextlib.nullcontext():
            value = loss()
            if scaler is None:
                value.backward()
                optimizer.step()
            else:
                scaler.scale(value).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    return step


def _failure(error: Exception) -> str:
    """One line: torch's dispatcher errors run to a hundred lines listing every backend."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _one_rank_group() -> tuple[str, bool]:
    """A 1-rank process group for the SyncBN variants: (backend, whether this call created it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend(), False
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{bench_syncbn._free_port()}", rank=0,
                            world_size=1)
    return backend, True


def bench_gpu(args: argparse.Namespace) -> Section:
    section = Section("gpu")
    if not torch.cuda.is_available():
        _log("gpu: skipped, CUDA is not available")
        section.details = ["Skipped: CUDA is not available on this machine (torch.cuda.is_available() is False). "
                           "On a GPU machine: `python scripts/bench.py --only gpu`, or `bash scripts/gpu_check.sh`."]
        section.raw = {"skipped": "CUDA is not available"}
        return section
    import contextlib

    import torch.distributed as dist

    rounds = args.rounds or (QUICK_ROUNDS if args.quick else GPU_ROUNDS)
    steps_per_round = 1 if args.quick else args.gpu_steps
    precisions = list(args.gpu_precisions)
    notes: list[str] = []
    if "bf16" in precisions and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
        notes.append("bf16 skipped: this GPU does not support bfloat16.")
    failures: dict[str, str] = {}
    gpu_args = argparse.Namespace(**{**vars(args), "seg_size": args.gpu_size})
    device = _gpu_device()
    images, labels = (tensor.to(device) for tensor in segmentation_batch(gpu_args))
    backend, created = _one_rank_group()
    try:
        models: dict[str, nn.Module] = {}
        for variant in GPU_VARIANTS:
            _log(f"gpu: building {args.seg_model} with {variant}")
            try:
                models[variant] = _gpu_model(args, variant)
            except Exception as error:  # noqa: BLE001 - reported in the section; the other variants still run
                failures[f"{variant}: build"] = _failure(error)

        # Peak memory of one forward + backward, each model alone on the GPU.
        peaks: dict[str, dict[str, int]] = {precision: {} for precision in precisions}
        for precision in precisions:
            for variant, model in models.items():
                _log(f"gpu: peak memory, {precision}, {variant}")
                model.to(device)
                try:
                    loss = _gpu_loss(model, images, labels, precision)
                    with _forced_collectives() if variant == "syncbn_sync" else contextlib.nullcontext():
                        peaks[precision][variant] = cuda_peak_bytes(model, loss)
                except Exception as error:  # noqa: BLE001
                    failures[f"{variant}: {precision} memory"] = _failure(error)
                finally:
                    model.zero_grad(set_to_none=True)
                    model.cpu()
                    gc.collect()
                    torch.cuda.empty_cache()

        # Step times: every model on the GPU, timed in interleaved rounds.
        for model in models.values():
            model.to(device)
        medians: dict[str, dict[str, float]] = {}
        for precision in precisions:
            steps = {}
            for variant, model in models.items():
                step = _gpu_train_step(model, _gpu_loss(model, images, labels, precision), precision, variant, device)
                try:
                    step()  # a variant that fails is reported and left out of the timing
                except Exception as error:  # noqa: BLE001
                    failures[f"{variant}: {precision} step"] = _failure(error)
                    continue
                steps[variant] = step
            _log(f"gpu: {precision}, {len(steps)} variants, {rounds} rounds x {steps_per_round} steps")
            medians[precision] = time_interleaved(steps, rounds, steps_per_round=steps_per_round, warmup=2) \
                if steps else {}
        del models
        gc.collect()
        torch.cuda.empty_cache()
        nccl = None
        if backend == "nccl":
            version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    finally:
        if created:
            dist.destroy_process_group()

    for precision in precisions:
        times, peak = medians.get(precision, {}), peaks[precision]
        for variant in GPU_VARIANTS[1:]:
            if variant in times and "bn" in times:
                section.add(f"{variant} / bn training step, {precision}", times[variant] / times["bn"])
        for variant in GPU_VARIANTS[1:]:
            if variant in peak and "bn" in peak:
                section.add(f"{variant} / bn peak memory, {precision}", peak[variant] / peak["bn"])
    section.raw = {
        "ms": medians, "peak_bytes": peaks, "failures": failures, "rounds": rounds, "steps_per_round": steps_per_round,
        "model": args.seg_model, "size": args.gpu_size, "batch": BATCH, "device": torch.cuda.get_device_name(device),
        "backend": backend, "nccl": nccl, "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }

    details = [
        (f"Training step (forward, cross-entropy, backward, SGD with momentum; `torch.cuda.synchronize()` after each) "
         f"of `{args.seg_model}`, {NUM_CLASSES} classes, batch {BATCH}, {args.gpu_size}x{args.gpu_size}, NCHW, on "
         f"{section.raw['device']} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); median of "
         f"{rounds} interleaved rounds x {steps_per_round} steps after 2 warm-up steps. fp32 keeps PyTorch's defaults "
         f"(cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, cudnn.benchmark "
         f"{'on' if torch.backends.cudnn.benchmark else 'off'}); bf16 and fp16 are autocast, fp16 with a GradScaler. "
         f"Peak: `torch.cuda.max_memory_allocated` over one forward + backward, the model alone on the GPU. "
         f"SyncBN variants run in a 1-rank {backend} process group{f' (NCCL {nccl})' if nccl else ''} made by the "
         "benchmark."),
        "",
        *[f"- {variant}: {GPU_DESCRIPTIONS[variant]}" for variant in GPU_VARIANTS],
    ]
    for precision in precisions:
        times, peak = medians.get(precision, {}), peaks[precision]

        def cell(values: dict, variant: str, scale: float, digits: int) -> list[str]:
            if variant not in values:
                return ["failed", "-"]
            ratio = f"{values[variant] / values['bn']:.3f}x" if "bn" in values else "-"
            return [f"{values[variant] / scale:.{digits}f}", ratio]

        rows = [[variant, *cell(times, variant, 1.0, 1), *cell(peak, variant, 2**20, 0)] for variant in GPU_VARIANTS]
        details += ["", f"**{precision}**", "",
                    *markdown_table(["variant", "step (ms)", "vs bn", "peak (MB)", "vs bn"], rows, "lrrrr")]
    details += [f"\n{note}" for note in notes]
    details += [f"\n**FAILED:** {what}: {message}" for what, message in failures.items()]
    section.details = details
    return section


BENCHES: dict[str, Callable[[argparse.Namespace], Section]] = {
    "ws": bench_ws, "syncbn": bench_syncbn_section, "norms": bench_norms, "convert": bench_convert,
    "memory": bench_memory, "gpu": bench_gpu,
}


# ------------------------------------------------------------------------------------------------------ report


def machine_info() -> dict:
    return {
        "cpu": bench_syncbn.cpu_name(),
        "logical_cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def render(command: str, machine: dict, load: tuple[float | None, float | None], sections: list[Section],
           quick: bool) -> str:
    ratios = [ratio for section in sections for ratio in section.ratios]
    targeted = [ratio for ratio in ratios if ratio.target is not None]
    misses = [ratio for ratio in targeted if not ratio.passed]
    lines = ["# gnlightning benchmark", "", f"`{command}`", ""]
    lines.append(
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['system']}; torch "
        f"{machine['torch']} with {machine['threads']} threads (torch.get_num_threads()); python {machine['python']}"
        + (f"; CUDA device {machine['cuda']}" if machine["cuda"] else "") + "."
    )
    if load[0] is not None:
        lines.append(f"Load average (1 min) before / after the run: {load[0]:.2f} / {load[1]:.2f}.")
    if quick:
        lines.append("**--quick: smoke-test sizes; these numbers mean nothing.**")
    lines.append("")
    verdicts = {None: "info", True: "pass", False: "**MISS**"}
    lines += markdown_table(
        ["section", "case", "ratio", "target", "result"],
        [[r.section, r.case, f"{r.ratio:.3f}x", str(r.target) if r.target else "-", verdicts[r.passed]]
         for r in ratios],
        "llrll",
    )
    lines.append("")
    if misses:
        lines.append(f"**MISSES: {len(misses)} of {len(targeted)} targets missed:** " + "; ".join(
            f"{r.section}: {r.case} = {r.ratio:.3f}x (target {r.target})" for r in misses) + ".")
    elif targeted:
        lines.append(f"All {len(targeted)} targets met.")
    else:
        lines.append("No targets in the sections run.")
    lines += ["", "## Details"]
    for section in sections:
        lines += ["", f"### {section.name}", "", *section.details]
    return "\n".join(lines) + "\n"


def report_json(command: str, machine: dict, load: tuple, sections: list[Section], args: argparse.Namespace) -> dict:
    ratios = [ratio.to_json() for section in sections for ratio in section.ratios]
    return {
        "command": command,
        "machine": {**machine, "load_1min_before": load[0], "load_1min_after": load[1]},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "ratios": ratios,
        "misses": [ratio for ratio in ratios if ratio["passed"] is False],
        "sections": {section.name: section.raw for section in sections},
    }


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS), metavar="SECTION",
                        help=f"sections to run: {' '.join(SECTIONS)} (default all; gpu only where CUDA is)")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes; the numbers mean nothing")
    parser.add_argument("--threads", type=int, default=_usable_cores(),
                        help="torch threads (default: every usable core); syncbn runs 1 per process regardless")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds in every timed section (default: "
                        + ", ".join(f"{name} {count}" for name, count in DEFAULT_ROUNDS.items())
                        + f"; {QUICK_ROUNDS} with --quick)")
    parser.add_argument("--repeats", type=int,
                        help=f"model builds per conversion in convert (default {DEFAULT_REPEATS}; 1 with --quick)")
    parser.add_argument("--syncbn-widths", type=int, nargs="+", metavar="WIDTH",
                        help="conv widths in syncbn (default 32 64 128 256, targets at 64 128 256; 8 with --quick)")
    parser.add_argument("--seg-model", default="deeplabv3_resnet50", choices=SEGMENTATION_MODELS, metavar="MODEL",
                        help="segmentation model of norms and memory (default deeplabv3_resnet50), one of: "
                        + ", ".join(SEGMENTATION_MODELS))
    parser.add_argument("--seg-size", type=int, metavar="SIZE",
                        help="its input height and width (default 128; 32 with --quick)")
    parser.add_argument("--gpu-size", type=int, metavar="SIZE",
                        help="input height and width of the gpu section (default 512; 64 with --quick)")
    parser.add_argument("--gpu-precisions", nargs="+", choices=GPU_PRECISIONS, default=list(GPU_PRECISIONS),
                        metavar="PRECISION", help=f"gpu section precisions (default: {' '.join(GPU_PRECISIONS)})")
    parser.add_argument("--gpu-steps", type=int, default=2, metavar="STEPS",
                        help="training steps per timed round in the gpu section (default 2; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="writes bench.md and bench.json here")
    args = parser.parse_args(argv)
    args.syncbn_widths = args.syncbn_widths or ([8] if args.quick else [32, *bench_syncbn.TARGET_WIDTHS])
    args.seg_size = args.seg_size or (32 if args.quick else 128)
    args.gpu_size = args.gpu_size or (64 if args.quick else 512)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = _load()
    started = time.perf_counter()
    sections = [BENCHES[name](args) for name in SECTIONS if name in args.only]
    _log(f"done in {time.perf_counter() - started:.0f} s")
    load = (load_before, _load())
    machine = machine_info()

    markdown = render(command, machine, load, sections, args.quick)
    print(markdown, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(markdown)
    data = report_json(command, machine, load, sections, args)
    (args.out / "bench.json").write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
