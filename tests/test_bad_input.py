"""Issue #8, "Bad input": the mistakes users make, each with the error (or warning) it gives.

One table: every row makes one mistake and names the exception (or warning) type and the regex fragments its
message must contain -- the offending value *and* the fix. A message is read the way a user sees it: the exception
with its chain of causes (Hydra prints the chain). Every row also checks that nothing was left behind: a failed
conversion leaves the model as it was (types and state), and a refused ``gnl-train`` config creates no run
directory. Two ``gnl-train`` subprocesses check the same for real runs, where Hydra has already made the directory.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from torch import nn

from gnlightning import NormSwap, SyncBatchNorm, convert_norms
from gnlightning.distributed import new_consecutive_groups
from gnlightning.train import build, remove_failed_run_dir
from tests.helpers import bn_mlp, compose_train, error_text, subprocess_env

SMALL = ["data.image_size=32", "data.batch_size=2"]  # keys every data config has


# ------------------------------------------------------------------------------------------------- the mistakes
def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64))


def gn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8))


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def converting(make_model, norm, **options):
    """convert_norms(make_model(), norm, **options); if it raises, the model must be exactly as before."""
    def mistake(tmp_path, monkeypatch):
        model = make_model()
        types, state = snapshot(model)
        try:
            convert_norms(model, norm, **options)
        except Exception:
            after_types, after_state = snapshot(model)
            assert after_types == types and after_state.keys() == state.keys(), "a failed conversion changed the model"
            assert all(torch.equal(after_state[k], v) for k, v in state.items()), "a failed conversion changed values"
            raise
    return mistake


def gnl(*overrides, env=None):
    """What ``gnl-train <overrides>`` does up to the start of training: compose, then build (in process)."""
    def mistake(tmp_path, monkeypatch):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        overrides_ = [o.replace("<tmp>", str(tmp_path)) for o in overrides]
        build(compose_train([*SMALL, *overrides_], tmp_path / "run"))
    return mistake


def coco_from_file(text):
    def mistake(tmp_path, monkeypatch):
        from gnlightning.data import COCODataModule

        (tmp_path / "annotations").mkdir()
        (tmp_path / "annotations" / "instances_train.json").write_text(text)
        COCODataModule(tmp_path).num_classes
    return mistake


def folder_data(images, masks):
    """A layout='folder' root with the given files (names only: existence is what is checked first)."""
    def mistake(tmp_path, monkeypatch):
        from gnlightning.data import VOCDataModule

        for kind, names in (("images", images), ("masks", masks)):
            if names is not None:
                (tmp_path / kind / "train").mkdir(parents=True)
                for name in names:
                    (tmp_path / kind / "train" / name).write_bytes(b"")
        VOCDataModule(tmp_path, layout="folder", num_classes=4).setup("fit")
    return mistake


def head_net(num_classes: int) -> nn.Module:
    return nn.Sequential(OrderedDict(features=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8),
                                     classifier=nn.Conv2d(8, num_classes, 1)))


def load_class_mismatch(tmp_path, monkeypatch):
    from gnlightning.models import load_weights

    torch.save(head_net(21).state_dict(), tmp_path / "voc21.pth")
    load_weights(head_net(4), tmp_path / "voc21.pth")


def load_other_architecture(tmp_path, monkeypatch):
    import torchvision

    from gnlightning.models import load_weights

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    load_weights(torchvision.models.resnet50(), tmp_path / "resnet18.pth")


def load_missing_file(tmp_path, monkeypatch):
    from gnlightning.models import load_weights

    load_weights(head_net(4), tmp_path / "weights.pth")


def unknown_hub_weights(tmp_path, monkeypatch):
    from gnlightning.models.weights import hub_weights

    hub_weights("deeplabv3_resnet50", "IMAGENET")


def train_step(images, model=None):
    def mistake(tmp_path, monkeypatch):
        from gnlightning.tasks import SegmentationTask

        task = SegmentationTask(model() if model else nn.Conv2d(3, 2, 1), num_classes=2)
        task.train()
        task.training_step((images, torch.zeros(len(images), *images.shape[-2:], dtype=torch.long)), 3)
    return mistake


def nan_images():
    images = torch.rand(2, 3, 8, 8)
    images[1, 0, 4, 4] = float("nan")
    return images


def pooled_bn_net() -> nn.Module:  # like DeepLabV3's ASPP pooling branch: BN after global pooling sees 1x1 maps
    return nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(2))


def syncbn_single_value(tmp_path, monkeypatch):
    SyncBatchNorm(4).train()(torch.randn(1, 4, 1, 1))


TORCHRUN_ONE_PROCESS = {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                        "TORCHELASTIC_RUN_ID": "bad-input-test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}

MISTAKES = [
    # --- convert_norms: names, group counts, WS, patterns, options
    pytest.param(converting(conv_net, "gorup_norm"), ValueError,
                 ["'gorup_norm'", "did you mean 'gn'", "valid names are bn, syncbn, gn, gn_ws, frozen_bn, ln, in"],
                 id="unknown-norm-name"),
    pytest.param(converting(conv_net, "gn", num_groups=7, strict=True), ValueError,
                 ["num_groups=7", "layer '1' with 64 channels", r"valid num_groups: \[1, 2, 4, 8, 16, 32, 64\]",
                  "strict=False"],
                 id="groups-do-not-divide-channels"),
    pytest.param(converting(conv_net, "gn", num_groups="four"), TypeError,
                 ["num_groups", "'four' \\(str\\)", "positive integer", "num_groups=32"],
                 id="groups-not-an-integer"),
    pytest.param(converting(conv_net, "gn", group_size=0), ValueError,
                 ["group_size", "got 0", "group_size=16"],
                 id="group-size-zero"),
    pytest.param(converting(bn_mlp, "gn", ws=True), ValueError,
                 ["ws=True", "Sequential has no Conv2d", "pass ws=False"],
                 id="ws-requested-without-conv"),
    pytest.param(converting(bn_mlp, "gn_ws"), UserWarning,
                 ["'gn_ws', ws='auto'", "no Conv2d", "norm='gn'"],
                 id="gn-ws-on-a-model-without-conv"),
    pytest.param(converting(conv_net, "gn", include="backbone.*"), UserWarning,
                 ["include pattern 'backbone.\\*' matched no norm layer", "describe_norms", "named '1', '4'"],
                 id="include-matches-nothing"),
    pytest.param(converting(conv_net, "gn", exclude=["head"]), UserWarning,
                 ["exclude pattern 'head' matched no norm layer", "describe_norms", "named '1', '4'"],
                 id="exclude-matches-nothing"),
    pytest.param(lambda tmp_path, monkeypatch: NormSwap("gn", num_group=8), TypeError,
                 ["'num_group'", "did you mean 'num_groups'", "convert_norms / NormSpec are num_groups, group_size"],
                 id="misspelt-normswap-option"),
    pytest.param(converting(conv_net, "gn_ws", ws="yes"), ValueError,
                 ["got 'yes'", "'auto', True or False"],
                 id="ws-not-a-choice"),
    pytest.param(converting(gn_net, "frozen_bn"), UserWarning,
                 ["nothing to freeze", r"'1' \(GroupNorm\)", "norm='gn'"],
                 id="frozen-bn-without-batchnorm"),
    pytest.param(converting(conv_net, "syncbn", sync_group_size=2), ValueError,
                 ["sync_group_size=2", "initialised torch.distributed", r"SyncBatchNormPlugin\(sync_group_size=...\)"],
                 id="syncbn-group-size-outside-ddp"),
    pytest.param(converting(conv_net, "syncbn", group_size=2), ValueError,
                 ["group_size=2", "channels per group", "sync_group_size=2"],
                 id="syncbn-with-the-gn-option"),
    pytest.param(converting(conv_net, "gn", sync_group_size=2), ValueError,
                 ["sync_group_size=2", "syncbn only"],
                 id="sync-group-size-for-another-norm"),
    pytest.param(lambda tmp_path, monkeypatch: new_consecutive_groups(3), ValueError,
                 ["group_size=3", "divisor of the world size 1", r"valid choices: \[1\]"],
                 id="sync-group-size-not-dividing-world"),
    pytest.param(lambda tmp_path, monkeypatch: new_consecutive_groups(True), ValueError,
                 ["group_size=True", "positive divisor", r"valid choices: \[1\]"],
                 id="sync-group-size-bool"),
    # --- gnl-train configs (Hydra composition, schema, check_target, build)
    pytest.param(gnl("norm=gnn"), MissingConfigException,
                 ["norm/gnn", "Available options in 'norm'", "gn_ws"],
                 id="hydra-unknown-norm-option"),
    pytest.param(gnl("data.batchsize=2"), ConfigCompositionException,
                 ["'data.batchsize'", "Key 'batchsize' is not in struct"],
                 id="hydra-misspelt-key"),
    pytest.param(gnl("+data.batchsize=2"), ValueError,
                 ["data.batchsize", "did you mean data.batch_size", "accepted keys: .*batch_size"],
                 id="hydra-added-misspelt-key"),
    pytest.param(gnl("data.batch_size=two"), ValueError,
                 ["data.batch_size='two'", "expects int", "e.g. data.batch_size=4"],
                 id="wrong-type-data-key"),
    pytest.param(gnl("norm.num_groups=four"), ConfigCompositionException,
                 ["norm.num_groups=four", "could not be converted to Integer"],
                 id="wrong-type-schema-key"),
    pytest.param(gnl("norm.include=backbone"), ConfigCompositionException,
                 ["norm.include=backbone", "not a ListConfig, list or tuple"],
                 id="string-where-a-list-goes"),
    pytest.param(gnl("data.batch_size=0"), ValueError,
                 ["data.batch_size=0", "at least 1", "data.batch_size=2"],
                 id="batch-size-zero"),
    pytest.param(gnl("model.name=deeplab"), ValueError,
                 ["unknown model 'deeplab'", "did you mean deeplabv3_resnet50", "detection: fasterrcnn"],
                 id="unknown-model-name"),
    pytest.param(gnl("+model.options.num_classes=21"), ValueError,
                 ["model.options.num_classes=21", "data has 4", "~model.options.num_classes"],
                 id="num-classes-in-model-config"),
    pytest.param(gnl("data._target_=gnlightning.data.ShapeDataModule"), ValueError,
                 ["data._target_='gnlightning.data.ShapeDataModule'", "did you mean gnlightning.data.ShapesDataModule"],
                 id="misspelt-target-class"),
    pytest.param(gnl("data=coco"), ValueError,
                 ["data.root must be set", "data.root=<value>", "data=shapes"],
                 id="data-root-not-set"),
    pytest.param(gnl("data=coco", "data.root=<tmp>/nowhere"), FileNotFoundError,
                 ["COCO root directory not found: .*nowhere", "annotations/instances_train.json",
                  "data.root=/path", "data=shapes"],
                 id="data-root-missing"),
    pytest.param(gnl("data=coco", "data.root=<tmp>"), FileNotFoundError,
                 ["annotation file not found: .*instances_train.json", "write_coco", "data=shapes"],
                 id="data-root-empty"),
    pytest.param(gnl("norm=syncbn", "trainer=ddp_cpu", "norm.sync_group_size=3"), ValueError,
                 ["norm.sync_group_size=3", "number of processes, 2", r"valid choices: \[1, 2\]"],
                 id="sync-group-size-vs-devices"),
    pytest.param(gnl("trainer=ddp_cpu", env=TORCHRUN_ONE_PROCESS), ValueError,
                 ["torchrun started 1 process", "WORLD_SIZE=1", "trainer.devices=2", "trainer.devices=1 ",
                  "--nproc-per-node=2"],
                 id="ddp-more-devices-than-processes"),
    pytest.param(gnl("ckpt_path=<tmp>/epoch3.ckpt"), FileNotFoundError,
                 ["ckpt_path='.*epoch3.ckpt'", "no such checkpoint", "checkpoints/last.ckpt", "ckpt_path=null"],
                 id="ckpt-path-missing"),
    # --- data files
    pytest.param(coco_from_file('{"images": [{"id": 1, "file_'), ValueError,
                 ["instances_train.json: not valid JSON", "line 1", "truncated or corrupt", "again"],
                 id="corrupt-coco-json"),
    pytest.param(folder_data(["a.png"], None), FileNotFoundError,
                 ["split directory not found: .*masks/train", "masks/<split>/<name>.png", "data.root="],
                 id="folder-without-masks"),
    pytest.param(folder_data(["a.png"], ["b.png"]), FileNotFoundError,
                 ["a.png \\(mask .*masks/train/a.png\\)", "same <name>"],
                 id="folder-mask-names-differ"),
    # --- weights
    pytest.param(load_class_mismatch, UserWarning,
                 ["voc21.pth", r"classifier.weight \(file \[21, 8, 1, 1\], model \[4, 8, 1, 1\]\)",
                  "number of classes"],
                 id="weights-with-another-class-count"),
    pytest.param(load_other_architecture, ValueError,
                 ["resnet18.pth", "do not fit ResNet", "another architecture", "check the model name"],
                 id="weights-of-another-architecture"),
    pytest.param(load_missing_file, FileNotFoundError,
                 ["weights.pth' does not exist", "state dict \\(.pth\\) or a Lightning checkpoint"],
                 id="weights-file-missing"),
    pytest.param(unknown_hub_weights, ValueError,
                 ["weights='IMAGENET'", "DEFAULT, COCO_WITH_VOC_LABELS_V1", "weights=/path/to/file.pth"],
                 id="weights-name-unknown"),
    # --- what reaches the norm layers in training
    pytest.param(train_step(nan_images()), FloatingPointError,
                 ["training batch 3", r"image\(s\) \[1\] of 2", "NaN or Inf", "Check the data"],
                 id="non-finite-input"),
    pytest.param(train_step(torch.rand(1, 3, 8, 8), pooled_bn_net), ValueError,
                 ["more than 1 value per channel", "batch of 1 image", "data.batch_size=2", "norm=gn"],
                 id="bn-batch-of-one"),
    pytest.param(syncbn_single_value, ValueError,
                 [r"input size \(1, 4, 1, 1\)", "at least 2 samples", "norm=gn"],
                 id="syncbn-one-value-per-channel"),
]


@pytest.mark.parametrize("mistake, expected, fragments", MISTAKES)
def test_mistake_names_value_and_fix(mistake, expected, fragments, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    if issubclass(expected, Warning):
        with pytest.warns(expected) as record:
            mistake(work, monkeypatch)
        message = "\n".join(str(warning.message) for warning in record if issubclass(warning.category, expected))
    else:
        with pytest.raises(expected) as info:
            mistake(work, monkeypatch)
        message = error_text(info.value)
    for fragment in fragments:
        assert re.search(fragment, message, re.S), f"{fragment!r} not in:\n{message}"
    assert not (work / "run").exists()  # a refused config leaves no run directory


def test_table_is_large_enough():
    assert len(MISTAKES) >= 22


# ------------------------------------------------------------------------------------------ not errors, on purpose
def test_empty_batch_on_one_rank_is_not_an_error():
    """An empty per-device batch (filtered samples, the last batch of a split) gives an empty output connected to
    the graph and leaves the running statistics alone; only a global batch of one value per channel is refused."""
    layer = SyncBatchNorm(4).train()
    before = copy.deepcopy(layer.state_dict())
    x = torch.zeros(0, 4, 3, 3, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 4, 3, 3) and x.grad.shape == x.shape
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# ------------------------------------------------------------------------------------------- partial output on disk
def test_failed_run_directory_is_removed_only_when_it_holds_hydra_files_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare"
    (bare / ".hydra").mkdir(parents=True)
    (bare / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (bare / "train.log").write_text("")
    (bare / "logs").mkdir()  # the logger's directory, created but empty
    assert remove_failed_run_dir(bare) and not bare.exists()
    kept = tmp_path / "kept"
    (kept / ".hydra").mkdir(parents=True)
    (kept / "checkpoints").mkdir()
    (kept / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not remove_failed_run_dir(kept) and (kept / "checkpoints" / "last.ckpt").is_file()
    (tmp_path / ".hydra").mkdir()  # hydra.run.dir=. must never delete the working directory
    assert not remove_failed_run_dir(tmp_path) and tmp_path.is_dir()


@pytest.mark.slow
def test_gnl_train_failures_leave_no_run_directory(tmp_path):
    """Two real runs, side by side: one refused while building (a group count that does not divide the channels,
    strict), one failing inside fit (an empty data root, found when Lightning sets the data up)."""
    (tmp_path / "empty").mkdir()
    runs = {
        "bad-groups": (["norm=gn", "norm.num_groups=7", "norm.strict=true"],
                       ["num_groups=7", r"valid num_groups: \[1, 2, 4, 8, 16, 32, 64\]"]),
        "empty-root": (["data=folder", f"data.root={tmp_path / 'empty'}", "data.num_classes=4", "data.num_workers=0"],
                       ["split directory not found", "data=shapes"]),
    }
    env = subprocess_env(HYDRA_FULL_ERROR="0")
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "gnlightning.train", *SMALL, *overrides,
                                f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (overrides, _) in runs.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode != 0, stderr[-2000:]
        for fragment in runs[name][1]:
            assert re.search(fragment, stderr), f"{fragment!r} not in stderr of {name}:\n{stderr[-2000:]}"
        assert not (tmp_path / name).exists(), f"{name} left {sorted(p.name for p in (tmp_path / name).rglob('*'))}"
