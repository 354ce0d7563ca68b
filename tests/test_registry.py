"""The norm registry: one table serves create_norm, get_norm_layer, convert_norms and the configs; EvoNorm-S0 and
FRN (timm's layers) arrive through it alone and are checked against hand-written formulas of their papers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import gnlightning
from gnlightning import convert_norms
from gnlightning.convert import NormConversionWarning
from gnlightning.layers.create_norm import create_norm, get_norm_layer, resolve_norm_name
from gnlightning.layers.registry import NORMS, REGISTRY, is_norm, norm_kind
from gnlightning.tasks.optim import param_groups

timm_layers = pytest.importorskip("timm.layers")
PACKAGE = Path(gnlightning.__file__).parent
BATCH_INDEPENDENT = [name for name, entry in REGISTRY.items() if not entry.batch_dependent and name != "frozen_bn"]


def _net(channels: int = 64, **bn_options) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels, **bn_options),
                         nn.ReLU())


def _randomize(layer: nn.Module) -> None:
    """Non-trivial parameters, so the formulas' scale, shift and gates all matter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + 0.5)


def evonorm_s0_formula(x: torch.Tensor, layer: nn.Module, groups: int) -> torch.Tensor:
    """EvoNorm-S0 (Liu et al. 2020): x * sigmoid(v x) / group_std(x) * gamma + beta, std over (C/G, H, W)."""
    n, c, h, w = x.shape
    std = (x.reshape(n, groups, -1).var(dim=2, unbiased=False) + layer.eps).sqrt()
    std = std.repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)
    view = (1, c, 1, 1)
    return x * torch.sigmoid(layer.v.view(view) * x) / std * layer.weight.view(view) + layer.bias.view(view)


def frn_formula(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """FRN + TLU (Singh & Krishnan 2020): max(gamma * x / sqrt(mean_hw(x^2) + eps) + beta, tau)."""
    view = (1, x.shape[1], 1, 1)
    normalized = x / (x.square().mean(dim=(2, 3), keepdim=True) + layer.eps).sqrt()
    return torch.maximum(normalized * layer.weight.view(view) + layer.bias.view(view), layer.tau.view(view))


def test_every_registered_norm_has_its_config_options() -> None:
    for name in NORMS:
        assert (PACKAGE / "train_conf" / "norm" / f"{name}.yaml").is_file(), name
        swap = (PACKAGE / "conf" / "norm_swap" / f"{name}.yaml").read_text()
        assert f"\nnorm: {name}\n" in swap, name


@pytest.mark.parametrize("norm", NORMS)
def test_create_norm_builds_the_registered_class(norm: str) -> None:
    layer = create_norm(norm, 64)
    assert isinstance(layer, REGISTRY[norm].layer())
    assert norm_kind(layer) is not None and is_norm(layer)
    assert create_norm(norm, 64)(torch.randn(2, 64, 4, 4)).shape == (2, 64, 4, 4)


def test_aliases_reach_the_new_norms() -> None:
    assert resolve_norm_name("EvoNorm-S0") == "evonorm_s0" and resolve_norm_name("FRN") == "frn"
    with pytest.raises(ValueError, match="valid names are bn, syncbn, gn, gn_ws, frozen_bn, ln, in, evonorm_s0, frn"):
        resolve_norm_name("evonrm_x")


def test_get_norm_layer_is_a_norm_layer_argument_for_model_constructors() -> None:
    model = torchvision.models.resnet18(num_classes=3, norm_layer=get_norm_layer("gn", num_groups=16))
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {16} and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = torchvision.models.resnet18(num_classes=3, norm_layer=get_norm_layer("frn"))
    assert sum(isinstance(m, timm_layers.FilterResponseNormTlu2d) for m in model.modules()) == 20
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_grups'\]"):
        get_norm_layer("gn", num_grups=16)


@pytest.mark.parametrize("norm", ["evonorm_s0", "frn"])
def test_conversion_matches_timms_layer_and_the_papers_formula(norm: str) -> None:
    net = _net()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    weight, bias = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    converted = convert_norms(net, norm, num_groups=8)
    layer = converted[1]
    assert type(layer) is REGISTRY[norm].layer()
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)  # the BN's affine values carry over
    _randomize(layer)
    x = converted[0](torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    if norm == "evonorm_s0":
        assert layer.groups == 8
        reference = timm_layers.EvoNorm2dS0(64, groups=8)
        expected = evonorm_s0_formula(x, layer, 8)
    else:
        reference = timm_layers.FilterResponseNormTlu2d(64)
        expected = frn_formula(x, layer)
    reference.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), reference(x))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
def test_batch_independent_norms_do_not_mix_samples(norm: str) -> None:
    net = convert_norms(_net(), norm).train()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-5, atol=1e-6)


def test_unfit_layers_are_skipped_loudly_and_refused_with_strict() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), *_net(16, affine=False))
    with pytest.warns(NormConversionWarning) as caught:
        converted = convert_norms(model, "frn")
    messages = " ".join(str(w.message) for w in caught)
    assert "'1' (BatchNorm1d)" in messages and "frn takes (N, C, H, W) input only" in messages
    assert "'3' (BatchNorm2d)" in messages and "frn would add a learnt scale and shift" in messages
    assert type(converted[1]) is nn.BatchNorm1d and type(converted[3]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="strict=True; the model is unchanged"):
        convert_norms(model, "evonorm_s0", strict=True)
    assert type(model[1]) is nn.BatchNorm1d


@pytest.mark.parametrize("norm, extra", [("evonorm_s0", "v"), ("frn", "tau")])
def test_the_parameters_a_new_norm_adds_are_named_with_the_fix(norm, extra) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16))
    before = {name for name, _ in model.named_parameters()}
    with pytest.warns(NormConversionWarning, match=rf"2 new layer\(s\) add parameters .*'1' \(\+{extra}\), "
                                                   rf"'4' \(\+{extra}\).*build the optimizer after converting"):
        converted = convert_norms(model, norm, num_groups=4, strict=True)  # not refused: they are the norm's own
    assert {name for name, _ in converted.named_parameters()} - before == {f"1.{extra}", f"4.{extra}"}


@pytest.mark.parametrize("norm", ["evonorm_s0", "frn"])
def test_a_groupnorm_on_features_is_skipped_at_conversion_not_at_the_first_forward(norm) -> None:
    # An MLP's GroupNorm sees (N, C): timm's layers would assert at the first forward.
    model = nn.Sequential(nn.Linear(4, 32), nn.GroupNorm(2, 32), nn.ReLU())
    with pytest.warns(NormConversionWarning, match=rf"{norm} takes \(N, C, H, W\) input only\): '1' \(GroupNorm\)"):
        converted = convert_norms(model, norm)
    assert type(converted[1]) is nn.GroupNorm
    converted(torch.randn(3, 4))


def test_evonorm_groups_are_checked_at_the_first_forward(caplog) -> None:
    net = convert_norms(nn.Sequential(nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64)), "evonorm_s0")
    with caplog.at_level("WARNING", logger="gnlightning"):
        net(torch.randn(2, 3, 1, 1))
    assert "normalizes only 2 value(s) per group" in caplog.text and "'1'" in caplog.text


def test_frn_on_1x1_maps_is_loud(caplog) -> None:
    net = convert_norms(nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)), "frn")
    with caplog.at_level("WARNING", logger="gnlightning"):
        net(torch.randn(2, 3, 1, 1))
    assert "normalizes only 1 value(s) per group" in caplog.text and "'1'" in caplog.text


def test_round_trip_back_to_bn_keeps_the_affine_values_and_classes() -> None:
    net = _net()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    weight = net[1].weight.detach().clone()
    with pytest.warns(NormConversionWarning) as caught:
        back = convert_norms(convert_norms(net, "evonorm_s0"), "bn")
    assert type(back[1]) is nn.BatchNorm2d and torch.equal(back[1].weight, weight)
    # The only news: EvoNorm-S0's own parameter v, added on the way there and dropped on the way back.
    assert [str(w.message).split(": ")[1] for w in caught] == [
        "1 new layer(s) add parameters the old layers did not have", "1 new layer(s) drop parameters the old layers had"]
    assert "'1' (+v)" in str(caught[0].message) and "'1' (-v)" in str(caught[1].message)


def test_new_norms_take_no_weight_decay() -> None:
    net = convert_norms(_net(), "evonorm_s0")
    decay, no_decay = param_groups(net, 1e-4)
    assert {id(p) for p in net[1].parameters()} <= {id(p) for p in no_decay["params"]}
    assert [id(p) for p in decay["params"]] == [id(net[0].weight)]
