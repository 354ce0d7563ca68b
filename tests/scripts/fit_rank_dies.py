"""A Lightning DDP fit (2 CPU processes, SyncBatchNormPlugin) in which one rank dies at step 3.

usage: GNL_LIGHTNING={lightning.pytorch|pytorch_lightning} python fit_rank_dies.py OUT CASE

CASE ``exit_rank1``: rank 1 leaves with ``os._exit(3)`` (as a crash or an OOM kill would: no exception, no
clean-up). CASE ``raise_rank0``: rank 0 raises RuntimeError. Every rank writes its pid to OUT/pid_rank{r} before
training so the caller can check that no process outlives the run; the surviving rank is then inside SyncBN's
all_reduce (or DDP's) waiting for the dead one.
"""

import importlib
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning import SyncBatchNormPlugin

L = importlib.import_module(os.environ.get("GNL_LIGHTNING", "lightning.pytorch"))
DEATH_STEP = 3


class Model(L.LightningModule):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def training_step(self, batch, batch_idx):
        # Inside DDP's forward, after its buffer broadcast: the surviving rank goes on into SyncBatchNorm's all_reduce
        # and waits there for the dead one.
        if self.global_step == DEATH_STEP:
            if self.case == "exit_rank1" and self.global_rank == 1:
                os._exit(3)
            if self.case == "raise_rank0" and self.global_rank == 0:
                raise RuntimeError(f"injected failure on rank 0 at step {DEATH_STEP}")
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 3, 6, 6)), batch_size=2)


class WritePid(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        (self.out / f"pid_rank{trainer.global_rank}").write_text(str(os.getpid()))


if __name__ == "__main__":
    out, case = Path(sys.argv[1]), sys.argv[2]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()], max_epochs=1,
                        callbacks=[WritePid(out)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(case))
    (out / f"finished_rank{trainer.global_rank}").write_text("the run went on after a rank died")
