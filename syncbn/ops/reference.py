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

from ..activations import IDENTITY, Spec
from ..dtypes import HALF_DTYPES, stat_dtype

if TYPE_CHECKING:
    from ..passes import RunningStats
_aten = torch.ops.aten

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


# Below this many values the pivot path's dozen small ops cost more than ATen's slow pass saves.
PIVOT_MIN_VALUES = 2**15


def _pivot_pays(x: torch.Tensor) -> bool:
    """Whether ``_pivoted_moments`` is both faster and accurate for ``x`` (see there)."""
    if x.device.type != "cpu" or x.dim() < 3 or not x.is_contiguous() or x.numel() < PIVOT_MIN_VALUES:
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
    centred = torch.batch_norm(x, None, None, pivot, one, False, 0.0, UNIT_EPS, False)
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
    # [n * mean, n * (var + mean**2), n]: float64 before the squares, whose low digits carry
    # the variance when the mean is large.
    sums = packed[: 2 * channels].view(2, channels)
    torch.stack((mean, var), out=sums)
    sums[1].addcmul_(sums[0], sums[0])
    sums.mul_(count)
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


def _update_running(running: RunningStats, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
    """``buffer = lerp(buffer, batch value, momentum)`` for the mean and the unbiased variance.

    The batch values are rounded to the buffer's dtype first and the lerp runs in it (in float32
    for half-precision buffers).
    """
    momentum = running.momentum
    for buffer, value in ((running.mean, mean), (running.var, var)):
        if buffer is None:
            continue
        if value is var:
            value = var * (count / (count - 1))  # unbiased
        if buffer.dtype in HALF_DTYPES:  # in float32, rounded once, as the Triton kernels do
            weight = momentum.float() if isinstance(momentum, torch.Tensor) else momentum
            buffer.copy_(torch.lerp(buffer.float(), value.to(buffer.dtype).float(), weight))
            continue
        weight = momentum.to(buffer.dtype) if isinstance(momentum, torch.Tensor) else momentum
        buffer.lerp_(value.to(buffer.dtype), weight)


def finalize(
    stats: torch.Tensor, eps: float, running: RunningStats | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and invstd from the all-reduced ``stats``; updates the running buffers in place.

    Everything stays on the device: the global count is read as a tensor, the unbiased variance
    is ``var * n / (n - 1)``, and ``running.momentum`` may be a 0-d tensor (the cumulative
    average of ``momentum=None``). The caller guarantees a global count of at least 2.
    """
    count = stats[-1]  # a 0-d tensor, never read back to the host
    mean, var = _moments(stats, count, dtype)
    if running is not None:
        _update_running(running, mean, var, count)
    return mean, (var + eps).rsqrt_()


def _moments(stats: torch.Tensor, count: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and biased variance in ``dtype`` from the all-reduced ``[S1, S2, n]``.

    ``var = S2 / n - mean**2`` in float64 (clamped at 0, NaN kept), then rounded once.
    """
    channels = (stats.numel() - 1) // 2
    moments = stats[: 2 * channels].view(2, channels) / count
    mean64, var64 = moments.unbind()
    var64.addcmul_(mean64, mean64, value=-1.0).clamp_(min=0.0)
    mean, var = moments.to(dtype).unbind()
    return mean, var


def _channels_inner(x: torch.Tensor) -> bool:
    """True when channels are the contiguous axis: (N, C) and channels_last(_3d) CPU tensors."""
    return x.device.type == "cpu" and (x.dim() == 2 or (x.stride(1) == 1 and x.shape[1] > 1))


def _affine(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x - mean) * invstd * weight + bias`` in x's dtype and memory format, into ``out`` if given.

    Bitwise what ATen's training kernel writes (``torch.native_batch_norm``, so ``nn.BatchNorm``)
    with these statistics: ``x * a + (bias - mean * a)`` with ``a = invstd * weight``, by the
    same kernels. The fused activation's backward recomputes the pre-activation with it, so that
    the derivative is taken at exactly the value the forward activated, kinks included.
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if _channels_inner(x):
        # y = x * scale + (bias - mean * scale): a per-channel broadcast along the contiguous
        # axis, which TensorIterator vectorizes (twice as fast as the batch-norm kernel here).
        # Computed in the statistics' dtype, rounded once into x's dtype and memory format.
        shift = -mean * scale if bias is None else torch.addcmul(bias.to(scale.dtype), mean, scale, value=-1.0)
        out = torch.empty_like(x) if out is None else out
        return torch.addcmul(_channel_view(shift, x.dim()), x, _channel_view(scale, x.dim()), out=out)
    shift = None if bias is None else bias.to(invstd.dtype)
    one = torch.ones_like(invstd)
    # var = 1: the kernel's own 1/sqrt(var + eps) is exactly 1.
    if out is None:
        return torch.batch_norm(x, scale, shift, mean, one, False, 0.0, UNIT_EPS, False)
    unused = invstd.new_empty((0,))
    _aten.native_batch_norm.out(
        x, scale, shift, mean, one, False, 0.0, UNIT_EPS, out=out, save_mean=unused, save_invstd=unused.clone()
    )
    return out


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scratch: Centred | None = None,
    *,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> torch.Tensor:
    """``y = act((x - mean) * invstd * weight + bias)`` in x's dtype and memory format.

    With ``scratch`` from ``forward_stats``, the output is written over ``scratch.values``;
    with ``overwrite``, over ``x``. An activation runs in place on the output (its ATen kernel),
    after ``_affine``'s pre-activation, which its backward recomputes.
    """
    if act.code == IDENTITY.code and scratch is not None and not overwrite:
        z = scratch.values
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        shift = (scratch.pivot - mean).mul_(scale)
        if bias is not None:
            shift.add_(bias.to(shift.dtype))
        # y = (x - pivot) * scale + ((pivot - mean) * scale + bias), in place over z (a
        # contiguous (N, C, S) tensor: two vectorized in-place passes beat one broadcast addcmul)
        return z.mul_(_channel_view(scale, z.dim())).add_(_channel_view(shift, z.dim()))
    out = x if overwrite else None if scratch is None else scratch.values
    y = _affine(x, mean, invstd, weight, bias, out)
    return act.entry.fn_(y, act.param)


def finalize_normalize(
    x: torch.Tensor,
    stats: torch.Tensor,
    *,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    scratch: Centred | None = None,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finalize`` then ``normalize``: ``(output, mean, invstd)``, statistics in ``stat_dtype``."""
    count = stats[-1]  # a 0-d tensor, never read back to the host
    mean, var = _moments(stats, count, stat_dtype(x.dtype))
    if running is not None:
        _update_running(running, mean, var, count)
    plain = act.code == IDENTITY.code and not overwrite
    if plain and scratch is None and not _channels_inner(x) and _params_match(weight, bias, mean.dtype):
        # The eval-mode kernel with the global mean and variance is the whole normalize pass
        # (its own invstd may differ from the saved one in the last bit: no recomputing from it).
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        return y, mean, (var + eps).rsqrt_()
    invstd = (var + eps).rsqrt_()
    return normalize(x, mean, invstd, weight, bias, scratch, act=act, overwrite=overwrite), mean, invstd


def _params_match(weight: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether ATen's kernels take these affine parameters with statistics of ``dtype``."""
    return (weight is None or weight.dtype == dtype) and (bias is None or bias.dtype == dtype)


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


def backward_prepare(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    act: Spec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Spec]:
    """``(grad, source, centre, IDENTITY)``: what the normalization's backward reads for ``act``.

    The activation's share of the backward done once, in ATen's kernels, so that
    ``backward_reduce_affine`` and ``backward_elemt`` run as for plain batch norm on
    ``grad = dy * act'(pre)`` and ``source - centre = x - mean``:

    - an activation on the saved input: the pre-activation recomputed by ``_affine`` (bitwise
      the forward's), then the activation's backward kernel written over it;
    - in place (``saved`` is the output y): ``grad`` from y, and ``source = (z - bias) /
      (invstd * weight)`` with ``z = act^-1(y)``, centred at 0; in float32 for half-precision y.
    """
    if act.code == IDENTITY.code and not act.inplace or saved.numel() == 0:
        return grad_out, saved, mean, IDENTITY
    entry = act.entry
    grad_out = _grad_like(grad_out, saved)
    if not act.inplace:
        pre = _affine(saved, mean, invstd, weight, bias)
        return entry.grad(grad_out, pre, act.param), saved, mean, IDENTITY
    y = saved.float() if saved.dtype in HALF_DTYPES else saved
    grad = entry.grad_from_output(grad_out.to(y.dtype), y, act.param)
    pre = entry.inverse(y, act.param, saved.dtype)
    inv_scale = (invstd if weight is None else invstd * weight.to(invstd.dtype)).reciprocal()
    centre = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    xmu = _affine(pre, centre, inv_scale, None, None, out=None if pre is y else pre)
    return grad, xmu, torch.zeros_like(invstd), IDENTITY


def backward_reduce_affine(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor | None,
    *,
    weight_dtype: torch.dtype | None,
    bias_dtype: torch.dtype | None,
    act: Spec = IDENTITY,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(sums, grad_weight, grad_bias)``: ``backward_reduce`` plus the local weight and bias
    gradients, ``sum_dy_xmu * invstd`` in ``weight_dtype`` and ``sum_dy`` in ``bias_dtype``
    (None when the dtype is None). The gradients never share memory with ``sums``, which the
    caller all-reduces in place. With an activation (``weight``, ``bias``: the layer's), the
    sums are those of ``dy * act'(pre)`` (``backward_prepare``; ``x`` is the output in place)."""
    if act != IDENTITY:
        grad_out, x, mean, _ = backward_prepare(grad_out, x, mean, invstd, weight, bias, act)
    channels = x.shape[1]
    if x.is_cuda or x.numel() == 0:
        sums = backward_reduce(grad_out, x, mean)
        sum_dy, sum_dy_xmu = sums[:channels], sums[channels:]
    else:
        one = torch.ones_like(mean)
        # Eval-mode backward with var = 1: grad_weight = sum(dy * (x - mean)), grad_bias = sum(dy).
        _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
            _grad_like(grad_out, x), x, one, mean, one, None, None, False, UNIT_EPS, [False, True, True]
        )
        sums = torch.cat([sum_dy, sum_dy_xmu])  # a copy: the gradients below stay apart from it
    grad_weight = None if weight_dtype is None else (sum_dy_xmu * invstd).to(weight_dtype)
    grad_bias = None if bias_dtype is None else sum_dy.to(bias_dtype, copy=sum_dy.data_ptr() == sums.data_ptr())
    return sums, grad_weight, grad_bias


def backward_elemt(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sums: torch.Tensor,
    count: torch.Tensor,
    *,
    act: Spec = IDENTITY,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input gradient from the global ``sums = [sum_dy, sum_dy_xmu]`` and global ``count``.

    ``dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``, as
    ``dx = scale * dy + (x - mean) * xmu_coef + const`` with per-channel coefficients. With an
    activation, ``dy`` is ``dy * act'(pre)`` (``backward_prepare``; ``x`` is the output in place).
    """
    if act != IDENTITY:
        dtype = x.dtype
        grad_out, x, mean, _ = backward_prepare(grad_out, x, mean, invstd, weight, bias, act)
        return backward_elemt(grad_out, x, mean, invstd, weight, sums, count).to(dtype)
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.empty_like(x)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)  # w * invstd
    # [const, xmu_coef / invstd**2] = -scale * [sum_dy, sum_dy_xmu] / n
    coefs = sums.view(2, channels) * (scale / -count)
    const, xmu_coef = coefs.unbind()
    xmu_coef.mul_(invstd * invstd)
    # Half precision: computed in float32 and rounded once at the end (two roundings to half
    # precision would double the error).
    out_dtype = x.dtype
    if _channels_inner(x):
        # (x - mean) * xmu_coef + const as one broadcast addcmul along the contiguous axis
        const.addcmul_(mean, xmu_coef, value=-1.0)
        grad_in = torch.empty_like(x, dtype=coefs.dtype)
        torch.addcmul(_channel_view(const, x.dim()), x, _channel_view(xmu_coef, x.dim()), out=grad_in)
    else:
        if x.dtype in HALF_DTYPES:
            x, grad_out = x.float(), grad_out.float()
        one = torch.ones_like(mean)
        grad_in = torch.batch_norm(x, xmu_coef, const, mean, one, False, 0.0, UNIT_EPS, False)
    grad_in.addcmul_(_grad_like(grad_out, x), _channel_view(scale, x.dim()))
    return grad_in.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# One process, nothing to synchronize: ATen's own training kernels, exactly nn.BatchNorm's.


def local_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    eps: float,
    *,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(output, mean, invstd)`` of a batch with no collective, or None where the generic
    passes must run: off the CPU (a 0-d momentum would be read back from the device), for
    half-precision input without float32 parameters (ATen would keep its statistics in half
    precision), and in place (its backward reads the output, not ATen's saved input). An
    activation runs in place on ATen's output: the forward is exactly ``nn.BatchNorm`` then
    torch's activation. The caller guarantees at least 2 values per channel."""
    if x.device.type != "cpu" or act.inplace or overwrite:
        return None
    if x.dtype in HALF_DTYPES and not any(t is not None for t in (weight, running)):
        return None
    running_mean = running_var = None
    momentum = 0.0
    if running is not None:
        running_mean, running_var, momentum = running.mean, running.var, running.momentum
        if isinstance(momentum, torch.Tensor):
            momentum = float(momentum)  # a CPU tensor: no device sync
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    return act.entry.fn_(y, act.param), mean, invstd


def local_batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
    needs_grad: tuple[bool, bool, bool],
    *,
    bias: torch.Tensor | None = None,
    act: Spec = IDENTITY,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of ``local_batch_norm``: ``(grad_input, grad_weight, grad_bias)``.

    With an activation, its backward kernel on the recomputed pre-activation (bitwise ATen's
    forward output, see ``_affine``) first: bitwise autograd through ``nn.BatchNorm`` and
    torch's activation.
    """
    grad_out = _grad_like(grad_out, x)
    if act.code != IDENTITY.code:
        grad_out = act.entry.grad(grad_out, _affine(x, mean, invstd, weight, bias), act.param)
    mask = [needs_grad[0], needs_grad[1] and weight is not None, needs_grad[2]]
    return torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, eps, mask)
