"""What every data module here shares: lazily built splits and identically configured loaders."""

from __future__ import annotations


import lightning.pytorch as L
from torch.utils.data import DataLoader, Dataset

from gnlightning.data.transforms import collate_fn_for

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """Subclasses set ``task``, ``batch_size``, ``num_workers`` and the ``pin_memory`` / ``drop_last``
    hyper-parameters, and build a split's dataset in ``dataset(split)`` (cached by the subclass).

    The train loader shuffles and drops its last incomplete batch when ``drop_last`` (a batch of one would make
    BatchNorm's batch statistics degenerate); evaluation loaders keep every sample."""

    task: str
    batch_size: int
    num_workers: int

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ("val",))
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.hparams.pin_memory,
            collate_fn=collate_fn_for(self.task),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, drop_last=self.hparams.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, drop_last=False)
