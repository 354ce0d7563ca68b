"""What every data module here shares: lazily built splits, identically configured loaders, and a training order
that checkpoints record (so that a run resumes on the sample where it stopped)."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from gnlightning.data.sampler import ResumableSampler
from gnlightning.data.transforms import collate_fn_for

__all__ = ["SplitDataModule"]


class SplitDataModule:
    """Subclasses set ``task``, ``batch_size``, ``num_workers`` and the ``pin_memory`` / ``drop_last``
    hyper-parameters, and build a split's dataset in ``dataset(split)`` (cached by the subclass).

    The train loader shuffles and drops its last incomplete batch when ``drop_last`` (a batch of one would make
    BatchNorm's batch statistics degenerate); evaluation loaders keep every sample.

    The training order is a :class:`~gnlightning.data.sampler.ResumableSampler` seeded with the run's seed
    (``seed_everything``'s ``PL_GLOBAL_SEED``, the same on every rank), and the module's checkpoint state records the
    epoch and how many batches of it were trained, so a run restored from any step continues on the next batch.
    Random augmentations are not replayed exactly: their random state is not part of a checkpoint."""

    task: str
    batch_size: int
    num_workers: int
    _resume_state: dict[str, int] | None = None

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ("val",))
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str, drop_last: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.hparams.pin_memory,
            collate_fn=collate_fn_for(self.task),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        state = self._resume_state or {}
        sampler = ResumableSampler(self.dataset("train"), num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=state.get("shuffle_seed", self._shuffle_seed()))
        if state:
            sampler.resume(state["epoch"], state["batches"] * self.batch_size)
        return self._loader("train", drop_last=self.hparams.drop_last, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", drop_last=False)

    @staticmethod
    def _shuffle_seed() -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def state_dict(self) -> dict[str, Any]:
        """Where training stands: saved in every checkpoint, read back by :meth:`load_state_dict` on resume."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":  # TrainerFn of either package is a str enum
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # "processed": batches whose training step ran, also while callbacks save at the end of that step (the
        # "completed" count lags by one there).
        return {"epoch": trainer.current_epoch, "batches": progress.processed,
                "shuffle_seed": self._shuffle_seed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict) or None
