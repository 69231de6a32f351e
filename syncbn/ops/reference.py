"""The torch-ops path: local reductions and elementwise passes built from ATen's own kernels.

It runs every CPU tensor (and CUDA tensors where the Triton kernels cannot), and it is the
second opinion the kernel tests compare against. Each function is one backend operation with
the same signature as its twin in ``syncbn.ops.triton``; ``syncbn.functional`` composes them
around the two collectives.

Speed on CPU comes from counting passes over memory. ``F.batch_norm(..., training=True)`` is
the budget, so every operation here is one ATen kernel over the activation, never a chain of
elementwise ops with temporaries:

- statistics: ``torch.batch_norm_update_stats`` (two-pass, double accumulation on CPU; about
  3x faster than ``torch.var_mean``);
- normalize: the eval-mode ``batch_norm`` kernel with the global mean and ``var = 1`` (and an
  ``eps`` too small to change ``1 + eps``)
  so that ``weight * invstd`` is applied exactly once;
- backward reduction: the eval-mode ``native_batch_norm_backward`` kernel, whose weight and
  bias gradients are exactly ``sum(dy * (x - mean))`` and ``sum(dy)`` when ``invstd`` is 1;
- backward elementwise: ``dx = a * dy + (b * (x - mean) + c)``, the bracket again from the
  eval-mode ``batch_norm`` kernel, then one fused ``addcmul_``.

``torch.batch_norm_stats``, ``batch_norm_elemt`` and friends would fit better but have no CPU
kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..dtypes import HALF_DTYPES, stat_dtype

if TYPE_CHECKING:
    from ..passes import RunningStats
# The eval-mode kernels below run with var = 1 so that their 1/sqrt(var + eps) is exactly 1.
# F.batch_norm rejects eps = 0 (torch 2.11), so eps is one that 1 + eps rounds away in any
# floating type (and that is still a normal float32).
UNIT_EPS = 1e-30


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against an (N, C, *) input of ``ndim`` dimensions."""
    return t.view((-1,) + (1,) * (ndim - 2))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``x`` is laid out that way (and not also contiguous), else contiguous."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _grad_like(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad_out`` in ``x``'s memory format (one copy when they differ).

    ATen's mixed-precision batch-norm backward accumulates half-precision sums in half
    precision when the two layouts differ; with matching layouts it accumulates in float32.
    """
    fmt = memory_format_of(x)
    return grad_out if grad_out.is_contiguous(memory_format=fmt) else grad_out.contiguous(memory_format=fmt)


# ATen's float32 reduction adds each (n, c) row of S values in vector lanes, then the N rows one
# after another: past about 2**16 of either, float32 rounding reaches 1e-6 of the variance.
PIVOT_MAX_ROW = 2**16


def _pivot_pays(x: torch.Tensor) -> bool:
    """Whether ``_pivoted_moments`` is both faster and accurate for ``x`` (see there)."""
    if x.device.type != "cpu" or x.dim() < 3 or not x.is_contiguous():
        return False
    spatial = x[0, 0].numel()
    return 1 < spatial <= PIVOT_MAX_ROW and x.shape[0] <= PIVOT_MAX_ROW


@dataclass
class Centred:
    """``x - pivot`` per channel, left over from the statistics pass.

    ``normalize`` writes the output over it (``y = z * a + ((pivot - mean) * a + b)``), so the
    forward pass allocates one activation-sized buffer, not two: on CPU a fresh buffer's page
    faults can cost more than the pass that fills it.
    """

    values: torch.Tensor
    pivot: torch.Tensor


def _pivoted_moments(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, Centred]:
    """Mean and biased variance of contiguous (N, C, S>1) CPU input, in float64.

    ATen's CPU statistics kernel for this layout accumulates in double one element at a time
    (2.6 ms for (8, 64, 56, 56) on one core, most of F.batch_norm's forward). Three vectorized
    passes do it in a quarter of that, as accurately: a float32 sum gives a pivot ``p`` within a
    few ulps of the mean, the eval-mode batch_norm kernel writes ``z = x - p`` (exact: x and p
    are close), and the eval-mode backward kernel sums ``z`` and ``z * z`` in one pass. With
    ``z`` centred, ``M2 = sum(z*z) - sum(z)**2 / n`` loses no digits. Returns float64 mean and
    biased variance, and ``z`` for ``normalize`` to reuse.
    """
    dims = [0, *range(2, x.dim())]
    pivot = x.sum(dims).div_(count)
    one = torch.ones_like(pivot)
    centred = F.batch_norm(x, pivot, one, None, None, False, 0.0, UNIT_EPS)
    _, sum_z2, sum_z = torch.ops.aten.native_batch_norm_backward(
        centred, centred, one, torch.zeros_like(pivot), one, None, None, False, UNIT_EPS, [False, True, True]
    )
    sum_z, sum_z2 = sum_z.to(torch.float64), sum_z2.to(torch.float64)
    mean_z = sum_z / count
    var = sum_z2.div_(count).sub_(mean_z * mean_z).clamp_(min=0.0)
    return mean_z.add_(pivot), var, Centred(centred, pivot)


def forward_stats(x: torch.Tensor) -> tuple[torch.Tensor, Centred | None]:
    """``local_stats`` plus the scratch the statistics pass leaves for ``normalize`` (or None)."""
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    packed = torch.empty(2 * channels + 1, dtype=torch.float64, device=x.device)
    if count == 0:
        return packed.zero_(), None
    centred = None
    # Half precision: statistics of the float32 upcast (ATen's mixed-precision statistics lose
    # half-precision digits in some layouts on CUDA); the scratch would be float32, not reused.
    source = x.float() if x.dtype in HALF_DTYPES else x
    if _pivot_pays(source):
        mean, var, centred = _pivoted_moments(source, count)
    else:
        mean, var = torch.batch_norm_update_stats(source, None, None, 0.0)
    if source is not x:
        centred = None
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    torch.mul(mean, count, out=packed[:channels])
    torch.addcmul(var, mean, mean, out=packed[channels : 2 * channels]).mul_(count)
    packed[2 * channels] = count
    return packed, centred


def local_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-channel local moments packed for the all-reduce.

    Returns a float64 tensor of 2C+1 values: ``[sum(x) per channel, sum(x**2) per channel,
    count]`` where the sum of squares is formed as ``M2 + n * mean**2`` from a numerically
    stable mean/variance (never by squaring in low precision), and ``count`` is the number of
    values per channel on this rank.
    """
    return forward_stats(x)[0]


def _update_running(buffer: torch.Tensor, batch_value: torch.Tensor, momentum: float | torch.Tensor) -> None:
    """``buffer = (1 - momentum) * buffer + momentum * batch_value``, in float64, rounded once."""
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(torch.float64)  # lerp takes a tensor weight only in its own dtype
    buffer.copy_(torch.lerp(buffer.to(torch.float64), batch_value, momentum))


def finalize(
    stats: torch.Tensor, eps: float, running: RunningStats | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and invstd from the all-reduced ``stats``; updates the running buffers in place.

    Everything stays on the device: the global count is read as a tensor, the unbiased variance
    is ``var * n / (n - 1)``, and ``running.momentum`` may be a 0-d tensor (the cumulative
    average of ``momentum=None``). The caller guarantees a global count of at least 2.
    """
    channels = (stats.numel() - 1) // 2
    count = stats[2 * channels]
    mean = stats[:channels] / count
    var = (stats[channels : 2 * channels] / count).sub_(mean * mean).clamp_(min=0.0)
    invstd = (var + eps).rsqrt_()
    if running is not None and running.mean is not None:
        _update_running(running.mean, mean, running.momentum)
    if running is not None and running.var is not None:
        unbiased = var.mul_(count / (count - 1))
        _update_running(running.var, unbiased, running.momentum)
    return mean.to(dtype), invstd.to(dtype)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scratch: Centred | None = None,
) -> torch.Tensor:
    """``y = (x - mean) * invstd * weight + bias`` in x's dtype and memory format.

    With ``scratch`` from ``forward_stats``, the output is written over ``scratch.values``.
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if scratch is not None:
        z = scratch.values
        shift = (scratch.pivot - mean).mul_(scale)
        if bias is not None:
            shift.add_(bias.to(shift.dtype))
        # y = (x - pivot) * scale + ((pivot - mean) * scale + bias), in place over z
        return torch.addcmul(_channel_view(shift, z.dim()), z, _channel_view(scale, z.dim()), out=z)
    shift = None if bias is None else bias.to(invstd.dtype)
    one = torch.ones_like(invstd)
    # var = 1: the kernel's own 1/sqrt(var + eps) is exactly 1.
    return F.batch_norm(x, mean, one, scale, shift, False, 0.0, UNIT_EPS)


def finalize_normalize(
    x: torch.Tensor,
    stats: torch.Tensor,
    *,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    scratch: Centred | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finalize`` then ``normalize``: ``(output, mean, invstd)``, statistics in ``stat_dtype``."""
    mean, invstd = finalize(stats, eps, running, stat_dtype(x.dtype))
    return normalize(x, mean, invstd, weight, bias, scratch), mean, invstd


def backward_reduce(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Local ``[sum(dy), sum(dy * (x - mean))]`` per channel, packed as 2C values of mean's dtype."""
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(2 * channels, dtype=mean.dtype, device=x.device)
    grad_out = _grad_like(grad_out, x)
    one = torch.ones_like(mean)
    if x.is_cuda:
        # CUDA's eval-mode native_batch_norm_backward insists on saved statistics; this is the
        # kernel torch's own SyncBatchNorm uses for the same two sums. The (unused) float weight
        # makes half-precision input a "mixed type" call: without a weight, ATen's contiguous
        # (non channels-last) path takes half input with float32 statistics as unmixed and
        # expects statistics in the input's dtype.
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(grad_out, x, mean, one, one, True, False, False)
        return torch.cat([sum_dy, sum_dy_xmu]).to(mean.dtype)
    # Eval-mode backward with var = 1: grad_weight = sum(dy * (x - mean)), grad_bias = sum(dy).
    _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, one, mean, one, None, None, False, UNIT_EPS, [False, True, True]
    )
    return torch.cat([sum_dy, sum_dy_xmu]).to(mean.dtype)


def backward_reduce_affine(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor | None,
    *,
    weight_dtype: torch.dtype | None,
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(sums, grad_weight, grad_bias)``: ``backward_reduce`` plus the local weight and bias
    gradients, ``sum_dy_xmu * invstd`` in ``weight_dtype`` and ``sum_dy`` in ``bias_dtype``
    (None when the dtype is None). The gradients never share memory with ``sums``, which the
    caller all-reduces in place."""
    sums = backward_reduce(grad_out, x, mean)
    channels = x.shape[1]
    grad_weight = None if weight_dtype is None else (sums[channels:] * invstd).to(weight_dtype)
    grad_bias = None if bias_dtype is None else sums[:channels].to(bias_dtype, copy=True)
    return sums, grad_weight, grad_bias


def backward_elemt(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sums: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Input gradient from the global ``sums = [sum_dy, sum_dy_xmu]`` and global ``count``.

    ``dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``.
    """
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.empty_like(x)
    dtype = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(dtype)  # w * invstd
    inv_count = count.to(dtype).reciprocal()
    mean_dy = sums[:channels] * inv_count
    mean_dy_xmu = sums[channels:] * inv_count
    xmu_coef = -scale * invstd * invstd * mean_dy_xmu  # multiplies (x - mean)
    const = -scale * mean_dy
    if x.dtype in HALF_DTYPES:
        # Two roundings to half precision would double the error; work in float32.
        x, grad_out, out_dtype = x.float(), grad_out.float(), x.dtype
    else:
        out_dtype = None
    one = torch.ones_like(mean)
    grad_in = F.batch_norm(x, mean, one, xmu_coef, const, False, 0.0, UNIT_EPS)
    grad_in.addcmul_(grad_out, _channel_view(scale, x.dim()))
    return grad_in if out_dtype is None else grad_in.to(out_dtype)
