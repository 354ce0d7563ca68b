"""A plain Lightning project (nothing from gnlightning.tasks) trained with NormSwap, then resumed.

usage: GNL_LIGHTNING={lightning.pytorch|pytorch_lightning} python fit_normswap.py OUT STRATEGY NORM DEVICES

Each rank writes OUT/{phase}_rank{r}.pt with what it observed: losses, whether the optimizer holds exactly the
model's (converted) parameters, the norm layer types, the global step reached.
"""

import importlib
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning import NormSwap, describe_norms

L = importlib.import_module(os.environ.get("GNL_LIGHTNING", "lightning.pytorch"))


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 2
    images = torch.randn(32, 3, 8, 8, generator=generator) * 0.5
    images[labels == 1, 0, 2:6, 2:6] += 2  # a square, red for class 1 and green for class 0
    images[labels == 0, 1, 2:6, 2:6] += 2
    return TensorDataset(images, labels)


class Classifier(L.LightningModule):
    def __init__(self, build: str = "init") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = None
        if build == "init":
            self.net = self.make()
        self.record: dict = {"losses": []}

    @staticmethod
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

    def setup(self, stage: str) -> None:
        if self.hparams.build == "setup" and self.net is None:
            self.net = self.make()

    def configure_model(self) -> None:
        if self.hparams.build == "configure_model" and self.net is None:
            self.net = self.make()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.record["losses"].append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=2, shuffle=False)

    def on_train_start(self) -> None:
        in_optimizer = {id(p) for group in self.trainer.optimizers[0].param_groups for p in group["params"]}
        self.record["optimizer_matches"] = in_optimizer == {id(p) for p in self.parameters()}
        self.record["types"] = [row.type for row in describe_norms(self)]

    def on_train_end(self) -> None:
        self.record["global_step"] = self.trainer.global_step
        phase = os.environ.get("GNL_PHASE")
        if phase:
                torch.save(self.record, f"{sys.argv[1]}/{phase}_rank{self.global_rank}.pt")


OPTIONS = {"gn_ws": {"num_groups": 4}}  # 32 groups on 16 channels would be InstanceNorm


def trainer(strategy: str, devices: int, norm: str, max_epochs: int, out: str):
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs,
                     callbacks=[NormSwap(norm, **OPTIONS.get(norm, {})), L.callbacks.ModelCheckpoint(dirpath=out, save_last=True)],
                     logger=False, enable_progress_bar=False, enable_model_summary=False)


if __name__ == "__main__":
    out, strategy, norm, devices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.environ["GNL_PHASE"] = "first"
    trainer(strategy, devices, norm, 2, out).fit(Classifier())
    os.environ["GNL_PHASE"] = "resumed"
    trainer(strategy, devices, norm, 3, out).fit(Classifier(), ckpt_path=f"{out}/last.ckpt")
