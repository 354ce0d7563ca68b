"""A distributed run that succeeded must also exit 0 (issue 15): nothing of ours may outlive destroy_process_group.

gloo runs each process group's collectives on worker threads that end only when the group is freed. If a group
survives into interpreter shutdown, a worker still dropping its last collective's tensors needs the GIL, Python ends
that thread with pthread_exit, and the process aborts ("terminate called without an active exception", SIGABRT)
after every assertion passed -- intermittently, more often on a loaded machine. gnlightning's caches (the host
channels, the consecutive groups) used to keep groups alive that way. The first test checks the cause directly and
deterministically; the second runs the reported scenario in a loop.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from gnlightning.distributed import HOST_CHANNEL_ENV, host_channel, new_consecutive_groups
from tests._dist import free_port, run_distributed
from tests.helpers import subprocess_env

SCENARIO = Path(__file__).parent / "scripts" / "ddp_join_syncbn.py"


def _groups_freed_worker(rank: int, world_size: int) -> dict[str, Any]:
    # A consecutive group destroyed on its own is freed, and asking again creates a new one.
    first_singles = weakref.ref(new_consecutive_groups(1))
    dist.destroy_process_group(first_singles())
    gc.collect()
    recreated = {"old_freed": first_singles() is None}
    world = dist.group.WORLD
    subgroup = dist.new_group(list(range(world_size)))
    singles = new_consecutive_groups(1)
    recreated["new_group"] = dist.get_world_size(singles) == 1 and singles is new_consecutive_groups(1)
    for group in (None, subgroup, singles):
        host_channel(group)  # creates the host channels (none for the group of one rank)
    channels = [host_channel(), host_channel(subgroup)]
    assert all(channel is not None for channel in channels)
    groups = {"world": weakref.ref(world), "subgroup": weakref.ref(subgroup), "consecutive": weakref.ref(singles)}
    del world, subgroup, singles, group
    dist.destroy_process_group()
    gc.collect()
    return {
        "freed": {name: ref() is None for name, ref in groups.items()},
        "channels_closed": [not channel._connections for channel in channels],
        "recreated": recreated,
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_destroy_process_group_frees_every_group_our_caches_have_seen() -> None:
    for result in run_distributed(_groups_freed_worker, 2, timeout=120):
        assert result["freed"] == {"world": True, "subgroup": True, "consecutive": True}
        assert result["channels_closed"] == [True, True]
        assert result["recreated"] == {"old_freed": True, "new_group": True}


def _run_scenario(world_size: int = 2, timeout: float = 120, channel: bool = False) -> list[tuple[int, str]]:
    """One run of the scenario, each rank its own process (as srun starts them): (exit status, stderr) per rank;
    ``channel``: SyncBN's collectives over the opt-in host-local channel instead of gloo."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = subprocess_env(**{HOST_CHANNEL_ENV: "1" if channel else "0"}, RANK=str(rank), WORLD_SIZE=str(world_size),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, str(SCENARIO)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    outcomes = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=timeout)
            outcomes.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_join_with_syncbn_exits_cleanly_every_time() -> None:
    """Issue 15's scenario, 20 times, every other run on the opt-in host-local channel. Before the fix 8 runs in 100
    aborted at exit on a 2-core machine (with the channel, then the default), so this catches that about 4 times in
    5 (0.92 ** 20 = 0.19); the test above pins the cause itself, deterministically."""
    failures = []
    for run in range(20):
        for rank, (returncode, stderr) in enumerate(_run_scenario(channel=run % 2 == 0)):
            if returncode != 0 or "terminate called" in stderr:
                failures.append(f"run {run} rank {rank}: exit status {returncode}\n{stderr[-1500:]}")
    assert not failures, f"{len(failures)} rank exits failed:\n" + "\n".join(failures)
