#!/usr/bin/env python
"""Benchmark: DDP training-step time with gnlightning SyncBatchNorm vs plain nn.BatchNorm2d.

Why: SyncBN is only worth offering for tiny per-device batches if synchronizing statistics is cheap next to the
convolutions around it. Target: SyncBN step time <= 1.15x BN step time on the same model.

What is measured: forward + backward + optimizer step of a small conv net (``--blocks`` x [conv3x3, norm, ReLU],
global pooling, linear head) wrapped in DistributedDataParallel with the gloo backend, ``--world-size`` CPU
processes with one intra-op thread each (each pinned to its own core unless ``--no-pin``), ``--batch`` images of
``--size`` x ``--size`` per rank, for each width in ``--channels``. Both variants live in the same processes and are
timed in interleaved rounds, so machine noise and frequency drift hit them alike; the table reports the median over
rounds of the mean step time within a round, and as the ratio to BN the median over rounds of each round's own
ratio, with a distribution-free 95% confidence interval. On a shared VM that interval is several percent wide at
15 rounds; a verdict whose interval straddles the target says so, and ``--rounds`` narrows it.

SyncBN's extra cost is two collectives per norm layer and step whose payload is tiny (2C+1 and 2C numbers), so it
is set by collective *latency*, which the script measures and prints next to the table -- both as SyncBN issues the
collective (between ranks of one host: gnlightning's loopback channel, see gnlightning/host_all_reduce.py) and
through gloo, which is what it would cost otherwise; the wider the convolutions, the smaller that fixed cost is
relative to the step. A third, diagnostic row runs SyncBN's exact code path over a group of one rank ("same math,
no collectives"), which splits SyncBN's overhead into the layer's own arithmetic and the collectives.

torch.nn.SyncBatchNorm is not in the table: it refuses CPU tensors in training.

Usage:  python scripts/bench_syncbn.py [--channels 32 64 --blocks 5 --batch 2 --size 64 --rounds 15 --steps 10]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import queue
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gnlightning.distributed import all_reduce_sum, new_consecutive_groups
from gnlightning.layers.sync_batchnorm import SyncBatchNorm, _SyncBatchNormFunction

TARGET_RATIO = 1.15
BASELINE = "nn.BatchNorm2d"
SYNC = "gnlightning SyncBatchNorm"
NO_COMM = "  same math, no collectives"
# measure()'s key for each variant's median step time.
RESULT_KEYS = {BASELINE: "bn_ms", SYNC: "syncbn_ms", NO_COMM: "no_comm_ms"}
# measure()'s key for each variant's ratio to BN: (median, low, high) over rounds, see median_with_ci.
RATIO_KEYS = {SYNC: "syncbn_ratio", NO_COMM: "no_comm_ratio"}


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


class _SyncBatchNormWithoutCollectives(SyncBatchNorm):
    """SyncBN's own training path (autograd Function, packing, global-statistics kernels) over a group of one rank.

    Diagnostic only: the layer normally short-cuts a one-rank group to nn.BatchNorm, so this forces the synchronized
    code path with nothing to synchronize. The gap to BN is the layer's arithmetic and Python overhead; the gap to
    real SyncBN is the cost of its two collectives per step.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.momentum, self.eps, self.process_group,
        )


NORMS: dict[str, Callable[[int], nn.Module]] = {
    BASELINE: nn.BatchNorm2d,
    SYNC: SyncBatchNorm,
    NO_COMM: lambda channels: _SyncBatchNormWithoutCollectives(channels, process_group=new_consecutive_groups(1)),
}


def build_net(norm: Callable[[int], nn.Module], blocks: int, channels: int, num_classes: int = 10) -> nn.Sequential:
    """Plain conv/norm/ReLU stack: the layer under test sits where it does in ResNet-style backbones."""
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(blocks):
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(inplace=True)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def _collective_latency(channels: int, all_reduce: Callable[[torch.Tensor], object], repeats: int = 50) -> float:
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


def _time_width(
    rank: int, channels: int, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float]]:
    models, optimizers = {}, {}
    for name, norm in NORMS.items():
        torch.manual_seed(0)
        model = build_net(norm, args.blocks, channels)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = nn.parallel.DistributedDataParallel(model)
        optimizers[name] = torch.optim.SGD(models[name].parameters(), lr=0.01, momentum=0.9)

    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss_fn(models[name](images), labels).backward()
        optimizers[name].step()

    # Warm-up in the same alternation as the timed rounds: switching between variants has its own transient (in the
    # first rounds here, the variant that follows BN ran up to 1.5x slower), which a run of one variant never sees.
    for warmup_round in range(args.warmup_rounds):
        for name in NORMS if warmup_round % 2 == 0 else reversed(NORMS):
            for _ in range(args.warmup):
                step(name)
    # What SyncBN uses (the host-local loopback channel here) and what gloo alone would cost.
    latency = {
        "latency_us": _collective_latency(channels, all_reduce_sum),
        "gloo_latency_us": _collective_latency(channels, dist.all_reduce),
    }

    times: dict[str, list[float]] = {name: [] for name in NORMS}
    for round_index in range(args.rounds):
        # Alternate the order so neither variant always runs right after the other.
        order = list(NORMS) if round_index % 2 == 0 else list(reversed(NORMS))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)
    return times, latency


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results: "mp.Queue") -> None:
    torch.set_num_threads(1)
    if args.pin:
        # One core per rank, set before the process group exists so that gloo's threads inherit it: a rank blocked
        # in a collective then leaves its own core to its communication threads instead of their wake-ups landing
        # on the core where another rank computes. Usual practice for CPU data parallelism (taskset / numactl per
        # rank); it applies to both variants alike.
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, {channels: _time_width(rank, channels, args) for channels in args.channels}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="conv widths to benchmark")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--warmup", type=int, default=5, help="steps per variant and warm-up round")
    parser.add_argument("--warmup-rounds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each rank to its own core")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pin and not hasattr(os, "sched_setaffinity"):
        args.pin = False  # macOS / Windows: no affinity API
    return args


def measure(args: argparse.Namespace) -> dict[int, dict]:
    """Run the benchmark in ``args.world_size`` spawned processes.

    Returns, per width: the median step time in ms of each variant (``bn_ms``, ``syncbn_ms``, ``no_comm_ms``), the
    ratio of SyncBN and of its no-collectives run to BN as ``(median, low, high)`` over rounds of the per-round
    ratio, with a 95% confidence interval (``syncbn_ratio``, ``no_comm_ratio``; see :func:`median_with_ci`), the
    idle all_reduce latency in microseconds (``latency_us``), and every round's step time in ms per variant
    (``rounds_ms``, keyed by the variant's table label), all as seen by rank 0. Latencies are of an idle all_reduce of
    a SyncBN-sized payload: ``latency_us`` through gnlightning's all_reduce_sum as SyncBN calls it, and
    ``gloo_latency_us`` through torch.distributed.all_reduce.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = mp.start_processes(
        _worker,
        args=(args.world_size, _free_port(), args, results),
        nprocs=args.world_size,
        join=False,
        start_method="spawn",
    )
    # Read before joining: a child cannot exit while its queued result is still in the pipe.
    per_rank = {}
    while len(per_rank) < args.world_size:
        try:
            rank, rank_results = results.get(timeout=1)
            per_rank[rank] = rank_results
        except queue.Empty:
            processes.join(timeout=0)  # re-raises a worker's exception, with its traceback, if one died
    while not processes.join():
        pass
    by_width = per_rank[0]  # DDP keeps ranks in lockstep; rank 0's clock is as good as any
    summary = {}
    for channels, (times, latency) in by_width.items():
        rounds_ms = {name: [value * 1e3 for value in values] for name, values in times.items()}
        summary[channels] = {
            **{RESULT_KEYS[name]: statistics.median(values) for name, values in rounds_ms.items()},
            # Per round, against the BN timing of the same round: the variants of one round run back to back, so
            # this cancels the machine's slow drifts, which a ratio of separate medians only averages.
            **{
                key: median_with_ci([value / bn for value, bn in zip(rounds_ms[name], rounds_ms[BASELINE])])
                for name, key in RATIO_KEYS.items()
            },
            **{key: seconds * 1e6 for key, seconds in latency.items()},
            "rounds_ms": rounds_ms,
        }
    return summary


def format_ratio(ratio: tuple[float, float, float]) -> str:
    """``(median, low, high)`` as ``1.123x (1.050-1.201)``."""
    median, low, high = ratio
    return f"{median:.3f}x ({low:.3f}-{high:.3f})"


def main() -> None:
    args = parse_args()

    # Other processes on the machine distort latency-bound timings far more than compute-bound ones: record it.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    by_width = measure(args)

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}")
    if load_before is not None:
        load_after = os.getloadavg()
        print(f"load average (1 min) before / after the run: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(
        f"torch {torch.__version__}, gloo, {args.world_size} processes x 1 thread (torch.set_num_threads(1)), "
        f"{'each rank pinned to its own core' if args.pin else 'no pinning'}, python {platform.python_version()}"
    )
    print(
        f"net: {args.blocks} x [conv3x3, norm, ReLU] + pool + linear; batch {args.batch}/rank, "
        f"{args.size}x{args.size}, {'channels_last' if args.channels_last else 'NCHW'}; "
        f"{args.warmup_rounds} warm-up rounds x {args.warmup} steps, median of {args.rounds} interleaved rounds x "
        f"{args.steps} steps"
    )
    print()
    print("| width | norm | step time (ms, median) | min / max round (ms) | ratio vs BN (95% CI) |")
    print("|---:|---|---:|---:|---:|")
    verdicts = []
    for channels, result in by_width.items():
        medians = {name: result[key] for name, key in RESULT_KEYS.items()}
        for name, values in result["rounds_ms"].items():
            low, high = min(values), max(values)
            ratio_cell = "1.000x" if name == BASELINE else format_ratio(result[RATIO_KEYS[name]])
            print(f"| {channels} | {name} | {medians[name]:.2f} | {low:.2f} / {high:.2f} | {ratio_cell} |")
        ratio = result[RATIO_KEYS[SYNC]]
        median_ratio, ratio_low, ratio_high = ratio
        verdict = f"{'meets' if median_ratio <= TARGET_RATIO else 'MISSES'} the target <= {TARGET_RATIO}x"
        if ratio_low <= TARGET_RATIO < ratio_high:
            verdict += " (but the interval straddles it; more --rounds tell)"
        collectives = 2 * args.blocks
        latency, gloo_latency = result["latency_us"] / 1e3, result["gloo_latency_us"] / 1e3  # ms
        verdicts.append(
            f"width {channels}: SyncBN / BN = {format_ratio(ratio)}, {verdict}; "
            f"all_reduce of {2 * channels + 1} float64 (idle, median): "
            f"{latency * 1e3:.0f} us as SyncBN issues it (host-local channel), {gloo_latency * 1e3:.0f} us through "
            f"gloo; x {collectives} per step = {collectives * latency:.1f} ms "
            f"({collectives * latency / medians[BASELINE]:.1%} of the BN step; through gloo: "
            f"{collectives * gloo_latency:.1f} ms); in training they cost "
            f"{medians[SYNC] - medians[NO_COMM]:.1f} ms per step (SyncBN minus its no-collectives row): the rest is "
            "each rank waiting for the slower one at every sync point"
        )
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
