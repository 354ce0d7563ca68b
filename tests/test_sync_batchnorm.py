"""gnlightning SyncBatchNorm against an independent reference: nn.BatchNorm on the concatenated global batch.

Distributed checks run real gloo process groups on CPU (see tests/_dist.py). Spawning costs seconds, so one 2-process
run computes every 2-rank case and the parametrized tests below only compare its results with the reference, which
is computed here, in the test process, in float64.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from gnlightning.distributed import HOST_CHANNEL_ENV, group_world_size, new_consecutive_groups
from gnlightning.layers import sync_batchnorm
from gnlightning.layers.sync_batchnorm import SyncBatchNorm
from tests._dist import CollectiveCounter, run_distributed
from tests.helpers import affine_values, batch_and_upstream_grad, batchnorm_reference

CHANNELS = 3
STEPS = 2
ATOL = RTOL = 1e-5

# Each case: per-rank batch sizes, the trailing (spatial) shape, and options. Data depend only on the case index
# and step, so workers and the reference regenerate identical global batches.
CASES: list[dict[str, Any]] = [
    {"name": "uneven_3_1", "sizes": [3, 1], "spatial": (4, 5)},
    {"name": "even_2_2", "sizes": [2, 2], "spatial": (4, 5)},
    {"name": "empty_rank_2_0", "sizes": [2, 0], "spatial": (4, 5)},
    {"name": "momentum_none", "sizes": [3, 1], "spatial": (4, 5), "momentum": None},
    # |mean| / std = 500: a naive float32 E[x^2] - E[x]^2 over the global batch would lose the variance entirely,
    # while running statistics must stay at the usual tolerance. Outputs and gradients get 1e-4: float32 resolves
    # values near 1000 to 6e-5, and single-process float32 nn.BatchNorm2d is off from float64 by as much (4e-5).
    {"name": "large_offset", "sizes": [3, 1], "spatial": (4, 5), "offset": 1000.0, "tolerance": 1e-4},
    # Planes of 64x64: CPU statistics take the two-pass summation path (see _local_mean_var) on both ranks.
    {"name": "large_planes", "sizes": [2, 1], "spatial": (64, 64), "offset": 1000.0, "tolerance": 1e-4},
    {"name": "input_2d", "sizes": [4, 3], "spatial": ()},
    {"name": "input_3d", "sizes": [1, 2], "spatial": (6,)},
    {"name": "input_5d", "sizes": [2, 1], "spatial": (2, 3, 4)},
    {"name": "channels_last", "sizes": [3, 1], "spatial": (4, 5), "channels_last": True},
    {"name": "bfloat16", "sizes": [3, 1], "spatial": (4, 5), "dtype": torch.bfloat16, "offset": 8.0},
    {"name": "no_affine", "sizes": [2, 1], "spatial": (3, 3), "affine": False},
    {"name": "input_without_grad", "sizes": [2, 1], "spatial": (3, 3), "input_grad": False},
    {"name": "all_ranks_empty", "sizes": [0, 0], "spatial": (4, 5)},
    {"name": "global_count_1", "sizes": [1, 0], "spatial": (), "error": True},
    {"name": "global_count_1_spatial", "sizes": [0, 1], "spatial": (1, 1), "error": True},
]
CASE_NAMES = [case["name"] for case in CASES]


def _data(case_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch and upstream gradient (float64) for one case and step."""
    case = CASES[case_index]
    shape = (sum(case["sizes"]), CHANNELS, *case["spatial"])
    return batch_and_upstream_grad(1000 * case_index + step, shape, case.get("offset", 3.0))


def _run_case(rank: int, case_index: int, counter: CollectiveCounter) -> dict[str, Any]:
    case = CASES[case_index]
    sizes = case["sizes"]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    dtype = case.get("dtype", torch.float32)
    layer = SyncBatchNorm(CHANNELS, momentum=case.get("momentum", 0.1), affine=case.get("affine", True))
    if layer.affine:
        weight, bias = affine_values(CHANNELS)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    result: dict[str, Any] = {"out": [], "grad_input": [], "grad_weight": [], "grad_bias": [], "calls": []}
    for step in range(STEPS):
        x_global, grad_global = _data(case_index, step)
        x = x_global[start:stop].to(dtype)
        grad = grad_global[start:stop].to(dtype)
        if case.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
            grad = grad.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(case.get("input_grad", True))
        layer.zero_grad(set_to_none=True)

        before = counter.calls
        try:
            out = layer(x)
        except ValueError as error:
            return {"error": str(error), "calls": counter.calls - before}
        forward_calls = counter.calls - before
        (out * grad).sum().backward()
        result["calls"].append((forward_calls, counter.calls - forward_calls - before))
        result["out"].append(out.detach())
        result["channels_last"] = out.is_contiguous(memory_format=torch.channels_last)
        result["grad_input"].append(None if x.grad is None else x.grad.detach())
        if layer.affine:
            result["grad_weight"].append(layer.weight.grad.detach().clone())
            result["grad_bias"].append(layer.bias.grad.detach().clone())
    result.update(
        running_mean=layer.running_mean.clone(),
        running_var=layer.running_var.clone(),
        num_batches_tracked=int(layer.num_batches_tracked),
    )
    return result


def _two_layer_calls(counter: CollectiveCounter) -> tuple[int, int]:
    """Collectives of a 2-layer stack in one forward and one backward: must be 2 and 2 (one per layer and pass)."""
    model = nn.Sequential(SyncBatchNorm(CHANNELS), nn.ReLU(), SyncBatchNorm(CHANNELS))
    x = torch.randn(2, CHANNELS, 4, 4, requires_grad=True)
    before = counter.calls
    out = model(x)
    forward_calls = counter.calls - before
    out.pow(2).sum().backward()
    return forward_calls, counter.calls - before - forward_calls


def _training_step_calls(counter: CollectiveCounter) -> list[tuple[int, int, int]]:
    """Collectives per DDP training step of a conv net with 3 SyncBN layers: (forward, backward, optimizer step).

    What a training loop pays: DDP's gradient reduction runs in its C++ reducer, not through either counted
    transport, so every counted call is SyncBN's; one per layer and pass, whatever the step.
    """
    torch.manual_seed(0)
    layers = []
    for in_channels in (3, CHANNELS, CHANNELS):
        layers += [nn.Conv2d(in_channels, CHANNELS, 3, padding=1), SyncBatchNorm(CHANNELS), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 2)]
    model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers, *head))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    for step in range(3):
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        before = counter.calls
        loss = model(x).square().mean()
        after_forward = counter.calls
        loss.backward()
        after_backward = counter.calls
        optimizer.step()
        calls.append((after_forward - before, after_backward - after_forward, counter.calls - after_backward))
    return calls


def _eval_calls_and_exactness(counter: CollectiveCounter) -> tuple[int, bool]:
    """Eval mode uses running statistics: no collective, and exactly nn.BatchNorm2d's output."""
    layer, reference = SyncBatchNorm(CHANNELS), nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        for module in (layer, reference):
            module.running_mean.fill_(0.5)
            module.running_var.fill_(2.0)
    layer.eval()
    reference.eval()
    x = torch.randn(3, CHANNELS, 4, 4, requires_grad=True)
    before = counter.calls
    out = layer(x)
    out.sum().backward()
    return counter.calls - before, torch.equal(out, reference(x))


def _two_rank_worker(rank: int, world_size: int, transport: str) -> dict[str, Any]:
    # "torch" is the default; the host-local channel is opt-in.
    os.environ[HOST_CHANNEL_ENV] = "1" if transport == "host" else "0"
    counter = CollectiveCounter()
    results: dict[str, Any] = {name: _run_case(rank, index, counter) for index, name in enumerate(CASE_NAMES)}
    results["two_layer_calls"] = _two_layer_calls(counter)
    results["training_step_calls"] = _training_step_calls(counter)
    results["eval"] = _eval_calls_and_exactness(counter)
    results["by_transport"] = counter.by_transport
    return results


@pytest.fixture(scope="module", params=["host", "torch"])
def two_rank_results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Every 2-rank case, once over gloo (the default) and once over the opt-in host-local loopback channel."""
    results = run_distributed(_two_rank_worker, 2, request.param, timeout=120)
    for rank_results in results:
        assert rank_results["by_transport"][request.param] > 0
        assert sum(rank_results["by_transport"].values()) == rank_results["by_transport"][request.param]
    return results


def _reference(case_index: int) -> dict[str, Any]:
    """nn.BatchNorm*d in float64 on the concatenated global batch, same steps and initial parameters."""
    case = CASES[case_index]
    steps = [_data(case_index, step) for step in range(STEPS)]
    return batchnorm_reference(steps, dtype=case.get("dtype", torch.float32), affine=case.get("affine", True),
                               momentum=case.get("momentum", 0.1))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [case["name"] for case in CASES if not case.get("error")])
def test_matches_single_process_batchnorm_on_global_batch(name: str, two_rank_results: list[dict[str, Any]]) -> None:
    case_index = CASE_NAMES.index(name)
    case = CASES[case_index]
    ranks = [results[name] for results in two_rank_results]
    sizes = case["sizes"]
    low_precision = case.get("dtype", torch.float32) != torch.float32
    tolerance = case.get("tolerance", ATOL)
    if sum(sizes) == 0:
        # Nothing anywhere: empty outputs, zero (not missing) parameter grads, statistics untouched.
        for rank in ranks:
            assert len(rank["out"]) == len(rank["grad_weight"]) == len(rank["grad_bias"]) == STEPS
            assert all(out.shape == (0, CHANNELS, *case["spatial"]) for out in rank["out"])
            assert all(torch.count_nonzero(g) == 0 for g in rank["grad_weight"] + rank["grad_bias"])
            assert_close(rank["running_mean"], torch.zeros(CHANNELS))
            assert_close(rank["running_var"], torch.ones(CHANNELS))
            assert rank["num_batches_tracked"] == 0
        return

    expected = _reference(case_index)
    for step in range(STEPS):
        split_out = expected["out"][step].split(sizes)
        split_grad = expected["grad_input"][step].split(sizes)
        for rank, result in enumerate(ranks):
            out = result["out"][step]
            assert out.dtype == case.get("dtype", torch.float32)
            assert out.shape == split_out[rank].shape
            if low_precision:
                # bf16 output: only the final rounding may differ (~3 significant digits).
                assert_close(out.double(), split_out[rank], rtol=2e-2, atol=2e-2)
            else:
                assert_close(out.double(), split_out[rank], rtol=tolerance, atol=tolerance)
            if not case.get("input_grad", True):
                assert result["grad_input"][step] is None
            elif low_precision:
                assert_close(result["grad_input"][step].double(), split_grad[rank], rtol=3e-2, atol=3e-2)
            else:
                assert_close(result["grad_input"][step].double(), split_grad[rank], rtol=tolerance, atol=tolerance)
        if case.get("affine", True):
            # Weight/bias grads are local sums by design: summed over ranks (what DDP does, up to its 1/world
            # averaging) they equal the single-process gradient on the concatenated batch.
            for key in ("grad_weight", "grad_bias"):
                total = sum(result[key][step].double() for result in ranks)
                grad_tolerance = 1e-4 if low_precision else tolerance
                assert_close(total, expected[key][step], rtol=grad_tolerance, atol=grad_tolerance)
            for rank, size in enumerate(sizes):
                if size == 0:
                    assert torch.count_nonzero(ranks[rank]["grad_weight"][step]) == 0
                    assert torch.count_nonzero(ranks[rank]["grad_bias"][step]) == 0

    for result in ranks:
        # Statistics come from float32 accumulation even for bf16 input: tight tolerance in every case.
        assert_close(result["running_mean"].double(), expected["running_mean"], rtol=RTOL, atol=ATOL)
        assert_close(result["running_var"].double(), expected["running_var"], rtol=RTOL, atol=ATOL)
        assert result["num_batches_tracked"] == expected["num_batches_tracked"] == STEPS
    if case.get("channels_last"):
        layouts = [result["channels_last"] for result in ranks if result["out"][0].numel()]
        assert layouts and all(layouts)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [case["name"] for case in CASES if not case.get("error")])
def test_one_collective_per_pass(name: str, two_rank_results: list[dict[str, Any]]) -> None:
    wants_input_grad = CASES[CASE_NAMES.index(name)].get("input_grad", True)
    # Without an input gradient the backward collective is skipped -- on every rank alike.
    expected = [(1, 1 if wants_input_grad else 0)] * STEPS
    for results in two_rank_results:
        assert results[name]["calls"] == expected


@pytest.mark.slow
@pytest.mark.distributed
def test_collectives_scale_with_layers_not_tensors(two_rank_results: list[dict[str, Any]]) -> None:
    for results in two_rank_results:
        assert results["two_layer_calls"] == (2, 2)


@pytest.mark.slow
@pytest.mark.distributed
def test_one_collective_per_layer_and_pass_in_ddp_training_steps(two_rank_results: list[dict[str, Any]]) -> None:
    for results in two_rank_results:
        assert results["training_step_calls"] == [(3, 3, 0)] * 3


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_mode_never_synchronizes(two_rank_results: list[dict[str, Any]]) -> None:
    for results in two_rank_results:
        assert results["eval"] == (0, True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [case["name"] for case in CASES if case.get("error")])
def test_global_count_of_one_raises_on_every_rank(name: str, two_rank_results: list[dict[str, Any]]) -> None:
    for results in two_rank_results:
        message = results[name].get("error", "")
        assert "Expected more than 1 value per channel when training" in message
        assert "norm=gn" in message
        # The forward collective still ran, so no rank is left waiting for the others.
        assert results[name]["calls"] == 1


def _four_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    with pytest.raises(ValueError) as error:
        new_consecutive_groups(3)
    checks["bad_size_message"] = str(error.value)
    pair = new_consecutive_groups(2)
    checks["cached"] = new_consecutive_groups(2) is pair
    checks["pair_size"] = group_world_size(pair)
    checks["whole_world_is_world"] = new_consecutive_groups(world_size) is dist.group.WORLD

    x_global, grad_global = _data(0, 0)
    x_global = torch.cat([x_global, x_global.flip(0) * 0.5 - 1.0])  # 8 samples, 2 per rank, pairs differ
    grad_global = torch.cat([grad_global, grad_global])
    x = x_global[2 * rank : 2 * rank + 2].float().requires_grad_()
    layer = SyncBatchNorm(CHANNELS, process_group=pair)
    (layer(x) * grad_global[2 * rank : 2 * rank + 2].float()).sum().backward()
    checks.update(running_mean=layer.running_mean, running_var=layer.running_var, grad_input=x.grad)

    # A group of one rank: no collective, plain BatchNorm -- where torch.nn.SyncBatchNorm refuses CPU tensors.
    alone = new_consecutive_groups(1)
    counter = CollectiveCounter()
    solo = SyncBatchNorm(CHANNELS, process_group=alone)
    solo_out = solo(x.detach())
    reference = nn.BatchNorm2d(CHANNELS)
    checks["solo_matches_bn"] = torch.equal(solo_out, reference(x.detach())) and torch.equal(
        solo.running_var, reference.running_var
    )
    checks["solo_calls"] = counter.calls
    try:
        nn.SyncBatchNorm(CHANNELS, process_group=alone)(x.detach())
        checks["torch_refuses_cpu"] = False
    except ValueError:
        checks["torch_refuses_cpu"] = True
    return checks


@pytest.mark.slow
@pytest.mark.distributed
def test_consecutive_groups_keep_statistics_per_group() -> None:
    results = run_distributed(_four_rank_worker, 4, timeout=120)
    x_global, grad_global = _data(0, 0)
    x_global = torch.cat([x_global, x_global.flip(0) * 0.5 - 1.0])
    grad_global = torch.cat([grad_global, grad_global])
    for result in results:
        assert "group_size=3" in result["bad_size_message"] and "world size 4" in result["bad_size_message"]
        assert "[1, 2, 4]" in result["bad_size_message"]
        assert result["cached"] and result["pair_size"] == 2 and result["whole_world_is_world"]
        assert result["solo_matches_bn"] and result["solo_calls"] == 0
        assert result["torch_refuses_cpu"]
    for first in (0, 2):
        # Ranks {0,1} and {2,3} each see exactly the statistics of their own pair's 4 samples.
        reference = nn.BatchNorm2d(CHANNELS).double()
        x = x_global[2 * first : 2 * first + 4].clone().requires_grad_()
        (reference(x) * grad_global[2 * first : 2 * first + 4]).sum().backward()
        for rank in (first, first + 1):
            assert_close(results[rank]["running_mean"].double(), reference.running_mean, rtol=RTOL, atol=ATOL)
            assert_close(results[rank]["running_var"].double(), reference.running_var, rtol=RTOL, atol=ATOL)
            local = slice(2 * (rank - first), 2 * (rank - first) + 2)
            assert_close(results[rank]["grad_input"].double(), x.grad[local], rtol=RTOL, atol=ATOL)
    assert not torch.allclose(results[0]["running_mean"], results[2]["running_mean"])


# ---- single process ----


@pytest.mark.parametrize(
    ("shape", "channels_last", "two_pass"),
    [
        ((2, 3, 64, 64), False, True),  # large contiguous planes: two summations
        ((2, 3, 64, 64), True, False),  # channels_last: the fused kernel is the fast one there
        ((2, 3, 4, 5), False, False),  # small planes: the fused kernel's lower fixed cost wins
        ((2, 64, 16, 16), False, True),  # 512 values per channel, 32K in all: two summations
        ((2, 16, 16, 16), False, False),  # 512 per channel but 8K in all: fused
        ((8192, 3), False, True),
    ],
)
def test_local_statistics_match_float64_on_either_path(shape, channels_last, two_pass, monkeypatch) -> None:
    fused_calls = []
    fused = torch.batch_norm_update_stats
    monkeypatch.setattr(torch, "batch_norm_update_stats", lambda *args: fused_calls.append(1) or fused(*args))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 2 + 1000  # |mean| / std = 500: E[x^2] - E[x]^2 would fail
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = sync_batchnorm._local_mean_var(x)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], correction=0)
    assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    assert_close(var.double(), expected_var, rtol=1e-5, atol=0)  # torch's channels_last kernel: 1.2e-6
    assert mean.dtype == var.dtype == torch.float32
    assert bool(fused_calls) != two_pass


# ---- single process: no process group, so exactly nn.BatchNorm ----


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_equals_batchnorm_exactly(momentum: float | None) -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(CHANNELS, momentum=momentum)
    nn.init.uniform_(reference.weight, 0.5, 1.5)
    nn.init.normal_(reference.bias)
    layer = SyncBatchNorm(CHANNELS, momentum=momentum)
    layer.load_state_dict(reference.state_dict())
    for step in range(3):
        x = torch.randn(4, CHANNELS, 5, 5) * 2 + 3
        grad = torch.randn_like(x)
        outputs = []
        for module in (reference, layer):
            module.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            out = module(leaf)
            (out * grad).sum().backward()
            outputs.append((out, leaf.grad, module.weight.grad, module.bias.grad))
        for expected, actual in zip(*outputs):
            assert torch.equal(expected, actual)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, layer.state_dict()[key]), key
    reference.eval()
    layer.eval()
    x = torch.randn(2, CHANNELS, 5, 5)
    assert torch.equal(reference(x), layer(x))


def test_state_dict_interchangeable_with_torch_syncbatchnorm() -> None:
    ours, theirs = SyncBatchNorm(CHANNELS), nn.SyncBatchNorm(CHANNELS)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours._source_class is None and not any("source" in key for key in ours.state_dict())
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.running_mean.normal_()
        theirs.num_batches_tracked.fill_(5)
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(value, ours.state_dict()[key]) for key, value in theirs.state_dict().items())
    with torch.no_grad():
        ours.bias.normal_()
        ours.running_var.uniform_(1, 2)
    theirs.load_state_dict(ours.state_dict())
    assert all(torch.equal(value, theirs.state_dict()[key]) for key, value in ours.state_dict().items())
    assert list(SyncBatchNorm(CHANNELS, bias=False).state_dict()) == list(
        nn.SyncBatchNorm(CHANNELS, bias=False).state_dict()
    )


def test_empty_batch_in_training_leaves_statistics_alone() -> None:
    layer = SyncBatchNorm(CHANNELS)
    x = torch.randn(0, CHANNELS, 4, 4, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert layer.num_batches_tracked == 0
    assert torch.equal(layer.running_mean, torch.zeros(CHANNELS))
    assert torch.equal(layer.running_var, torch.ones(CHANNELS))
    assert torch.count_nonzero(layer.weight.grad) == 0 and torch.count_nonzero(layer.bias.grad) == 0


def test_convert_sync_batchnorm_parity_with_torch() -> None:
    # Same entry point as torch.nn.SyncBatchNorm.convert_sync_batchnorm; the surgery itself is convert_norms'.
    model = nn.Sequential(nn.Conv2d(3, CHANNELS, 3), nn.BatchNorm2d(CHANNELS), nn.Sequential(nn.BatchNorm1d(4)))
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNorm and type(converted[2][0]) is SyncBatchNorm
    assert torch.equal(converted[1].running_mean, torch.full((CHANNELS,), 2.0))
    assert converted[1]._source_class is nn.BatchNorm2d


def test_rejects_inputs_without_channel_dimension() -> None:
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SyncBatchNorm(CHANNELS)(torch.randn(CHANNELS))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        SyncBatchNorm(CHANNELS)(torch.randn(1, CHANNELS))  # same message as nn.BatchNorm without a group


@pytest.mark.parametrize(
    ("shape", "lowered_thresholds"),
    [
        ((3, 7, 40, 40), True),  # thresholds lowered: blocks of 2, 2, 2 and 1 channels
        ((2, 65, 128, 128), False),  # as large an input as the defaults build block by block, with a partial block
    ],
)
def test_large_input_statistics_built_a_block_of_channels_at_a_time(shape, lowered_thresholds, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 2 + 1000
    if lowered_thresholds:
        monkeypatch.setattr(sync_batchnorm, "_TWO_PASS_CHUNK_ABOVE_NUMEL", x.numel() - 1)
        monkeypatch.setattr(sync_batchnorm, "_TWO_PASS_CHUNK_NUMEL", 2 * x.numel() // x.size(1))
    assert x.numel() > sync_batchnorm._TWO_PASS_CHUNK_ABOVE_NUMEL
    blocks = []  # channels of each block's sum of squared deviations
    real_sum = torch.sum
    monkeypatch.setattr(torch, "sum", lambda tensor, *args, **kwargs: blocks.append(tensor.size(1))
                        or real_sum(tensor, *args, **kwargs))
    mean, var = sync_batchnorm._local_mean_var(x)
    block = max(1, sync_batchnorm._TWO_PASS_CHUNK_NUMEL // (x.numel() // x.size(1)))
    assert blocks == [min(block, x.size(1) - start) for start in range(0, x.size(1), block)]
    expected_var, expected_mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
    assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    assert_close(var.double(), expected_var, rtol=1e-5, atol=0)
