"""bf16 mixed precision with every norm: Lightning's "bf16-mixed" (CPU autocast) trains each converted model like
float32 does, WSConv2d standardizes in float32, SyncBatchNorm keeps float32 statistics under autocast.

(tests/test_sync_batchnorm.py already checks SyncBatchNorm on bf16 *tensors*; the distributed test here checks the
path Lightning actually takes: float32 parameters, a conv whose bf16 output autocast hands to the norm layer.)
"""

from __future__ import annotations

from typing import Any

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning import SyncBatchNorm, WSConv2d, convert_norms
from gnlightning.layers import sync_batchnorm
from gnlightning.layers.ws_conv import standardize_weight
from tests._dist import run_distributed

pytestmark = pytest.mark.usefixtures("quiet_lightning")

NORMS = ["bn", "syncbn", "frozen_bn", "gn", "gn_ws", "ln", "in"]
STEPS = 20


def _dataset() -> TensorDataset:
    """Which quadrant holds a patch (channel 0 up, channel 1 down: visible to WS's zero-mean filters too)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(STEPS * 8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (STEPS * 8,), generator=generator)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 2)
        image[0, 8 * row + 2:8 * row + 6, 8 * col + 2:8 * col + 6] += 0.8
        image[1, 8 * row + 2:8 * row + 6, 8 * col + 2:8 * col + 6] -= 0.8
    return TensorDataset(images, labels)


@functools.cache
def _quadrant_net_class() -> type:
    """The LightningModule, built on first use: importing Lightning in this module would make every spawned rank
    of the distributed test below import it too (seconds each on a loaded 2-core machine)."""
    import lightning.pytorch as L

    class _QuadrantNet(L.LightningModule):
        def __init__(self, norm: str) -> None:
            super().__init__()
            torch.manual_seed(0)
            net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4),
            )
            self.net = convert_norms(net, norm, num_groups=4)
            self.losses: list[float] = []
            self.norm_input_dtypes: set[torch.dtype] = set()
            for index in (1, 4):
                self.net[index].register_forward_pre_hook(lambda _, args: self.norm_input_dtypes.add(args[0].dtype))

        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = F.cross_entropy(self.net(images), labels)
            self.losses.append(loss.detach().float().item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            return DataLoader(_dataset(), batch_size=8, shuffle=False)

    return _QuadrantNet


def _fit(norm: str, precision: str):
    import lightning.pytorch as L

    model = _quadrant_net_class()(norm)
    L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=STEPS, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_bf16_mixed_trains_like_float32(norm):
    """20 AdamW steps on the same data and seed, "bf16-mixed" against "32-true".

    Tolerances: the mean of the last 5 losses agrees within 8% (relative) and the first loss (same weights, same
    batch: only bf16 rounding differs) within 0.2%. Measured on torch 2.14.1 / Lightning 2.6.6 CPU, final: bn and
    syncbn 0.22%, frozen_bn 0.83%, gn 1.49%, gn_ws 0.90%, ln 3.22%, in 0.65%; first: at most 0.033%. Training
    takes the mean loss from ~1.45 to 0.52-0.91 (0.36-0.63 of the first loss), and both runs must get below 0.75
    of it, so a run that merely stays finite, or learns nothing in both precisions, fails. Syncbn runs on one
    process here (plain BatchNorm arithmetic inside gnlightning.SyncBatchNorm).
    """
    mixed, full = _fit(norm, "bf16-mixed"), _fit(norm, "32-true")
    assert mixed.norm_input_dtypes == {torch.bfloat16}, "autocast must be on: the convs feed bf16 to the norms"
    assert full.norm_input_dtypes == {torch.float32}
    for model in (mixed, full):
        assert len(model.losses) == STEPS
        assert all(torch.isfinite(torch.tensor(model.losses))), model.losses
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            assert tensor.dtype in (torch.float32, torch.int64), name  # master weights / statistics stay float32
            assert torch.isfinite(tensor.float()).all(), name
        assert sum(model.losses[-5:]) / 5 < 0.75 * model.losses[0], model.losses
    final_mixed, final_full = sum(mixed.losses[-5:]) / 5, sum(full.losses[-5:]) / 5
    assert abs(final_mixed - final_full) <= 0.08 * final_full, (mixed.losses, full.losses)
    assert mixed.losses[0] == pytest.approx(full.losses[0], rel=0.002)  # same model, same batch: bf16 rounding only


def test_ws_standardizes_in_float32_under_autocast():
    """Filters with |mean| >> std, as WS meets them after training: in bf16 (8 significant bits) the deviations from
    the mean would be mostly rounding, so standardizing after the autocast cast would be badly wrong."""
    torch.manual_seed(0)
    layer = WSConv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(0.01).add_(1.0)
    x = torch.randn(2, 8, 6, 6)
    expected_weight = standardize_weight(layer.weight.double(), layer.eps)
    reference = F.conv2d(x.double(), expected_weight, layer.bias.double(), padding=1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.standardized_weight()
        out = layer(x)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, standardize_weight(layer.weight, layer.eps))  # bit for bit the float32 result
    assert out.dtype == torch.bfloat16
    # The conv itself runs in bf16 on the float32-standardized weight, cast once.
    assert torch.equal(out, F.conv2d(x.bfloat16(), weight.bfloat16(), layer.bias.bfloat16(), padding=1))
    torch.testing.assert_close(out.double(), reference, rtol=0.02, atol=0.1)
    naive = F.conv2d(x.bfloat16(), standardize_weight(layer.weight.bfloat16(), layer.eps), layer.bias.bfloat16(),
                     padding=1)
    assert (naive.double() - reference).abs().max() > 10 * (out.double() - reference).abs().max()

    out.float().sum().backward()  # gradients reach the float32 weight
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()

    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eval_out = layer(x)
    assert layer._cached_weight is not None and layer._cached_weight.dtype == torch.float32
    assert torch.equal(layer._cached_weight, weight)
    assert torch.equal(eval_out, out.detach())


# ---- SyncBatchNorm under autocast, 2 processes ----

CHANNELS = 4


def _syncbn_autocast_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Conv (bf16 under autocast) -> SyncBatchNorm, 2 training steps; records what the layer computed in."""
    stat_dtypes, reduce_dtypes = [], []
    local_mean_var = sync_batchnorm._local_mean_var
    all_reduce_sum = sync_batchnorm.all_reduce_sum

    def spy_local_mean_var(x):
        stat_dtypes.append(x.dtype)
        return local_mean_var(x)

    def spy_all_reduce(tensor, *args, **kwargs):
        reduce_dtypes.append(tensor.dtype)
        return all_reduce_sum(tensor, *args, **kwargs)

    sync_batchnorm._local_mean_var = spy_local_mean_var
    sync_batchnorm.all_reduce_sum = spy_all_reduce
    torch.manual_seed(0)  # same conv on both ranks, as DDP would have it
    conv, norm = nn.Conv2d(3, CHANNELS, 3, padding=1), SyncBatchNorm(CHANNELS)
    record: dict[str, Any] = {"norm_inputs": [], "outputs": []}
    for step in range(2):
        generator = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(2 + rank, 3, 5, 5, generator=generator) * 2 + 5  # uneven ranks, offset activations
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = conv(x)
            out = norm(hidden)
        out.float().square().sum().backward()
        record["norm_inputs"].append(hidden.detach())
        record["outputs"].append(out.detach())
    record.update(
        stat_dtypes=stat_dtypes, reduce_dtypes=reduce_dtypes, running_mean=norm.running_mean.clone(),
        running_var=norm.running_var.clone(), weight_grad=norm.weight.grad.clone(),
    )
    return record


@pytest.mark.slow
@pytest.mark.distributed
def test_syncbn_statistics_stay_float32_under_autocast():
    ranks = run_distributed(_syncbn_autocast_worker, 2, timeout=120)
    reference = nn.BatchNorm2d(CHANNELS).double()  # float64 BN on the global batch of bf16 activations
    for step in range(2):
        global_input = torch.cat([rank["norm_inputs"][step] for rank in ranks])
        assert global_input.dtype == torch.bfloat16
        expected = reference(global_input.double())
        got = torch.cat([rank["outputs"][step] for rank in ranks])
        assert got.dtype == torch.bfloat16  # like nn.BatchNorm2d under autocast
        torch.testing.assert_close(got.double(), expected.detach(), rtol=0.01, atol=0.02)  # bf16 output rounding
    for rank in ranks:
        # Local moments from float32 input, summed over ranks in float64 -- never bf16.
        assert set(rank["stat_dtypes"]) == {torch.float32} and len(rank["stat_dtypes"]) == 2
        assert torch.float64 in rank["reduce_dtypes"] and torch.bfloat16 not in rank["reduce_dtypes"]
        assert rank["running_mean"].dtype == rank["running_var"].dtype == torch.float32
        assert rank["weight_grad"].dtype == torch.float32
        # Float32 statistics of the bf16 activations: as exact as float32 allows (bf16 ones would be ~1e-2 off).
        torch.testing.assert_close(rank["running_mean"].double(), reference.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["running_var"].double(), reference.running_var, rtol=1e-5, atol=1e-5)
