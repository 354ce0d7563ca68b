"""Callbacks the tests plug into real runs (in-process or through `gnl-train +callbacks.x._target_=tests.callbacks.X`).

A module of their own: it imports Lightning, which tests/helpers.py does not (spawned ranks import their test module
and, with it, what that imports).
"""

import json
from pathlib import Path

import lightning.pytorch as L


class Crash(RuntimeError):
    """The simulated failure: a crash, not an orderly stop, so nothing after it gets a chance to save."""


class CrashAtStep(L.Callback):
    """Dies when training is about to run optimizer step ``step + 1``, i.e. right after step ``step`` finished (and
    its checkpoint, if any, was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash after step {self.step}")


class RecordSteps(L.Callback):
    """Per optimizer step: the loss and a fingerprint of the batch, on every rank; written as JSON to ``path``
    (``{rank}`` is replaced by the global rank) at every step, so that a crashed run leaves its record too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images = batch[0]
        self.steps[trainer.global_step] = {"loss": float(outputs["loss"]), "batch": float(images.double().sum()),
                                           "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        path = Path(self.path.format(rank=trainer.global_rank))
        path.write_text(json.dumps(self.steps))
