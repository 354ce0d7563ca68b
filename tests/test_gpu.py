"""gnlightning's CUDA paths, checked against PyTorch's own layers on the same data (issue 18).

Why this module: every layer and script of the package has been written for GPUs, but the machines it was developed
on have none. These tests are the check the first lent GPU runs (``bash scripts/gpu_check.sh``, which also times the
GPU benchmark and writes one report). They are marked ``gpu`` and skipped without CUDA, yet collected everywhere, so
an import or syntax error cannot hide until then. Failures say what was compared with what, and how far apart.

What is checked, always against an independent reference:

* SyncBatchNorm over 2 processes sharing one GPU, joined by gloo (NCCL refuses two ranks on one device; gloo
  all-reduces CUDA tensors through pinned host memory): outputs, input gradients, weight/bias gradients and running
  statistics against ``nn.BatchNorm2d`` training on the concatenated batch (float64, CPU), uneven and empty ranks
  included; and against ``torch.nn.SyncBatchNorm`` on the same ranks and data.
* SyncBatchNorm in a 1-rank NCCL group: the plain path it takes there, and its synchronized path forced, with both
  collectives issued on NCCL (the only way to run gnlightning's NCCL path on one GPU).
* WSConv2d, and GN, GN+WS, FrozenBN and SyncBN as ``convert_norms`` builds them, in float32 and under float16 and
  bfloat16 autocast, NCHW and channels_last: against the same network written with PyTorch's own layers.
* ``gnl-train trainer=gpu`` for a few steps, and ``prepare_for_export`` on a CUDA model.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import math
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.testing import assert_close

from gnlightning import FrozenBatchNorm2d, SyncBatchNorm, WSConv2d, convert_norms
from gnlightning.export import prepare_for_export
from gnlightning.layers import sync_batchnorm
from gnlightning.layers.sync_batchnorm import _SyncBatchNormFunction
from tests._dist import CollectiveCounter, run_distributed
from tests.helpers import (affine_values, batch_and_upstream_grad, batchnorm_reference, randomized_statistics,
                           run_gnl_train)

# One place names the device, so that the helpers can be exercised on "cpu" by hand (the tests themselves need CUDA).
DEVICE = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]


@pytest.fixture(autouse=True)
def _ieee_float32():
    """TF32 off while a test runs: cuDNN convolutions use TF32 by default on Ampere and later (a 10-bit mantissa,
    ~1e-3 relative), which would swamp every float32 comparison here."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------- helpers


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """Relative L2 error within ``tolerance``: the measure that suits low-precision results, where elementwise
    tolerances fail on the few values that round far from zero-crossings."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    error = _relative_error(actual, expected)
    largest = float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()) if \
        actual.numel() else 0.0
    assert error <= tolerance, (
        f"{what}: relative L2 error {error:.3g} exceeds {tolerance:g} (largest absolute difference {largest:.3g}, "
        f"largest expected magnitude {float(expected.detach().abs().max()) if expected.numel() else 0.0:.3g})"
    )


def _assert_finite(tensor: torch.Tensor | None, what: str) -> None:
    assert tensor is not None, f"{what}: missing (None)"
    finite = torch.isfinite(tensor.detach().float())
    assert bool(finite.all()), f"{what}: {int((~finite).sum())} of {tensor.numel()} values are not finite"


def _raise_worker_errors(results: list[dict[str, Any]], what: str) -> None:
    for rank, result in enumerate(results):
        if "error" in result:
            pytest.fail(f"{what} raised on rank {rank}:\n{result['error']}", pytrace=False)


def _recorded(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``function()``, or its traceback: one failing case must not hide the others, and the test that reads the
    case names it."""
    try:
        return function()
    except Exception:  # noqa: BLE001 - re-raised by name in the test process (_raise_worker_errors)
        return {"error": traceback.format_exc()}


# ------------------------------------------------------------------------ norms under autocast and channels_last

NORMS = ["gn", "gn_ws", "frozen_bn", "syncbn"]
LAYOUTS = ["nchw", "channels_last"]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Relative L2 errors against the float32 reference, for the output and for every gradient. In float32 (TF32 off)
# only the order of operations differs. Under autocast, how far a result may drift from float32 depends on the
# network as much as on the dtype (BN's and GN's input gradients subtract projections and amplify rounding; measured
# on the CPU up to 0.03 in fp16 and 0.08 in bf16 for PyTorch's own layers), so the bound is calibrated by PyTorch's
# layers under the same autocast: gnlightning's error may be at most AUTOCAST_FACTOR times theirs plus a floor, and
# never above a ceiling. A wrong formula is off by O(1).
FLOAT32_TOLERANCE = 1e-4
AUTOCAST_FACTOR = 3.0
AUTOCAST_FLOOR = {"fp16": 5e-3, "bf16": 2e-2}
AUTOCAST_CEILING = {"fp16": 0.1, "bf16": 0.2}


class _StandardizedConv2d(nn.Conv2d):
    """Weight Standardization written with plain autograd ops, as the paper states it: the reference for WSConv2d."""

    eps: float = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)
        return self._conv_forward(x, (weight - mean) / torch.sqrt(var + self.eps), self.bias)


class _EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that stays in eval mode: FrozenBatchNorm2d's definition, computed by PyTorch's own layer."""

    def train(self, mode: bool = True) -> "_EvalBatchNorm2d":
        return super().train(False)


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 1),
    )
    return randomized_statistics(net)


def _pytorch_twin(model: nn.Sequential) -> nn.Sequential:
    """``model`` with every gnlightning layer replaced by PyTorch's own equivalent, holding the same values, under
    the same names (so parameters and gradients pair up by name)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_children()):
        if isinstance(module, WSConv2d):
            new = _StandardizedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                      module.padding, module.dilation, module.groups, module.bias is not None,
                                      module.padding_mode, device=module.weight.device)
            new.eps = module.eps
        elif isinstance(module, FrozenBatchNorm2d):
            new = _EvalBatchNorm2d(module.num_features, eps=module.eps, device=module.weight.device)
        elif isinstance(module, SyncBatchNorm):
            new = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, device=module.weight.device)
        elif isinstance(module, nn.GroupNorm):
            new = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine,
                               device=module.weight.device)
        else:
            continue
        new.load_state_dict(module.state_dict())
        if isinstance(new, _EvalBatchNorm2d):
            new.requires_grad_(False)  # frozen: buffers in FrozenBatchNorm2d
        setattr(twin, name, new.train(module.training))
    return twin


def _step(model: nn.Sequential, x: torch.Tensor, grad: torch.Tensor, autocast: torch.dtype | None) -> dict[str, Any]:
    """One forward + backward; the output, the gradients and each child's output dtype and layout."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    layers: dict[str, tuple[torch.dtype, bool]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            layers[name] = (out.dtype, out.is_contiguous(memory_format=torch.channels_last))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_children()]
    try:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
        (out.float() * grad).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {"out": out.detach(), "grad_input": x.grad,
            "grads": {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad},
            "layers": layers}


def _net_and_twin(norm: str, layout: str) -> tuple[nn.Sequential, nn.Sequential, torch.Tensor, torch.Tensor]:
    model = convert_norms(_small_net(), norm, num_groups=4).to(DEVICE).train()
    twin = _pytorch_twin(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=generator).to(DEVICE)
    grad = torch.randn(4, 8, 8, 8, generator=generator).to(DEVICE)
    if layout == "channels_last":
        model, twin = model.to(memory_format=torch.channels_last), twin.to(memory_format=torch.channels_last)
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    return model, twin, x, grad


def _compared(step: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one step that are compared, by what they are."""
    return {"output": step["out"], "input gradient": step["grad_input"],
            **{f"gradient of {name}": grad for name, grad in step["grads"].items()}}


def _tolerances(reference: dict[str, Any], peer: dict[str, Any] | None, precision: str) -> dict[str, float]:
    """Per compared tensor: FLOAT32_TOLERANCE in float32; under autocast, calibrated by ``peer`` (PyTorch's layers
    under the same autocast) against the float32 ``reference`` (see AUTOCAST_FACTOR)."""
    expected = _compared(reference)
    if precision == "fp32" or peer is None:
        return {key: FLOAT32_TOLERANCE for key in expected}
    peer_tensors = _compared(peer)
    return {key: min(AUTOCAST_CEILING[precision],
                     AUTOCAST_FACTOR * _relative_error(peer_tensors[key], value) + AUTOCAST_FLOOR[precision])
            for key, value in expected.items() if key in peer_tensors}


def _compare_steps(ours: dict[str, Any], reference: dict[str, Any], tolerances: dict[str, float], what: str) -> None:
    actual, expected = _compared(ours), _compared(reference)
    assert actual.keys() <= expected.keys(), f"{what}: compared {sorted(actual)}, reference has {sorted(expected)}"
    for key, value in actual.items():
        _assert_finite(value, f"{what}: {key}")
        _assert_near(value, expected[key], tolerances[key], f"{what}: {key}")
    for name, grad in ours["grads"].items():
        assert grad.dtype == torch.float32, f"{what}: gradient of {name} is {grad.dtype}; master weights are float32"


def _compare_layers(ours: dict[str, Any], theirs: dict[str, Any], what: str) -> None:
    """Per layer, the output dtype and layout PyTorch's own layers give under the same autocast and layout."""
    mismatches = [f"layer {name}: {ours['layers'][name]} vs PyTorch's {theirs['layers'][name]}"
                  for name in theirs["layers"] if ours["layers"].get(name) != theirs["layers"][name]]
    assert not mismatches, f"{what}: (output dtype, channels_last) differ: " + "; ".join(mismatches)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", NORMS)
def test_converted_net_in_float32_matches_pytorch_layers(norm: str, layout: str) -> None:
    model, twin, x, grad = _net_and_twin(norm, layout)
    ours, reference = _step(model, x, grad, None), _step(twin, x, grad, None)
    what = f"convert_norms(net, {norm!r}), float32, {layout}"
    _compare_steps(ours, reference, _tolerances(reference, None, "fp32"), what)
    _compare_layers(ours, reference, what)
    if norm == "syncbn":  # one process: nn.BatchNorm's statistics, updated alike
        for name, buffer in model.named_buffers():
            assert_close(buffer, dict(twin.named_buffers())[name], rtol=1e-5, atol=1e-6,
                         msg=lambda message: f"{what}: buffer {name}: {message}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", list(AUTOCAST_DTYPES))
@pytest.mark.parametrize("norm", NORMS)
def test_converted_net_under_autocast_matches_float32_reference(norm: str, precision: str, layout: str) -> None:
    if precision == "bf16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    dtype = AUTOCAST_DTYPES[precision]
    model, twin, x, grad = _net_and_twin(norm, layout)
    reference = _step(twin, x, grad, None)
    reference_autocast = _step(twin, x, grad, dtype)
    ours = _step(model, x, grad, dtype)
    what = f"convert_norms(net, {norm!r}) under {precision} autocast, {layout}"
    assert ours["out"].dtype == reference_autocast["out"].dtype, (
        f"{what}: output dtype {ours['out'].dtype}, PyTorch's layers give {reference_autocast['out'].dtype}")
    _compare_layers(ours, reference_autocast, what)
    _compare_steps(ours, reference, _tolerances(reference, reference_autocast, precision),
                   what + " vs float32 PyTorch layers")
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, f"{what}: parameter {name} became {parameter.dtype}"


# -------------------------------------------------------------------------------------------------- WSConv2d

WS_CONFIGS = [
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1, "bias": False},
    {"in_channels": 16, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1, "groups": 4, "bias": True},
    {"in_channels": 8, "out_channels": 32, "kernel_size": 1, "bias": False},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 2, "dilation": 2, "bias": True},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", ["fp32", *AUTOCAST_DTYPES])
def test_wsconv2d_training_and_eval_match_standardized_conv(precision: str, layout: str) -> None:
    if precision == "bf16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    dtype = AUTOCAST_DTYPES.get(precision)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for config in WS_CONFIGS:
        what = f"WSConv2d({config}), {precision}, {layout}"
        torch.manual_seed(0)
        model = nn.Sequential(WSConv2d(**config)).to(DEVICE).to(memory_format=memory_format)
        with torch.no_grad():  # kaiming init leaves filters near zero mean: move them off it
            model[0].weight.add_(torch.rand_like(model[0].weight) * 0.1)
        twin = _pytorch_twin(model).to(memory_format=memory_format)
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(2, config["in_channels"], 12, 12, generator=generator).to(DEVICE)
        x = x.contiguous(memory_format=memory_format)
        out_shape = twin(x).shape
        grad = torch.randn(out_shape, generator=generator).to(DEVICE).contiguous(memory_format=memory_format)

        ours, reference, peer = _step(model, x, grad, dtype), _step(twin, x, grad, None), _step(twin, x, grad, dtype)
        _compare_layers(ours, peer, what + ", training")
        tolerances = _tolerances(reference, peer, precision)
        _compare_steps(ours, reference, tolerances, what + ", training")

        # Eval without gradients: the cached standardized weight, then the folded plain convolution.
        model.eval()
        twin.eval()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            cached, again, expected_autocast = model(x), model(x), twin(x)
        with torch.no_grad():
            expected, folded = twin(x), model[0].to_conv2d()(x)
        assert cached.dtype == expected_autocast.dtype, f"{what}, eval: dtype {cached.dtype}"
        assert cached.is_contiguous(memory_format=torch.channels_last) == expected_autocast.is_contiguous(
            memory_format=torch.channels_last), f"{what}, eval: layout differs from nn.Conv2d's"
        assert torch.equal(cached, again), f"{what}, eval: the cached weight changed the output between calls"
        _assert_finite(cached, f"{what}, eval output")
        _assert_near(cached, expected, tolerances["output"], f"{what}, eval output (cached standardized weight)")
        _assert_near(folded, expected, FLOAT32_TOLERANCE, f"{what}, to_conv2d() output")


# ------------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozen_bn", "gn_ws"])
def test_prepare_for_export_of_cuda_model_matches_eval_outputs(norm: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3)
    model = convert_norms(randomized_statistics(model), norm).to(DEVICE).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    exported = prepare_for_export(model)
    devices = {tensor.device.type for tensor in [*exported.parameters(), *exported.buffers()]}
    assert devices == {torch.device(DEVICE).type}, f"exported model's tensors live on {devices}"
    assert not any(isinstance(module, (SyncBatchNorm, WSConv2d)) for module in exported.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        expected, got = model(x)["out"], exported(x)["out"]
    what = f"prepare_for_export(convert_norms(lraspp_mobilenet_v3_large, {norm!r})) on {DEVICE}"
    _assert_finite(got, what)
    # Folding changes the rounding of each convolution, not its value.
    _assert_near(got, expected, 1e-5, what + " vs the eval model")
    assert_close(got, expected, rtol=1e-3, atol=1e-4, msg=lambda message: f"{what} vs the eval model: {message}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"prepare_for_export modified the original model's {key}"


# ------------------------------------------------------------------------------------------------------ SyncBN

CHANNELS = 3
SPATIAL = (5, 6)
STEPS = 2
TOLERANCE = 1e-5

# Per-rank batch sizes and options. Data depend only on the case and step, so workers and reference regenerate the
# same global batch.
SYNC_CASES: dict[str, dict[str, Any]] = {
    "uneven_3_1": {"sizes": (3, 1)},
    "even_2_2": {"sizes": (2, 2)},
    "channels_last_3_1": {"sizes": (3, 1), "channels_last": True},
    "no_affine_2_1": {"sizes": (2, 1), "affine": False},
    # |mean| / std = 500: the global variance survives only because ranks send float64 moments.
    "large_offset_3_1": {"sizes": (3, 1), "offset": 1000.0, "tolerance": 1e-4},
    "bfloat16_3_1": {"sizes": (3, 1), "dtype": torch.bfloat16, "offset": 8.0},
    # Last: a rank with nothing still joins both collectives.
    "empty_rank_2_0": {"sizes": (2, 0)},
}
# torch.nn.SyncBatchNorm is compared on float32 input: its mixed bf16 path is torch's business, not the subject here.
TORCH_PEER_CASES = [name for name, case in SYNC_CASES.items() if case.get("dtype", torch.float32) == torch.float32]
# One rank: the whole global batch.
ONE_RANK_CASES = ["even_2_2", "channels_last_3_1", "no_affine_2_1", "large_offset_3_1", "bfloat16_3_1"]


def _sync_data(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch and upstream gradient, float64 on the CPU."""
    case = SYNC_CASES[name]
    shape = (sum(case["sizes"]), CHANNELS, *SPATIAL)
    return batch_and_upstream_grad(100 * list(SYNC_CASES).index(name) + step, shape, case.get("offset", 3.0))


class _SyncPathBatchNorm(SyncBatchNorm):
    """gnlightning's synchronized training path even in a group of one rank (where the layer normally takes
    nn.BatchNorm's path), so that its collectives can run on a 1-rank NCCL group."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        track = self.track_running_stats
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None, self.momentum, self.eps, self.process_group,
        )


def _train_layer(layer: nn.Module, name: str, rank: int, world_size: int, device: str) -> dict[str, Any]:
    """STEPS training steps of ``layer`` on this rank's share of case ``name``; everything returned on the CPU."""
    case = SYNC_CASES[name]
    sizes = case["sizes"] if world_size > 1 else (sum(case["sizes"]),)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    dtype = case.get("dtype", torch.float32)
    layer = layer.to(device).train()
    if layer.affine:
        weight, bias = affine_values(CHANNELS)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    result: dict[str, Any] = {"out": [], "grad_input": [], "grad_weight": [], "grad_bias": []}
    for step in range(STEPS):
        x_global, grad_global = _sync_data(name, step)
        x = x_global[start:stop].to(device=device, dtype=dtype)
        grad = grad_global[start:stop].to(device=device, dtype=dtype)
        if case.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
            grad = grad.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        (out * grad).sum().backward()
        result["out"].append(out.detach().cpu())
        # torch's SyncBatchNorm leaves the gradients of an empty rank as None ("tensors full of zeros").
        result["grad_input"].append(torch.zeros_like(x).cpu() if x.grad is None else x.grad.detach().cpu())
        if layer.affine:
            for key, parameter in (("grad_weight", layer.weight), ("grad_bias", layer.bias)):
                grad_value = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
                result[key].append(grad_value.detach().cpu())
        if x.numel():
            # Whatever layout PyTorch's own BatchNorm gives this input is the one to keep.
            reference_layout = nn.BatchNorm2d(CHANNELS).to(device)(x.detach()).is_contiguous(
                memory_format=torch.channels_last)
            result["layout"] = (out.is_contiguous(memory_format=torch.channels_last), reference_layout)
    result.update(running_mean=layer.running_mean.detach().cpu(), running_var=layer.running_var.detach().cpu(),
                  num_batches_tracked=int(layer.num_batches_tracked), out_dtype=result["out"][0].dtype)
    return result


def _gloo_worker(rank: int, world_size: int, device: str) -> dict[str, Any]:
    """Every 2-rank case, with gnlightning's layer and then with torch's, on the GPU both processes share.

    Why gloo, for torch.nn.SyncBatchNorm too: NCCL refuses two ranks on one device, and in a 1-rank group torch's
    module skips synchronization altogether (``need_sync = world_size > 1``), so only 2 ranks run its collective
    path. gloo carries CUDA tensors for what that path needs: torch's forward picks ``dist.all_gather`` of a list
    when the backend is gloo ("The Gloo backend does not support all_gather_into_tensor"; gloo has
    AsyncAllgatherCUDAWork) and its backward an ``all_reduce`` (gloo's AsyncAllreduceCUDAHostWork stages through
    pinned host memory), which is also the one collective gnlightning's layer uses.
    """
    if device == "cuda":
        torch.cuda.set_device(0)
    counter = CollectiveCounter()
    results: dict[str, Any] = {"backend": dist.get_backend(), "gnl": {}, "torch": {}}
    for name in SYNC_CASES:
        results["gnl"][name] = _recorded(
            lambda: _train_layer(SyncBatchNorm(CHANNELS, affine=SYNC_CASES[name].get("affine", True)), name, rank,
                                 world_size, device))
    results["gnl_transports"] = dict(counter.by_transport)
    for name in TORCH_PEER_CASES:
        results["torch"][name] = _recorded(
            lambda: _train_layer(nn.SyncBatchNorm(CHANNELS, affine=SYNC_CASES[name].get("affine", True)), name, rank,
                                 world_size, device))
    return results


def _one_rank_worker(rank: int, world_size: int, backend: str, device: str) -> dict[str, Any]:
    """A 1-rank group of ``backend`` (NCCL on the GPU): the plain path, the forced synchronized path with its
    collectives issued on that group, and torch's SyncBatchNorm."""
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        calls: list[tuple[int, torch.dtype]] = []

        def all_reduce_on_group(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
            # gnlightning skips collectives in a 1-rank group; this issues them anyway, on the real backend.
            calls.append((tensor.numel(), tensor.dtype))
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            return tensor

        results: dict[str, Any] = {"backend": dist.get_backend(), "plain": {}, "sync_path": {}, "torch": {},
                                   "sync_path_calls": {}}
        for name in ONE_RANK_CASES:
            affine = SYNC_CASES[name].get("affine", True)
            results["plain"][name] = _recorded(
                lambda: _train_layer(SyncBatchNorm(CHANNELS, affine=affine), name, 0, 1, device))
            original = sync_batchnorm.all_reduce_sum
            sync_batchnorm.all_reduce_sum = all_reduce_on_group
            calls.clear()
            try:
                results["sync_path"][name] = _recorded(
                    lambda: _train_layer(_SyncPathBatchNorm(CHANNELS, affine=affine), name, 0, 1, device))
            finally:
                sync_batchnorm.all_reduce_sum = original
            results["sync_path_calls"][name] = list(calls)
            if SYNC_CASES[name].get("dtype", torch.float32) == torch.float32:
                results["torch"][name] = _recorded(
                    lambda: _train_layer(nn.SyncBatchNorm(CHANNELS, affine=affine), name, 0, 1, device))
        return results
    finally:
        dist.destroy_process_group()


def _sync_reference(name: str) -> dict[str, Any]:
    """nn.BatchNorm2d in float64 on the concatenated global batch, same steps and initial parameters."""
    case = SYNC_CASES[name]
    return batchnorm_reference([_sync_data(name, step) for step in range(STEPS)],
                               dtype=case.get("dtype", torch.float32), affine=case.get("affine", True))


def _check_against_reference(name: str, ranks: list[dict[str, Any]], what: str) -> None:
    case = SYNC_CASES[name]
    sizes = list(case["sizes"]) if len(ranks) > 1 else [sum(case["sizes"])]
    dtype = case.get("dtype", torch.float32)
    low_precision = dtype != torch.float32
    tolerance = case.get("tolerance", TOLERANCE)
    # bf16 output: only the final rounding may differ (~3 significant digits).
    out_tolerance, grad_tolerance = (2e-2, 3e-2) if low_precision else (tolerance, tolerance)
    expected = _sync_reference(name)
    for step in range(STEPS):
        for rank, (out, grad, expected_out, expected_grad) in enumerate(zip(
                [result["out"][step] for result in ranks], [result["grad_input"][step] for result in ranks],
                expected["out"][step].split(sizes), expected["grad_input"][step].split(sizes))):
            where = f"{what}, step {step}, rank {rank}"
            assert out.dtype == dtype, f"{where}: output dtype {out.dtype}, input dtype {dtype}"
            assert out.shape == expected_out.shape, f"{where}: output shape {tuple(out.shape)}"
            assert_close(out.double(), expected_out, rtol=out_tolerance, atol=out_tolerance,
                         msg=lambda message: f"{where}, output vs BatchNorm2d on the global batch: {message}")
            assert_close(grad.double(), expected_grad, rtol=grad_tolerance, atol=grad_tolerance,
                         msg=lambda message: f"{where}, input gradient vs BatchNorm2d on the global batch: {message}")
        if case.get("affine", True):
            # Local sums by design: summed over ranks (what DDP does, up to its 1/world averaging) they equal the
            # single-process gradient on the concatenated batch.
            for key in ("grad_weight", "grad_bias"):
                total = sum(result[key][step].double() for result in ranks)
                parameter_tolerance = 1e-4 if low_precision else tolerance
                assert_close(total, expected[key][step], rtol=parameter_tolerance, atol=parameter_tolerance,
                             msg=lambda message: f"{what}, step {step}, {key} summed over ranks: {message}")
    for rank, result in enumerate(ranks):
        for key in ("running_mean", "running_var"):
            assert_close(result[key].double(), expected[key], rtol=TOLERANCE, atol=TOLERANCE,
                         msg=lambda message: f"{what}, rank {rank}, {key}: {message}")
        assert result["num_batches_tracked"] == expected["num_batches_tracked"] == STEPS, (
            f"{what}, rank {rank}: num_batches_tracked {result['num_batches_tracked']}, expected {STEPS}")
        if "layout" in result:
            layout, reference_layout = result["layout"]
            assert layout == reference_layout, (
                f"{what}, rank {rank}: output channels_last={layout}, nn.BatchNorm2d on the same input gives "
                f"channels_last={reference_layout}")


def _check_equal_ranks(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], what: str) -> None:
    """Rank by rank, step by step: the same outputs, gradients (local weight/bias sums in both) and statistics."""
    for rank, (mine, peer) in enumerate(zip(ours, theirs)):
        for key in ("out", "grad_input", "grad_weight", "grad_bias"):
            for step, (value, peer_value) in enumerate(zip(mine[key], peer[key])):
                assert_close(value, peer_value, rtol=TOLERANCE, atol=TOLERANCE,
                             msg=lambda message: f"{what}, rank {rank}, step {step}, {key}: {message}")
        for key in ("running_mean", "running_var"):
            assert_close(mine[key], peer[key], rtol=TOLERANCE, atol=TOLERANCE,
                         msg=lambda message: f"{what}, rank {rank}, {key}: {message}")
        assert mine["num_batches_tracked"] == peer["num_batches_tracked"], f"{what}, rank {rank}: num_batches_tracked"
        assert mine.get("layout", (None,))[0] == peer.get("layout", (None,))[0], f"{what}, rank {rank}: output layout"


@pytest.fixture(scope="module")
def two_ranks_one_gpu() -> list[dict[str, Any]]:
    return run_distributed(_gloo_worker, 2, DEVICE, timeout=150)


@pytest.fixture(scope="module")
def one_rank_nccl() -> dict[str, Any]:
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    return run_distributed(_one_rank_worker, 1, "nccl", DEVICE, init_process_group=False, timeout=150)[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_one_gpu_use_gloo_through_torch_distributed(two_ranks_one_gpu: list[dict[str, Any]]) -> None:
    for rank, results in enumerate(two_ranks_one_gpu):
        assert results["backend"] == "gloo"
        # CUDA tensors never take the host-local CPU channel: every collective went through torch.distributed.
        assert results["gnl_transports"]["host"] == 0, f"rank {rank}: {results['gnl_transports']}"
        assert results["gnl_transports"]["torch"] > 0, f"rank {rank}: no collective ran ({results['gnl_transports']})"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SYNC_CASES))
def test_syncbn_two_ranks_on_one_gpu_matches_batchnorm_on_global_batch(
    name: str, two_ranks_one_gpu: list[dict[str, Any]]
) -> None:
    ranks = [results["gnl"][name] for results in two_ranks_one_gpu]
    _raise_worker_errors(ranks, f"gnlightning SyncBatchNorm, 2 ranks on one GPU (gloo), case {name}")
    _check_against_reference(name, ranks, f"gnlightning SyncBatchNorm, 2 ranks (gloo, CUDA), case {name}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", TORCH_PEER_CASES)
def test_syncbn_two_ranks_on_one_gpu_equals_torch_syncbatchnorm(
    name: str, two_ranks_one_gpu: list[dict[str, Any]]
) -> None:
    ours = [results["gnl"][name] for results in two_ranks_one_gpu]
    theirs = [results["torch"][name] for results in two_ranks_one_gpu]
    _raise_worker_errors(ours, f"gnlightning SyncBatchNorm, case {name}")
    _raise_worker_errors(theirs, f"torch.nn.SyncBatchNorm (the peer, not the code under test), case {name}")
    # The peer first checked against the same reference: a disagreement then is ours to explain.
    _check_against_reference(name, theirs, f"torch.nn.SyncBatchNorm, 2 ranks (gloo, CUDA), case {name}")
    _check_equal_ranks(ours, theirs, f"gnlightning vs torch.nn.SyncBatchNorm, case {name}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["plain", "sync_path"])
@pytest.mark.parametrize("name", ONE_RANK_CASES)
def test_syncbn_one_rank_nccl_matches_batchnorm(name: str, variant: str, one_rank_nccl: dict[str, Any]) -> None:
    assert one_rank_nccl["backend"] == "nccl"
    result = one_rank_nccl[variant][name]
    what = f"gnlightning SyncBatchNorm, 1-rank NCCL group, {variant} path, case {name}"
    _raise_worker_errors([result], what)
    _check_against_reference(name, [result], what)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ONE_RANK_CASES)
def test_syncbn_sync_path_issues_both_collectives_on_nccl(name: str, one_rank_nccl: dict[str, Any]) -> None:
    calls = one_rank_nccl["sync_path_calls"][name]
    # Per step: the forward moments [sum x, sum x^2, count] in float64, the backward sums [sum dy, sum dy x_hat].
    expected = [(2 * CHANNELS + 1, torch.float64), (2 * CHANNELS, torch.float32)] * STEPS
    assert calls == expected, f"case {name}: collectives (numel, dtype) {calls}, expected {expected}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [name for name in ONE_RANK_CASES if name in TORCH_PEER_CASES])
def test_syncbn_one_rank_nccl_equals_torch_syncbatchnorm(name: str, one_rank_nccl: dict[str, Any]) -> None:
    _raise_worker_errors([one_rank_nccl["torch"][name]], f"torch.nn.SyncBatchNorm (the peer), case {name}")
    for variant in ("plain", "sync_path"):
        _raise_worker_errors([one_rank_nccl[variant][name]], f"gnlightning SyncBatchNorm, {variant}, case {name}")
        _check_equal_ranks([one_rank_nccl[variant][name]], [one_rank_nccl["torch"][name]],
                           f"gnlightning ({variant} path) vs torch.nn.SyncBatchNorm, 1-rank NCCL, case {name}")


# --------------------------------------------------------------------------------------------------- gnl-train

TRAIN_OVERRIDES = [
    "trainer=gpu", "data.num_train=8", "data.num_val=4", "data.num_test=4", "data.image_size=64",
    "data.batch_size=2", "trainer.max_epochs=1", "trainer.max_steps=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "hydra.run.dir=run",
]


@pytest.mark.slow
def test_gnl_train_trainer_gpu_runs_a_few_steps(tmp_path: Path) -> None:
    result = run_gnl_train(*TRAIN_OVERRIDES, cwd=tmp_path, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"gnl-train {' '.join(TRAIN_OVERRIDES)} exited with {result.returncode}; last output:\n{output[-5000:]}")
    for line in output.splitlines():  # Lightning's device summary, where it prints one
        if line.startswith("GPU available:"):
            assert "used: True" in line, line

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # 4 optimizer steps, unless the fp16 GradScaler skipped some (Lightning may not count those)
    assert 1 <= results["settings"]["global_step"] <= 4, results["settings"]
    assert results["metrics"], f"no metrics in results.json: {results}"
    for key, value in results["metrics"].items():
        assert math.isfinite(value), f"results.json: {key} = {value}"
    assert 0.0 <= results["metrics"]["test/mIoU"] <= 1.0, results["metrics"]

    metrics_files = sorted((tmp_path / "run").rglob("metrics.csv"))
    assert metrics_files, f"no metrics.csv under {tmp_path / 'run'}"
    with metrics_files[0].open() as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) >= 1, f"no train/loss logged in {metrics_files[0]}"
    assert all(math.isfinite(loss) for loss in losses), f"train/loss: {losses}"
