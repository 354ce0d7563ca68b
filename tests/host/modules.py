"""The host's LightningModules: an MLP with BatchNorm1d and a CNN, neither with a ``forward`` method.

Many projects call ``self.net(x)`` in ``training_step`` and never define ``forward``; callbacks that call the
LightningModule directly break on them, which is why these modules do not define it.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def feature_data(samples: int = 64, features: int = 16, seed: int = 0) -> TensorDataset:
    """Two classes of tabular features whose first feature carries the label, at an offset and scale BN must
    learn (so a wrong normalization shows in the loss)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % 2
    x = torch.randn(samples, features, generator=generator) * 3 + 5
    x[:, 0] += 4 * labels
    return TensorDataset(x, labels)


def image_data(samples: int = 32, seed: int = 0) -> TensorDataset:
    """Two classes of 3x8x8 images: a red or a green square."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % 2
    images = torch.randn(samples, 3, 8, 8, generator=generator) * 0.5
    images[labels == 1, 0, 2:6, 2:6] += 2
    images[labels == 0, 1, 2:6, 2:6] += 2
    return TensorDataset(images, labels)


@functools.lru_cache(maxsize=None)
def host_classes(namespace: str = "lightning.pytorch") -> SimpleNamespace:
    """``MLP`` and ``CNN`` LightningModules of ``namespace`` (``lightning.pytorch`` or ``pytorch_lightning``)."""
    L = importlib.import_module(namespace)

    class _Base(L.LightningModule):
        def __init__(self, lr: float = 0.05, batch_size: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            self.losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        test_step = validation_step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(self.dataset(), batch_size=self.hparams.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

        def val_dataloader(self):
            return DataLoader(self.dataset(), batch_size=self.hparams.batch_size)

        test_dataloader = val_dataloader

    class MLP(_Base):
        """Linear -> BatchNorm1d -> ReLU, twice, on (N, 16) features."""

        def __init__(self, width: int = 64, **kwargs) -> None:
            super().__init__(**kwargs)
            self.net = nn.Sequential(nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(),
                                     nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                     nn.Linear(width, 2))

        @staticmethod
        def dataset() -> TensorDataset:
            return feature_data()

    class CNN(_Base):
        """Conv -> BatchNorm2d -> ReLU, twice, then pooling and a linear classifier."""

        def __init__(self, width: int = 16, **kwargs) -> None:
            super().__init__(**kwargs)
            self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

        @staticmethod
        def dataset() -> TensorDataset:
            return image_data()

    # Module-level names, so that spawn launchers can pickle the classes as they would a host's own.
    suffix = namespace.replace(".", "_")
    for cls in (MLP, CNN):
        cls.__module__, cls.__qualname__ = __name__, f"{cls.__name__}__{suffix}"
    return SimpleNamespace(L=L, MLP=MLP, CNN=CNN)


def __getattr__(name: str):
    """``MLP__lightning_pytorch`` and the like: the classes as pickle finds them in a freshly started process."""
    kind, _, suffix = name.partition("__")
    namespace = {"lightning_pytorch": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}.get(suffix)
    if kind in ("MLP", "CNN") and namespace:
        return getattr(host_classes(namespace), kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quiet_trainer(L, **kwargs):
    """A CPU Trainer of namespace ``L`` without logger, progress bar, summary or checkpoints (override any)."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})
