"""gnlightning from the outside: a stranger's Hydra app that adds ``pkg://gnlightning.conf`` to its search path.

The app is written here the way its author would: its own primary ``train.yaml`` (the only place Hydra accepts
``hydra.searchpath``), its own ``trainer``, ``callbacks``, ``model`` and ``data`` groups (same group names as
gnl-train's, different contents), and a ``train.py`` that instantiates every ``callbacks`` value and fits. The search
path must change nothing the app composes from its own options; ``+norm_swap=<norm>`` must add exactly one callback
and convert the app's model, with every ``callbacks.norm_swap.<option>`` reaching the conversion.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gnlightning import NormSpec, NormSwap
from gnlightning.lightning.norm_swap import _record
from gnlightning.layers import NORMS
from tests.helpers import error_text, run_python, subprocess_env
from tests.host.modules import host_classes

TRAINER_TARGET = "${oc.env:HOST_LIGHTNING,lightning.pytorch}.Trainer"

HOST_APP = {
    "train.yaml": """\
defaults:
  - trainer: cpu
  - model: cnn
  - data: default
  - callbacks: default
  - _self_

hydra:
  searchpath:
    - pkg://gnlightning.conf

seed: 0
""",
    "trainer/cpu.yaml": f"""\
_target_: {TRAINER_TARGET}
accelerator: cpu
devices: 1
max_epochs: 1
limit_train_batches: 2
limit_val_batches: 1
logger: false
enable_checkpointing: false
enable_progress_bar: false
enable_model_summary: false
""",
    # What many projects' DDP configs say, plus gnlightning's plugin so that SyncBN runs on CPU.
    "trainer/ddp_cpu.yaml": """\
defaults:
  - cpu
strategy: ddp
devices: 2
sync_batchnorm: true
plugins:
  - _target_: gnlightning.SyncBatchNormPlugin
""",
    "callbacks/default.yaml": """\
record_norms:
  _target_: host_callbacks.RecordNorms
  path: ${hydra:runtime.output_dir}/norms_rank{rank}.json
""",
    "callbacks/early_stop.yaml": """\
defaults:
  - default
early_stop:
  _target_: ${oc.env:HOST_LIGHTNING,lightning.pytorch}.callbacks.EarlyStopping
  monitor: val_loss
""",
    "model/cnn.yaml": "name: CNN\noptions:\n  width: 16\n",
    "model/mlp.yaml": "name: MLP\noptions:\n  width: 32\n",
    "data/default.yaml": "batch_size: 8\n",
    "data/small.yaml": "batch_size: 2\n",
    "host_callbacks.py": '''\
import importlib
import json
import os
from pathlib import Path

from torch import nn

L = importlib.import_module(os.environ.get("HOST_LIGHTNING", "lightning.pytorch"))


class RecordNorms(L.Callback):
    """The class of every layer and each GroupNorm's group count, as the first training step sees them."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step:
            return
        layers = {name: f"{type(m).__module__}.{type(m).__name__}" for name, m in pl_module.named_modules() if name}
        groups = {name: m.num_groups for name, m in pl_module.named_modules() if isinstance(m, nn.GroupNorm)}
        record = {"layers": layers, "groups": groups, "world_size": trainer.world_size, "lightning": L.__name__}
        Path(self.path.format(rank=trainer.global_rank)).write_text(json.dumps(record))
''',
    "train.py": '''\
import os

import hydra
from hydra.utils import instantiate

from tests.host.modules import host_classes


@hydra.main(version_base="1.3", config_path=".", config_name="train")
def main(cfg):
    classes = host_classes(os.environ.get("HOST_LIGHTNING", "lightning.pytorch"))
    model = getattr(classes, cfg.model.name)(batch_size=cfg.data.batch_size, **cfg.model.options)
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks)
    trainer.fit(model)


if __name__ == "__main__":
    main()
''',
}
HOST_GROUPS = ("trainer", "callbacks", "model", "data")


def write_host_app(root: Path, search_path: bool = True) -> Path:
    for name, text in HOST_APP.items():
        if name == "train.yaml" and not search_path:
            text = text.replace("hydra:\n  searchpath:\n    - pkg://gnlightning.conf\n", "")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def host_options(group: str) -> list[str]:
    """The options the host wrote for ``group`` (the reference the composed app is compared against)."""
    return sorted(Path(name).stem for name in HOST_APP if name.startswith(f"{group}/"))


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    return {"with": write_host_app(root / "with"), "without": write_host_app(root / "without", search_path=False)}


def composed(app: Path, overrides=()) -> dict:
    with initialize_config_dir(str(app), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)))


def group_options(app: Path, group: str) -> list[str]:
    """The options Hydra offers for ``group`` once the app's primary config, and so its search path, is loaded (the
    list its error for a missing option carries); ``[]`` where ``group`` is no config group at all."""
    in_defaults = group in HOST_GROUPS or group.startswith("hydra/")
    try:
        composed(app, [f"{'' if in_defaults else '+'}{group}=__no_such_option__"])
    except MissingConfigException as error:
        return sorted(error.options or [])
    return []


def outcome(app: Path, overrides) -> tuple[str, object]:
    try:
        return "composed", composed(app, overrides)
    except HydraException as error:
        return type(error).__name__, str(error).split("\n")[0]


# ---------------------------------------------------------------------------------------- the search path is inert
HOST_CHOICES = [[]] + [[f"{group}={option}"] for group in HOST_GROUPS for option in host_options(group)]


@pytest.mark.parametrize("overrides", HOST_CHOICES, ids=lambda o: " ".join(o) or "defaults")
def test_search_path_changes_nothing_the_host_composes(apps, overrides):
    assert composed(apps["with"], overrides) == composed(apps["without"], overrides)


@pytest.mark.parametrize("group", [*HOST_GROUPS, "hydra/launcher", "hydra/sweeper"])
def test_host_groups_list_only_the_hosts_options(apps, group):
    expected = group_options(apps["without"], group)
    if group in HOST_GROUPS:
        assert expected == host_options(group)
    assert group_options(apps["with"], group) == expected


@pytest.mark.parametrize("override", ["trainer=gpu", "trainer=ddp", "callbacks=precise_bn", "model=timm_segmentation",
                                      "hydra/launcher=slurm", "+norm=gn", "+experiment=shapes_gn_ws"])
def test_gnl_train_options_stay_invisible_to_the_host(apps, override):
    # gnl-train's options, in the host's groups or in groups the host does not have: the same error (or, for a name
    # that is no group of the host, the same plain value) as without the search path, never gnl-train's file.
    expected = outcome(apps["without"], [override])
    if not override.startswith("+"):
        assert expected[0] == "MissingConfigException"
    assert outcome(apps["with"], [override]) == expected


def test_norm_swap_is_the_only_group_the_search_path_adds(apps):
    assert group_options(apps["without"], "norm_swap") == []
    assert group_options(apps["with"], "norm_swap") == sorted(NORMS)


# ------------------------------------------------------------------------------------------------ +norm_swap=<norm>
def reference_options() -> dict:
    """NormSwap's ``module`` and NormSpec's options at their defaults, read from the signatures."""
    options = {"module": inspect.signature(NormSwap).parameters["module"].default}
    options.update((spec_field.name, spec_field.default) for spec_field in dataclasses.fields(NormSpec)[1:])
    return options


@pytest.mark.parametrize("norm", NORMS)
def test_norm_swap_adds_one_callback_with_every_option_at_its_default(apps, norm):
    base = composed(apps["with"])
    swapped = composed(apps["with"], [f"+norm_swap={norm}"])
    node = swapped["callbacks"].pop("norm_swap")
    assert swapped == base, "+norm_swap must change nothing but callbacks.norm_swap"
    assert node.pop("_target_") == "gnlightning.NormSwap" and node.pop("norm") == norm
    assert node.pop("_convert_") == "all"
    assert node == reference_options()


def host_cnn(width: int = 16):
    return host_classes("lightning.pytorch").CNN(width=width)


def swapped_model(apps, overrides, width: int = 16):
    """The host CNN after the composed callbacks.norm_swap has been applied, as NormSwap.setup applies it."""
    with initialize_config_dir(str(apps["with"]), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    swap = instantiate(cfg.callbacks.norm_swap)
    assert isinstance(swap, NormSwap)
    return swap.apply(host_cnn(width)), swap


def layer_types(model) -> list[str]:
    return [type(m).__name__ for m in model.net]


def test_norm_swap_gn_ws_converts_the_host_cnn(apps):
    model, swap = swapped_model(apps, ["+norm_swap=gn_ws"], width=64)
    assert layer_types(model)[:5] == ["WSConv2d", "GroupNorm", "ReLU", "WSConv2d", "GroupNorm"]
    assert [model.net[i].num_groups for i in (1, 4)] == [32, 32]


@pytest.mark.parametrize("overrides, check", [
    (["+norm_swap=gn", "callbacks.norm_swap.num_groups=4"],
     lambda m: [m.net[i].num_groups for i in (1, 4)] == [4, 4]),
    (["+norm_swap=gn", "callbacks.norm_swap.group_size=8"],  # 16 channels / 8 per group
     lambda m: [m.net[i].num_groups for i in (1, 4)] == [2, 2]),
    (["+norm_swap=gn", "callbacks.norm_swap.ws=true"],
     lambda m: layer_types(m)[:5] == ["WSConv2d", "GroupNorm", "ReLU", "WSConv2d", "GroupNorm"]),
    (["+norm_swap=gn_ws", "callbacks.norm_swap.ws=false"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "GroupNorm", "ReLU", "Conv2d", "GroupNorm"]),
    (["+norm_swap=gn_ws", "callbacks.norm_swap.ws_eps=0.001"],
     lambda m: [m.net[i].eps for i in (0, 3)] == [0.001, 0.001]),
    (["+norm_swap=gn", "callbacks.norm_swap.eps=0.001"],
     lambda m: [m.net[i].eps for i in (1, 4)] == [0.001, 0.001]),
    (["+norm_swap=gn", "callbacks.norm_swap.include=[net.1]"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "GroupNorm", "ReLU", "Conv2d", "BatchNorm2d"]),
    (["+norm_swap=gn", "callbacks.norm_swap.exclude=[net.1]"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "GroupNorm"]),
    (["+norm_swap=frozen_bn", "callbacks.norm_swap.module=net.4"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "FrozenBatchNorm2d"]),
    (["+norm_swap=ln"], lambda m: [m.net[i].num_groups for i in (1, 4)] == [1, 1]),
    (["+norm_swap=in"], lambda m: [m.net[i].num_groups for i in (1, 4)] == [16, 16]),
    (["+norm_swap=evonorm_s0", "callbacks.norm_swap.num_groups=4"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "EvoNorm2dS0", "ReLU", "Conv2d", "EvoNorm2dS0"]
     and [m.net[i].groups for i in (1, 4)] == [4, 4]),
    (["+norm_swap=frn", "callbacks.norm_swap.eps=0.001"],
     lambda m: layer_types(m)[:5] == ["Conv2d", "FilterResponseNormTlu2d", "ReLU", "Conv2d",
                                      "FilterResponseNormTlu2d"] and m.net[1].eps == 0.001),
], ids=lambda value: " ".join(value[1:]) if isinstance(value, list) else "")
def test_every_norm_swap_option_reaches_the_conversion(apps, overrides, check):
    model, _ = swapped_model(apps, overrides)
    assert check(model), layer_types(model)


def test_norm_swap_sync_group_size_reaches_the_conversion(apps):
    # Ranks exist only inside a DDP process: outside one, the option is refused by name (DDP runs test the groups).
    with pytest.raises(ValueError, match=r"syncbn with sync_group_size=2 needs an initialised torch.distributed"):
        swapped_model(apps, ["+norm_swap=syncbn", "callbacks.norm_swap.sync_group_size=2"])
    with pytest.raises(InstantiationException, match=r"group_size is channels per group.*sync_group_size=2"):
        swapped_model(apps, ["+norm_swap=syncbn", "callbacks.norm_swap.group_size=2"])  # when NormSwap is built


def test_norm_swap_strict_refuses_groups_that_do_not_divide(apps):
    model, _ = swapped_model(apps, ["+norm_swap=gn", "callbacks.norm_swap.num_groups=5"])
    assert [model.net[i].num_groups for i in (1, 4)] == [4, 4]  # not strict: the nearest divisor of 16
    with pytest.raises(ValueError, match="5"):
        swapped_model(apps, ["+norm_swap=gn", "callbacks.norm_swap.num_groups=5", "callbacks.norm_swap.strict=true"])


def test_norm_swap_include_reaches_norm_swap_as_a_plain_list(apps):
    # NormSwap records its options in every checkpoint: a ListConfig there would not load with weights_only.
    _, swap = swapped_model(apps, ["+norm_swap=gn", "callbacks.norm_swap.include=[net.1]"])
    assert type(_record(swap.targets[0])["options"]["include"]) is list


@pytest.mark.parametrize("overrides, exception, message", [
    (["+norm_swap=gn", "callbacks.norm_swap.num_group=4"], HydraException, "num_group"),
    (["+norm_swap=gn", "+callbacks.norm_swap.num_group=4"], InstantiationException, "did you mean 'num_groups'"),
    (["+norm_swap=gnws"], HydraException, "gnws"),
    (["+norm_swap=gn", "norm_swap.num_groups=4"], HydraException, "norm_swap.num_groups"),  # keys: callbacks.norm_swap
])
def test_a_misspelt_norm_swap_key_or_option_fails_naming_it(apps, overrides, exception, message):
    with pytest.raises(exception) as info:
        swapped_model(apps, overrides)
    assert message in error_text(info.value)


# --------------------------------------------------------------------------------------- the host's own train.py
def run_host(app: Path, overrides, namespace: str, timeout: int = 300) -> list[dict]:
    """``python train.py <overrides>`` in ``app`` with ``namespace`` as the host's Lightning; the RecordNorms
    records of every rank."""
    pytest.importorskip(namespace)
    run_dir = app / "runs" / "_".join([namespace, *overrides]).replace("/", "_").replace("=", "-")
    run_python("train.py", *overrides, f"hydra.run.dir={run_dir}", cwd=app, timeout=timeout,
               env=subprocess_env(HOST_LIGHTNING=namespace))
    return [json.loads(path.read_text()) for path in sorted(run_dir.glob("norms_rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("namespace, overrides, groups", [
    ("lightning.pytorch", ["+norm_swap=gn_ws", "callbacks.norm_swap.num_groups=4"], 4),
    ("pytorch_lightning", ["+norm_swap=gn_ws", "model.options.width=64", "callbacks=early_stop"], 32),
])
def test_host_train_py_with_norm_swap_trains_the_converted_model(apps, namespace, overrides, groups):
    [record] = run_host(apps["with"], overrides, namespace)
    assert record["lightning"] == namespace
    layers = record["layers"]
    assert [layers[f"net.{i}"] for i in (0, 1, 3, 4)] == [
        "gnlightning.layers.ws_conv.WSConv2d", "torch.nn.modules.normalization.GroupNorm"] * 2
    assert record["groups"] == {"net.1": groups, "net.4": groups}


@pytest.mark.slow
@pytest.mark.distributed
def test_host_ddp_config_with_sync_batchnorm_and_the_plugin_trains_on_cpu(apps):
    # trainer=ddp_cpu says sync_batchnorm: true (Lightning's own flag, whose torch SyncBatchNorm refuses CPU tensors)
    # and adds SyncBatchNormPlugin: Lightning must accept the pair and synchronise with gnlightning's SyncBatchNorm.
    records = run_host(apps["with"], ["trainer=ddp_cpu"], "lightning.pytorch")
    assert len(records) == 2 and all(record["world_size"] == 2 for record in records)
    for record in records:
        assert [record["layers"][f"net.{i}"] for i in (1, 4)] == [
            "gnlightning.layers.sync_batchnorm.SyncBatchNorm"] * 2
