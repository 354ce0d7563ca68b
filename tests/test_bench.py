"""scripts/bench.py: a smoke run of its cheap sections (nothing timed against a threshold), its memory
accounting checked against counts made by hand, and of bench_syncbn.py the checks it runs before timing (the naive
peer against gnlightning's SyncBN, collectives per transport) and how bench.py renders its targets."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
from torch import nn

from gnlightning import FrozenBatchNorm2d
from tests.helpers import REPO, run_python, script_module

SCRIPT = REPO / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench") as module:
        yield module


@pytest.mark.slow
def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    # One thread: the run stays quick on a machine busy with other tests.
    completed = run_python(SCRIPT, "--quick", "--only", "ws", "convert", "memory", "--threads", "1", "--out", tmp_path)

    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["sections"]) == {"ws", "convert", "memory"}
    assert report["machine"]["threads"] == 1 and report["machine"]["logical_cpus"] >= 1
    ratios = {(row["section"], row["case"]): row for row in report["ratios"]}
    assert {section for section, _ in ratios} == {"ws", "convert", "memory"}
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in ratios.values())
    for row in ratios.values():  # a verdict exactly where there is a target
        assert (row["passed"] is None) == (row["target"] is None)
    targets = {(section, row["target"]) for (section, _), row in ratios.items() if row["target"]}
    # A row whose interval contains its target is information that names the target (two quick rounds often do).
    targets |= {(section, case.rpartition("(target ")[2].rstrip(")")) for section, case in ratios if "undecided" in case}
    assert {("ws", "<= 1.05x"), ("ws", "<= 1.01x"), ("convert", "< 0.05x"), ("memory", "<= 1.1x"),
            ("memory", "< 1x")} <= targets
    assert report["misses"] == [row for row in report["ratios"] if row["passed"] is False]

    frozen = ratios[("memory", "frozen_bn / bn")]
    assert frozen["passed"] is True  # holds at any input size: FrozenBN keeps no conv output and has no gradients
    memory = report["sections"]["memory"]["bytes"]
    assert memory["frozen_bn"]["total"] < memory["bn"]["total"]
    assert frozen["ratio"] == pytest.approx(memory["frozen_bn"]["total"] / memory["bn"]["total"])

    markdown = (tmp_path / "bench.md").read_text()
    assert completed.stdout == markdown
    assert "| section | case | ratio | target | result |" in markdown
    assert "torch.get_num_threads()" in markdown and "Load average" in markdown


def test_linear_saves_exactly_its_input(bench) -> None:
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    memory = bench.step_memory(linear, lambda: linear(x).sum())
    # The weight gradient needs x; x needs no gradient, so the weight is not saved (and would count as a parameter).
    assert memory.saved == 4 * 16 * 4
    assert memory.parameters == memory.gradients == (16 * 8 + 8) * 4
    assert memory.buffers == 0


def test_frozen_bn_saves_less_than_bn(bench) -> None:
    x = torch.randn(2, 3, 8, 8)
    conv_output_bytes = 2 * 8 * 8 * 8 * 4

    def step(norm: nn.Module):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm)
        return bench.step_memory(model, lambda: model(x).sum())

    bn, frozen = step(nn.BatchNorm2d(8)), step(FrozenBatchNorm2d(8))
    # Both keep the conv's input (for its weight gradient); BN also keeps the conv's output (its own input), which
    # FrozenBN, a fixed affine map, does not need.
    assert bn.saved >= x.nbytes + conv_output_bytes
    assert x.nbytes <= frozen.saved < x.nbytes + conv_output_bytes
    conv_parameter_bytes = (8 * 3 * 3 * 3 + 8) * 4
    assert frozen.parameters == conv_parameter_bytes and bn.parameters == conv_parameter_bytes + 2 * 8 * 4
    assert frozen.total < bn.total


def test_median_confidence_interval_matches_the_binomial_order_statistics_table(bench) -> None:
    # bench.py imports its sibling. The textbook ranks of the 95% interval for a median (binomial order
    # statistics): n=15 -> 4th and 12th value (96.5% coverage), n=100 -> 40th and 61st (96.5%).
    median_with_ci = sys.modules["bench_syncbn"].median_with_ci
    assert median_with_ci([float(v) for v in range(1, 16)][::-1]) == (8.0, 4.0, 12.0)
    assert median_with_ci([float(v) for v in range(1, 101)]) == (50.5, 40.0, 61.0)
    # Too few values for 95% coverage between any pair of order statistics: the full range.
    assert median_with_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


# ---- syncbn: what bench_syncbn checks before timing, and how bench.py renders its results ----


def _bench_syncbn() -> ModuleType:
    """The sibling script, importable in spawned ranks too (they do not run the bench fixture)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    import bench_syncbn

    return bench_syncbn


def _check_variants_worker(rank: int, world_size: int) -> dict:
    from gnlightning import distributed as gnl_distributed

    bench_syncbn = _bench_syncbn()
    args = bench_syncbn.parse_args(["--channels", "6", "--blocks", "2", "--size", "8"])
    gnl_distributed.host_channel()  # its setup is a collective of its own, as in the benchmark
    models = bench_syncbn.build_models(6, args, gnl_distributed.new_consecutive_groups(1))
    images, labels = bench_syncbn._batch(rank, args)
    counts = bench_syncbn.check_variants(models, images, labels, norm_layers=args.blocks)
    results = {"counts": {name: (count.torch, count.host) for name, count in counts.items()}}
    # A peer that computes something else must not pass: nudge one of its norm weights.
    with torch.no_grad():
        models[bench_syncbn.NAIVE].module[1].weight[0] += 0.1
    try:
        bench_syncbn.check_variants(models, images, labels, norm_layers=args.blocks)
        results["caught"] = None
    except AssertionError as error:
        results["caught"] = str(error)
    return results


@pytest.mark.slow
@pytest.mark.distributed
def test_naive_peer_and_syncbn_transports_agree_before_timing() -> None:
    from tests._dist import run_distributed

    bench_syncbn = _bench_syncbn()
    for result in run_distributed(_check_variants_worker, 2, timeout=120):
        # Per training step of 2 norm layers, (torch.distributed, loopback) all_reduce calls: one per layer in
        # forward and one in backward, on the transport each label names.
        assert result["counts"] == {
            bench_syncbn.BASELINE: (0, 0), bench_syncbn.SYNC_GLOO: (4, 0), bench_syncbn.SYNC_LOOPBACK: (0, 4),
            bench_syncbn.NAIVE: (4, 0), bench_syncbn.ONE_RANK: (0, 0),
        }
        assert result["caught"] is not None and bench_syncbn.NAIVE in result["caught"]


def _fake_width(bench_syncbn: ModuleType, peer: tuple[float, float, float]) -> dict:
    ratio = (1.05, 1.0, 1.1)
    return {
        **{key: 10.0 for key in bench_syncbn.RESULT_KEYS.values()},
        **{key: ratio for key in bench_syncbn.RATIO_KEYS.values()},
        bench_syncbn.PEER_RATIO_KEY: peer, "latency_us": 30.0, "gloo_latency_us": 300.0, "steps": 3,
        "rounds_ms": {name: [10.0] for name in bench_syncbn.RESULT_KEYS},
    }


def test_syncbn_section_targets_and_undecided_peer_ratio(bench, monkeypatch) -> None:
    bench_syncbn = sys.modules["bench_syncbn"]
    by_width = {32: _fake_width(bench_syncbn, (0.9, 0.8, 0.95)), 64: _fake_width(bench_syncbn, (0.99, 0.95, 1.03)),
                128: _fake_width(bench_syncbn, (0.9, 0.85, 0.95)), 256: _fake_width(bench_syncbn, (1.1, 1.02, 1.2))}
    layer_ms = {bench_syncbn.LAYER_BASELINE: 1.0, bench_syncbn.LAYER_AS_USED: 1.0, bench_syncbn.LAYER_FORCED: 1.0}
    layer_ratio = {bench_syncbn.LAYER_AS_USED: (1.0, 0.99, 1.01), bench_syncbn.LAYER_FORCED: (1.02, 1.0, 1.04)}
    layers = {"shapes": [{"shape": "2x8x4x4", "layers": 2, "calls": 1, "ms": layer_ms, "ratio": layer_ratio}],
              "total": {"ms": layer_ms, "ratio": layer_ratio, "layers": 2}}
    monkeypatch.setattr(bench_syncbn, "measure", lambda args: by_width)
    monkeypatch.setattr(bench_syncbn, "measure_layers", lambda args: layers)

    section = bench.bench_syncbn_section(bench.parse_args(["--syncbn-widths", "32", "64", "128", "256"]))

    peers = {ratio.case.split(":")[0]: ratio for ratio in section.ratios if "naive" in ratio.case}
    assert peers["width 32"].target is None  # narrower than a ResNet stage: information only
    assert peers["width 64"].target is None and "undecided" in peers["width 64"].case  # CI contains 1.0
    assert peers["width 128"].passed is True and peers["width 256"].passed is False
    targets = {str(ratio.target) for ratio in section.ratios if ratio.target is not None}
    assert targets == {"<= 1.15x", "<= 1x", "<= 1.05x"}
    assert sum(ratio.target is not None and "/ BN training step" in ratio.case for ratio in section.ratios) == 6
    header = next(index for index, line in enumerate(section.details) if line.startswith("| width | BN (ms)"))
    assert "| SyncBN gloo (ms) | SyncBN loopback (ms) | naive gloo (ms) |" in section.details[header]
    rows = section.details[header + 2 : header + 6]  # one row per width, after the rule
    assert [row.split("|")[1].strip() for row in rows] == ["32", "64", "128", "256"]
    assert all(row.count("|") == section.details[header].count("|") for row in rows)


def test_interval_rows_are_judged_only_when_the_interval_is_on_one_side(bench) -> None:
    section = bench.Section("ws")
    section.add_interval("below", (0.98, 0.95, 0.99), 1.0, rounds=6)
    section.add_interval("above", (1.05, 1.02, 1.08), 1.0, rounds=6)
    section.add_interval("straddles", (1.00, 0.97, 1.03), 1.0, rounds=3)
    section.add_interval("info", (1.20, 1.10, 1.30), None, rounds=6)
    below, above, straddles, info = section.ratios
    assert (below.passed, above.passed) == (True, False)
    assert below.case == "below (95% CI 0.950-0.990)"
    assert straddles.target is None and straddles.case.startswith("straddles (range of 3 rounds 0.970-1.030): undecided")
    assert info.target is None and info.ratio == 1.20
