"""Layers against independent references: the GN paper's reshape formula, torch's functional ops, timm."""

import copy
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gnlightning import FrozenBatchNorm2d, WSConv2d
from gnlightning.layers import create_norm, resolve_norm_name, resolve_num_groups
from gnlightning.layers.ws_conv import _WSConv2dFunction


def gn_paper_formula(x, num_groups, gamma, beta, eps=1e-5):
    """Figure 3 of the GN paper: x -> [N, G, C/G, H, W], moments over the last three axes."""
    n, c, h, w = x.shape
    grouped = x.reshape(n, num_groups, c // num_groups, h, w)
    mean = grouped.mean(dim=(2, 3, 4), keepdim=True)
    var = grouped.var(dim=(2, 3, 4), keepdim=True, unbiased=False)
    grouped = (grouped - mean) / torch.sqrt(var + eps)
    return grouped.reshape(n, c, h, w) * gamma.view(1, c, 1, 1) + beta.view(1, c, 1, 1)


@pytest.mark.parametrize("norm, groups", [("gn", 8), ("ln", 1), ("in", 32)])
def test_gn_family_matches_paper_formula_and_functional_ops(norm, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64) * 3 + 1
    layer = create_norm(norm, 32, num_groups=8).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    assert layer.num_groups == groups
    out = layer(x)
    expected = gn_paper_formula(x, groups, layer.weight, layer.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    if norm == "ln":  # LN of the GN paper normalises over (C, H, W) per sample
        reference = F.layer_norm(x, x.shape[1:]) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    elif norm == "in":
        reference = F.instance_norm(x, weight=layer.weight, bias=layer.bias)
    else:
        reference = F.group_norm(x, groups, layer.weight, layer.bias)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-10)


def test_group_policy_divisible_and_group_size():
    assert resolve_num_groups(256) == 32
    assert resolve_num_groups(256, group_size=16) == 16
    assert resolve_num_groups(64, num_groups=32) == 32


def test_group_policy_falls_back_to_largest_divisor_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        assert resolve_num_groups(40, num_groups=32, layer_name="features.3.bn") == 20
    assert "features.3.bn" in caplog.text and "40 channels" in caplog.text and "20 groups" in caplog.text
    assert resolve_num_groups(24, num_groups=32) == 24  # more groups than channels: one channel per group
    assert resolve_num_groups(48, group_size=20) == 2  # two groups of 20 requested -> 2 divides 48


def test_group_policy_strict_names_layer_channels_and_choices():
    with pytest.raises(ValueError) as info:
        resolve_num_groups(40, num_groups=32, strict=True, layer_name="features.3.bn")
    message = str(info.value)
    assert "features.3.bn" in message and "40 channels" in message and "[1, 2, 4, 5, 8, 10, 20, 40]" in message
    with pytest.raises(ValueError, match="group_size"):
        resolve_num_groups(40, group_size=16, strict=True)


def test_norm_names_and_aliases():
    for alias, name in [("BN", "bn"), ("SyncBN", "syncbn"), ("GN+WS", "gn_ws"), ("gn-ws", "gn_ws"),
                        ("FrozenBN", "frozen_bn"), ("frozen_bn", "frozen_bn"), ("LN", "ln"), ("IN", "in")]:
        assert resolve_norm_name(alias) == name
    with pytest.raises(ValueError, match="valid names are bn, syncbn, gn, gn_ws, frozen_bn, ln, in"):
        resolve_norm_name("groupnrom")


def ws_formula(weight, eps):
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).view_as(weight)


@pytest.mark.parametrize("groups", [1, 4])
def test_ws_conv_matches_formula_and_timm(groups):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1, groups=groups, bias=True, eps=1e-5)
    with torch.no_grad():
        conv.weight.mul_(5).add_(0.3)
    x = torch.randn(2, 8, 9, 9)
    expected = F.conv2d(x, ws_formula(conv.weight.double(), 1e-5).float(), conv.bias, padding=1, groups=groups)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    timm_conv = timm_layers.StdConv2d(8, 16, 3, padding=1, groups=groups, bias=True, eps=1e-5)
    timm_conv.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), timm_conv(x), rtol=1e-5, atol=1e-5)
    # gradients flow through the standardization like timm's
    conv(x).square().sum().backward()
    timm_conv(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, timm_conv.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("groups, stride, dilation, bias", [(1, 1, 1, True), (2, 2, 1, False), (4, 1, 2, True)])
def test_ws_conv_training_gradients_equal_the_autograd_formula(groups, stride, dilation, bias):
    """WSConv2d trains through one autograd node with a hand-written backward; compare it in float64 with plain
    autograd through the textbook formula (input, weight and bias gradients), and with finite differences."""
    torch.manual_seed(0)
    conv = WSConv2d(8, 8, 3, padding=1, stride=stride, dilation=dilation, groups=groups, bias=bias).double()
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.5)
    x = torch.randn(2, 8, 9, 9, dtype=torch.double, requires_grad=True)
    out = conv(x)
    grad = torch.randn_like(out)
    out.backward(grad)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = conv.weight.detach().clone().requires_grad_()
    b_ref = conv.bias.detach().clone().requires_grad_() if bias else None
    ref = F.conv2d(x_ref, ws_formula(w_ref, conv.eps), b_ref, stride, 1, dilation, groups)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-10)
    if bias:
        torch.testing.assert_close(conv.bias.grad, b_ref.grad, rtol=1e-10, atol=1e-10)

    probe = torch.randn(1, 4, 5, 5, dtype=torch.double, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda inp, w: _WSConv2dFunction.apply(inp, w, None, 1e-6, (stride,) * 2, (1, 1), (dilation,) * 2, 2),
        (probe, weight))


@pytest.mark.parametrize("backend", [
    "aot_eager",  # AOTAutograd traces the custom autograd Function's forward and backward: what can break
    pytest.param("inductor", marks=[pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler"),
                                    pytest.mark.slow]),  # compiles C++ kernels: ~20 s
])
def test_ws_conv_compiles_without_graph_breaks_to_the_same_values(backend):
    """torch.compile(fullgraph=True) of a GN+WS block (an error at any graph break), against the textbook formula
    in float64: training output and gradients, then the eval path (the cached standardized weight)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), WSConv2d(8, 6, 1)).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.double)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(x).square().sum().backward()

    reference = copy.deepcopy(model)  # same weights, no gradients

    def forward(inp: torch.Tensor) -> torch.Tensor:
        for module in reference:
            if isinstance(module, WSConv2d):
                inp = F.conv2d(inp, ws_formula(module.weight, module.eps), module.bias, module.stride, module.padding)
            else:
                inp = module(inp)
        return inp

    forward(x).square().sum().backward()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-9, atol=1e-9, msg=name)

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), forward(x), rtol=1e-10, atol=1e-10)


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the module's own parameters (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x).sum()
    return sum(seen.values())


def test_ws_conv_keeps_no_more_for_backward_than_a_plain_conv():
    """Standardizing must not keep weight-sized copies alive until backward: what a WSConv2d step saves equals
    what nn.Conv2d saves (its input) plus a mean and a scale per filter, at a size where one weight copy (2.4 MB)
    would dwarf the input (8 KB)."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    ws = WSConv2d.from_conv(conv)
    x = torch.randn(2, 256, 2, 2, requires_grad=True)
    assert _saved_bytes(conv, x) == x.numel() * 4
    assert _saved_bytes(ws.train(), x) == x.numel() * 4 + 2 * 256 * 4


def test_ws_statistics_in_float32_for_half_weights():
    torch.manual_seed(0)
    conv = WSConv2d(64, 4, 3, eps=1e-6)
    with torch.no_grad():
        conv.weight.mul_(1e-2)  # tiny filters: their variance underflows in float16 arithmetic
    reference = ws_formula(conv.weight.half().double(), 1e-6)
    half = conv.to(torch.float16)
    standardized = half.standardized_weight()
    assert standardized.dtype == torch.float16
    torch.testing.assert_close(standardized.double(), reference, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = WSConv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_ws_eval_cache_reused_and_invalidated_by_optimizer_step():
    torch.manual_seed(0)
    conv = WSConv2d(4, 4, 3)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    x = torch.randn(1, 4, 6, 6)
    conv.eval()
    with torch.no_grad():
        first = conv(x)
        cached = conv._cached_weight
        assert cached is not None
        conv(x)
        assert conv._cached_weight is cached  # reused, not recomputed
    conv.train()
    assert conv._cached_weight is None
    conv(x).sum().backward()
    optimizer.step()
    conv.eval()
    with torch.no_grad():
        after = conv(x)
    assert not torch.allclose(first, after)
    expected = F.conv2d(x, ws_formula(conv.weight, conv.eps), conv.bias)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place change in eval mode (e.g. load_state_dict) also invalidates
        conv.weight.mul_(-1)
        torch.testing.assert_close(conv(x), F.conv2d(x, ws_formula(conv.weight, conv.eps), conv.bias),
                                   rtol=1e-5, atol=1e-5)


def test_ws_eval_with_grad_does_not_cache():
    conv = WSConv2d(4, 4, 3).eval()
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv._cached_weight is None


def test_ws_fold_to_plain_conv():
    torch.manual_seed(0)
    conv = WSConv2d(6, 8, 3, stride=2, padding=1, dilation=1, bias=True).eval()
    plain = conv.to_conv2d()
    assert type(plain) is nn.Conv2d
    x = torch.randn(2, 6, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), conv(x), rtol=1e-5, atol=1e-6)
    assert set(plain.state_dict()) == set(conv.state_dict())


def test_ws_conv_loads_plain_conv_state_dict():
    plain = nn.Conv2d(3, 8, 3)
    ws = WSConv2d(3, 8, 3)
    ws.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ws.weight, plain.weight)


def test_frozen_bn_is_torchvision_frozen_and_stays_frozen():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    assert isinstance(frozen, torchvision.ops.FrozenBatchNorm2d)
    assert list(frozen.parameters()) == []
    frozen.train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(3, 4, 5, 5) * 4 + 2
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)  # eval BN, although frozen.training
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key])
    # Under autocast the activation keeps its bf16 dtype (torchvision's multiplies by a float32 scale and promotes).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = frozen(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), bn(x.bfloat16().float()), rtol=0.02, atol=0.05)
    # Checkpoints of torchvision's class (no num_batches_tracked) load, and ours load into torchvision's.
    frozen.load_state_dict(torchvision.ops.FrozenBatchNorm2d(4).state_dict())
    torchvision.ops.FrozenBatchNorm2d(4).load_state_dict(frozen.state_dict())
    assert set(frozen.state_dict()) == set(bn.state_dict())


def test_as_int_takes_integers_of_any_kind_and_nothing_else() -> None:
    from omegaconf import OmegaConf

    from gnlightning.config_values import as_int

    config = OmegaConf.create({"groups": 32})
    for value in (32, np.int64(32), torch.tensor(32), config.groups):
        assert as_int(value) == 32 and type(as_int(value)) is int
    for value in (True, 32.0, "32", None, np.float32(32)):
        assert as_int(value) is None
