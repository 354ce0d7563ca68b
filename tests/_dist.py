"""Run a test function in several CPU processes joined by a gloo process group.

Why a harness: collectives can only be tested with real peers, and a test that deadlocks must fail instead of
hanging CI. This module owns the boring parts once -- spawning, a free rendezvous port, one thread per worker so
two cores are enough, collecting return values, re-raising a worker's exception with its traceback, and killing
everything on a timeout -- so distributed tests stay a plain function plus one call.

Usage::

    def _worker(rank: int, world_size: int, scale: float) -> dict:   # top level: spawn pickles it by name
        ...
        return {"out": tensor}                                        # anything picklable

    results = run_distributed(_worker, 2, 0.5)                       # -> [result of rank 0, result of rank 1]

``fn`` runs as ``fn(rank, world_size, *args)``. By default the default process group is already initialized (gloo)
when it starts and destroyed after it returns. With ``init_process_group=False`` only the usual environment
variables are set (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``NODE_RANK``), which
is what Lightning's DDP strategy expects from an external launcher: it then initializes the group itself.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gnlightning.host_all_reduce import HostAllReduce

__all__ = ["run_distributed", "free_port", "CollectiveCounter"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; tiny race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    result_dir: str,
    init_process_group: bool,
    timeout: float,
    args: tuple[Any, ...],
) -> None:
    # One intra-op thread: N workers on a 2-core runner would otherwise oversubscribe and crawl.
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        NODE_RANK="0",
    )
    if init_process_group:
        # The collective timeout makes a rank stuck in all_reduce raise instead of waiting forever; the parent's
        # own deadline below is the backstop for hangs outside collectives.
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
    try:
        result = fn(rank, world_size, *args)
    finally:
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()
    # Written to a file rather than a queue: nothing to drain before the child may exit, and a result that fails to
    # pickle raises here, inside the rank, with a traceback that names it.
    with open(Path(result_dir) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    init_process_group: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return the results by rank.

    Args:
        fn: a picklable *top-level* function (spawned children import it by qualified name).
        world_size: number of processes.
        *args: extra picklable arguments passed to every rank.
        timeout: seconds before the whole run is killed and ``TimeoutError`` raised (also the gloo collective
            timeout inside the workers).
        init_process_group: initialize (and afterwards destroy) a gloo default group around ``fn``; pass False
            when the code under test initializes it (e.g. a Lightning Trainer with ``strategy="ddp"``).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised; the message carries that rank's traceback.
            The other ranks are terminated.
        torch.multiprocessing.ProcessExitedException: a rank died without a Python exception (e.g. a signal).
        TimeoutError: the run did not finish within ``timeout`` seconds (a deadlock, typically a rank that
            skipped a collective).
    """
    with tempfile.TemporaryDirectory(prefix="gnl-dist-") as result_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), result_dir, init_process_group, timeout, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() returns True once all ranks exited cleanly and raises as soon as one failed (after
            # terminating the others), so a failure surfaces without waiting for the deadline.
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    raise TimeoutError(
                        f"{getattr(fn, '__qualname__', fn)} did not finish within {timeout}s on {world_size} "
                        f"processes; ranks still running: {alive} (a rank skipping a collective deadlocks the rest)"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        results = []
        for rank in range(world_size):
            with open(Path(result_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results


class CollectiveCounter:
    """Counts all_reduce calls per transport; every collective of the package goes through one of the two.

    ``calls`` is the total; ``by_transport`` tells whether they went through the host-local loopback channel
    (``host``) or through ``torch.distributed.all_reduce`` (``torch``).
    """

    def __init__(self) -> None:
        self.by_transport = {"host": 0, "torch": 0}
        real_torch, real_host = dist.all_reduce, HostAllReduce.all_reduce_sum_

        def torch_all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.by_transport["torch"] += 1
            return real_torch(*args, **kwargs)

        def host_all_reduce(channel: HostAllReduce, tensor: torch.Tensor) -> torch.Tensor:
            self.by_transport["host"] += 1
            return real_host(channel, tensor)

        # Patched for good: create it only inside a spawned worker process.
        dist.all_reduce = torch_all_reduce  # type: ignore[assignment]
        HostAllReduce.all_reduce_sum_ = host_all_reduce  # type: ignore[method-assign]

    @property
    def calls(self) -> int:
        return sum(self.by_transport.values())
