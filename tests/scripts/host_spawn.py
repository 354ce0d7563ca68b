"""The host project (tests/host/modules.py) fitted under ``ddp_spawn``: 2 CPU processes, gloo, no logging set-up.

usage: GNL_LIGHTNING={lightning.pytorch|pytorch_lightning} python host_spawn.py SCENARIO

Scenarios (what the calling test reads from this process's stdout and stderr):
  normswap  the MLP with NormSwap("gn"): the NormSwap summary; and every rank logs "rank R was here" through a
            child of the "gnlightning" logger, as gnlightning.layers does (only rank 0's may be shown).
  syncbn    the CNN with SyncBatchNormPlugin and two NormAdvisors, 2 samples per device: synchronised BN over
            2 x 2 = 4 samples, below min_batch=16 (a warning) and not below min_batch=4 (silence); and PreciseBN,
            which replays the CNN's training_step (it has no forward) through SyncBN's collectives on both ranks.

The LightningModules are subclassed at the top level of this file: ``ddp_spawn`` pickles the model into its workers,
and host_classes() builds its classes inside a function, which pickle cannot name.
"""

import logging
import os
import sys

from gnlightning import NormAdvisor, NormSwap, PreciseBN, SyncBatchNormPlugin
from tests.host.modules import host_classes, quiet_trainer

HOST = host_classes(os.environ.get("GNL_LIGHTNING", "lightning.pytorch"))


class EveryRankLogs(HOST.L.Callback):
    def setup(self, trainer, pl_module, stage):
        logging.getLogger("gnlightning.tests.host_spawn").info("rank %d was here", trainer.global_rank)


class MLP(HOST.MLP):
    pass


class CNN(HOST.CNN):
    pass


def main(scenario: str) -> None:
    if scenario == "normswap":
        model, callbacks, plugins = MLP(), [NormSwap("gn"), EveryRankLogs()], []
    elif scenario == "syncbn":
        model, plugins = CNN(batch_size=2), [SyncBatchNormPlugin()]
        callbacks = [NormAdvisor(min_batch=16), NormAdvisor(min_batch=4), PreciseBN(num_batches=3)]
    else:
        raise SystemExit(f"unknown scenario {scenario!r}; use normswap or syncbn")
    trainer = quiet_trainer(HOST.L, strategy="ddp_spawn", devices=2, max_steps=1, val_check_interval=1,
                            limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks, plugins=plugins)
    trainer.fit(model)


if __name__ == "__main__":
    main(sys.argv[1])
