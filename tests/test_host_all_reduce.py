"""The host-local loopback all_reduce: exact sums, identical on every rank, and the cases where it must step aside.

References: the sum computed here in float64 (or exactly, for integers) from the values every rank contributed, and
torch.distributed (gloo) for the transport choice.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import gnlightning.host_all_reduce as host_all_reduce_module
from gnlightning.distributed import HOST_CHANNEL_ENV, all_reduce_sum, host_channel
from gnlightning.host_all_reduce import MAX_BYTES, HostAllReduce
from tests._dist import CollectiveCounter, free_port, run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(autouse=True)
def _channel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel is opt-in: every test here runs with the switch on (spawned ranks inherit the environment)."""
    monkeypatch.setenv(HOST_CHANNEL_ENV, "1")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.int64]


def _contribution(rank: int, dtype: torch.dtype, numel: int = 37) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    values = torch.randn(numel, generator=generator, dtype=torch.float64) * 10 ** (rank + 1)
    return values.round() if not dtype.is_floating_point else values


def _sums_worker(rank: int, world_size: int, second_port: int) -> dict[str, Any]:
    counter = CollectiveCounter()
    results: dict[str, Any] = {}
    for dtype in DTYPES:
        tensor = _contribution(rank, dtype).to(dtype)
        results[str(dtype)] = all_reduce_sum(tensor)
    # In place on a non-contiguous view, and on a 0-dim tensor.
    matrix = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
    all_reduce_sum(matrix.t())
    results["non_contiguous"] = matrix
    results["scalar"] = all_reduce_sum(torch.tensor(float(rank + 1)))
    results["after_values"] = dict(counter.by_transport)
    # The size limit is inclusive; one element more goes to torch.distributed.
    all_reduce_sum(torch.ones(MAX_BYTES // 8, dtype=torch.float64))
    results["at_limit"] = dict(counter.by_transport)
    big = all_reduce_sum(torch.ones(MAX_BYTES // 8 + 1, dtype=torch.float64))
    results["over_limit"] = dict(counter.by_transport)
    results["big_sum"] = float(big[0])
    results["cached"] = host_channel() is host_channel(dist.group.WORLD)

    # A destroyed and re-initialized default group (tests, scripts running several trainings) gets a new channel,
    # and the old one's connections are closed.
    first = host_channel()
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(second_port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    second = host_channel()
    results["reinit"] = {
        "new_channel": second is not None and second is not first,
        "first_closed": not first._connections,
        "sum": all_reduce_sum(torch.tensor([rank + 1.0])).item(),
    }
    return results


def test_sums_are_exact_identical_on_every_rank_and_in_place() -> None:
    ranks = run_distributed(_sums_worker, 3, free_port(), timeout=120)
    for dtype in DTYPES:
        contributions = [_contribution(rank, dtype).to(dtype) for rank in range(3)]
        # The channel adds in rank order in the tensor's own dtype: bit for bit this sum.
        expected = contributions[0] + contributions[1] + contributions[2]
        for result in ranks:
            assert result[str(dtype)].dtype == dtype
            assert torch.equal(result[str(dtype)], expected), dtype
        # ...and that is the true sum up to the dtype's rounding.
        exact = sum(contribution.double() for contribution in contributions)
        tolerance = {torch.bfloat16: 1e-2, torch.float32: 1e-6}.get(dtype, 1e-12)
        torch.testing.assert_close(expected.double(), exact, rtol=tolerance, atol=0)
    for result in ranks:
        assert torch.equal(result["non_contiguous"], torch.arange(12.0).reshape(3, 4) * 6)
        assert result["scalar"].item() == 6.0
        assert result["after_values"] == {"host": len(DTYPES) + 2, "torch": 0}
        assert result["at_limit"] == {"host": len(DTYPES) + 3, "torch": 0}
        assert result["over_limit"] == {"host": len(DTYPES) + 3, "torch": 1}
        assert result["big_sum"] == 3.0
        assert result["cached"]
        assert result["reinit"] == {"new_channel": True, "first_closed": True, "sum": 6.0}


def _connect_fails_worker(rank: int, world_size: int) -> dict[str, Any]:
    if rank == 1:  # this rank cannot reach its peer: setup must give up on every rank, not just here

        def refuse(*args: Any) -> None:
            raise ConnectionRefusedError("injected")

        HostAllReduce._connect_mesh = staticmethod(refuse)  # type: ignore[method-assign]
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(host_all_reduce_module.__name__).addHandler(handler)
    counter = CollectiveCounter()
    channel = host_channel()
    total = all_reduce_sum(torch.full((5,), rank + 1.0))
    return {"channel": channel, "total": total, "counts": counter.by_transport, "warnings": warnings}


def test_falls_back_to_torch_distributed_on_every_rank_if_one_cannot_connect() -> None:
    """(Ranks on different machines fall back too: test_sync_batchnorm runs every case that way.)"""
    for result in run_distributed(_connect_fails_worker, 2, timeout=120):
        assert result["channel"] is None
        assert torch.equal(result["total"], torch.full((5,), 3.0))
        assert result["counts"] == {"host": 0, "torch": 1}
        # Every rank says which rank failed and why.
        assert any("rank 1: ConnectionRefusedError: injected" in warning and "using torch.distributed" in warning
                   for warning in result["warnings"])


def _peer_gone_worker(rank: int, world_size: int) -> dict[str, Any]:
    channel = host_channel()
    assert channel is not None
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1))
    short_channel = host_channel(short)
    assert short_channel is not None
    if rank == 1:
        time.sleep(2.5)  # rank 0 waits on the short-timeout group meanwhile
        channel.close()  # what the kernel does to the sockets of a rank that dies
        return {}
    result: dict[str, Any] = {}
    start = time.monotonic()
    with pytest.raises(TimeoutError) as timeout:
        all_reduce_sum(torch.ones(3), short)
    result["timeout_s"] = time.monotonic() - start
    result["timeout_message"] = str(timeout.value)
    with pytest.raises(ConnectionError) as gone:
        all_reduce_sum(torch.ones(3))
    result["gone_message"] = str(gone.value)
    with pytest.raises(RuntimeError) as broken:
        all_reduce_sum(torch.ones(3), short)
    result["broken_message"] = str(broken.value)
    return result


def test_a_hung_peer_times_out_with_the_group_and_a_dead_one_fails_at_once() -> None:
    result = run_distributed(_peer_gone_worker, 2, timeout=60)[0]
    # The short group's 1 s timeout, not the world's 60 s.
    assert 0.8 < result["timeout_s"] < 2.4, result["timeout_s"]
    assert "timeout (1 s)" in result["timeout_message"]
    assert "rank 1 closed its connection" in result["gone_message"]
    assert "out of step" in result["broken_message"]


def _switch_worker(rank: int, world_size: int) -> dict[str, Any]:
    counter = CollectiveCounter()
    os.environ[HOST_CHANNEL_ENV] = "0"
    off = all_reduce_sum(torch.ones(3)).clone(), dict(counter.by_transport)
    os.environ[HOST_CHANNEL_ENV] = "1"
    host_all_reduce_module._host_id = lambda: f"machine-{rank}"  # ranks that look like two machines
    declined = all_reduce_sum(torch.ones(3)).clone(), dict(counter.by_transport), host_channel()
    return {"off": off, "declined": declined}


def test_off_unless_switched_on_and_declines_across_machines() -> None:
    for result in run_distributed(_switch_worker, 2, timeout=120):
        total, counts = result["off"]
        assert torch.equal(total, torch.full((3,), 2.0)) and counts == {"host": 0, "torch": 1}
        total, counts, channel = result["declined"]
        assert torch.equal(total, torch.full((3,), 2.0)) and counts == {"host": 0, "torch": 2} and channel is None
