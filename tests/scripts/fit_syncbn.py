"""Fit a tiny BN model with SyncBatchNormPlugin under Lightning DDP (the subprocess launcher re-runs this file
for rank 1). Each rank saves what it saw to OUT/rank{r}.pt.

usage: GNL_LIGHTNING={lightning.pytorch|pytorch_lightning} python fit_syncbn.py OUT
"""

import importlib
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning import NormSwap, SyncBatchNorm, SyncBatchNormPlugin

L = importlib.import_module(os.environ.get("GNL_LIGHTNING", "lightning.pytorch"))


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 6, 6, generator=generator) * 3 + 1
    return TensorDataset(images, torch.randn(12, 4, 6, 6, generator=generator), torch.arange(12))


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))  # NormSwap makes this GroupNorm
        self.seen_types: list[str] = []
        self.seen_indices: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen_types.append((type(self.net[0]).__name__, type(self.head[1]).__name__))
        images, targets, indices = batch
        self.seen_indices.append(indices.tolist())
        return nn.functional.mse_loss(self.head(self.net(images)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=2, shuffle=False)

    def on_train_end(self) -> None:
        bn = self.net[0]
        torch.save({"types": self.seen_types, "indices": self.seen_indices, "running_mean": bn.running_mean, "running_var": bn.running_var,
                    "num_batches_tracked": bn.num_batches_tracked, "is_sync": isinstance(bn, SyncBatchNorm)},
                   f"{sys.argv[1]}/rank{self.global_rank}.pt")


if __name__ == "__main__":
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()], max_epochs=1,
                        callbacks=[NormSwap("gn", module="head", num_groups=2)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Model()
    trainer.fit(model)
    assert type(model.net[0]) is nn.BatchNorm2d, "the plugin reverts to the original class after fit"
