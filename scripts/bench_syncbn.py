#!/usr/bin/env python
"""Benchmark: DDP training-step time with gnlightning SyncBatchNorm vs plain nn.BatchNorm2d and a naive peer.

Why: SyncBN is only worth offering for tiny per-device batches if synchronizing statistics is cheap next to the
convolutions around it, and gnlightning's layer is only worth its code if it is no slower than the obvious way to
write one. Targets (ResNet widths 64, 128 and 256; narrower widths are reported as information):

* SyncBN step time <= 1.15x BN step time on the same model, with each of SyncBN's two transports;
* gnlightning SyncBN <= 1.0x the naive peer's step time on the same transport (gloo), "undecided" while the 95%
  confidence interval of that ratio contains 1.0;
* in one process, SyncBN's synchronized code path over a group of one rank <= 1.05x nn.BatchNorm2d, forward +
  backward of the norm layers alone at the shapes of DeepLabV3-R50 (see "Layer costs" below).

What is measured (DDP part): forward + backward + optimizer step of a small conv net (``--blocks`` x [conv3x3, norm,
ReLU], global pooling, linear head) wrapped in DistributedDataParallel with the gloo backend, ``--world-size`` CPU
processes with one intra-op thread each (each pinned to its own core unless ``--no-pin``), ``--batch`` images of
``--size`` x ``--size`` per rank, for each width in ``--channels``. The variants:

* nn.BatchNorm2d, the baseline (per-rank statistics, no collective);
* gnlightning SyncBN with ``torch.distributed.all_reduce`` on gloo, its default on every backend (this process
  also makes gnlightning.distributed's host-channel lookup return None while this variant runs);
* gnlightning SyncBN on its opt-in loopback channel (gnlightning/host_all_reduce.py), switched on with
  ``GNLIGHTNING_HOST_ALL_REDUCE=1`` while this variant runs;
* a naive peer (below), on gloo;
* SyncBN's exact synchronized code path over a group of one rank, a diagnostic that splits SyncBN's overhead into
  the layer's own arithmetic and the collectives (the layer itself short-cuts a one-rank group to nn.BatchNorm).

All variants live in the same processes and are timed in interleaved rounds whose order rotates, so machine noise
and frequency drift hit them alike. Each variant runs as many steps per round as fill about ``--round-ms`` (at
least 1, at most ``--steps``; the ranks agree on the count), so a narrow net is not timed from a single jittery
step and a wide one does not take an hour. The table reports the median over rounds of the mean step time within a
round, and each ratio as the median over rounds of that round's own ratio, with a distribution-free 95% confidence
interval. On a shared VM that interval is several percent wide at 15 rounds; a verdict whose interval straddles
the target says so, and ``--rounds`` narrows it. Before timing, every rank checks that the synchronized variants
compute the same outputs, gradients and running statistics, and that each issues exactly one all_reduce per norm
layer in forward and one in backward on the transport its label names: a timing of different work, or of the
wrong transport, would be worthless.

The naive peer is written here from the published description of detectron2's NaiveSyncBatchNorm (no code copied):
per-channel mean and mean of squares, concatenated and averaged over ranks with one all_reduce inside an autograd
Function whose backward all_reduces the gradient, then normalization and its gradient by plain autograd; running
statistics follow nn.BatchNorm (unbiased variance of the global batch). It is a peer for comparison, not a library
layer: it assumes equal batches on all ranks and takes E[x^2] - E[x]^2 in the input's precision.

SyncBN's extra cost is two collectives per norm layer and step whose payload is tiny (2C+1 and 2C numbers), so it
is set by collective *latency*, which the script measures and prints next to the table, through the loopback
channel and through gloo; the wider the convolutions, the smaller that fixed cost is relative to the step.

Layer costs (``--layer-shapes``): in a single process (no DDP; a gloo world of one rank), forward + backward of one
norm layer alone, per input shape, for nn.BatchNorm2d, gnlightning SyncBatchNorm as a user gets it with a group of
one rank (plain nn.BatchNorm behind a few checks), and SyncBN's synchronized code path forced over that group. The
default shapes are every BatchNorm input of torchvision's DeepLabV3-R50 (output stride 8, no auxiliary head) at
512x512 and batch 2 -- the setting SyncBN is offered for -- and the total weights each shape by how many layers of
the model see it. This isolates the layer's arithmetic from DDP and from the collectives.

torch.nn.SyncBatchNorm is not in the tables: it refuses CPU tensors in training.

Usage:  python scripts/bench_syncbn.py [--channels 32 64 128 256 --rounds 15 --only ddp layers]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import queue
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import gnlightning.distributed as gnl_distributed
from gnlightning.distributed import all_reduce_sum, new_consecutive_groups
from gnlightning.host_all_reduce import HostAllReduce
from gnlightning.layers.sync_batchnorm import SyncBatchNorm, _SyncBatchNormFunction

TARGET_RATIO = 1.15  # SyncBN / BN step time under DDP
PEER_TARGET_RATIO = 1.0  # gnlightning SyncBN / naive peer, same transport
LAYER_TARGET_RATIO = 1.05  # SyncBN's synchronized code path over one rank / BN, layer alone
TARGET_WIDTHS = (64, 128, 256)  # ResNet stage widths; other widths are reported without a target

BASELINE = "nn.BatchNorm2d"
SYNC_GLOO = "SyncBN, torch.distributed/gloo"
SYNC_LOOPBACK = "SyncBN, loopback channel"
NAIVE = "naive SyncBN peer, gloo"
ONE_RANK = "  same code, group of one rank"
# measure()'s key for each variant's median step time.
RESULT_KEYS = {
    BASELINE: "bn_ms", SYNC_GLOO: "syncbn_gloo_ms", SYNC_LOOPBACK: "syncbn_loopback_ms", NAIVE: "naive_ms",
    ONE_RANK: "one_rank_ms",
}
# measure()'s key for each variant's ratio to BN: (median, low, high) over rounds, see median_with_ci.
RATIO_KEYS = {
    SYNC_GLOO: "syncbn_gloo_ratio", SYNC_LOOPBACK: "syncbn_loopback_ratio", NAIVE: "naive_ratio",
    ONE_RANK: "one_rank_ratio",
}
PEER_RATIO_KEY = "syncbn_gloo_vs_naive_ratio"  # SYNC_GLOO / NAIVE per round, same (median, low, high) form

# Layer costs: the variants, in one process.
LAYER_BASELINE = "nn.BatchNorm2d"
LAYER_AS_USED = "SyncBatchNorm, group of one rank"
LAYER_FORCED = "SyncBN synchronized code path, group of one rank"
LAYER_TIMING_MIN_ELEMENTS = 1 << 22  # a timing repeats the call until it has touched this many input elements


# ------------------------------------------------------------------------------------------------ statistics


def median_with_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free confidence interval for the true median.

    The interval between the k-th smallest and the k-th largest value covers the median of the distribution the
    values come from with probability ``1 - 2 P(Binomial(n, 1/2) < k)``, whatever that distribution is (step
    times are skewed, with a long tail of preempted rounds, so no normal approximation); k is the largest whose
    coverage is at least ``confidence``. With too few values for that (fewer than 6 at 95%), the full range.
    """
    ordered = sorted(values)
    n = len(ordered)
    k, tail = 0, 0.0  # tail = P(Binomial(n, 1/2) < k + 1), summed term by term
    while k < n:
        tail += math.comb(n, k) / 2**n
        if 1 - 2 * tail < confidence:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def ratio_ci(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """:func:`median_with_ci` of the per-round ratios: the variants of one round run back to back, so a per-round
    ratio cancels the machine's slow drifts, which a ratio of separate medians only averages."""
    return median_with_ci([value / reference for value, reference in zip(numerators, denominators)])


def interval_verdict(ratio: tuple[float, float, float], target: float) -> str:
    """"meets" / "MISSES" when the whole confidence interval lies on one side of ``target``, else "undecided"."""
    _, low, high = ratio
    if high < target:
        return "meets"
    if low > target:
        return "MISSES"
    return "undecided"


def median_verdict(ratio: tuple[float, float, float], target: float) -> str:
    """The median against ``target``, with a warning when the confidence interval straddles it."""
    median, low, high = ratio
    verdict = f"{'meets' if median <= target else 'MISSES'} the target <= {target}x"
    if low <= target < high:
        verdict += " (but the interval straddles it; more --rounds tell)"
    return verdict


def format_ratio(ratio: tuple[float, float, float]) -> str:
    """``(median, low, high)`` as ``1.123x (1.050-1.201)``."""
    median, low, high = ratio
    return f"{median:.3f}x ({low:.3f}-{high:.3f})"


# --------------------------------------------------------------------------------------------------- variants


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``, differentiable: the gradient of a sum over ranks, seen by one rank, is the
    sum of every rank's gradient, so backward is one more all_reduce."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        dist.all_reduce(tensor, group=group)  # in place on a fresh tensor (the caller's torch.cat)
        ctx.mark_dirty(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad_output.clone(memory_format=torch.contiguous_format)  # autograd may share grad_output
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """The naive peer: the textbook synchronized BN that gnlightning's layer has to beat (see module docstring).

    Training with a group of more than one rank only (elsewhere it is nn.BatchNorm2d), equal batches on all ranks,
    a float ``momentum``.
    """

    def __init__(self, num_features: int, process_group: Any | None = None) -> None:
        super().__init__(num_features)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        world_size = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        if not self.training or world_size == 1:
            return super().forward(input)
        channels = input.size(1)
        dims = [0, *range(2, input.dim())]
        local_moments = torch.cat([input.mean(dims), (input * input).mean(dims)])
        moments = _AllReduceSum.apply(local_moments, self.process_group) * (1.0 / world_size)
        mean, mean_of_squares = moments.split(channels)
        var = mean_of_squares - mean * mean
        with torch.no_grad():
            count = input.numel() // channels * world_size
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (count / (count - 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        view = (1, channels, *([1] * (input.dim() - 2)))
        return input * scale.view(view) + shift.view(view)


class _SyncBatchNormWithoutCollectives(SyncBatchNorm):
    """SyncBN's own training path (autograd Function, packing, global-statistics kernels) over a group of one rank.

    Diagnostic only: the layer normally short-cuts a one-rank group to nn.BatchNorm, so this forces the synchronized
    code path with nothing to synchronize. The gap to BN is the layer's arithmetic and Python overhead; the gap to
    real SyncBN is the cost of its two collectives per step.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.momentum, self.eps, self.process_group,
        )


@contextlib.contextmanager
def _torch_distributed_only() -> Iterator[None]:
    """gnlightning's collectives through torch.distributed.all_reduce (gloo), as between ranks on different hosts.

    ``all_reduce_sum`` looks ``host_channel`` up in its module at call time; without a channel it falls back to
    torch.distributed. Only this process, and only while the variant runs: the library's default is untouched.
    """
    original = gnl_distributed.host_channel
    gnl_distributed.host_channel = lambda group=None: None
    try:
        yield
    finally:
        gnl_distributed.host_channel = original


@contextlib.contextmanager
def _host_channel_on() -> Iterator[None]:
    """The opt-in loopback channel switched on in this process while the variant runs."""
    previous = os.environ.get(gnl_distributed.HOST_CHANNEL_ENV)
    os.environ[gnl_distributed.HOST_CHANNEL_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[gnl_distributed.HOST_CHANNEL_ENV]
        else:
            os.environ[gnl_distributed.HOST_CHANNEL_ENV] = previous


TRANSPORTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    SYNC_GLOO: _torch_distributed_only, SYNC_LOOPBACK: _host_channel_on}


def _transport(name: str) -> contextlib.AbstractContextManager:
    return TRANSPORTS.get(name, contextlib.nullcontext)()


@dataclass
class CollectiveCounts:
    torch: int = 0  # torch.distributed.all_reduce calls
    host: int = 0  # HostAllReduce.all_reduce_sum_ calls (the loopback channel)


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounts]:
    """Count all_reduce calls per transport while the block runs, through the two attribute lookups that
    gnlightning.distributed documents for this purpose (and through which the naive peer's calls go too)."""
    counts = CollectiveCounts()
    real_torch, real_host = dist.all_reduce, HostAllReduce.all_reduce_sum_

    def torch_all_reduce(*args: Any, **kwargs: Any) -> Any:
        counts.torch += 1
        return real_torch(*args, **kwargs)

    def host_all_reduce(channel: HostAllReduce, tensor: Tensor) -> Tensor:
        counts.host += 1
        return real_host(channel, tensor)

    dist.all_reduce = torch_all_reduce  # type: ignore[assignment]
    HostAllReduce.all_reduce_sum_ = host_all_reduce  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        dist.all_reduce = real_torch
        HostAllReduce.all_reduce_sum_ = real_host  # type: ignore[method-assign]


def norm_factories(one_rank_group: Any) -> dict[str, Callable[[int], nn.Module]]:
    return {
        BASELINE: nn.BatchNorm2d,
        SYNC_GLOO: SyncBatchNorm,
        SYNC_LOOPBACK: SyncBatchNorm,
        NAIVE: NaiveSyncBatchNorm,
        ONE_RANK: lambda channels: _SyncBatchNormWithoutCollectives(channels, process_group=one_rank_group),
    }


# Collectives per norm layer and training step as (torch.distributed, loopback channel): what the labels claim.
EXPECTED_COLLECTIVES = {BASELINE: (0, 0), SYNC_GLOO: (2, 0), SYNC_LOOPBACK: (0, 2), NAIVE: (2, 0), ONE_RANK: (0, 0)}
# Variants that must compute the same function (up to rounding): the first of each tuple is the reference.
SAME_FUNCTION = ((SYNC_GLOO, SYNC_LOOPBACK, NAIVE), (BASELINE, ONE_RANK))


def build_net(norm: Callable[[int], nn.Module], blocks: int, channels: int, num_classes: int = 10) -> nn.Sequential:
    """Plain conv/norm/ReLU stack: the layer under test sits where it does in ResNet-style backbones."""
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(blocks):
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(inplace=True)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ correctness


def _assert_close(what: str, actual: Tensor, expected: Tensor) -> None:
    """Equal up to rounding, relative to the tensor's scale (gradients near zero have no relative error)."""
    tolerance = 1e-9 if expected.dtype == torch.float64 else 1e-4
    atol = tolerance * expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=atol,
                               msg=lambda message: f"{what}: {message}")


def _state(model: nn.Module) -> dict[str, Tensor]:
    """Parameter gradients and norm buffers of one model after a step, by name."""
    state = {f"grad {name}": parameter.grad.clone() for name, parameter in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            state[f"{name}.running_mean"] = module.running_mean.clone()
            state[f"{name}.running_var"] = module.running_var.clone()
    return state


def check_variants(
    models: dict[str, nn.Module], images: Tensor, labels: Tensor, norm_layers: int
) -> dict[str, CollectiveCounts]:
    """One forward + backward of every model on the same batch: outputs, gradients and running statistics must
    agree within each group of :data:`SAME_FUNCTION`, and each variant must have issued exactly the collectives of
    :data:`EXPECTED_COLLECTIVES`. Raises AssertionError otherwise; returns the counts. Leaves gradients at None."""
    loss_fn = nn.CrossEntropyLoss()
    outputs, states, counts = {}, {}, {}
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        with _transport(name), count_collectives() as counted:
            output = model(images)
            loss_fn(output, labels).backward()
        outputs[name], states[name], counts[name] = output.detach(), _state(model), counted
        model.zero_grad(set_to_none=True)
    for name, counted in counts.items():
        expected = tuple(norm_layers * per_layer for per_layer in EXPECTED_COLLECTIVES[name])
        assert (counted.torch, counted.host) == expected, (
            f"{name.strip()}: {counted.torch} torch.distributed and {counted.host} loopback all_reduce calls in one "
            f"training step of {norm_layers} norm layers, expected {expected[0]} and {expected[1]}"
        )
    for reference, *others in SAME_FUNCTION:
        for name in others:
            _assert_close(f"{name.strip()} vs {reference}: output", outputs[name], outputs[reference])
            for key, value in states[reference].items():
                _assert_close(f"{name.strip()} vs {reference}: {key}", states[name][key], value)
    return counts


# ------------------------------------------------------------------------------------------------- DDP timing


def _batch(rank: int, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, (args.batch,), generator=generator)


def build_models(channels: int, args: argparse.Namespace, one_rank_group: Any,
                 dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Every variant's net, from the same seed (identical weights), each in its own DDP wrapper."""
    models = {}
    for name, norm in norm_factories(one_rank_group).items():
        torch.manual_seed(0)
        model = build_net(norm, args.blocks, channels).to(dtype)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = nn.parallel.DistributedDataParallel(model)
    return models


def _collective_latency(channels: int, all_reduce: Callable[[Tensor], object], repeats: int = 50) -> float:
    """Median seconds of one all_reduce of a SyncBN-sized payload with all ranks arriving together.

    Calls run back to back: each one's completion lines the ranks up for the next more tightly than a barrier,
    whose own wake-up jitter (gloo: up to milliseconds) would be counted as latency.
    """
    moments = torch.zeros(2 * channels + 1, dtype=torch.float64)
    for _ in range(10):
        all_reduce(moments)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        all_reduce(moments)
        latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


def _agreed_steps_per_round(step_seconds: float, args: argparse.Namespace) -> int:
    """Steps per variant and round that fill about ``--round-ms``; the slowest rank's estimate decides, so that all
    ranks run the same count (DDP keeps them in lockstep; a rank that stopped early would deadlock the others)."""
    slowest = torch.tensor([step_seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return max(1, min(args.steps, math.ceil(args.round_ms / 1e3 / slowest.item())))


def _rotated(names: list[str], round_index: int) -> list[str]:
    """Round ``r``'s order: rotated by ``r`` and reversed every other round, so that no variant always runs in the
    same position or right after the same other one."""
    shift = round_index % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_index % 2 else order


def _time_width(rank: int, channels: int, args: argparse.Namespace, one_rank_group: Any) -> dict[str, Any]:
    models = build_models(channels, args, one_rank_group)
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) for name, model in models.items()}
    images, labels = _batch(rank, args)
    loss_fn = nn.CrossEntropyLoss()
    # Checked in float64: in float32 this net's first-layer weight gradients are ill-conditioned (global pooling
    # after ReLU after BN hands BN's backward nearly equal terms to subtract). Plain nn.BatchNorm2d on the
    # concatenated batch already differs from a float64 reference by up to 2e-3 of the largest gradient at width 128
    # and 1e-2 at 256, so a float32 comparison either fails on rounding or tolerates real errors.
    check_variants(build_models(channels, args, one_rank_group, torch.float64), images.double(), labels,
                   norm_layers=args.blocks)

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss_fn(models[name](images), labels).backward()
        optimizers[name].step()

    names = list(models)
    # Warm-up in the same alternation as the timed rounds: switching between variants has its own transient (in the
    # first rounds here, the variant that follows BN ran up to 1.5x slower), which a run of one variant never sees.
    # The first round runs one step each, after which a BN step is timed to size the rounds.
    for name in names:
        with _transport(name):
            step(name)
    start = time.perf_counter()
    step(BASELINE)
    steps = _agreed_steps_per_round(time.perf_counter() - start, args)
    for warmup_round in range(1, args.warmup_rounds):
        for name in _rotated(names, warmup_round):
            with _transport(name):
                for _ in range(min(args.warmup, steps)):
                    step(name)
    with _host_channel_on():
        loopback_latency = _collective_latency(channels, all_reduce_sum)  # loopback channel, as SyncBN issues it
    latency = {
        "latency_us": loopback_latency,
        "gloo_latency_us": _collective_latency(channels, dist.all_reduce),
    }

    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in _rotated(names, round_index):
            with _transport(name):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    step(name)
                times[name].append((time.perf_counter() - start) / steps)
    return {"times": times, "latency": latency, "steps": steps}


def _ddp_worker(rank: int, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    # Set up front, on all ranks alike: the loopback channel (its setup is a collective of its own, which the
    # per-variant counts of check_variants must not see) and the one-rank groups of the diagnostic variant.
    gnl_distributed.host_channel()
    one_rank_group = new_consecutive_groups(1)
    return {channels: _time_width(rank, channels, args, one_rank_group) for channels in args.channels}


# ----------------------------------------------------------------------------------------------- layer costs


@dataclass(frozen=True)
class LayerShape:
    batch: int
    channels: int
    size: int  # height and width
    layers: int  # how many norm layers of the model see this input shape

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.size, self.size)

    def __str__(self) -> str:
        return f"{self.batch}x{self.channels}x{self.size}x{self.size}"


# Every BatchNorm2d input of torchvision's deeplabv3_resnet50 (replace_stride_with_dilation: output stride 8, no
# auxiliary head) on a batch of 2 at 512x512, with the number of layers per shape (60 layers in all): the stem,
# layer1 at 128x128, layer2-4 and the ASPP head at 64x64, and the ASPP's image-pooling branch at 1x1.
DEEPLABV3_R50_512 = (
    LayerShape(2, 64, 256, 1),
    LayerShape(2, 64, 128, 6),
    LayerShape(2, 128, 128, 1),
    LayerShape(2, 256, 128, 4),
    LayerShape(2, 128, 64, 7),
    LayerShape(2, 256, 64, 18),
    LayerShape(2, 512, 64, 11),
    LayerShape(2, 1024, 64, 7),
    LayerShape(2, 2048, 64, 4),
    LayerShape(2, 256, 1, 1),
)
SMOKE_LAYER_SHAPES = (LayerShape(2, 8, 16, 2), LayerShape(2, 16, 4, 1))
LAYER_SHAPES = {"deeplabv3_r50_512": DEEPLABV3_R50_512, "smoke": SMOKE_LAYER_SHAPES}
LAYER_SHAPE_SETS = {"deeplabv3_r50_512": "DeepLabV3-R50 (output stride 8), batch 2, 512x512",
                    "smoke": "a smoke-test model"}  # what each set of shapes stands for, in words


def _layer_step(layer: nn.Module, x: Tensor, grad_output: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = layer.weight.grad = layer.bias.grad = None
        layer(x).backward(grad_output)

    return step


def _layer_variants(channels: int, group: Any) -> dict[str, nn.Module]:
    return {
        LAYER_BASELINE: nn.BatchNorm2d(channels),
        LAYER_AS_USED: SyncBatchNorm(channels, process_group=group),
        LAYER_FORCED: _SyncBatchNormWithoutCollectives(channels, process_group=group),
    }


def _check_layers(layers: dict[str, nn.Module], x: Tensor, grad_output: Tensor) -> None:
    """Time equal work only: the same output and gradients as nn.BatchNorm2d (exactly, for the layer as used)."""
    results = {}
    for name, layer in layers.items():
        leaf = x.detach().clone().requires_grad_()
        output = layer(leaf)
        output.backward(grad_output)
        results[name] = {"output": output.detach(), "input gradient": leaf.grad, "weight gradient": layer.weight.grad,
                         "bias gradient": layer.bias.grad, "running_var": layer.running_var}
        layer.zero_grad(set_to_none=True)
    reference = results[LAYER_BASELINE]
    for key, value in reference.items():
        assert torch.equal(results[LAYER_AS_USED][key], value), f"{LAYER_AS_USED}: {key} differs from nn.BatchNorm2d"
        _assert_close(f"{LAYER_FORCED}: {key}", results[LAYER_FORCED][key], value)


def _layer_worker(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    group = dist.group.WORLD  # a world of this one process
    assert dist.get_world_size(group) == 1
    shapes = LAYER_SHAPES[args.layer_shapes]
    setups = []
    for index, shape in enumerate(shapes):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(shape.shape, generator=generator).requires_grad_()
        grad_output = torch.randn(shape.shape, generator=generator)
        layers = _layer_variants(shape.channels, group)
        _check_layers(layers, x, grad_output)
        calls = max(1, min(100, math.ceil(LAYER_TIMING_MIN_ELEMENTS / x.numel())))
        setups.append(({name: _layer_step(layer, x, grad_output) for name, layer in layers.items()}, calls))
    names = list(_layer_variants(1, group))
    for steps, calls in setups:  # warm-up
        for name in names:
            for _ in range(calls):
                steps[name]()
    # times[shape index][variant]: ms per call, one value per round.
    times: list[dict[str, list[float]]] = [{name: [] for name in names} for _ in shapes]
    for round_index in range(args.rounds):
        for (steps, calls), shape_times in zip(setups, times):
            for name in _rotated(names, round_index):
                start = time.perf_counter()
                for _ in range(calls):
                    steps[name]()
                shape_times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {"times": times, "calls": [calls for _, calls in setups]}


# ---------------------------------------------------------------------------------------------- processes


def _worker(
    rank: int, world_size: int, port: int, task: Callable[[int, argparse.Namespace], Any], args: argparse.Namespace,
    results: "mp.Queue",
) -> None:
    torch.set_num_threads(1)
    if args.pin:
        # One core per rank, set before the process group exists so that gloo's threads inherit it: a rank blocked
        # in a collective then leaves its own core to its communication threads instead of their wake-ups landing
        # on the core where another rank computes. Usual practice for CPU data parallelism (taskset / numactl per
        # rank); it applies to all variants alike.
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, task(rank, args)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(task: Callable[[int, argparse.Namespace], Any], world_size: int, args: argparse.Namespace) -> Any:
    """``task(rank, args)`` in ``world_size`` spawned processes joined by a gloo group; rank 0's result."""
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = mp.start_processes(
        _worker,
        args=(world_size, _free_port(), task, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    # Read before joining: a child cannot exit while its queued result is still in the pipe.
    per_rank = {}
    while len(per_rank) < world_size:
        try:
            rank, result = results.get(timeout=1)
            per_rank[rank] = result
        except queue.Empty:
            processes.join(timeout=0)  # re-raises a worker's exception, with its traceback, if one died
    while not processes.join():
        pass
    return per_rank[0]  # DDP keeps ranks in lockstep; rank 0's clock is as good as any


def measure(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Run the DDP benchmark in ``args.world_size`` spawned processes.

    Returns, per width, as seen by rank 0: the median step time in ms of each variant (the values of
    :data:`RESULT_KEYS`); each variant's ratio to BN (:data:`RATIO_KEYS`) and gnlightning SyncBN on gloo over the
    naive peer (:data:`PEER_RATIO_KEY`) as ``(median, low, high)`` over rounds of the per-round ratio with a 95%
    confidence interval (see :func:`median_with_ci`); the idle latency in microseconds of one all_reduce of a
    SyncBN-sized payload through the loopback channel (``latency_us``) and through gloo (``gloo_latency_us``);
    the steps per variant and round (``steps``); and every round's step time in ms per variant (``rounds_ms``,
    keyed by the variant's label).
    """
    summary = {}
    for channels, result in _spawn(_ddp_worker, args.world_size, args).items():
        rounds_ms = {name: [value * 1e3 for value in values] for name, values in result["times"].items()}
        summary[channels] = {
            **{RESULT_KEYS[name]: statistics.median(values) for name, values in rounds_ms.items()},
            **{key: ratio_ci(rounds_ms[name], rounds_ms[BASELINE]) for name, key in RATIO_KEYS.items()},
            PEER_RATIO_KEY: ratio_ci(rounds_ms[SYNC_GLOO], rounds_ms[NAIVE]),
            **{key: seconds * 1e6 for key, seconds in result["latency"].items()},
            "steps": result["steps"],
            "rounds_ms": rounds_ms,
        }
    return summary


def measure_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Layer costs in one spawned process (a gloo world of one rank, one thread, pinned unless ``--no-pin``).

    Returns ``shapes``: per shape of ``--layer-shapes``, its label, ``layers`` (how many layers of the model see
    it), ``calls`` (per timing), ``ms`` (median ms per forward + backward, per variant) and ``ratio`` (per variant
    but the baseline, ``(median, low, high)`` of the per-round ratio to nn.BatchNorm2d); and ``total``: the same
    ``ms`` and ``ratio`` for the layer-count-weighted sum over shapes, i.e. all the model's norm layers.
    """
    shapes = LAYER_SHAPES[args.layer_shapes]
    result = _spawn(_layer_worker, 1, args)
    names = list(result["times"][0])
    others = [name for name in names if name != LAYER_BASELINE]
    per_shape = []
    for shape, times, calls in zip(shapes, result["times"], result["calls"]):
        per_shape.append({
            "shape": str(shape), "layers": shape.layers, "calls": calls,
            "ms": {name: statistics.median(values) for name, values in times.items()},
            "ratio": {name: ratio_ci(times[name], times[LAYER_BASELINE]) for name in others},
        })
    totals = {
        name: [sum(shape.layers * times[name][round_index] for shape, times in zip(shapes, result["times"]))
               for round_index in range(args.rounds)]
        for name in names
    }
    return {
        "shapes": per_shape,
        "total": {
            "ms": {name: statistics.median(values) for name, values in totals.items()},
            "ratio": {name: ratio_ci(totals[name], totals[LAYER_BASELINE]) for name in others},
            "layers": sum(shape.layers for shape in shapes),
        },
    }


# ------------------------------------------------------------------------------------------------------- CLI


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=("ddp", "layers"), default=["ddp", "layers"],
                        help="parts to run (default both)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, *TARGET_WIDTHS],
                        help=f"conv widths to benchmark (targets apply to {' '.join(map(str, TARGET_WIDTHS))})")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--warmup", type=int, default=5, help="at most this many steps per variant and warm-up round")
    parser.add_argument("--warmup-rounds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (DDP part and layer costs alike)")
    parser.add_argument("--steps", type=int, default=10, help="at most this many steps per variant and timed round")
    parser.add_argument("--round-ms", type=float, default=300.0,
                        help="steps per variant and round fill about this long (at least 1 step, at most --steps)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--layer-shapes", choices=sorted(LAYER_SHAPES), default="deeplabv3_r50_512",
                        help="input shapes of the layer costs (smoke: tiny, for testing the script)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each rank to its own core")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pin and not hasattr(os, "sched_setaffinity"):
        args.pin = False  # macOS / Windows: no affinity API
    return args


def _print_ddp(args: argparse.Namespace, by_width: dict[int, dict[str, Any]]) -> None:
    print(
        f"DDP: {args.world_size} processes x 1 thread (torch.set_num_threads(1)), gloo, "
        f"{'each rank pinned to its own core' if args.pin else 'no pinning'}; net: {args.blocks} x [conv3x3, norm, "
        f"ReLU] + pool + linear; batch {args.batch}/rank, {args.size}x{args.size}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}; {args.warmup_rounds} warm-up rounds, median of "
        f"{args.rounds} interleaved rounds of about {args.round_ms:g} ms per variant"
    )
    print()
    print("| width | norm | steps/round | step time (ms, median) | min / max round (ms) | ratio vs BN (95% CI) |")
    print("|---:|---|---:|---:|---:|---:|")
    verdicts = []
    for channels, result in by_width.items():
        for name, values in result["rounds_ms"].items():
            ratio_cell = "1.000x" if name == BASELINE else format_ratio(result[RATIO_KEYS[name]])
            print(f"| {channels} | {name} | {result['steps']} | {result[RESULT_KEYS[name]]:.2f} | "
                  f"{min(values):.2f} / {max(values):.2f} | {ratio_cell} |")
        targeted = channels in TARGET_WIDTHS
        peer = result[PEER_RATIO_KEY]
        collectives = 2 * args.blocks
        one_rank = result[RESULT_KEYS[ONE_RANK]]
        lines = [
            f"width {channels}{'' if targeted else ' (information only, no target)'}:",
            *(f"  {name} / BN = {format_ratio(result[RATIO_KEYS[name]])}"
              + (f", {median_verdict(result[RATIO_KEYS[name]], TARGET_RATIO)}" if targeted else "")
              for name in (SYNC_GLOO, SYNC_LOOPBACK)),
            f"  {SYNC_GLOO} / {NAIVE} = {format_ratio(peer)}"
            + (f": {interval_verdict(peer, PEER_TARGET_RATIO)} (target <= {PEER_TARGET_RATIO}x, undecided while the "
               "interval contains it)" if targeted else ""),
            f"  all_reduce of {2 * channels + 1} float64 (idle, median): {result['latency_us']:.0f} us through the "
            f"loopback channel, {result['gloo_latency_us']:.0f} us through gloo; {collectives} per step; in training "
            f"they cost {result[RESULT_KEYS[SYNC_LOOPBACK]] - one_rank:.1f} ms (loopback) and "
            f"{result[RESULT_KEYS[SYNC_GLOO]] - one_rank:.1f} ms (gloo) per step over the group-of-one row, idle "
            "latency plus each rank waiting for the slower one at every sync point",
        ]
        verdicts.append("\n".join(lines))
    print()
    print("\n".join(verdicts))


def _print_layers(args: argparse.Namespace, layers: dict[str, Any]) -> None:
    total = layers["total"]
    names = list(total["ms"])
    print(
        f"Layer costs: one process x 1 thread, a gloo world of one rank; forward + backward of one norm layer, "
        f"{args.layer_shapes} shapes; median of {args.rounds} interleaved rounds"
    )
    print()
    print(f"| input | layers | {' | '.join(f'{name} (ms)' for name in names)} | "
          f"{' | '.join(f'{name} / BN (95% CI)' for name in names[1:])} |")
    print("|---|---:|" + "---:|" * (2 * len(names) - 1))
    for row in [*layers["shapes"], {**total, "shape": "weighted total"}]:
        cells = [row["shape"], str(row["layers"]), *(f"{row['ms'][name]:.3f}" for name in names),
                 *(format_ratio(row["ratio"][name]) for name in names[1:])]
        print(f"| {' | '.join(cells)} |")
    print()
    forced = total["ratio"][LAYER_FORCED]
    print(f"{LAYER_FORCED} / BN over the model's {total['layers']} norm layers = {format_ratio(forced)}, "
          f"{median_verdict(forced, LAYER_TARGET_RATIO)}")


def main() -> None:
    args = parse_args()
    # Other processes on the machine distort latency-bound timings far more than compute-bound ones: record it.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    by_width = measure(args) if "ddp" in args.only else None
    layers = measure_layers(args) if "layers" in args.only else None

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}")
    if load_before is not None:
        load_after = os.getloadavg()
        print(f"load average (1 min) before / after the run: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"torch {torch.__version__}, python {platform.python_version()}")
    if by_width is not None:
        print()
        _print_ddp(args, by_width)
    if layers is not None:
        print()
        _print_layers(args, layers)


if __name__ == "__main__":
    main()
