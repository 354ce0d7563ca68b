"""NormSwap inside a stranger's Lightning project (tests/host): conversions are reported, checkpoints travel to the
project's own eval script, and a spawn launcher cannot leave the caller with a silently wrong model."""

import functools
import logging

import pytest
import torch
from torch import nn

from gnlightning import FrozenBatchNorm2d, NormSwap
from gnlightning.lightning.norm_swap import CHECKPOINT_KEY, load_converted
from tests.helpers import run_python
from tests.host.modules import host_classes, quiet_trainer

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_frozen_bn_freezes_the_mlp_batchnorm1d_and_nothing_moves(host, caplog):
    model = host.MLP()
    bn = model.net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(4, 6)  # the statistics a pretrained model would bring
        bn.running_var.uniform_(8, 10)
    expected = {key: value.clone() for key, value in bn.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        quiet_trainer(host.L, max_epochs=1, callbacks=[NormSwap("frozen_bn")]).fit(model)
    assert isinstance(model.net[1], FrozenBatchNorm2d) and isinstance(model.net[4], FrozenBatchNorm2d)
    frozen = {key: value for key, value in model.net[1].state_dict().items() if key in expected}
    assert {"running_mean", "running_var"} <= frozen.keys(), sorted(frozen)
    for key, value in frozen.items():
        assert torch.equal(value, expected[key]), key  # frozen: training did not move the statistics
    assert "NormSwap(frozen_bn): converted 2 BatchNorm1d -> FrozenBatchNorm2d" in caplog.text


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_nothing_converted_and_every_skip_are_warnings(host, caplog):
    model = host.CNN()
    model.net[1] = nn.GroupNorm(4, 16)  # the host already uses GroupNorm in the first block
    model.net[4] = nn.GroupNorm(4, 16)
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        quiet_trainer(host.L, max_epochs=1, limit_train_batches=2, callbacks=[NormSwap("frozen_bn")]).fit(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "gnlightning"]
    assert any("left 2 layer(s) as they are (no running statistics to freeze): 'net.1' (GroupNorm)" in message
               for message in warnings), warnings
    assert any("nothing was converted in CNN" in message for message in warnings), warnings


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_degenerate_gn_on_the_mlp_is_a_warning_naming_the_layer(host, caplog):
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        quiet_trainer(host.L, max_epochs=1, limit_train_batches=2, callbacks=[NormSwap("in")]).fit(host.MLP())
    assert "GroupNorm 'net.1' (64 groups over 64 channels" in caplog.text
    assert "output is the bias alone" in caplog.text


def train_with_checkpoint(host, module, tmp_path, swaps):
    checkpoint = host.L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(host.L, max_epochs=2, callbacks=[*swaps, checkpoint], enable_checkpointing=True)
    trainer.fit(module)
    return trainer, str(tmp_path / "last.ckpt")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_hosts_eval_script_reapplies_the_recorded_conversions(host, tmp_path):
    trained = host.CNN()
    swaps = [NormSwap("gn_ws", num_groups=4, module="net"), NormSwap("frozen_bn", include="nothing.matches")]
    trainer, path = train_with_checkpoint(host, trained, tmp_path, swaps[:1])
    reference = trainer.test(trained, verbose=False)[0]  # the trained model itself, in memory

    # The host's eval script: build the module from its config, test from the checkpoint.
    with pytest.raises(RuntimeError, match="running_mean"):  # what a user hits without NormSwap
        quiet_trainer(host.L).test(host.CNN(), ckpt_path=path, verbose=False)
    result = quiet_trainer(host.L, callbacks=[NormSwap.from_checkpoint(path)]).test(host.CNN(), ckpt_path=path,
                                                                                    verbose=False)[0]
    assert result == pytest.approx(reference)


def test_from_checkpoint_is_a_hydra_target_and_records_every_swap(tmp_path):
    from hydra.utils import instantiate

    host = host_classes("lightning.pytorch")
    swaps = [NormSwap("frozen_bn", module="net.1"), NormSwap("gn", num_groups=2, module="net.4")]
    _, path = train_with_checkpoint(host, host.CNN(), tmp_path, swaps)
    assert [spec["norm"] for spec in torch.load(path, weights_only=True)[CHECKPOINT_KEY]] == ["frozen_bn", "gn"]
    swap = instantiate({"_target_": "gnlightning.NormSwap.from_checkpoint", "ckpt_path": path})
    assert repr(swap) == f"NormSwap.from_checkpoint({path!r})"
    model = swap.apply(host.CNN())
    assert isinstance(model.net[1], FrozenBatchNorm2d) and model.net[4].num_groups == 2


def test_from_checkpoint_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        NormSwap.from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no NormSwap settings"):
        NormSwap.from_checkpoint(tmp_path / "plain.ckpt")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_load_converted_passes_weights_only_for_pickled_hyperparameters(host, tmp_path):

    class WithOptimizerFactory(host.CNN):  # a Hydra-style partial in the hyper-parameters: pickled in the checkpoint
        def __init__(self, optimizer=functools.partial(torch.optim.SGD, lr=0.05), **kwargs):
            super().__init__(**kwargs)
            self.save_hyperparameters()

        def configure_optimizers(self):
            return self.hparams.optimizer(self.parameters())

    trained = WithOptimizerFactory()
    _, path = train_with_checkpoint(host, trained, tmp_path, [NormSwap("gn", num_groups=4)])
    with pytest.raises(ValueError, match="weights_only=False"):
        load_converted(WithOptimizerFactory, path)
    model = load_converted(WithOptimizerFactory, path, weights_only=False, map_location="cpu")
    assert isinstance(model.net[1], nn.GroupNorm)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


SPAWN_SCRIPT = '''
import sys, torch
from tests.host.modules import host_classes, quiet_trainer
from gnlightning import NormSwap, describe_norms
h = host_classes(sys.argv[1])
model = h.CNN()
swap = NormSwap("gn", num_groups=4)
if sys.argv[2] == "converted":
    swap.apply(model)
quiet_trainer(h.L, max_epochs=1, limit_train_batches=2, strategy="ddp_spawn", devices=2,
              callbacks=[swap]).fit(model)
print("caller holds:", sorted({row.type for row in describe_norms(model)}))
'''


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_spawn_launcher_warns_unless_the_caller_converted_first(namespace, tmp_path):
    pytest.importorskip(namespace)
    outputs = {}
    for mode in ("plain", "converted"):
        done = run_python("-c", SPAWN_SCRIPT, namespace, mode, cwd=tmp_path)
        outputs[mode] = done.stdout + done.stderr
    assert "the model object you passed to fit() is not converted" in outputs["plain"]
    assert "caller holds: ['BatchNorm2d']" in outputs["plain"]  # what the warning is about
    assert "not converted" not in outputs["converted"]
    assert "caller holds: ['GroupNorm']" in outputs["converted"]
