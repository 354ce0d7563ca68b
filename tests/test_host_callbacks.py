"""PreciseBN in a stranger's Lightning project (tests/host): modules without forward(), either Lightning
namespace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning import PreciseBN
from tests.host.modules import host_classes, quiet_trainer

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def host(namespace: str):
    pytest.importorskip(namespace)
    return host_classes(namespace)


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
def test_precise_bn_default_replays_training_step_of_module_without_forward(namespace, module):
    """The host modules define no forward(); the default used to call pl_module(batch[0]) and crash at the first
    validation. Now their training_step is replayed, and the statistics are the true average over the batches."""
    H = host(namespace)
    torch.manual_seed(0)
    model = getattr(H, module)()
    probe = batches_probe(H.L)
    trainer = quiet_trainer(H.L, max_epochs=1, num_sanity_val_steps=0,
                            callbacks=[probe, PreciseBN(num_batches=3)])
    trainer.fit(model)
    steps = trainer.global_step
    assert_precise_statistics(model, probe.batches, 3, steps)
    # training_step ran 3 more times, but its self.log calls did not overwrite the last training step's loss
    assert len(model.losses) == steps + 3
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(model.losses[steps - 1])


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("module", ["MLP", "CNN"])
def test_precise_bn_calls_forward_of_module_that_has_one(namespace, module):
    H = host(namespace)
    calls = {"forward": 0, "training_step": 0}

    class WithForward(getattr(H, module)):
        def forward(self, x):
            calls["forward"] += 1
            return self.net(x)

        def training_step(self, batch, batch_idx):
            calls["training_step"] += 1
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = WithForward()
    probe = batches_probe(H.L)
    trainer = quiet_trainer(H.L, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1,
                            callbacks=[probe, PreciseBN(num_batches=100)])
    trainer.fit(model)
    steps = trainer.global_step
    assert calls == {"forward": len(probe.batches), "training_step": steps}  # every batch, through forward()
    assert_precise_statistics(model, probe.batches, 100, steps)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_precise_bn_replay_leaves_training_metrics_alone(namespace):
    """A torchmetrics Metric updated in training_step and logged per epoch reports the training batches only: the
    same figure as the same fit without PreciseBN (whose replay comes after the last training step)."""
    H = host(namespace)
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithAccuracy(H.MLP):
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
        trainer = quiet_trainer(H.L, max_epochs=1, num_sanity_val_steps=0, callbacks=callbacks)
        trainer.fit(WithAccuracy())
        figures.append({key: trainer.callback_metrics[key].item() for key in ("train_acc", "train_loss")})
    assert figures[0] == figures[1]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_precise_bn_refuses_manual_optimization_without_forward_before_training(namespace):
    H = host(namespace)

    class Manual(H.MLP):
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
        quiet_trainer(H.L, max_epochs=1, callbacks=[PreciseBN()]).fit(model)
    assert model.losses == []  # refused before the first training step
    # with forward= it trains and recomputes
    quiet_trainer(H.L, max_epochs=1, num_sanity_val_steps=0,
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
