"""NormSwap, PreciseBN and NormAdvisor in plain Lightning projects (LightningModules written here, not tasks)."""

import functools
import importlib
import logging
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning import FrozenBatchNorm2d, NormAdvisor, NormSwap, PreciseBN, WSConv2d
from gnlightning.lightning.norm_swap import load_converted
from tests.helpers import run_python, subprocess_env
from tests.host import modules as host_modules
from tests.scripts.fit_normswap import Classifier

SCRIPT = Path(__file__).parent / "scripts" / "fit_normswap.py"


def quiet_trainer(**kwargs):
    """A quiet lightning.pytorch Trainer on the CPU (tests/host's, for this namespace)."""
    return host_modules.quiet_trainer(L, **kwargs)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy, norm, namespace", [
    ("ddp", "gn_ws", "lightning.pytorch"),
    ("ddp_spawn", "gn_ws", "lightning.pytorch"),
    ("ddp", "syncbn", "lightning.pytorch"),
    ("ddp_spawn", "syncbn", "pytorch_lightning"),
])
def test_normswap_under_ddp_trains_checkpoints_and_resumes(strategy, norm, namespace, tmp_path):
    pytest.importorskip(namespace)
    run_python(SCRIPT, tmp_path, strategy, norm, "2", cwd=tmp_path, env=subprocess_env(GNL_LIGHTNING=namespace))
    expected_types = {"gn_ws": ["WSConv2d", "GroupNorm"] * 2, "syncbn": ["SyncBatchNorm"] * 2}[norm]
    for rank in range(2):
        first = torch.load(tmp_path / f"first_rank{rank}.pt")
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        for record in (first, resumed):
            assert record["optimizer_matches"], "the optimizer must hold exactly the converted parameters"
            assert record["types"] == expected_types
        losses = first["losses"]
        assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:8]) / 8  # the last epoch beats the first
        assert first["global_step"] == 16 and resumed["global_step"] == 24  # resumed at epoch 2, not from zero
        assert sum(resumed["losses"]) / 8 < sum(losses[:8]) / 8
    hook = Classifier.on_load_checkpoint
    model = load_converted(Classifier, str(tmp_path / "last.ckpt"))
    assert type(model) is Classifier and Classifier.on_load_checkpoint is hook  # the user's class is untouched
    expected_net = {"gn_ws": ["WSConv2d", "GroupNorm"], "syncbn": ["Conv2d", "SyncBatchNorm"]}[norm]
    assert [type(m).__name__ for m in model.net][:2] == expected_net
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


@pytest.mark.parametrize("build", ["init", "setup", "configure_model"])
def test_normswap_converts_models_built_anywhere_once(build, caplog):
    model = Classifier(build=build)
    swap = NormSwap("gn_ws", num_groups=4)
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        quiet_trainer(max_epochs=1, callbacks=[swap], limit_train_batches=4).fit(model)
        quiet_trainer(callbacks=[swap]).validate(model, model.train_dataloader())
        quiet_trainer(max_epochs=2, callbacks=[swap], limit_train_batches=4).fit(model)  # a second fit
    assert isinstance(model.net[0], WSConv2d) and isinstance(model.net[1], nn.GroupNorm)
    assert model.net[1].num_groups == 4
    assert caplog.text.count("NormSwap(gn_ws)") == 1  # converted and announced once
    assert "configure_model" not in model.__dict__  # the wrapper is gone after teardown


def test_normswap_bad_option_and_bad_module_path():
    with pytest.raises(TypeError, match="num_group"):
        NormSwap("gn", num_group=8)
    with pytest.raises(ValueError, match="valid names"):
        NormSwap("groupnorm32")
    with pytest.raises(ValueError, match="no submodule 'model.backbone'"):
        quiet_trainer(max_epochs=1, callbacks=[NormSwap("gn", module="model.backbone")],
                      limit_train_batches=1).fit(Classifier())


@functools.cache
def detector_class(namespace: str = "lightning.pytorch") -> type:
    """Backbone + head, as in detection models, as a LightningModule of ``namespace`` (a Trainer accepts only
    LightningModules of its own namespace)."""
    L = importlib.import_module(namespace)

    class Detector(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 2, 1))

        def training_step(self, batch, batch_idx):
            return self.head(self.backbone(batch[0])).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=2)

    return Detector


def test_normswap_composes_on_submodules(tmp_path):
    """Frozen BN in the backbone, GN in the head, each by a NormSwap of its own."""
    Detector = detector_class()
    model = Detector()
    callbacks = [NormSwap("frozen_bn", module="backbone"), NormSwap("gn", module="head", num_groups=2)]
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path,
                            enable_checkpointing=True)
    trainer.fit(model)
    assert isinstance(model.backbone[1], FrozenBatchNorm2d) and isinstance(model.head[1], nn.GroupNorm)
    restored = load_converted(Detector, trainer.checkpoint_callback.best_model_path)
    assert isinstance(restored.backbone[1], FrozenBatchNorm2d) and isinstance(restored.head[1], nn.GroupNorm)


def test_callbacks_from_pytorch_lightning_trainer():
    pl = pytest.importorskip("pytorch_lightning")
    model = detector_class("pytorch_lightning")()
    trainer = host_modules.quiet_trainer(pl, max_epochs=1, callbacks=[NormSwap("gn_ws", num_groups=2),
                                                                      PreciseBN(num_batches=2), NormAdvisor()])
    trainer.fit(model)
    assert isinstance(model.backbone[1], nn.GroupNorm) and isinstance(model.backbone[0], WSConv2d)


class BNNet(L.LightningModule):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.frozen_bn = nn.BatchNorm2d(3).eval()  # a layer the user keeps in eval mode: PreciseBN leaves it

    def forward(self, x):
        self.frozen_bn(x)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).mean()

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def on_train_epoch_start(self):
        self.frozen_bn.eval()


def precise_reference(model, batches):
    """Average of per-batch statistics (formula, float64) of every trained BN, each fed what the fixed network gives
    it with the BN layers normalising by batch statistics (as in training) and dropout off."""
    means, variances = {}, {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name != "frozen_bn":
            def hook(mod, args, name=name):
                x = args[0].double()
                n = x.numel() / x.shape[1]
                means.setdefault(name, []).append(x.mean(dim=(0, 2, 3)))
                variances.setdefault(name, []).append(x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1))
            handles.append(module.register_forward_pre_hook(hook))
    model.eval()
    model.net[1].train()
    model.net[5].train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return {name: (torch.stack(means[name]).mean(0), torch.stack(variances[name]).mean(0)) for name in means}


def test_precise_bn_true_average_without_side_effects():
    torch.manual_seed(0)
    data = torch.randn(12, 3, 8, 8) * 2 + 1
    loader = DataLoader(TensorDataset(data), batch_size=2)
    model = BNNet(dropout=0.5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                            callbacks=[PreciseBN(num_batches=4)])
    captured = {}

    class Capture(L.Callback):
        def on_validation_start(self, trainer, pl_module):  # runs after PreciseBN (callback order)
            captured["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            captured["momentum"] = [m.momentum for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]
            captured["optimizer"] = trainer.optimizers[0].state_dict()

    trainer.callbacks.append(Capture())
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    state = captured["state"]
    # The reference uses the same final weights and the first 4 training batches (plain BN -> formula).
    reference_model = BNNet()
    reference_model.load_state_dict(state)
    reference = precise_reference(reference_model, [data[i: i + 2] for i in range(0, 8, 2)])
    assert sorted(reference) == ["net.1", "net.5"]  # every trained BatchNorm, none left out of the comparison
    for name, (mean, var) in reference.items():
        torch.testing.assert_close(state[f"{name}.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"{name}.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    assert state["frozen_bn.running_mean"].abs().sum() == 0  # the eval-mode layer was left alone
    assert state["net.1.num_batches_tracked"].item() == 3  # counters restored: 3 training steps
    assert captured["momentum"] == [0.1, 0.1, 0.1]


def test_precise_bn_on_gn_model_logs_and_does_nothing(caplog):
    model = BNNet()
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8)), batch_size=2)
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        quiet_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[NormSwap("gn", num_groups=2),
                                                                        PreciseBN(num_batches=2)]).fit(
            model, train_dataloaders=loader, val_dataloaders=loader)
    assert "PreciseBN: the model has no BatchNorm layer in training mode" in caplog.text


@pytest.mark.parametrize("batch_size, swap, warns", [(2, None, True), (16, None, False), (2, "gn_ws", False)])
def test_norm_advisor(batch_size, swap, warns, caplog):
    callbacks = [NormAdvisor()] + ([NormSwap(swap)] if swap else [])
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 8, 8)), batch_size=batch_size)
    with caplog.at_level(logging.WARNING, logger="gnlightning"):
        quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=callbacks).fit(BNNet(), train_dataloaders=loader)
    assert ("train unsynchronised on 2 samples per device" in caplog.text) == warns
    if warns:
        assert "norm=gn_ws" in caplog.text and "PreciseBN" in caplog.text
