"""scripts/bench.py: a smoke run of its cheap sections (nothing timed against a threshold), and its memory
accounting checked against counts made by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
from torch import nn

from gnlightning import FrozenBatchNorm2d

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    # One thread: the run stays quick on a machine busy with other tests.
    command = [sys.executable, str(SCRIPT), "--quick", "--only", "ws", "convert", "memory", "--threads", "1",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)

    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["sections"]) == {"ws", "convert", "memory"}
    assert report["machine"]["threads"] == 1 and report["machine"]["logical_cpus"] >= 1
    ratios = {(row["section"], row["case"]): row for row in report["ratios"]}
    assert {section for section, _ in ratios} == {"ws", "convert", "memory"}
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in ratios.values())
    for row in ratios.values():  # a verdict exactly where there is a target
        assert (row["passed"] is None) == (row["target"] is None)
    targets = {(section, row["target"]) for (section, _), row in ratios.items() if row["target"]}
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
