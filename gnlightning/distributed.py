"""The few collective helpers that synchronized normalization layers share.

Why a module of its own: SyncBatchNorm (and the PreciseBN callback, which re-estimates BN statistics over many
batches) need the same three questions answered -- "are we distributed at all?", "how many ranks share my
statistics?" and "sum this tensor over them" -- and each answer has an edge case that is easy to get subtly wrong
when repeated inline (an uninitialized default group, a world of size 1, sub-groups that every rank must create).

Every collective of the package goes through :func:`all_reduce_sum`, which calls ``torch.distributed.all_reduce``
(or, only where :data:`HOST_CHANNEL_ENV` opts in, ``HostAllReduce.all_reduce_sum_``), by attribute lookup at call
time. Tests
rely on that to count collectives by monkeypatching them; keep it that way (no ``from torch.distributed import
all_reduce``).

This module must stay free of Lightning and Hydra imports: ``gnlightning.layers`` depends on it.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from gnlightning.config_values import as_int, divisors
from gnlightning.host_all_reduce import MAX_BYTES, HostAllReduce

__all__ = [
    "is_distributed",
    "group_world_size",
    "all_reduce_sum",
    "host_channel",
    "host_channel_enabled",
    "new_consecutive_groups",
    "HOST_CHANNEL_ENV",
]

#: The one switch for the host-local loopback channel (:mod:`gnlightning.host_all_reduce`): ``1`` in the environment
#: of every rank (e.g. ``GNLIGHTNING_HOST_ALL_REDUCE=1 torchrun ...``) sends small CPU collectives between ranks of
#: one host over it. Off by default, so every collective is a plain torch.distributed one on every backend: CPU
#: multi-process training is a test setting, GPUs use NCCL, and gloo meets SyncBN's cost target at ResNet widths on
#: its own (docs/bench). The channel pays off only for narrow CPU layers. All ranks must agree on it, as on any
#: collective.
HOST_CHANNEL_ENV = "GNLIGHTNING_HOST_ALL_REDUCE"

# torch.distributed.ProcessGroup only exists when torch was built with distributed support, so the annotations
# below use Any instead of importing it.
ProcessGroup = Any

# Per-world caches (see _per_world). They hold process groups only *weakly*: torch's registry owns them, and a gloo
# group's worker threads end only when its last reference goes. A cache that kept a group after
# destroy_process_group() kept those threads running into interpreter shutdown, where a worker still releasing its
# last collective's tensors needs the GIL, is ended by Python with pthread_exit, and the process aborts with
# "terminate called without an active exception" (issue 15) -- after a run that succeeded.
# group_size -> (world, this rank's group of consecutive ranks).
_CONSECUTIVE_GROUPS: dict[int, tuple[weakref.ref, weakref.ref]] = {}
# process group -> (world, its HostAllReduce, or None: a group of one rank, or one spanning hosts).
_HOST_CHANNELS: dict[weakref.ref, tuple[weakref.ref, HostAllReduce | None]] = {}


def _per_world(cache: dict[Any, tuple[weakref.ref, Any]], key: Any, create: Callable[[], Any]) -> Any:
    """``cache[key]``'s value if it was created under the current default group, else ``create()``'s (cached).

    Remembering the world lets a cache notice that the default group was destroyed and re-initialized (common in
    tests and in scripts that run several trainings in one process): what belonged to a dead world -- its groups,
    their channels -- must not be handed out again. Entries of a dead world are dropped on the first miss, and
    closed if they can be (a host channel's sockets). The hit path is one lookup and one weak-reference call: this
    runs per collective.
    """
    world = dist.group.WORLD
    cached = cache.get(key)
    if cached is not None and cached[0]() is world:
        return cached[1]
    for stale_key, (owner, value) in list(cache.items()):
        if owner() is not world:
            if isinstance(value, HostAllReduce):
                value.close()
            del cache[stale_key]
    value = create()
    cache[key] = (weakref.ref(world), value)
    return value


def _connect_host_channel(group: ProcessGroup, key: weakref.ref) -> HostAllReduce | None:
    """A new channel for ``group``, closed and forgotten when the group is freed (destroyed and unreferenced)."""
    channel = HostAllReduce.connect(group) if dist.get_world_size(group) > 1 else None
    weakref.finalize(group, _forget_channel, key)
    return channel


def _forget_channel(key: weakref.ref) -> None:
    """Close the host channel of a process group that is being freed (or, at exit, of one still alive)."""
    _, channel = _HOST_CHANNELS.pop(key, (None, None))
    if channel is not None:
        channel.close()


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


def host_channel_enabled() -> bool:
    """Whether :data:`HOST_CHANNEL_ENV` opts in to the host-local loopback channel."""
    return os.environ.get(HOST_CHANNEL_ENV) == "1"


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks of ``group`` (``None`` = world) and return it.

    A no-op when there is nobody to talk to (not distributed, or a group of one rank): single-process code paths
    then cost nothing and need no special casing. Callers must invoke it on *every* rank of the group the same
    number of times and in the same order, including ranks whose local batch is empty; a rank that skips a call
    deadlocks the others.

    It is ``torch.distributed.all_reduce``. Where :data:`HOST_CHANNEL_ENV` opts in, small CPU tensors in a group
    whose ranks share this host go through :mod:`gnlightning.host_all_reduce` instead (loopback TCP from the calling
    thread, a fraction of gloo's thread hand-offs). That choice depends only on the switch, the
    device, the size and the group, which all ranks share, so they always take the same transport.
    """
    if tensor.is_cpu and tensor.nbytes <= MAX_BYTES and host_channel_enabled():
        channel = host_channel(group)
        if channel is not None:
            return channel.all_reduce_sum_(tensor)
    if group_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def host_channel(group: ProcessGroup | None = None) -> HostAllReduce | None:
    """The host-local all_reduce channel of ``group`` (``None`` = world).

    ``None`` when there is nothing to reduce over (not distributed, or a group of one rank) or when the group's
    ranks span hosts. Created on the first call for a group, which is a collective: call it on every rank of the
    group at the same point (as any collective; :func:`all_reduce_sum` does). Later calls are a dictionary lookup.
    """
    if not is_distributed():
        return None
    group = dist.group.WORLD if group is None else group
    # Keyed by a weak reference (CPython hands out the same one per live group, so this costs no allocation): the
    # channel is closed, and its entry dropped, when the group itself is freed.
    key = weakref.ref(group)
    return _per_world(_HOST_CHANNELS, key, lambda: _connect_host_channel(group, key))


def new_consecutive_groups(sync_group_size: int) -> ProcessGroup | None:
    """Return the process group of ``sync_group_size`` consecutive ranks that contains this rank.

    The world is cut into blocks ``{0..g-1}, {g..2g-1}, ...`` with ``g = sync_group_size``. Consecutive blocks are what
    "sync BN over the GPUs of one node" (or over pairs of GPUs) means with the usual rank layout, where a node's
    local ranks are numbered consecutively, and it keeps intra-group traffic on the fast intra-node links.

    Every rank creates *every* block, in the same order, although it only keeps its own: ``new_group`` is a
    collective over the whole world (it agrees on a group id through the store, and with some backends it
    exchanges addresses), so a rank that skipped a block would either block forever or pair up its later groups
    with the wrong group ids on other ranks.

    Groups are cached per size (and per default group): converting several models, or the same model
    twice, must not create new groups each time -- group creation is slow, holds communicator resources (NCCL
    memory), and would itself have to happen in lockstep on all ranks.

    Returns:
        The group containing this rank. ``torch.distributed.group.WORLD`` when ``sync_group_size`` equals the
        world size (no new group is needed for that), and ``None`` when torch.distributed is not initialized and
        ``sync_group_size`` is 1 (there is nothing to synchronize with).

    Raises:
        ValueError: if ``sync_group_size`` is not a positive divisor of the world size.
    """
    world_size = group_world_size()
    valid = divisors(world_size)
    size = as_int(sync_group_size)
    if size not in valid:
        where = "" if is_distributed() else " (torch.distributed is not initialized, so the world is this process)"
        raise ValueError(
            f"sync_group_size={sync_group_size!r} must be a positive divisor of the world size {world_size}{where}; "
            f"valid choices: {valid}"
        )
    group_size = size
    if not is_distributed():
        return None
    if group_size == world_size:
        return dist.group.WORLD

    own_group = _per_world(
        _CONSECUTIVE_GROUPS, group_size, lambda: weakref.ref(_create_consecutive_groups(world_size, group_size))
    )()
    if own_group is None:
        # Destroyed on its own (destroy_process_group(group)) in a world that lives on: every rank sees that at the
        # same call, so they all create the blocks anew together.
        del _CONSECUTIVE_GROUPS[group_size]
        return new_consecutive_groups(group_size)
    return own_group


def _create_consecutive_groups(world_size: int, group_size: int) -> ProcessGroup:
    rank = dist.get_rank()
    own_group = None
    for start in range(0, world_size, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            own_group = group
    return own_group
