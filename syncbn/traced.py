"""The training-mode layer as torch ops the compiler traces: what ``torch.compile`` runs.

    local    per-channel ``var_mean`` (inductor lowers it to a Welford reduction), packed in
             float64 as ``[n * mean, M2 + n * mean**2, n]``: 2C + 1 values
    global   one functional ``all_reduce(SUM)`` -> global mean, biased variance, invstd (float64)
    running  statistics and ``num_batches_tracked`` updated as buffer mutations
    output   ``(x - mean) * (invstd * weight) + bias``, pointwise, so that inductor fuses it with
             the ops around it (an activation, a residual add, the next convolution's prologue)
    backward local ``sum(dy)``, ``sum(dy * (x - mean))`` -> one functional all-reduce of 2C
             float64 values -> ``dx``, pointwise (``_Normalize``, a Function dynamo traces)

Collectives. Every rank of a group must make the same collectives in the same order with the
same sizes, forward and backward, while each rank traces its own graph (batch sizes differ
between ranks, so shapes do). Nothing here makes a collective depend on the local count: a
rank without samples all-reduces zeros, and its backward all-reduces like everyone's. As in
eager mode, the backward all-reduce happens when the input needs a gradient (the same on every
rank). The compiler neither removes nor recomputes collectives outside a checkpointed region,
whatever the shapes; it does merge identical expressions, so every collective's input is
computed from that layer's own tensors, never a constant (an empty rank's moments included).

Two rules need the runtime; each goes through a small custom op:

- the global-count rule: a rank whose own count is 0 or 1 (known when tracing) passes the
  reduced buffer through ``syncbn::check_count``, which reads the global count back and raises
  nn.BatchNorm's ValueError for a count of 1; those ranks also keep the running statistics of
  an empty global batch. Any other rank knows the global count is at least 2 without asking,
  and in a global batch of 0 or 1 every rank is one of those that ask.
- recomputation: ``syncbn::recomputing`` says whether the graph runs inside a backward pass,
  where eager activation checkpointing around compiled code reruns the whole compiled forward;
  the buffer updates of that run are discarded (``syncbn.passes.in_backward_pass``). It takes
  no input, so the compiler's common-subexpression pass leaves one call per graph. Under CUDA
  graphs it is not rerun, so there it cannot tell. Checkpointing traced inside the compiled
  code recomputes only what backward needs, and backward needs no buffer update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import distributed, settings
from .dtypes import stat_dtype
from .ops.reference import _channel_view
from .passes import MOMENTUM_NONE_MESSAGE, in_backward_pass, single_value_error
from .passes import inplace_weight as _floored


@torch.compiler.assume_constant_result
def compile_time_choices(process_group: dist.ProcessGroup | None) -> tuple[bool, bool]:
    """``(sync, traced)``: whether compiled code all-reduces, and whether it takes this module's
    path (not the custom ops of ``SYNCBN_COMPILE=ops`` and debug mode). Read once when tracing,
    the settings being the same on every rank; traced instead, the first read would fill the
    settings' parse cache, which dynamo guards on: a recompilation on the next call."""
    sync = distributed.sync_world_size(process_group) > 0
    return sync, settings.COMPILE.get() == "traced" and not (sync and distributed.debug_enabled())


@torch.library.custom_op("syncbn::recomputing", mutates_args=())
def _recomputing(device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor on ``device``: True while the autograd engine runs a backward pass."""
    return torch.full((), in_backward_pass(), dtype=torch.bool, device=device)


@_recomputing.register_fake
def _recomputing_fake(device):
    return torch.empty((), dtype=torch.bool, device=device)


@torch.library.custom_op("syncbn::check_count", mutates_args=())
def _check_count(stats: torch.Tensor, input_shape: list[int], sync: bool) -> torch.Tensor:
    """``stats`` (all-reduced, the global count last), after raising ValueError on a count of 1."""
    if int(stats[-1].item()) == 1:
        raise single_value_error(torch.Size(input_shape), sync)
    return stats.clone()


@_check_count.register_fake
def _check_count_fake(stats, input_shape, sync):
    return torch.empty_like(stats)


class _InplaceWeight(torch.autograd.Function):
    """``syncbn.passes.inplace_weight``, its gradient passed straight through to the weight."""

    @staticmethod
    def forward(ctx, weight, eps):
        return _floored(weight, eps)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def inplace_weight(weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """The weight an in-place SyncBatchNormAct normalizes with, as in eager mode."""
    return None if weight is None else _InplaceWeight.apply(weight, eps)


def _local_moments(x: torch.Tensor, dims: list[int], count: int) -> torch.Tensor:
    """``[n * mean, M2 + n * mean**2, n]`` per channel in float64, from ``var_mean`` of the input
    shifted by one sample per channel, so that a float32 reduction sums values near zero
    whatever the mean (at mean 1e4 and standard deviation 1, inductor's Welford reduction of
    16K unshifted values is off by 1e-5 in the variance, of the shifted ones by 3e-8)."""
    if count == 0:
        # var_mean of nothing is NaN. Exact zeros computed from x, not constants: two layers'
        # constant buffers would be one expression, which the compiler's common-subexpression
        # pass merges into one all-reduce on this rank only.
        moments = torch.cat([x.sum(dims), (x * x).sum(dims)]).double()
    else:
        shift = x[(0, slice(None)) + (0,) * (x.dim() - 2)]
        var, mean = torch.var_mean(x - _channel_view(shift, x.dim()), dims, correction=0)
        mean = mean.double() + shift.double()
        moments = torch.cat([mean * count, (var.double() + mean * mean) * count])
    return torch.cat([moments, moments.new_full((1,), count)])


class _Normalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with the synchronized backward.

    ``mean``, ``invstd`` and ``total`` (the global count) are float64 constants here: the
    backward accounts for the statistics' dependence on every rank's input itself, with the
    eager backward's formulas (``syncbn.ops.reference.backward_elemt``): local sums of ``dy``
    and ``dy * (x - mean)`` in one pass over the activation, one all-reduce of those 2C values
    in float64 when the input needs a gradient (the same on every rank), then ``dx`` in one
    pointwise pass. (Autograd through the forward's moments would make inductor write and read
    an activation-sized intermediate more.) Weight and bias gradients stay local.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total, group):
        acc_dtype = stat_dtype(x.dtype)
        ndim = x.dim()
        scale = invstd.to(acc_dtype)
        if weight is not None:
            scale = scale * weight.to(acc_dtype)
        output = (x.to(acc_dtype) - _channel_view(mean.to(acc_dtype), ndim)) * _channel_view(scale, ndim)
        if bias is not None:
            output = output + _channel_view(bias.to(acc_dtype), ndim)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, invstd, total = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc_dtype = stat_dtype(x.dtype)
        ndim, channels = x.dim(), x.shape[1]
        dims = [0, *range(2, ndim)]
        dy = grad_output.to(acc_dtype)
        xmu = x.to(acc_dtype) - _channel_view(mean.to(acc_dtype), ndim)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_weight = (sum_dy_xmu * invstd.to(acc_dtype)).to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_input = None
        if need_input:
            sums = torch.cat([sum_dy, sum_dy_xmu]).double()
            if ctx.group is not None:
                sums = funcol.all_reduce(sums, "sum", ctx.group)
            scale = invstd if weight is None else invstd * weight.double()
            mean_dy, mean_dy_xmu = sums[:channels] / total, sums[channels:] / total
            xmu_coef = (-scale * invstd * invstd * mean_dy_xmu).to(acc_dtype)
            const = (-scale * mean_dy).to(acc_dtype)
            grad_input = dy * _channel_view(scale.to(acc_dtype), ndim) + (
                xmu * _channel_view(xmu_coef, ndim) + _channel_view(const, ndim)
            )
            grad_input = grad_input.to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _count_batch(
    num_batches_tracked: torch.Tensor | None, momentum: float | torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """``syncbn.passes.count_batch`` as a buffer mutation that a recomputation discards:
    ``(recomputing, momentum)``, the momentum of ``None`` being ``1 / num_batches_tracked``."""
    recomputing = _recomputing(device)
    if num_batches_tracked is not None:
        counted = num_batches_tracked + 1
        num_batches_tracked.copy_(torch.where(recomputing, num_batches_tracked, counted))
        if momentum is None:
            momentum = counted.double().reciprocal()
    return recomputing, momentum


def _update_running(
    running: torch.Tensor, batch_value: torch.Tensor, momentum: float | torch.Tensor, keep: torch.Tensor
) -> None:
    """``syncbn.ops.reference``'s update in float64, unless ``keep``."""
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(torch.float64)
    running.copy_(torch.where(keep, running, torch.lerp(running.double(), batch_value, momentum)))


def training_forward(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | torch.Tensor | None,
    eps: float,
    process_group: dist.ProcessGroup | None,
    sync: bool,
) -> torch.Tensor:
    """Training-mode synchronized batch norm of checked input, as traceable ops.

    The same arguments and results as ``syncbn.functional.training_forward``; ``sync`` is
    whether to all-reduce over ``process_group`` (None: the world). An activation applied to
    the result is fused by inductor with the normalize step.
    """
    if momentum is None and num_batches_tracked is None:
        raise TypeError(MOMENTUM_NONE_MESSAGE)
    channels = input.shape[1]
    if channels == 0:  # no statistics to share (every rank has the same C); still counted
        with torch.no_grad():
            _count_batch(num_batches_tracked, momentum, input.device)
        return input.clone()
    dims = [0, *range(2, input.dim())]
    count = input.numel() // channels
    x = input.detach().to(stat_dtype(input.dtype))
    stats = _local_moments(x, dims, count)
    group = None
    if sync:
        group = process_group if process_group is not None else dist.group.WORLD
        stats = funcol.all_reduce(stats, "sum", group)
    total = stats[2 * channels]
    if count <= 1:  # only here may the global count be below 2
        stats = _check_count(stats, list(input.shape), sync)
        # An empty global batch: statistics of 0 / 1, finite, so that the (empty) gradients
        # are zeros, not 0 * NaN; the running statistics stay as they are (below).
        total = stats[2 * channels].clamp(min=1.0)
    mean = stats[:channels] / total
    var = (stats[channels : 2 * channels] / total - mean * mean).clamp(min=0.0)
    invstd = torch.rsqrt(var + eps)
    with torch.no_grad():
        recomputing, momentum = _count_batch(num_batches_tracked, momentum, input.device)
        keep = recomputing | (total < 2) if count <= 1 else recomputing
        if running_mean is not None:
            _update_running(running_mean, mean, momentum, keep)
        if running_var is not None:
            _update_running(running_var, var * (total / (total - 1)), momentum, keep)
    return _Normalize.apply(input, weight, bias, mean, invstd, total, group)
