"""Every conversion is right or loud: degenerate group norms, skips and parameter changes never pass silently.

Plain nn.Modules here; the same cases inside a stranger's Lightning project are in test_host_normswap.py.
"""

import copy
import itertools
import logging
import warnings

import pytest
import torch
from torch import nn

from gnlightning import FrozenBatchNorm2d, SyncBatchNorm, convert_norms, revert_sync_batchnorm
from gnlightning.convert import NormConversionWarning
from tests.helpers import bn_mlp


def state(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_gn_on_features_defaults_to_16_channels_per_group_and_matches_torch():
    model = bn_mlp(64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    convert_norms(model, "gn")
    norm = model[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 4  # not 32 groups of 2 values
    x = torch.randn(8, 64) * 3 + 1
    reference = nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x), reference)


@pytest.mark.parametrize("norm, options, values", [("in", {}, 1), ("gn", {"group_size": 2}, 2)])
def test_degenerate_groups_on_features_warn_naming_layer_and_fix_or_raise_when_strict(norm, options, values):
    model = bn_mlp(64)
    with pytest.warns(NormConversionWarning) as record:
        convert_norms(model, norm, **options)
    message = str(record[0].message)
    assert "GroupNorm '1'" in message and f"only {values} value(s) per group" in message
    assert "exclude=['1']" in message
    untouched = bn_mlp(64)
    before = copy.deepcopy(untouched)
    with pytest.raises(ValueError, match=f"only {values} value"):
        convert_norms(untouched, norm, strict=True, **options)
    assert type(untouched[1]) is nn.BatchNorm1d and str(untouched) == str(before)  # nothing half converted


def test_in_on_features_really_erases_the_input():
    """What the warning is about: IN over one value per group outputs the bias whatever the input."""
    with pytest.warns(NormConversionWarning):
        model = convert_norms(bn_mlp(8), "in")
    out = model[1](torch.randn(4, 8))
    torch.testing.assert_close(out, model[1].bias.detach().expand(4, 8), atol=1e-4, rtol=0)


def test_runtime_check_warns_once_at_first_forward(caplog):
    # A GroupNorm after global pooling sees 1x1 maps: 64 channels / 32 groups = 2 values per group.
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(64))
    convert_norms(model, "gn")
    with caplog.at_level(logging.WARNING, logger="gnlightning"):
        model(torch.randn(2, 3, 8, 8))
        model(torch.randn(2, 3, 8, 8))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned  # the layer over 6x6 maps is fine; the pooled one warns, once
    assert "GroupNorm '3'" in warned[0] and "only 2 value(s) per group" in warned[0]
    assert "shape (2, 64, 1, 1)" in warned[0]
    strict = convert_norms(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(64)), "gn", strict=True)
    with pytest.raises(ValueError, match="only 2 value"):
        strict(torch.randn(2, 64, 4, 4))


def test_runtime_check_stays_quiet_on_sequences_and_survives_pickling(caplog):
    import pickle

    model = nn.Sequential(nn.Conv1d(4, 64, 3), nn.BatchNorm1d(64))  # (N, C, L): values = 2 channels x L
    convert_norms(model, "gn")
    model = pickle.loads(pickle.dumps(model))  # spawned workers and torch.save(model) pickle the hook
    with caplog.at_level(logging.WARNING, logger="gnlightning"):
        model(torch.randn(2, 4, 40))
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not model[1]._forward_pre_hooks  # removed after the first call


def test_frozen_bn_freezes_batchnorm1d_and_3d_as_eval_bn():
    for layer, x in ((nn.BatchNorm1d(6), torch.randn(4, 6)), (nn.BatchNorm1d(6), torch.randn(4, 6, 5)),
                     (nn.BatchNorm3d(6), torch.randn(2, 6, 3, 4, 5))):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.uniform_(0.5, 1.5)
        expected = copy.deepcopy(layer).eval()(x)
        frozen = convert_norms(nn.Sequential(layer), "frozen_bn")[0]
        assert isinstance(frozen, FrozenBatchNorm2d)
        torch.testing.assert_close(frozen.train()(x), expected)
        back = convert_norms(nn.Sequential(frozen), "bn")[0]
        assert type(back) is type(layer)


def test_skips_warn_naming_layers_and_fix_or_raise_when_strict():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8),
                          nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.warns(NormConversionWarning, match=r"left 2 layer\(s\).*'3' \(GroupNorm\), '4' \(BatchNorm2d\)"):
        convert_norms(copy.deepcopy(model), "frozen_bn")
    with pytest.raises(ValueError, match="strict=True"):
        convert_norms(model, "frozen_bn", strict=True)
    assert type(model[1]) is nn.BatchNorm2d  # strict refused before touching anything
    with warnings.catch_warnings():  # a skip the user asked for is not a surprise
        warnings.simplefilter("error")
        convert_norms(copy.deepcopy(model), "frozen_bn", exclude=["3", "4"])


BN_VARIANTS = [dict(affine=a, bias=b, track_running_stats=t)
               for a, b, t in itertools.product([True, False], repeat=3) if a or b]  # bias only matters with affine


def randomized_bn(options, cls=nn.BatchNorm2d):
    layer = cls(8, **options)
    with torch.no_grad():
        for tensor in (*layer.parameters(), layer.running_mean, layer.running_var):
            if tensor is not None:
                tensor.uniform_(0.5, 1.5)
    if layer.num_batches_tracked is not None:
        layer.num_batches_tracked.fill_(3)
    return layer


@pytest.mark.parametrize("options", BN_VARIANTS, ids=lambda o: "-".join(f"{k[:5]}={v}" for k, v in o.items()))
@pytest.mark.parametrize("via", ["syncbn", "frozen_bn"])
def test_round_trips_keep_exactly_the_parameters_and_buffers(options, via):
    layer = randomized_bn(options)
    original = state(layer)
    params = [name for name, _ in layer.named_parameters()]
    model = convert_norms(nn.Sequential(layer), via)
    if via == "frozen_bn" and not options["track_running_stats"]:
        assert model[0] is layer  # nothing to freeze (and a warning, tested above)
        return
    if via == "syncbn":
        assert [name for name, _ in model[0].named_parameters()] == params  # no parameter gained or lost
        model[0].load_state_dict(original, strict=True)
    else:
        assert not list(model[0].parameters())  # frozen: nothing to train
    back = revert_sync_batchnorm(model) if via == "syncbn" else convert_norms(model, "bn")
    assert type(back[0]) is nn.BatchNorm2d
    assert [name for name, _ in back[0].named_parameters()] == params
    restored = state(back[0])
    assert list(restored) == list(original)
    for key in original:
        assert torch.equal(restored[key], original[key]), key
    back[0].load_state_dict(original, strict=True)


@pytest.mark.parametrize("options", BN_VARIANTS, ids=lambda o: "-".join(f"{k[:5]}={v}" for k, v in o.items()))
def test_group_norm_takes_only_the_affine_parameters_the_source_had(options):
    layer = randomized_bn(options)
    params = {name: p for name, p in layer.named_parameters()}
    gn = convert_norms(nn.Sequential(nn.Conv2d(3, 8, 1), layer), "gn", num_groups=2)[1]
    assert {name for name, _ in gn.named_parameters()} == set(params)
    for name, value in gn.named_parameters():
        assert value is params[name]  # the same Parameter objects: an optimizer keeps pointing at them
    x = torch.randn(2, 8, 4, 4)
    expected = nn.functional.group_norm(x, 2, params.get("weight"), params.get("bias"), gn.eps)
    torch.testing.assert_close(gn(x), expected)


def test_syncbn_layer_keeps_a_missing_bias_missing_in_training():
    layer = randomized_bn(dict(affine=True, bias=False, track_running_stats=True))
    sync = convert_norms(nn.Sequential(layer), "syncbn")[0]
    assert isinstance(sync, SyncBatchNorm) and sync.bias is None
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(sync(x), copy.deepcopy(layer)(x))
