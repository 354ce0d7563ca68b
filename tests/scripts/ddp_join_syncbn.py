"""One rank of a DDP run with gnlightning's SyncBatchNorm and uneven inputs under ``Join`` (issue 15's scenario).

usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ddp_join_syncbn.py [OPTION...]

Each rank is its own process started by the caller, as srun or torchrun would start it, so what happens at
interpreter exit shows in this process's exit status and stderr. Rank ``r`` gets ``3 + r`` batches of ``2 + r``
images: uneven in size and in number. SyncBN's own collectives cannot be shadowed by a joined rank, so the run uses
``throw_on_early_termination=True`` (what torch documents for models with such collectives): every rank raises
when the first one runs out, catches it, and checks that all ranks still hold the same parameters.

Options (for experiments; the default is the plain scenario); GNLIGHTNING_HOST_ALL_REDUCE=1 in the environment
sends SyncBN's collectives over the host-local channel, as in gnlightning.distributed:
  norm=bn              plain BatchNorm2d instead of SyncBatchNorm
  destroy=no           leave the default process group to the interpreter's exit
"""

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from gnlightning import SyncBatchNorm


def main(options: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial model on every rank
    norm = nn.BatchNorm2d(4) if options.get("norm") == "bn" else SyncBatchNorm(4)
    model = DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 2, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randn(2 + rank, 3, 6, 6, generator=generator) for _ in range(3 + rank)]
    steps = 0
    try:
        with Join([model], throw_on_early_termination=True):
            for images in batches:
                optimizer.zero_grad()
                model(images).square().mean().backward()
                optimizer.step()
                steps += 1
    except RuntimeError as error:
        assert "exhausted" in str(error), error
    assert steps == 3, steps  # everyone stops when rank 0 (3 batches) runs out
    parameters = torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])
    gathered = [torch.empty_like(parameters) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, parameters)
    assert all(torch.equal(parameters, other) for other in gathered), "ranks diverged"
    if options.get("destroy", "yes") == "yes":
        dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main(dict(argument.split("=", 1) for argument in sys.argv[1:]))
