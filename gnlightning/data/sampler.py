"""A training sampler whose order a checkpoint can reproduce, so that a run resumes mid-epoch on the next sample.

Why not the loaders' defaults: ``DataLoader(shuffle=True)`` draws each epoch's permutation from the global RNG,
which no Lightning checkpoint records, so a resumed run sees the samples of its epoch in a different order (some
twice, some never); and Lightning restarts an interrupted epoch from its first batch unless the loader can say where
it was. ``torch.utils.data.DistributedSampler`` already makes the order a pure function of ``(seed, epoch)``
and shards it over ranks; this subclass adds the one missing piece, starting an epoch part-way. Being a
``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order from ``seed + epoch``, one shard per rank) that can skip the head of one epoch.

    ``resume(epoch, consumed)`` makes the epoch ``epoch`` -- once :meth:`set_epoch` selects it -- start after this
    rank's first ``consumed`` samples. Other epochs are unaffected, and the skip is used once. ``len()`` stays the
    full shard size, as Lightning counts the resumed epoch's batches from where the checkpoint left off.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        if self._resume is None or self._resume[0] != self.epoch:
            return indices
        _, consumed = self._resume
        self._resume = None
        return iter(list(indices)[consumed:])
