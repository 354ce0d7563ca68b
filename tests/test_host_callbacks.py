"""PreciseBN and NormAdvisor in a stranger's Lightning project (tests/host): modules without forward(), either
Lightning namespace, and NormAdvisor counting the batch that synchronised BatchNorm really normalises over."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning import NormAdvisor, PreciseBN, SyncBatchNorm
from gnlightning.distributed import new_consecutive_groups
from gnlightning.lightning.norm_advisor import synchronised_ranks
from tests._dist import run_distributed
from tests.helpers import REPO, run_python, subprocess_env
from tests.host.modules import quiet_trainer

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def reference_statistics(net: nn.Sequential, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each BatchNorm of ``net`` (by index): the average over ``batches`` of the mean and the unbiased variance
    of its input per channel, in float64, computed layer by layer by hand: each BatchNorm normalises with its batch's
    own statistics (biased variance), as in training; the other layers of the host models (Linear, Conv2d, ReLU,
    pooling) behave alike in both modes."""
    statistics: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    with torch.no_grad():
        for x, _ in batches:
            for index, layer in enumerate(net):
                if not isinstance(layer, _BatchNorm):
                    x = layer(x)
                    continue
                x64 = x.double()
                dims = [0, *range(2, x.dim())]
                count = x64.numel() // x64.shape[1]
                mean, biased = x64.mean(dims), x64.var(dims, unbiased=False)
                statistics.setdefault(index, []).append((mean, biased * count / (count - 1)))
                shape = [1, -1] + [1] * (x.dim() - 2)
                x = ((x64 - mean.view(shape)) / (biased.view(shape) + layer.eps).sqrt()
                     * layer.weight.double().view(shape) + layer.bias.double().view(shape)).float()
    return {index: (torch.stack([m for m, _ in pairs]).mean(0), torch.stack([v for _, v in pairs]).mean(0))
            for index, pairs in statistics.items()}


def batches_probe(L):
    """A callback that, placed before PreciseBN, takes the training batches PreciseBN is about to draw: it iterates
    the train loader itself and rewinds the loader's generator, so PreciseBN's pass shuffles the same way."""

    class Probe(L.Callback):
        batches: list = []

        def on_validation_start(self, trainer, pl_module):
            loader = trainer.train_dataloader
            state = loader.generator.get_state()
            self.batches = [tuple(t.clone() for t in batch) for batch in loader]
            loader.generator.set_state(state)

    return Probe()


def assert_precise_statistics(model, batches, num_batches: int, steps: int) -> None:
    reference = reference_statistics(model.net, batches[:num_batches])
    assert len(reference) == 2
    for index, (mean, var) in reference.items():
        bn = model.net[index]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1 and bn.num_batches_tracked.item() == steps  # restored after the passes


# --- PreciseBN ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("module", ["MLP", "CNN"])
def test_precise_bn_default_replays_training_step_of_module_without_forward(host, module):
    """The host modules define no forward(); the default used to call pl_module(batch[0]) and crash at the first
    validation. Now their training_step is replayed, and the statistics are the true average over the batches."""
    torch.manual_seed(0)
    model = getattr(host, module)()
    probe = batches_probe(host.L)
    trainer = quiet_trainer(host.L, max_epochs=1, num_sanity_val_steps=0,
                            callbacks=[probe, PreciseBN(num_batches=3)])
    trainer.fit(model)
    steps = trainer.global_step
    assert_precise_statistics(model, probe.batches, 3, steps)
    # training_step ran 3 more times, but its self.log calls did not overwrite the last training step's loss
    assert len(model.losses) == steps + 3
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(model.losses[steps - 1])


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("module", ["MLP", "CNN"])
def test_precise_bn_calls_forward_of_module_that_has_one(host, module):
    calls = {"forward": 0, "training_step": 0}

    class WithForward(getattr(host, module)):
        def forward(self, x):
            calls["forward"] += 1
            return self.net(x)

        def training_step(self, batch, batch_idx):
            calls["training_step"] += 1
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = WithForward()
    probe = batches_probe(host.L)
    trainer = quiet_trainer(host.L, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1,
                            callbacks=[probe, PreciseBN(num_batches=100)])
    trainer.fit(model)
    steps = trainer.global_step
    assert calls == {"forward": len(probe.batches), "training_step": steps}  # every batch, through forward()
    assert_precise_statistics(model, probe.batches, 100, steps)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_precise_bn_replay_leaves_training_metrics_alone(host):
    """A torchmetrics Metric updated in training_step and logged per epoch reports the training batches only: the
    same figure as the same fit without PreciseBN (whose replay comes after the last training step)."""
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithAccuracy(host.MLP):
        def __init__(self):
            super().__init__()
            self.train_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=2, average="micro")

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.train_accuracy(logits, y)
            self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True)
            self.log_dict({"train_loss": F.cross_entropy(logits, y)})
            return F.cross_entropy(logits, y)

    figures = []
    for callbacks in ([], [PreciseBN(num_batches=8)]):
        torch.manual_seed(0)
        trainer = quiet_trainer(host.L, max_epochs=1, num_sanity_val_steps=0, callbacks=callbacks)
        trainer.fit(WithAccuracy())
        figures.append({key: trainer.callback_metrics[key].item() for key in ("train_acc", "train_loss")})
    assert figures[0] == figures[1]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_precise_bn_refuses_manual_optimization_without_forward_before_training(host):

    class Manual(host.MLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.manual_backward(loss)
            optimizer.step()
            self.losses.append(float(loss))

    model = Manual()
    with pytest.raises(ValueError, match=r"Manual defines no forward\(\) and uses manual optimization.*forward="):
        quiet_trainer(host.L, max_epochs=1, callbacks=[PreciseBN()]).fit(model)
    assert model.losses == []  # refused before the first training step
    # with forward= it trains and recomputes
    quiet_trainer(host.L, max_epochs=1, num_sanity_val_steps=0,
                  callbacks=[PreciseBN(forward=lambda module, batch: module.net(batch[0]))]).fit(model)
    assert len(model.losses) == 8


@pytest.mark.parametrize("arguments, error, match", [
    (dict(num_batches=0), ValueError, "num_batches=0"),
    (dict(num_batches="200"), ValueError, "num_batches='200'"),
    (dict(every_n_epochs=1.5), ValueError, "every_n_epochs=1.5"),
    (dict(forward="net"), TypeError, "forward='net'.*forward.pl_module, batch."),
])
def test_precise_bn_bad_arguments(arguments, error, match):
    with pytest.raises(error, match=match):
        PreciseBN(**arguments)


# --- NormAdvisor ----------------------------------------------------------------------------------------------


def advice(host, model, caplog, **advisor) -> str:
    with caplog.at_level(logging.WARNING, logger="gnlightning"):
        quiet_trainer(host.L, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[NormAdvisor(**advisor)]).fit(model)
    return caplog.text


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_norm_advisor_advice_fits_the_model(host, caplog):
    """gn_ws standardises convolution filters: advice for the CNN, not for the MLP (gn or ln there)."""
    mlp = advice(host, host.MLP(batch_size=2), caplog)
    assert "2 BatchNorm layers (e.g. 'net.1') train unsynchronised on 2 samples per device" in mlp
    assert "norm=gn or norm=ln" in mlp and "gn_ws" not in mlp and "PreciseBN()" in mlp
    caplog.clear()
    cnn = advice(host, host.CNN(batch_size=2), caplog)
    assert "train unsynchronised on 2 samples per device" in cnn and "norm=gn_ws" in cnn
    caplog.clear()
    assert advice(host, host.CNN(batch_size=8), caplog, min_batch=8) == ""


@pytest.mark.parametrize("arguments, match", [
    (dict(min_batch=0), "min_batch=0"), (dict(min_batch=16.0), "min_batch=16.0"), (dict(log_health="yes"), "'yes'"),
])
def test_norm_advisor_bad_arguments(arguments, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NormAdvisor(**arguments)


def _ranks_worker(rank: int, world_size: int) -> list[int]:
    model = nn.Sequential(SyncBatchNorm(4), nn.SyncBatchNorm(4), SyncBatchNorm(4, process_group=new_consecutive_groups(1)),
                          nn.BatchNorm2d(4))
    return [synchronised_ranks(layer) for layer in model]


@pytest.mark.slow
@pytest.mark.distributed
def test_synchronised_ranks_counts_the_process_group():
    assert _ranks_worker(0, 1) == [1, 1, 1, 1]  # no process group: both SyncBN classes are plain BN
    assert run_distributed(_ranks_worker, 2) == [[2, 2, 1, 1]] * 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_norm_advisor_counts_the_synchronised_batch_under_ddp(namespace, tmp_path):
    """SyncBN over 2 processes x 2 images normalises over 4 samples, below min_batch=16: NormAdvisor says so, once
    (rank 0), naming the total. (It used to count SyncBN as fine whatever the total, and stay silent.) The same run
    has PreciseBN replay the CNN's training_step under DDP."""
    pytest.importorskip(namespace)
    result = run_python(REPO / "tests" / "scripts" / "host_spawn.py", "syncbn", cwd=tmp_path,
                        env=subprocess_env(GNL_LIGHTNING=namespace))
    output = result.stdout + result.stderr
    expected = ("2 BatchNorm layers (e.g. 'net.1') train synchronised over 2 processes x 2 samples per device = "
                "4 samples (fewer than min_batch=16)")
    assert output.count(expected) == 1, output
    assert "a per-device batch of at least 8" in output and "norm=gn_ws" in output
    assert "min_batch=4" not in output  # the second advisor (min_batch=4) finds 4 samples enough
    # PreciseBN replayed training_step (the CNN has no forward) through SyncBN's collectives, on both ranks alike
    assert output.count("PreciseBN: recomputed 2 BatchNorm layers over 3 batches") == 1, output
