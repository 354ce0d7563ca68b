"""The few collective helpers that synchronized normalization layers share.

Why a module of its own: SyncBatchNorm (and the PreciseBN callback, which re-estimates BN statistics over many
batches) need the same three questions answered -- "are we distributed at all?", "how many ranks share my
statistics?" and "sum this tensor over them" -- and each answer has an edge case that is easy to get subtly wrong
when repeated inline (an uninitialized default group, a world of size 1, sub-groups that every rank must create).

Every collective of the package goes through :func:`all_reduce_sum`, which calls
``torch.distributed.all_reduce`` by attribute lookup at call time. Tests rely on that to count collectives by
monkeypatching ``torch.distributed.all_reduce``; keep it that way (no ``from torch.distributed import all_reduce``).

This module must stay free of Lightning and Hydra imports: ``gnlightning.layers`` depends on it.
"""

from __future__ import annotations

import operator
import os
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "group_world_size",
    "all_reduce_sum",
    "new_consecutive_groups",
]

# torch.distributed.ProcessGroup only exists when torch was built with distributed support, so the annotations
# below use Any instead of importing it.
ProcessGroup = Any

# group_size -> (world group the groups were created under, this rank's group). Remembering the world group lets
# the cache notice that the default group was destroyed and re-initialized (common in tests and in scripts that
# run several trainings in one process); groups of a dead world must not be handed out again.
_CONSECUTIVE_GROUPS: dict[int, tuple[Any, ProcessGroup]] = {}

# os.sched_yield is POSIX-only; sleep(0) is the closest portable "let others run" elsewhere.
_yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))


def is_distributed() -> bool:
    """Whether collectives can be issued: torch.distributed is compiled in *and* a default group exists.

    ``torch.distributed.is_initialized`` alone raises or lies on builds without distributed support (some macOS
    and mobile wheels), hence the double check.
    """
    return dist.is_available() and dist.is_initialized()


def group_world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (``None`` = the whole world); 1 when not distributed.

    Returning 1 instead of raising lets callers write a single ``if group_world_size(g) > 1:`` test for "do I need
    to synchronize", which is the only thing normalization layers want to know.
    """
    if not is_distributed():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks of ``group`` (``None`` = world) and return it.

    A no-op when there is nobody to talk to (not distributed, or a group of one rank): single-process code paths
    then cost nothing and need no special casing. Callers must invoke it on *every* rank of the group the same
    number of times and in the same order, including ranks whose local batch is empty; a rank that skips a call
    deadlocks the others.

    CPU tensors are waited for by polling with ``sched_yield`` instead of blocking. SyncBN issues two tiny
    collectives per layer and step, so their latency, not their bandwidth, is what it costs, and a blocking wait
    adds thread wake-up hand-offs to each (gloo on a 2-vCPU VM: 0.3-3 ms per all_reduce). Yielding keeps the
    waiting core available to gloo's own threads and to other work; it cut the SyncBN step of
    ``scripts/bench_syncbn.py`` by 3-23% (typically ~12%) against a blocking wait. Accelerator tensors keep the
    ordinary call: there the wait only orders streams and does not block the host.
    """
    if group_world_size(group) <= 1:
        return tensor
    if tensor.device.type != "cpu":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    if work is not None:  # None only from stand-ins that test code patches in; they have finished already
        while not work.is_completed():
            _yield_cpu()
        work.wait()  # raises the collective's error (e.g. a timeout) if it failed
    return tensor


def new_consecutive_groups(group_size: int) -> ProcessGroup | None:
    """Return the process group of consecutive ranks that contains this rank.

    The world is cut into blocks ``{0..g-1}, {g..2g-1}, ...`` with ``g = group_size``. Consecutive blocks are what
    "sync BN over the GPUs of one node" (or over pairs of GPUs) means with the usual rank layout, where a node's
    local ranks are numbered consecutively, and it keeps intra-group traffic on the fast intra-node links.

    Every rank creates *every* block, in the same order, although it only keeps its own: ``new_group`` is a
    collective over the whole world (it agrees on a group id through the store, and with some backends it
    exchanges addresses), so a rank that skipped a block would either block forever or pair up its later groups
    with the wrong group ids on other ranks.

    Groups are cached per ``group_size`` (and per default group): converting several models, or the same model
    twice, must not create new groups each time -- group creation is slow, holds communicator resources (NCCL
    memory), and would itself have to happen in lockstep on all ranks.

    Returns:
        The group containing this rank. ``torch.distributed.group.WORLD`` when ``group_size`` equals the world
        size (no new group is needed for that), and ``None`` when torch.distributed is not initialized and
        ``group_size`` is 1 (there is nothing to synchronize with).

    Raises:
        ValueError: if ``group_size`` is not a positive divisor of the world size.
    """
    world_size = group_world_size()
    valid = [size for size in range(1, world_size + 1) if world_size % size == 0]
    try:
        # operator.index accepts numpy / OmegaConf integers from configs, but not floats or strings.
        size = operator.index(group_size) if not isinstance(group_size, bool) else None
    except TypeError:
        size = None
    if size not in valid:
        where = "" if is_distributed() else " (torch.distributed is not initialized, so the world is this process)"
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of the world size {world_size}{where}; "
            f"valid choices: {valid}"
        )
    group_size = size
    if not is_distributed():
        return None
    if group_size == world_size:
        return dist.group.WORLD

    world = dist.group.WORLD
    cached = _CONSECUTIVE_GROUPS.get(group_size)
    if cached is not None and cached[0] is world:
        return cached[1]

    rank = dist.get_rank()
    own_group = None
    for start in range(0, world_size, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            own_group = group
    _CONSECUTIVE_GROUPS[group_size] = (world, own_group)
    return own_group
