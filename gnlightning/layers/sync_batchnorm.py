"""Synchronized BatchNorm that works on every backend, with exact statistics for empty and uneven batches.

Why this exists instead of ``torch.nn.SyncBatchNorm``:

* **CPU / gloo.** torch's layer raises ``ValueError`` for CPU tensors in training whenever a process group exists --
  even gloo with a world of one process. That makes SyncBN impossible to unit-test, debug or prototype on a laptop
  or a CPU CI runner, and forces code to special-case "converted for DDP but running on CPU". This layer runs
  wherever ``torch.distributed.all_reduce`` runs.
* **Empty and uneven per-rank batches.** With 1-4 images per device, data loaders for detection and segmentation
  routinely hand a rank fewer images than its peers (last batch, filtered samples), or none at all. Statistics here
  are weighted by each rank's element count, an empty rank still joins every collective (a rank that skipped one
  would deadlock the others) and contributes nothing, and when the *whole* group is empty the running statistics
  are left untouched instead of being pulled toward garbage.
* **Exactness, cheaply.** The forward pass needs one ``all_reduce`` of ``2C + 1`` numbers (per-channel sum and sum
  of squares, plus the count) and the backward one of ``2C`` numbers. The result equals a single-process
  ``nn.BatchNorm`` on the concatenated global batch up to rounding: same normalization, same input gradient, and
  weight/bias gradients that sum over ranks to the single-process ones (so DDP's gradient averaging treats them like
  any other parameter). Statistics are accumulated in float32 even for float16/bfloat16 activations.

Everything else -- eval mode, no process group, a group of one rank -- is plain ``nn.BatchNorm`` (no collective at
all), so a converted model behaves identically in single-process runs and exports cleanly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from gnlightning.distributed import all_reduce_sum, group_world_size
from gnlightning.layers.norm_source import NormSource, finish

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]

# Device types with a fused kernel returning per-channel (mean, biased var) in one pass over the input; elsewhere the
# generic var_mean reduction is used.
_FUSED_STATS_DEVICES = ("cpu", "cuda")
# From these many values per channel *and* in all, two plain summations beat that fused kernel on contiguous
# (N, C, *) CPU input (measured crossover, float32, one thread; see _local_mean_var).
_TWO_PASS_MIN_COUNT = 512
_TWO_PASS_MIN_NUMEL = 16384
# The two-pass path's temporary (deviations from the mean) is made a block of channels at a time, of at most this
# many elements, once the whole one would exceed _TWO_PASS_CHUNK_ABOVE_NUMEL (see _local_mean_var).
_TWO_PASS_CHUNK_NUMEL = 1 << 18
_TWO_PASS_CHUNK_ABOVE_NUMEL = 1 << 21


def _reduce_dtype(device: torch.device) -> torch.dtype:
    """dtype in which per-rank moments are summed across ranks.

    float64 turns "sum of squares minus squared sum" into a safe formula: the cancellation it suffers when
    ``|mean| >> std`` costs ~1e-16 relative instead of ~1e-7, so no shift has to be agreed on between ranks. The
    tensor holds only ``2C + 1`` numbers, so the wider type costs nothing measurable. MPS has no float64 (and no
    distributed backend that accepts its tensors today); there we fall back to float32.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` minus the dispatcher round trip when nothing changes (the common float32 case): this
    layer runs once per norm layer and step, so per-call overhead adds up next to small activations."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _local_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a non-empty ``(N, C, *)`` tensor, in ``x``'s dtype.

    Both are computed around the local mean (not as E[x^2] - E[x]^2), so they are accurate whatever the offset of
    the activations; the cross-rank combination in :func:`_SyncBatchNormFunction.forward` only has to handle the
    spread *between* ranks.

    On CPU, torch's fused statistics kernel (the one nn.BatchNorm uses) runs a per-channel Welford loop that is fast
    on channels_last input but slower than two summations on contiguous NCHW once planes are large. There the
    textbook two-pass algorithm is used instead: the mean, then the mean of squared deviations from it -- as
    accurate (~1e-7 relative against float64) at the price of a temporary. Smaller inputs keep the fused kernel,
    whose fixed cost is lower. The crossover (the constants above) was measured with scripts/bench_syncbn.py.

    On large inputs (a segmentation backbone's activations run to tens of MB) that temporary is built a block of
    channels at a time instead: one the size of the input would leave the cache between its write and its reads,
    and above the C allocator's mmap threshold every call would fault in freshly zeroed pages for it, which can
    cost more than the arithmetic; a bounded block is reused from the heap while still in cache. Same formula,
    channel by channel, so the same accuracy.
    """
    count = x.numel() // x.size(1)
    dims = [0, *range(2, x.dim())]
    if (x.device.type == "cpu" and count >= _TWO_PASS_MIN_COUNT and x.numel() >= _TWO_PASS_MIN_NUMEL
            and x.is_contiguous()):
        mean = x.sum(dims).div_(count)
        per_channel = (1, -1, *([1] * (x.dim() - 2)))
        if x.numel() <= _TWO_PASS_CHUNK_ABOVE_NUMEL:
            deviations = x - mean.view(per_channel)
            return mean, deviations.square_().sum(dims).div_(count)
        var = torch.empty_like(mean)
        block = max(1, _TWO_PASS_CHUNK_NUMEL // count)  # channels per block
        for start in range(0, x.size(1), block):
            deviations = x[:, start : start + block] - mean[start : start + block].view(per_channel)
            torch.sum(deviations.square_(), dims, out=var[start : start + block])
        return mean, var.div_(count)
    if x.device.type in _FUSED_STATS_DEVICES:
        # One pass, layout-aware (fast on channels_last).
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def _local_backward_sums(
    grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum dy`` and ``sum dy * x_hat`` of a non-empty rank, with ``x_hat`` from the global statistics.

    Both are what the weight and bias gradients are, and what the input gradient needs summed over ranks.

    CUDA: ``torch.batch_norm_backward_reduce``, the kernel torch's own SyncBatchNorm uses for the same sums (it
    returns ``sum dy`` and ``sum dy * (x - mean)``). The eval-mode ``native_batch_norm_backward`` call used on CPU
    cannot run there: its CUDA implementation asserts that ``save_mean`` / ``save_invstd`` are defined tensors
    (``TORCH_INTERNAL_ASSERT(save_mean->defined())`` in aten/src/ATen/native/cuda/Normalization.cu), and with the
    weight/bias gradients requested it allocates them with the options of ``weight``, which is undefined for
    ``affine=False``. Only the two sums are requested here, so neither applies.

    Elsewhere: eval-mode BN backward with the global statistics yields, in one fused pass, exactly the two sums:
    sum dy * x_hat (= grad_weight) and sum dy (= grad_bias). Its elementwise part would use the wrong (non-global)
    formula for the input gradient, so it is not requested.
    """
    if x.device.type == "cuda":
        invstd = torch.rsqrt(var + eps)
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(grad, x, mean, invstd, None, True, False, False)
        return sum_dy, sum_dy_xmu * invstd
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def _local_moments(input: Tensor, stat_dtype: torch.dtype, reduce_dtype: torch.dtype) -> Tensor:
    """This rank's ``[count * mean, count * (var + mean^2), count]`` (per channel; one count), so that a plain SUM
    over ranks gives the global sums. An empty rank sends zeros and so carries no weight."""
    num_channels = input.size(1)
    local_count = input.numel() // num_channels
    if local_count == 0:
        return torch.zeros(2 * num_channels + 1, dtype=reduce_dtype, device=input.device)
    mean, var = _local_mean_var(_cast(input, stat_dtype))
    moments = torch.cat([mean, var, mean.new_ones(1)]).to(reduce_dtype)
    local_mean = moments[:num_channels]
    moments[num_channels:-1].addcmul_(local_mean, local_mean)
    return moments.mul_(local_count)


def _global_count(moments: Tensor, input: Tensor, process_group: Any) -> int:
    """The reduced count: the one host sync of the layer. It decides between error, no-op and normal path,
    identically on all ranks since they hold the same reduced tensor."""
    global_count = int(moments[-1].item())
    if global_count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(input.shape)} on this rank and 1 value per channel in total over the "
            f"{group_world_size(process_group)} ranks of the process group; "
            "use a larger batch, norm=gn, or eval mode"
        )
    return global_count


def _global_mean_var(moments: Tensor, global_count: int, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the global batch from the reduced sums (in place, in the reduce dtype)."""
    num_channels = (moments.numel() - 1) // 2
    moments.div_(global_count)  # [mean, E[x^2], 1] of the global batch
    global_mean = moments[:num_channels]
    moments[num_channels:-1].addcmul_(global_mean, global_mean, value=-1).clamp_(min=0)  # E[x^2] -> variance
    stats = _cast(moments[:-1], stat_dtype)
    return stats[:num_channels], stats[num_channels:]


def _update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
                          momentum: float | None, mean: Tensor, var: Tensor, global_count: int) -> None:
    """nn.BatchNorm's update, with the global batch's statistics (its variance unbiased, as BN on that batch)."""
    factor: Tensor | float
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        # Cumulative average, as nn.BatchNorm; kept as a tensor to avoid a second host sync on GPUs.
        assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
        factor = _cast(num_batches_tracked.reciprocal(), running_mean.dtype)
    else:
        factor = momentum
    running_mean.lerp_(_cast(mean, running_mean.dtype), factor)
    running_var.lerp_(_cast(var * (global_count / (global_count - 1)), running_var.dtype), factor)


def _normalize(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    """Normalizing with given statistics is exactly eval-mode batch_norm: one fused, layout-preserving kernel that
    also accepts low-precision input with float32 statistics and parameters."""
    return F.batch_norm(input, mean, var, None if weight is None else _cast(weight, mean.dtype),
                        None if bias is None else _cast(bias, mean.dtype), training=False, momentum=0.0, eps=eps)


def _grad_input(x: Tensor, grad: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, global_sums: Tensor,
                global_count: int, eps: float) -> Tensor:
    """``scale * (dy - (sum dy + x_hat * sum dy x_hat) / n)`` with global sums and n, in ``x``'s dtype.

    The second term is an affine map of x_hat per channel, i.e. once more an eval-mode batch_norm (one fused pass
    recomputing x_hat exactly as the forward did); then one in-place pass adds scale * dy."""
    num_channels = x.size(1)
    global_sum_dy, global_sum_dy_xhat = global_sums[:num_channels], global_sums[num_channels:]
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    coefficient = scale / -global_count
    grad_input = F.batch_norm(x, mean, var, coefficient * global_sum_dy_xhat, coefficient * global_sum_dy,
                              training=False, momentum=0.0, eps=eps)
    return grad_input.addcmul_(grad, scale.view(1, num_channels, *([1] * (x.dim() - 2))))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the union of the batches of all ranks in ``process_group``.

    Forward: one all_reduce of ``[sum x, sum x^2, count]`` (per channel; the count is the same for every channel, so
    one number). Each rank derives its sums from its *locally centred* mean and variance (float32 or wider) and
    sends them in float64, so that "E[x^2] - E[x]^2" of the global batch loses nothing to cancellation even when
    ``|mean| >> std``, and no shift has to be agreed on between ranks. Backward:
    one all_reduce of ``[sum dy, sum dy * x_hat]``, the two quantities the input gradient of BN depends on besides
    local values. Weight/bias gradients are returned as *local* sums, by design: DDP (or any data-parallel wrapper)
    reduces them like every other parameter gradient, and reducing them here as well would count them twice.

    Every rank must execute both collectives, even with an empty local batch; the ranks of a group see the same
    reduced count, so they all take the same branch (including the error for a global count of 1).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        eps: float,
        process_group: Any,
    ) -> Tensor:
        num_channels = input.size(1)
        # Statistics never in half precision: bf16 keeps 8 significant bits, too few for a variance, let alone for
        # sums over a batch.
        stat_dtype = torch.promote_types(input.dtype, torch.float32)
        moments = all_reduce_sum(_local_moments(input, stat_dtype, _reduce_dtype(input.device)), process_group)
        global_count = _global_count(moments, input, process_group)

        ctx.process_group = process_group
        ctx.global_count = global_count
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        if global_count == 0:
            # Nothing to normalize anywhere; running statistics keep their values rather than averaging in 0/0.
            empty_stats = torch.zeros(num_channels, dtype=stat_dtype, device=input.device)
            ctx.save_for_backward(input, weight, empty_stats, empty_stats)
            return torch.empty_like(input)

        mean, var = _global_mean_var(moments, global_count, stat_dtype)
        if running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, global_count)
        ctx.save_for_backward(input, weight, mean, var)
        if input.numel() == 0:
            return torch.empty_like(input)
        return _normalize(input, mean, var, weight, bias, eps)

    @staticmethod
    @once_differentiable  # no double backward (as torch's SyncBN): fail loudly instead of silently wrong
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        num_channels = input.size(1)
        stat_dtype = mean.dtype
        eps = ctx.eps

        stat_weight = None if weight is None else _cast(weight, stat_dtype)
        if input.numel() > 0:
            x = _cast(input, stat_dtype)
            grad = _cast(grad_output, stat_dtype)
            sum_dy, sum_dy_xhat = _local_backward_sums(grad, x, stat_weight, mean, var, eps)
        else:
            x = grad = None
            sum_dy_xhat = torch.zeros(num_channels, dtype=stat_dtype, device=input.device)
            sum_dy = torch.zeros_like(sum_dy_xhat)

        # Local sums on purpose (see class docstring); an empty rank contributes explicit zeros so that DDP sees a
        # gradient for every parameter.
        grad_weight = _cast(sum_dy_xhat, weight.dtype) if need_weight else None
        grad_bias = _cast(sum_dy, ctx.bias_dtype) if need_bias else None

        grad_input = None
        if need_input:
            # Skipped on every rank alike when the input needs no gradient, so the ranks stay in step.
            global_sums = all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.process_group)
            if x is None or grad is None:
                grad_input = torch.empty_like(input)
            else:
                grad_input = _cast(_grad_input(x, grad, mean, var, stat_weight, global_sums, ctx.global_count, eps),
                                   input.dtype)

        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Drop-in replacement for ``torch.nn.SyncBatchNorm`` that also runs on CPU/gloo and handles empty ranks.

    Same constructor, attributes, state-dict keys and momentum semantics as ``torch.nn.SyncBatchNorm`` (and as
    ``nn.BatchNorm*d`` -- including ``momentum=None`` for a cumulative average), for any ``(N, C, *)`` input.
    Checkpoints load both ways between the two classes and ``nn.BatchNorm*d``.

    Statistics are synchronized only when they are needed *and* someone shares them: in training mode, with
    torch.distributed initialized and ``process_group`` (``None`` = world) holding more than one rank. Then the
    layer normalizes with the exact mean and variance of the group's global batch (see module docstring);
    otherwise it is exactly ``nn.BatchNorm``, with one deliberate difference: an empty batch in training returns
    an empty output and leaves the running statistics and ``num_batches_tracked`` alone (nn.BatchNorm counts it as
    a tracked batch).

    Args:
        num_features: ``C`` of an ``(N, C, *)`` input.
        eps: added to the variance for numerical stability.
        momentum: running-statistics update factor; ``None`` for a cumulative moving average.
        affine: learn a per-channel scale and shift.
        track_running_stats: keep running mean/variance for eval mode.
        process_group: group whose ranks share statistics; ``None`` means the whole world. Use
            :func:`gnlightning.distributed.new_consecutive_groups` to sync over blocks of consecutive ranks.
        device, dtype: factory arguments for parameters and buffers.
        bias: learn the shift (only with ``affine``); keyword-only, as in torch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        # Only forwarded when False, so that torch versions predating the keyword still work with the default.
        bias_kwargs = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **bias_kwargs
        )
        self.process_group = process_group
        # The norm class this layer replaced, set by from_source so that revert_sync_batchnorm can restore
        # BatchNorm1d/2d/3d faithfully. A plain attribute: not part of the state dict, so checkpoints stay
        # interchangeable with torch's SyncBatchNorm.
        self._source_class: type[torch.nn.Module] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        # Like torch.nn.SyncBatchNorm: any (N, C, *) layout, since the layer replaces BatchNorm1d, 2d and 3d alike.
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects an (N, C, *) input with at least 2 dimensions, "
                f"got a {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError(f"{type(self).__name__} got an input with 0 channels: {tuple(input.shape)}")
        if not self.training:
            # Eval (running statistics, or local batch statistics without them) never synchronizes, as in torch.
            return super().forward(input)
        synchronized = group_world_size(self.process_group) > 1
        if not synchronized and input.numel() == input.size(1):
            # torch's own message names the shape but not the way out; the synchronized path says the same below.
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}: batch statistics of a single value per channel are undefined; use a batch of "
                "at least 2 samples (or drop the last incomplete batch), norm=gn or frozen_bn, or eval mode"
            )
        if synchronized or input.numel() == 0:
            # An empty single-process batch takes this path too: with no collective to run it just returns an
            # empty output connected to the graph and leaves the running statistics alone.
            track = self.track_running_stats
            return _SyncBatchNormFunction.apply(
                input,
                self.weight,
                self.bias,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.num_batches_tracked if track else None,
                self.momentum,
                self.eps,
                self.process_group,
            )
        return super().forward(input)

    @classmethod
    def from_source(cls, source: NormSource, groups: int | None, eps: float,
                    process_group: Any | None = None) -> "SyncBatchNorm":
        """The SyncBatchNorm that replaces ``source`` (SyncBatchNormAct for timm's fused norm+act layers), with or
        without its affine parameters and statistics as the source had them; its BatchNorm class is remembered for
        the way back."""
        layer_class = SyncBatchNormAct if source.fused else cls
        layer = layer_class(source.channels, eps, source.momentum, source.affine, source.track_running_stats,
                            process_group, **source.factory, **source.no_bias)
        layer._source_class = source.bn_class
        return layer

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, process_group: Any | None = None) -> "SyncBatchNorm":
        """This layer in place of ``bn``, holding ``bn``'s own parameters and buffers (nothing is copied, so an
        optimizer built before keeps working), in ``bn``'s mode; ``bn``'s class is remembered for the way back."""
        source = NormSource.read("", bn, "bn")
        return finish(source, cls.from_source(source, None, bn.eps, process_group))

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any | None = None) -> torch.nn.Module:
        """Replace every BatchNorm of ``module`` by this class and return the root, as ``torch.nn.SyncBatchNorm``'s
        method does (drop-in parity). :func:`gnlightning.convert_norms` (``"syncbn"``) does the same with
        include / exclude, reports and a way back."""
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            return cls.from_batchnorm(module, process_group)
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm -> drop -> act, for timm models built from norm+act layers, with timm's ``act`` / ``drop``
    attribute names (so weights and the activation carried over from a timm ``BatchNormAct2d`` keep their names).

    timm's own ``SyncBatchNormAct`` subclasses ``torch.nn.SyncBatchNorm`` and so inherits its CPU refusal."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))
