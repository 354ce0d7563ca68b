"""convert_norms on small hand-made models: what is kept, what is swapped, what is refused."""

import copy
import logging
import warnings

import pytest
import torch
import torchvision
from torch import nn

from gnlightning import FrozenBatchNorm2d, SyncBatchNorm, WSConv2d, convert_norms, describe_norms, revert_sync_batchnorm
from gnlightning.layers import BatchNormXd
from tests.helpers import assert_same_state, randomized_statistics, run_python


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = block(3, 32)
        self.body = block(32, 48)
        self.head = nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 4)
        self.fc_bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.fc_bn(self.fc(self.pool(self.head(self.body(self.stem(x)))).flatten(1)))


def test_gn_ws_conversion_replaces_and_wraps_exactly():
    model = randomized_statistics(Net(), num_batches_tracked=7)
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"'fc_bn' \(1 groups over 4 channels.*only 4 value\(s\) per group"):
        out = convert_norms(model, "GN+WS")
    assert out is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["stem.1"] is nn.GroupNorm and model.stem[1].num_groups == 32
    assert model.body[1].num_groups == 24  # 32 does not divide 48: largest divisor below
    assert model.fc_bn.num_groups == 1  # (N, 4) features: one group (4 would leave one value per group)
    # WS wraps exactly the convs followed by a converted norm with matching channels
    assert kinds["stem.0"] is WSConv2d and kinds["body.0"] is WSConv2d and kinds["head.0"] is WSConv2d
    assert kinds["head.2"] is nn.Conv2d
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # affine values carried over, names (state-dict keys) kept apart from BN's statistics
    torch.testing.assert_close(model.stem[1].weight, original.stem[1].weight)
    torch.testing.assert_close(model.stem[1].bias, original.stem[1].bias)
    assert set(model.state_dict()) == {k for k in original.state_dict() if "running" not in k and "num_batches" not in k}
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    model.eval()(torch.randn(2, 3, 16, 16))


def test_bn_syncbn_frozen_round_trips_are_exact():
    model = randomized_statistics(Net(), num_batches_tracked=7).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = copy.deepcopy(model)
    expected = reference(x)
    sync = convert_norms(model, "SyncBN")
    assert sum(isinstance(m, SyncBatchNorm) for m in sync.modules()) == 4
    assert_same_state(sync, reference)
    back = revert_sync_batchnorm(sync)
    assert type(back.stem[1]) is nn.BatchNorm2d and type(back.fc_bn) is nn.BatchNorm1d
    assert_same_state(back, reference)
    frozen = convert_norms(back, "frozen_bn")
    assert type(frozen.stem[1]) is FrozenBatchNorm2d
    assert type(frozen.fc_bn) is FrozenBatchNorm2d  # (N, C) features freeze too
    assert_same_state(frozen, reference)
    torch.testing.assert_close(frozen(x), expected)
    again = convert_norms(frozen, "bn")
    assert type(again.stem[1]) is nn.BatchNorm2d and again.stem[1].momentum == reference.stem[1].momentum
    assert type(again.fc_bn) is nn.BatchNorm1d
    assert_same_state(again, reference)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_preserves_mode_dtype_requires_grad_and_parameter_identity():
    model = randomized_statistics(Net(), num_batches_tracked=7).double()
    model.stem[1].weight.requires_grad_(False)
    model.body.eval()
    body_weight = model.body[1].weight
    convert_norms(model, "gn")
    assert model.stem[1].weight.dtype == torch.float64
    assert not model.stem[1].weight.requires_grad and model.body[1].weight.requires_grad
    assert model.training and not model.body[1].training
    assert model.body[1].weight is body_weight  # an optimizer built earlier still points at it


def test_root_norm_layer_returns_new_root():
    bn = nn.BatchNorm2d(8)
    gn = convert_norms(bn, "ln")
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 1
    instance = convert_norms(gn, "in")
    assert instance.num_groups == 8


def test_gn_to_bn_and_between_gn_family():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8))
    convert_norms(model, "gn", num_groups=2)
    assert model[1].num_groups == 2
    convert_norms(model, "bn")
    assert isinstance(model[1], BatchNormXd)
    model(torch.randn(2, 3, 8, 8))


def test_include_exclude_and_unmatched_pattern_warning():
    model = Net()
    with pytest.warns(UserWarning, match="'nothing.here' matched no norm layer"):
        convert_norms(model, "gn", exclude=["head", "nothing.here"])
    assert isinstance(model.head[1], nn.BatchNorm2d)
    assert isinstance(model.stem[1], nn.GroupNorm)
    model = Net()
    convert_norms(model, "frozen_bn", include="stem*")
    assert isinstance(model.stem[1], FrozenBatchNorm2d) and isinstance(model.body[1], nn.BatchNorm2d)


def test_summary_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        convert_norms(Net(), "gn_ws", exclude="head")
    assert ("converted 2 BatchNorm2d -> GroupNorm, converted 1 BatchNorm1d -> GroupNorm, wrapped 2 Conv2d with WS, "
            "skipped 1: head.1 (excluded)") in caplog.text


def test_unknown_norm_and_bad_options_leave_model_untouched():
    model = Net()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="valid names are bn, syncbn, gn, gn_ws, frozen_bn, ln, in"):
        convert_norms(model, "batchgroup")
    with pytest.raises(ValueError, match="layer 'body.1' with 48 channels"):
        convert_norms(model, "gn", num_groups=32, strict=True)  # stem (32 channels) would be fine
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert_same_state(model, before)
    with pytest.raises(TypeError):
        convert_norms(model, "gn", groups=4)


def test_model_without_norm_warns_and_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.warns(UserWarning, match="has no BatchNorm"):
        assert convert_norms(model, "gn") is model
    assert type(model[0]) is nn.Conv2d


def test_ws_forced_and_disabled():
    model = convert_norms(Net(), "gn_ws", ws=False)
    assert not any(isinstance(m, WSConv2d) for m in model.modules())
    model = convert_norms(Net(), "bn", ws=True)
    assert isinstance(model.head[2], WSConv2d)  # every plain conv, also the one before no norm
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        convert_norms(model, "gn_ws")  # convs already standardized: nothing to complain about
    assert not [w for w in record if "Weight Standardization" in str(w.message)]


def test_describe_norms_table():
    model = convert_norms(Net(), "gn_ws")
    table = describe_norms(model)
    names = [row.name for row in table]
    assert names == ["stem.0", "stem.1", "body.0", "body.1", "head.0", "head.1", "fc_bn"]
    body = table[3]
    assert (body.type, body.channels, body.groups, body.eps, body.frozen) == ("GroupNorm", 48, 24, 1e-5, False)
    text = str(table)
    assert "body.1" in text and "GroupNorm" in text and "3 WSConv2d, 4 GroupNorm" in text


def test_torchvision_frozen_bn_source_to_gn_trains():
    model = torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    convert_norms(model, "gn")
    params = {id(p) for p in model.parameters()}
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 20  # every FrozenBatchNorm2d of the ResNet-18
    assert all(id(m.weight) in params for m in group_norms)
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def test_timm_fused_norm_act_keeps_activation_and_dropout():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct

    from gnlightning.layers import SyncBatchNormAct

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3).eval()
    model.bn1.drop = nn.Dropout(0.1)
    act, drop = model.bn1.act, model.bn1.drop
    assert isinstance(model.bn1, BatchNormAct2d) and isinstance(act, nn.SiLU)
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    for norm, cls in [("syncbn", SyncBatchNormAct), ("frozen_bn", FrozenBatchNormAct2d), ("bn", BatchNormAct2d)]:
        model = convert_norms(model, norm)
        assert type(model.bn1) is cls and model.bn1.act is act and model.bn1.drop is drop
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # same function in eval mode
    model = convert_norms(model, "gn")
    assert type(model.bn1) is GroupNormAct and model.bn1.act is act and model.bn1.drop is drop
    assert {n for n, _ in model.bn1.named_children()} == {"act", "drop"}


def test_convert_sync_batchnorm_keeps_a_fused_activation():
    # torch.nn.SyncBatchNorm.convert_sync_batchnorm's parity method: a timm BatchNormAct2d is a BatchNorm2d, and
    # becoming a plain SyncBatchNorm would drop its activation.
    timm_layers = pytest.importorskip("timm.layers")
    from gnlightning.layers import SyncBatchNormAct

    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    weight = model[1].weight
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNormAct and isinstance(converted[1].act, nn.ReLU)
    assert converted[1].weight is weight and not converted[1].training
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_convert_norms_does_not_import_lightning():
    code = ("import sys, torch, gnlightning; gnlightning.convert_norms(torch.nn.BatchNorm2d(4), 'gn'); "
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra') for m in sys.modules)")
    run_python("-c", code, timeout=120)
