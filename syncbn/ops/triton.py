"""The Triton backend: the local passes of synchronized batch norm as GPU kernels.

Same functions, same signatures, as ``syncbn.ops.reference``; ``syncbn.ops.backend_for``
sends CUDA tensors of float32, float16 and bfloat16 here (and, with ``SYNCBN_BACKEND=triton``,
CPU tensors too, which Triton runs only under ``TRITON_INTERPRET=1``: that is how CI tests it).
The file reads top to bottom: kernels, then the launchers that are the backend interface.
Layouts, block sizes and grids come from ``syncbn.ops.launch_plan``; every launch goes through
``syncbn.ops.fast_launch``.

Passes and kernels (launches per call in brackets). The layer calls ``forward_stats``,
``finalize_normalize``, ``backward_reduce_affine`` and ``backward_elemt``: six launches per
forward and backward, and no other device work but the two all-reduces and the allocations of
the outputs and small buffers (eager speed on small layers is host time per launch).

- ``local_stats`` / ``forward_stats`` [2]: ``_reduce_*_kernel`` splits every channel's ``N*S``
  values over many programs; each writes its tile's ``(mean - pivot, M2, pivot)`` in float32,
  accumulated as sums of ``x - pivot`` and ``(x - pivot)**2`` with the pivot the mean of the
  program's first step (so a mean of 1e4 with a std of 1 costs no digits). ``_merge_kernel``
  merges the tiles per channel with Chan's formula in float64 and writes the packed
  ``[sum, sum of squares, count]``.
- ``finalize_normalize`` [1]: ``_elemt_*_kernel`` with ``FROM_STATS``: every program turns the
  all-reduced statistics of its channels into mean and invstd (float64 math, rounded to float32)
  and writes ``y = (x - mean) * (invstd * w) + b``; the programs holding a channel's first block
  also store its mean and invstd (saved for backward) and update its running statistics (the
  lerp, with a float or a 0-d device tensor momentum, never read on the host).
  ``finalize`` [1] (``_finalize_kernel``) and ``normalize`` [1] do the same in two launches;
  the layer uses ``finalize`` alone on a rank with an empty batch.
- ``backward_reduce_affine`` [2]: the same reduce and merge kernels summing ``dy`` and
  ``dy * (x - mean)``; the merge also writes the weight and bias gradients.
- ``backward_elemt`` [1]: ``_elemt_*_kernel`` again,
  ``dx = dy * k + (x - mean) * a + b`` with per-channel ``k, a, b`` formed in each program.

Nothing is read back to the host and nothing is allocated beyond the outputs and small
per-channel buffers (the tile partials, ``3 * C * T`` floats), so a training step can be
captured in a CUDA graph: no autotuning, only the usual warm-up call that compiles each kernel
before capture. Integer arguments are kept out of Triton's specialization except the strides
that decide vector widths (S for ``ncs``, C for ``mc``, the tile's S span), so that a new shape
rarely means a new compile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..activations import CODES, IDENTITY, Spec, elu_inverse_floor
from .fast_launch import launch
from .launch_plan import Plan, cdiv, dense, match_layout, next_pow2

if TYPE_CHECKING:
    from ..passes import RunningStats

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

# The activations' numbers (syncbn.activations.CODES): the ACT constexpr of the kernels below.
_IDENTITY = tl.constexpr(CODES["identity"])
_RELU = tl.constexpr(CODES["relu"])
_LEAKY_RELU = tl.constexpr(CODES["leaky_relu"])
_ELU = tl.constexpr(CODES["elu"])
_SILU = tl.constexpr(CODES["silu"])
_GELU = tl.constexpr(CODES["gelu"])
_HARDSWISH = tl.constexpr(CODES["hardswish"])


@triton.jit
def _expm1(z):
    """``exp(z) - 1`` without the cancellation near 0 (Kahan: ``(u - 1) * z / log(u)``)."""
    u = tl.exp(z)
    um1 = u - 1.0
    exact = (u == 1.0) | (um1 == -1.0)  # the formula's 0 / 0 and -inf / -inf: z itself, or -1
    ratio = um1 * z / tl.log(tl.where(exact, 2.0, u))
    return tl.where(u == 1.0, z, tl.where(um1 == -1.0, -1.0, ratio))


@triton.jit
def _log1p(v):
    """``log(1 + v)`` without the cancellation near 0 (Kahan: ``log(w) * v / (w - 1)``)."""
    w = 1.0 + v
    return tl.where(w == 1.0, v, tl.log(w) * v / tl.where(w == 1.0, 1.0, w - 1.0))


@triton.jit
def _activate(z, param, ACT: tl.constexpr):
    """``act(z)``: the formulas of ``syncbn.activations`` (torch's); NaN stays NaN."""
    if ACT == _RELU:
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == _LEAKY_RELU:
        return tl.where(z > 0.0, z, z * param)
    elif ACT == _ELU:
        return tl.where(z > 0.0, z, param * _expm1(z))
    elif ACT == _SILU:
        return z / (1.0 + tl.exp(-z))
    elif ACT == _GELU:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == _HARDSWISH:
        return z * tl.minimum(tl.where(z + 3.0 < 0.0, 0.0, z + 3.0), 6.0) / 6.0
    else:
        return z


@triton.jit
def _activation_grad(z, param, ACT: tl.constexpr):
    """``act'(z)`` from the pre-activation, with torch's backward kernels' sides at the kinks."""
    if ACT == _RELU:
        return tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == _LEAKY_RELU:
        return tl.where(z > 0.0, 1.0, param)
    elif ACT == _ELU:
        return tl.where(z <= 0.0, param * tl.exp(z), 1.0)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * (tl.exp(-0.5 * z * z) * 0.3989422804014327)
    elif ACT == _HARDSWISH:
        return tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _inverse(y, param, floor, ACT: tl.constexpr):
    """The pre-activation from the output of an invertible activation (``floor``: elu's
    smallest ``y / alpha``, see ``syncbn.activations.elu_inverse_floor``)."""
    if ACT == _LEAKY_RELU:
        return tl.where(y > 0.0, y, y / param)
    elif ACT == _ELU:
        ratio = y / param
        return tl.where(y > 0.0, y, _log1p(tl.where(ratio < floor, floor, ratio)))
    else:
        return y


@triton.jit
def _grad_from_output(y, param, ACT: tl.constexpr):
    """``act'`` of an invertible activation from its output (torch's in-place backward)."""
    if ACT == _LEAKY_RELU:
        return tl.where(y > 0.0, 1.0, param)
    elif ACT == _ELU:
        return tl.where(y <= 0.0, y + param, 1.0)
    else:
        return tl.full(y.shape, 1.0, tl.float32)


@triton.jit
def _pre_activation(x, mean, scale, shift):
    """``(x - mean) * scale + shift``: the one expression of the normalized output, which the
    backward kernels recompute exactly as the forward wrote it."""
    return (x - mean) * scale + shift


@triton.jit
def _grad_terms(x, dy, mean, scale, shift, inv_scale, param, floor, ACT: tl.constexpr, INPLACE: tl.constexpr):
    """``(x - mean, dy * act'(pre))`` at the values a backward kernel loaded.

    ``x`` is the input; INPLACE, the output y, from which ``pre = act^-1(y)`` and
    ``x - mean = (pre - shift) * inv_scale`` (``inv_scale = 1 / (invstd * w)``).
    """
    if INPLACE:
        pre = _inverse(x, param, floor, ACT)
        return (pre - shift) * inv_scale, dy * _grad_from_output(x, param, ACT)
    else:
        xmu = x - mean
        return xmu, dy * _activation_grad(xmu * scale + shift, param, ACT)


@triton.jit
def _scale_shift(invstd, c, mask, weight_ptr, bias_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel ``(invstd * w, b)`` in float32 (1 and 0 for an absent weight and bias)."""
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + c, mask=mask, other=1.0).to(tl.float32)
    else:
        scale = invstd
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros_like(scale)
    return scale, shift


@triton.jit
def _step_terms(
    x, dy, mask, pivot, scale, shift, inv_scale, param, floor,
    GRAD: tl.constexpr, ACT: tl.constexpr, INPLACE: tl.constexpr,
):  # fmt: skip
    """One step's terms of the two tile sums, 0 where masked.

    GRAD: ``g`` and ``g * (x - mean)`` with ``g = dy * act'(pre)`` (``pivot`` is the global
    mean; ``g = dy`` for the identity); statistics: ``d`` and ``d * d`` with ``d = x - pivot``.
    """
    if GRAD:
        if ACT != _IDENTITY or INPLACE:
            xmu, g = _grad_terms(x, dy, pivot, scale, shift, inv_scale, param, floor, ACT, INPLACE)
            g = tl.where(mask, g, 0.0)
            return g, g * tl.where(mask, xmu, 0.0)
        else:
            d = tl.where(mask, x - pivot, 0.0)
            return dy, dy * d
    else:
        d = tl.where(mask, x - pivot, 0.0)
        return d, d * d


@triton.jit
def _store_partials(part_ptr, c, c_mask, t, C, T, s1, s2, pivot, count, GRAD: tl.constexpr):
    """Tile ``t``'s partials of channels ``c``: ``[sum g, sum g*(x-mean)]`` (GRAD), else
    ``[tile mean - pivot, tile M2, pivot]`` from the sums of ``d = x - pivot`` over ``count`` values."""
    if GRAD:
        tl.store(part_ptr + c * T + t, s1, mask=c_mask)
        tl.store(part_ptr + C * T + c * T + t, s2, mask=c_mask)
    else:
        # The pivot travels apart from the shifted mean: their float32 sum would lose the
        # mean's low digits (an ulp of 1e4 is 1e-3) and the merge would turn that into variance.
        tl.store(part_ptr + c * T + t, s1 / count, mask=c_mask)
        m2 = s2 - s1 * (s1 / count)
        tl.store(part_ptr + C * T + c * T + t, tl.where(m2 < 0.0, 0.0, m2), mask=c_mask)  # keeps NaN
        tl.store(part_ptr + 2 * C * T + c * T + t, pivot, mask=c_mask)


@triton.jit
def _grad_channel_params(
    c, mask, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INPLACE: tl.constexpr,
):  # fmt: skip
    """What a GRAD reduction needs per channel: ``(mean, scale, shift, inv_scale)``, the last
    three only for an activation (placeholders otherwise)."""
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if ACT != _IDENTITY or INPLACE:
        invstd = tl.load(invstd_ptr + c, mask=mask, other=1.0).to(tl.float32)
        scale, shift = _scale_shift(invstd, c, mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
        return mean, scale, shift, 1.0 / scale
    else:
        return mean, mean, mean, mean


@triton.jit
def _ncs_step(
    x_ptr, dy_ptr, k, n_iter, n_lo, s_lo, s_hi, chunks, c0, C, S, offs, c_mask, s_offs,
    BLOCK_S: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """Step ``k`` of a (N, C, S) tile: [BLOCK_C, BLOCK_S] values of x (and dy) in float32.

    A step past the tile (``k >= n_iter``, the odd tail of the unrolled loop) loads nothing.
    """
    n = n_lo + k // chunks
    s0 = s_lo + (k % chunks) * BLOCK_S
    base = (n.to(tl.int64) * C + c0) * S + s0
    s_left = tl.where(k < n_iter, s_hi - s0, 0)
    mask = c_mask[:, None] & (s_offs[None, :] < s_left)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = x
    return x, dy, mask


@triton.jit(do_not_specialize=["N", "C", "rows_per", "col_splits", "c_blocks", "T"])
def _reduce_ncs_kernel(
    x_ptr,  # (N, C, S) contiguous input (GRAD and INPLACE: the layer's output)
    dy_ptr,  # (N, C, S) contiguous grad_out (GRAD only)
    mean_ptr,  # (C,) global mean (GRAD only)
    invstd_ptr,  # (C,) global invstd (GRAD with an activation)
    weight_ptr,  # (C,) (GRAD with an activation, HAS_WEIGHT)
    bias_ptr,  # (C,) (GRAD with an activation, HAS_BIAS)
    part_ptr,  # (3, C, T) float32 out: [tile mean - pivot, tile M2, pivot]; GRAD: (2, C, T) [sum g, sum g*(x-mean)]
    act_param,  # the activation's parameter (negative slope, alpha)
    act_floor,  # elu's smallest y / alpha (INPLACE)
    N,
    C,
    S,
    rows_per,  # samples per tile
    cols_per,  # positions of S per tile (a multiple of BLOCK_S)
    col_splits,  # tiles along S
    c_blocks,  # cdiv(C, BLOCK_C)
    T,  # tiles per channel = row splits * col_splits
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % c_blocks  # neighbouring programs read neighbouring channels
    t = pid // c_blocks
    pn = t // col_splits
    ps = t % col_splits
    n_lo = pn * rows_per
    n_hi = tl.minimum(n_lo + rows_per, N)
    s_lo = ps * cols_per
    s_hi = tl.minimum(s_lo + cols_per, S)
    chunks = tl.cdiv(s_hi - s_lo, BLOCK_S)
    n_iter = (n_hi - n_lo) * chunks

    c0 = cb * BLOCK_C
    c_local = tl.arange(0, BLOCK_C)
    c_mask = (c0 + c_local) < C
    s_offs = tl.arange(0, BLOCK_S)
    offs = c_local[:, None] * S + s_offs[None, :]  # BLOCK_C > 1 only when S is small

    # Step 0, peeled: it gives the per-channel pivot (statistics) or goes with the mean (GRAD).
    x, dy, mask = _ncs_step(
        x_ptr, dy_ptr, 0, n_iter, n_lo, s_lo, s_hi, chunks, c0, C, S, offs, c_mask, s_offs,
        BLOCK_S, GRAD,
    )  # fmt: skip
    if GRAD:
        pivot, scale, shift, inv_scale = _grad_channel_params(
            c0 + c_local, c_mask, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACT, INPLACE
        )
    else:
        pivot = tl.sum(x, axis=1) / tl.minimum(s_hi - s_lo, BLOCK_S).to(tl.float32)
        scale, shift, inv_scale = pivot, pivot, pivot
    # broadcast over the tile once
    p_b, scale_b, shift_b, inv_b = pivot[:, None], scale[:, None], shift[:, None], inv_scale[:, None]
    acc1, acc2 = _step_terms(x, dy, mask, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)

    # Two steps per iteration, so that two loads are in flight before either is used.
    for k in range(1, n_iter, 2):
        xa, dya, ma = _ncs_step(
            x_ptr, dy_ptr, k, n_iter, n_lo, s_lo, s_hi, chunks, c0, C, S, offs, c_mask, s_offs,
            BLOCK_S, GRAD,
        )  # fmt: skip
        xb, dyb, mb = _ncs_step(
            x_ptr, dy_ptr, k + 1, n_iter, n_lo, s_lo, s_hi, chunks, c0, C, S, offs, c_mask,
            s_offs, BLOCK_S, GRAD,
        )  # fmt: skip
        a1, a2 = _step_terms(xa, dya, ma, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)
        b1, b2 = _step_terms(xb, dyb, mb, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)
        acc1 += a1 + b1
        acc2 += a2 + b2

    count = ((n_hi - n_lo) * (s_hi - s_lo)).to(tl.float32)
    _store_partials(
        part_ptr, c0 + c_local, c_mask, t, C, T, tl.sum(acc1, axis=1), tl.sum(acc2, axis=1),
        pivot, count, GRAD,
    )  # fmt: skip


@triton.jit
def _mc_step(
    x_ptr, dy_ptr, k, m_lo, m_hi, C, offs, c_mask, m_offs,
    BLOCK_M: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """Step ``k`` of an (M, C) tile: [BLOCK_M, BLOCK_C] values of x (and dy) in float32.

    A step past the tile (the odd tail of the unrolled loop) has no rows left: it loads nothing.
    """
    m0 = m_lo + k * BLOCK_M
    base = m0.to(tl.int64) * C
    mask = (m_offs[:, None] < m_hi - m0) & c_mask[None, :]
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = x
    return x, dy, mask


@triton.jit(do_not_specialize=["M", "rows_per", "c_blocks", "T"])
def _reduce_mc_kernel(
    x_ptr,  # (M, C) row-major input (GRAD and INPLACE: the layer's output)
    dy_ptr,  # (M, C) row-major grad_out (GRAD only)
    mean_ptr,  # the per-channel arguments as in _reduce_ncs_kernel
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    part_ptr,  # (3 or 2, C, T) float32 out, as in _reduce_ncs_kernel
    act_param,
    act_floor,
    M,
    C,
    rows_per,  # rows per tile (a multiple of BLOCK_M)
    c_blocks,  # cdiv(C, BLOCK_C)
    T,  # tiles per channel = cdiv(M, rows_per)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % c_blocks
    t = pid // c_blocks
    m_lo = t * rows_per
    m_hi = tl.minimum(m_lo + rows_per, M)
    n_iter = tl.cdiv(m_hi - m_lo, BLOCK_M)

    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    m_offs = tl.arange(0, BLOCK_M)
    offs = m_offs[:, None] * C + c[None, :]

    x, dy, mask = _mc_step(x_ptr, dy_ptr, 0, m_lo, m_hi, C, offs, c_mask, m_offs, BLOCK_M, GRAD)
    if GRAD:
        pivot, scale, shift, inv_scale = _grad_channel_params(
            c, c_mask, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACT, INPLACE
        )
    else:
        pivot = tl.sum(x, axis=0) / tl.minimum(m_hi - m_lo, BLOCK_M).to(tl.float32)
        scale, shift, inv_scale = pivot, pivot, pivot
    # broadcast over the tile once
    p_b, scale_b, shift_b, inv_b = pivot[None, :], scale[None, :], shift[None, :], inv_scale[None, :]
    acc1, acc2 = _step_terms(x, dy, mask, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)

    for k in range(1, n_iter, 2):
        xa, dya, ma = _mc_step(x_ptr, dy_ptr, k, m_lo, m_hi, C, offs, c_mask, m_offs, BLOCK_M, GRAD)
        xb, dyb, mb = _mc_step(x_ptr, dy_ptr, k + 1, m_lo, m_hi, C, offs, c_mask, m_offs, BLOCK_M, GRAD)
        a1, a2 = _step_terms(xa, dya, ma, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)
        b1, b2 = _step_terms(xb, dyb, mb, p_b, scale_b, shift_b, inv_b, act_param, act_floor, GRAD, ACT, INPLACE)
        acc1 += a1 + b1
        acc2 += a2 + b2

    count = (m_hi - m_lo).to(tl.float32)
    _store_partials(part_ptr, c, c_mask, t, C, T, tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), pivot, count, GRAD)


@triton.jit(do_not_specialize=["C", "T", "R", "rows_per", "S", "cols_per", "col_splits"])
def _merge_kernel(
    part_ptr,  # (3 or 2, C, T) float32 tile partials from a _reduce_*_kernel
    out_ptr,  # stats: (2C+1,) float64 [sum x, sum x^2, count]; GRAD: (2C,) [sum dy, sum dy_xmu]
    invstd_ptr,  # (C,) global invstd (HAS_GRAD_WEIGHT)
    grad_weight_ptr,  # (C,) out: sum dy_xmu * invstd (HAS_GRAD_WEIGHT)
    grad_bias_ptr,  # (C,) out: sum dy (HAS_GRAD_BIAS)
    C,
    T,
    R,  # rows (N or M): with rows_per, S, cols_per, col_splits gives each tile's count
    rows_per,
    S,
    cols_per,
    col_splits,
    BLOCK_CM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr,
    HAS_GRAD_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid * BLOCK_CM + tl.arange(0, BLOCK_CM)
    c_mask = c < C
    t_offs = tl.arange(0, BLOCK_T)
    acc1 = tl.zeros([BLOCK_CM], dtype=tl.float64)  # GRAD: sum dy;  stats: running mean
    acc2 = tl.zeros([BLOCK_CM], dtype=tl.float64)  # GRAD: sum dy_xmu;  stats: running M2
    n = tl.zeros([BLOCK_CM], dtype=tl.float64)  # stats: values merged so far
    for t0 in range(0, T, BLOCK_T):
        t = t0 + t_offs
        t_mask = t < T
        mask = c_mask[:, None] & t_mask[None, :]
        offs = c[:, None] * T + t[None, :]
        p1 = tl.load(part_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        p2 = tl.load(part_ptr + C * T + offs, mask=mask, other=0.0).to(tl.float64)
        if not GRAD:  # tile mean = pivot + shifted mean, exact in float64
            p1 += tl.load(part_ptr + 2 * C * T + offs, mask=mask, other=0.0).to(tl.float64)
        if GRAD:
            acc1 += tl.sum(p1, axis=1)
            acc2 += tl.sum(p2, axis=1)
        else:
            # Chan: merge this chunk of tiles exactly (two sums), then merge it into the total.
            pn = t // col_splits
            ps = t % col_splits
            rows = tl.minimum(pn * rows_per + rows_per, R) - pn * rows_per
            cols = tl.minimum(ps * cols_per + cols_per, S) - ps * cols_per
            cnt = tl.where(t_mask, rows.to(tl.float64) * cols.to(tl.float64), 0.0)
            n_chunk = tl.sum(cnt, axis=0)
            mean_chunk = tl.sum(cnt[None, :] * p1, axis=1) / n_chunk
            dev = tl.where(mask, p1 - mean_chunk[:, None], 0.0)
            m2_chunk = tl.sum(p2 + cnt[None, :] * dev * dev, axis=1)
            n_new = n + n_chunk
            delta = mean_chunk - acc1
            acc1 += delta * (n_chunk / n_new)
            acc2 += m2_chunk + delta * delta * (n * n_chunk / n_new)
            n = n_new
    if GRAD:
        # Rounded to the sums' dtype first: the weight and bias gradients are exactly those
        # of the torch path, (sum dy_xmu * invstd) and sum dy in float32, cast to their dtype.
        sum_dy = acc1.to(out_ptr.dtype.element_ty)
        sum_dy_xmu = acc2.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + c, sum_dy, mask=c_mask)
        tl.store(out_ptr + C + c, sum_dy_xmu, mask=c_mask)
        if HAS_GRAD_WEIGHT:
            invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
            tl.store(grad_weight_ptr + c, sum_dy_xmu * invstd, mask=c_mask)
        if HAS_GRAD_BIAS:
            tl.store(grad_bias_ptr + c, sum_dy, mask=c_mask)
    else:
        tl.store(out_ptr + c, n * acc1, mask=c_mask)
        tl.store(out_ptr + C + c, acc2 + n * acc1 * acc1, mask=c_mask)
        if pid == 0:  # the count, exact in float64 (every channel has the same)
            tl.store(out_ptr + 2 * C, tl.sum(tl.where(c == 0, n, 0.0), axis=0))


@triton.jit
def _update_running(running_ptr, c, write, batch_value, w):
    """``running = lerp(running, batch_value, w)`` for the channels in ``write``, in float32.

    ``batch_value`` is first rounded to the buffer's dtype, and the lerp is torch.lerp's formula
    (two branches), so that a weight of 1 gives exactly what the torch path stores.
    """
    old = tl.load(running_ptr + c, mask=write)
    new = batch_value.to(old.dtype).to(tl.float32)
    old = old.to(tl.float32)
    upd = tl.where(w < 0.5, old + w * (new - old), new - (new - old) * (1.0 - w))
    tl.store(running_ptr + c, upd, mask=write)


@triton.jit
def _finalize_channels(
    stats_ptr,  # (2C+1,) float64 all-reduced [sum x, sum x^2, count]
    c,
    mask,  # channels to compute
    write,  # channels whose mean, invstd and running statistics this program writes
    mean_ptr,  # (C,) out
    invstd_ptr,  # (C,) out
    running_mean_ptr,  # (C,) updated in place (HAS_RUNNING_MEAN)
    running_var_ptr,  # (C,) updated in place (HAS_RUNNING_VAR)
    momentum_ptr,  # 0-d tensor (MOMENTUM_TENSOR)
    momentum,  # float (not MOMENTUM_TENSOR)
    eps,
    C,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
):
    """Global mean and invstd of channels ``c`` (float32) from the all-reduced statistics.

    Channels in ``write`` also get their mean and invstd stored and their running statistics
    updated: every channel must be in exactly one program's ``write``.
    """
    n = tl.load(stats_ptr + 2 * C)
    mean = tl.load(stats_ptr + c, mask=mask, other=0.0) / n
    var = tl.load(stats_ptr + C + c, mask=mask, other=0.0) / n - mean * mean
    # Clamped at 0 with where, not tl.maximum: maximum(NaN, 0) is 0, and a NaN or inf in the
    # input must leave its channel's statistics NaN, as in nn.BatchNorm.
    var = tl.where(var < 0.0, 0.0, var)
    mean32 = mean.to(tl.float32)
    invstd32 = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
    tl.store(mean_ptr + c, mean32, mask=write)
    tl.store(invstd_ptr + c, invstd32, mask=write)
    if HAS_RUNNING_MEAN or HAS_RUNNING_VAR:
        if MOMENTUM_TENSOR:
            w = tl.load(momentum_ptr).to(tl.float32)
        else:
            w = momentum
    if HAS_RUNNING_MEAN:
        _update_running(running_mean_ptr, c, write, mean32, w)
    if HAS_RUNNING_VAR:
        _update_running(running_var_ptr, c, write, (var * (n / (n - 1.0))).to(tl.float32), w)
    return mean32, invstd32


@triton.jit(do_not_specialize=["C"])
def _finalize_kernel(
    stats_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, momentum_ptr, momentum,
    eps, C,
    BLOCK: tl.constexpr, HAS_RUNNING_MEAN: tl.constexpr, HAS_RUNNING_VAR: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
):  # fmt: skip
    """``_finalize_channels`` for all channels, BLOCK per program (arguments as there)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    _finalize_channels(
        stats_ptr, c, mask, mask, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
        momentum_ptr, momentum, eps, C, HAS_RUNNING_MEAN, HAS_RUNNING_VAR, MOMENTUM_TENSOR,
    )  # fmt: skip


@triton.jit
def _channel_coefs(
    c, mask, leader,
    mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sums_ptr, count_ptr,
    stats_ptr, running_mean_ptr, running_var_ptr, momentum_ptr, momentum, eps,
    C,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
    FROM_STATS: tl.constexpr, HAS_RUNNING_MEAN: tl.constexpr, HAS_RUNNING_VAR: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
):  # fmt: skip
    """Per-channel (mean, a, b, k, shift) with out = (x - mean) * a + b [+ g * k], all float32.

    ``k`` is ``invstd * w`` and ``shift`` the bias (0 without one, or in backward without an
    activation): the pre-activation is ``(x - mean) * k + shift``.
    ``FROM_STATS`` (forward): mean and invstd come from the all-reduced statistics, and the
    channels in ``leader`` are finalized by this program (mean, invstd, running statistics
    written), which saves a launch; otherwise they are loaded from ``mean_ptr``, ``invstd_ptr``.
    """
    if FROM_STATS:
        mean, invstd = _finalize_channels(
            stats_ptr, c, mask, leader, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
            momentum_ptr, momentum, eps, C, HAS_RUNNING_MEAN, HAS_RUNNING_VAR, MOMENTUM_TENSOR,
        )  # fmt: skip
    else:
        mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
        invstd = tl.load(invstd_ptr + c, mask=mask, other=1.0).to(tl.float32)
    scale, shift = _scale_shift(invstd, c, mask, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    if BACKWARD:
        inv_count = 1.0 / tl.load(count_ptr).to(tl.float32)
        mean_dy = tl.load(sums_ptr + c, mask=mask, other=0.0).to(tl.float32) * inv_count
        mean_dy_xmu = tl.load(sums_ptr + C + c, mask=mask, other=0.0).to(tl.float32) * inv_count
        a = -scale * invstd * invstd * mean_dy_xmu
        b = -scale * mean_dy
    else:
        a = scale
        b = shift
    return mean, a, b, scale, shift


@triton.jit
def _elemt_values(
    x, dy, mean, a, b, k, shift, act_param, act_floor,
    BACKWARD: tl.constexpr, ACT: tl.constexpr, INPLACE: tl.constexpr,
):  # fmt: skip
    """What an elementwise program writes, from its loaded tile and broadcast coefficients.

    Forward: ``act((x - mean) * a + b)``. Backward: ``(x - mean) * a + b + g * k`` with
    ``g = dy * act'(pre)`` (``x - mean`` from the output when INPLACE).
    """
    if BACKWARD:
        if ACT != _IDENTITY or INPLACE:
            xmu, g = _grad_terms(x, dy, mean, k, shift, 1.0 / k, act_param, act_floor, ACT, INPLACE)
            return xmu * a + b + g * k
        else:
            out = _pre_activation(x, mean, a, b)
            out += dy * k
            return out
    else:
        return _activate(_pre_activation(x, mean, a, b), act_param, ACT)


@triton.jit(do_not_specialize=["R", "C", "s_blocks"])
def _elemt_ncs_kernel(
    x_ptr,  # (N, C, S) contiguous input (BACKWARD and INPLACE: the layer's output)
    dy_ptr,  # (N, C, S) contiguous grad_out (BACKWARD only)
    out_ptr,  # (N, C, S) contiguous out: y (may be x_ptr), or grad_input (BACKWARD)
    mean_ptr,  # (C,) in; out when FROM_STATS
    invstd_ptr,  # (C,) in; out when FROM_STATS
    weight_ptr,  # (C,) (HAS_WEIGHT)
    bias_ptr,  # (C,) (HAS_BIAS: forward, or backward with an activation)
    sums_ptr,  # (2C,) global [sum g, sum g*(x-mean)] (BACKWARD)
    count_ptr,  # 0-d float64 global count (BACKWARD)
    stats_ptr,  # (2C+1,) float64 all-reduced statistics (FROM_STATS)
    running_mean_ptr,  # (C,) (FROM_STATS and HAS_RUNNING_MEAN)
    running_var_ptr,  # (C,) (FROM_STATS and HAS_RUNNING_VAR)
    momentum_ptr,  # 0-d (FROM_STATS and MOMENTUM_TENSOR)
    momentum,
    eps,
    act_param,  # the activation's parameter (negative slope, alpha)
    act_floor,  # elu's smallest y / alpha (BACKWARD and INPLACE)
    R,  # N * C rows of S values
    C,
    S,
    s_blocks,  # cdiv(S, BLOCK_S)
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    FROM_STATS: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
    ACT: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid // s_blocks
    sb = pid % s_blocks
    r0 = rb * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < R
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = r_mask[:, None] & (s < S)[None, :]
    # Rows r < C are sample 0 of channel r: the first S block of each finalizes that channel.
    leader = r_mask & (r < C) & ((r * 0 + sb) == 0)  # a block-shaped mask (the interpreter wants one)
    mean, a, b, k, shift = _channel_coefs(
        r % C, r_mask, leader, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sums_ptr, count_ptr,
        stats_ptr, running_mean_ptr, running_var_ptr, momentum_ptr, momentum, eps, C,
        HAS_WEIGHT, HAS_BIAS, BACKWARD, FROM_STATS, HAS_RUNNING_MEAN, HAS_RUNNING_VAR,
        MOMENTUM_TENSOR,
    )  # fmt: skip
    offs = r0.to(tl.int64) * S + ((r - r0)[:, None] * S + s[None, :])
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = x
    out = _elemt_values(
        x, dy, mean[:, None], a[:, None], b[:, None], k[:, None], shift[:, None], act_param, act_floor,
        BACKWARD, ACT, INPLACE,
    )  # fmt: skip
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit(do_not_specialize=["M", "c_blocks"])
def _elemt_mc_kernel(
    x_ptr,  # (M, C) row-major input (BACKWARD and INPLACE: the layer's output)
    dy_ptr,  # (M, C) row-major grad_out (BACKWARD only)
    out_ptr,  # (M, C) row-major out (may be x_ptr)
    mean_ptr,  # the per-channel arguments as in _elemt_ncs_kernel
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    sums_ptr,
    count_ptr,
    stats_ptr,
    running_mean_ptr,
    running_var_ptr,
    momentum_ptr,
    momentum,
    eps,
    act_param,
    act_floor,
    M,
    C,
    c_blocks,  # cdiv(C, BLOCK_C)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    FROM_STATS: tl.constexpr,
    HAS_RUNNING_MEAN: tl.constexpr,
    HAS_RUNNING_VAR: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
    ACT: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid // c_blocks
    cb = pid % c_blocks
    m0 = mb * BLOCK_M
    m_local = tl.arange(0, BLOCK_M)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = ((m0 + m_local) < M)[:, None] & c_mask[None, :]
    mean, a, b, k, shift = _channel_coefs(
        c, c_mask, c_mask & ((c * 0 + mb) == 0), mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sums_ptr,
        count_ptr, stats_ptr, running_mean_ptr, running_var_ptr, momentum_ptr, momentum, eps, C,
        HAS_WEIGHT, HAS_BIAS, BACKWARD, FROM_STATS, HAS_RUNNING_MEAN, HAS_RUNNING_VAR,
        MOMENTUM_TENSOR,
    )  # fmt: skip
    offs = m0.to(tl.int64) * C + (m_local[:, None] * C + c[None, :])
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = x
    out = _elemt_values(
        x, dy, mean[None, :], a[None, :], b[None, :], k[None, :], shift[None, :], act_param, act_floor,
        BACKWARD, ACT, INPLACE,
    )  # fmt: skip
    tl.store(out_ptr + offs, out, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: the backend interface (see syncbn.ops.reference for the contract of each)
# ----------------------------------------------------------------------------------------------


def _act_args(act: Spec, saved_dtype: torch.dtype) -> tuple[float, float]:
    """The activation's runtime kernel arguments: its parameter and elu's inverse floor."""
    param = 0.0 if act.param is None else float(act.param)
    return param, elu_inverse_floor(saved_dtype) if act.inplace else 0.0


def _reduce(
    x: torch.Tensor,
    plan: Plan,
    dy: torch.Tensor | None,
    mean: torch.Tensor | None,
    act: Spec = IDENTITY,
    invstd: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch a reduce kernel; returns the (3 or 2, C, T) partials."""
    view, cfg = plan.view, plan.reduce
    grad = dy is not None
    part = torch.empty((2 if grad else 3, view.channels, cfg.tiles), dtype=torch.float32, device=x.device)
    fused = grad and act.needs_pre_activation
    per_channel = (
        mean if grad else part,
        invstd if fused else part,
        weight if fused and weight is not None else part,
        bias if fused and bias is not None else part,
    )
    consts = dict(
        **cfg.blocks, GRAD=grad, HAS_WEIGHT=fused and weight is not None, HAS_BIAS=fused and bias is not None,
        ACT=act.code if grad else 0, INPLACE=grad and act.inplace, num_warps=cfg.num_warps,
    )  # fmt: skip
    head = (x, dy if grad else x, *per_channel, part, *_act_args(act, x.dtype))
    if view.kind == "ncs":
        args = (
            *head, view.rows, view.channels, view.inner,
            cfg.rows_per, cfg.cols_per, cfg.col_splits, cfg.c_blocks, cfg.tiles,
        )  # fmt: skip
        launch(plan, _reduce_ncs_kernel, cfg.grid, args, consts)
    else:
        args = (*head, view.rows, view.channels, cfg.rows_per, cfg.c_blocks, cfg.tiles)
        launch(plan, _reduce_mc_kernel, cfg.grid, args, consts)
    return part


def _merge(
    part: torch.Tensor,
    out: torch.Tensor,
    plan: Plan,
    grad: bool,
    invstd: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> None:
    view, cfg = plan.view, plan.reduce
    args = (
        part, out,
        invstd if grad_weight is not None else out,
        grad_weight if grad_weight is not None else out,
        grad_bias if grad_bias is not None else out,
        view.channels, cfg.tiles, view.rows, cfg.rows_per, view.inner, cfg.cols_per,
        cfg.col_splits,
    )  # fmt: skip
    consts = dict(
        BLOCK_CM=cfg.merge_block_c, BLOCK_T=cfg.merge_block_t, GRAD=grad,
        HAS_GRAD_WEIGHT=grad_weight is not None, HAS_GRAD_BIAS=grad_bias is not None,
        num_warps=cfg.merge_warps,
    )  # fmt: skip
    launch(plan, _merge_kernel, cdiv(view.channels, cfg.merge_block_c), args, consts)


def local_stats(x: torch.Tensor) -> torch.Tensor:
    """Float64 ``[sum x per channel, sum x**2 per channel, count]`` (2C+1 values) of this rank.

    The sum of squares is ``M2 + n * mean**2`` from Chan's merge of float32 tile moments, never
    a float32 sum of squares.
    """
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
    x, plan = dense(x)
    part = _reduce(x, plan, None, None)
    packed = torch.empty(2 * channels + 1, dtype=torch.float64, device=x.device)
    _merge(part, packed, plan, grad=False)
    return packed


def forward_stats(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """``local_stats`` and the (here: no) scratch that ``normalize`` may reuse."""
    return local_stats(x), None


def local_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    eps: float,
    *,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> None:
    """No one-call path here: without a group the kernels run as usual, minus the all-reduce
    (they beat ATen's, and nothing is read back to the host)."""
    return None


def _running_args(running: RunningStats | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """Kernel arguments (pointers, momentum) and flags of the running-statistics update."""
    mean = None if running is None else running.mean
    var = None if running is None else running.var
    momentum = 0.0 if running is None else running.momentum
    momentum_tensor = isinstance(momentum, torch.Tensor)
    args = (
        mean if mean is not None else placeholder,
        var if var is not None else placeholder,
        momentum if momentum_tensor else placeholder,
        0.0 if momentum_tensor else float(momentum),
    )
    flags = dict(HAS_RUNNING_MEAN=mean is not None, HAS_RUNNING_VAR=var is not None, MOMENTUM_TENSOR=momentum_tensor)
    return args, flags


def finalize(
    stats: torch.Tensor, eps: float, running: RunningStats | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, invstd) in ``dtype``; running buffers updated in place, all in one launch."""
    channels = (stats.numel() - 1) // 2
    out = torch.empty((2, channels), dtype=dtype, device=stats.device)
    mean, invstd = out[0], out[1]
    running_args, flags = _running_args(running, mean)
    block = min(1024, next_pow2(max(channels, 1)))
    _finalize_kernel[(cdiv(channels, block),)](
        stats, mean, invstd, *running_args, float(eps), channels, BLOCK=block, num_warps=4, **flags
    )
    return mean, invstd


def _elemt(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    stats: torch.Tensor | None = None,
    running: RunningStats | None = None,
    eps: float = 0.0,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> torch.Tensor:
    """One elementwise pass: normalize and activate, or the input gradient when ``grad = (dy,
    sums, count)`` (``x`` is the output for an in-place activation).

    With ``stats`` (forward only), mean and invstd are outputs: the kernel finalizes them from
    the all-reduced statistics and updates ``running`` on the way. ``overwrite`` (forward): the
    output is written over ``x`` when the kernel reads ``x`` itself (dense strides).
    """
    x, plan = dense(x)
    view, cfg = plan.view, plan.elemt
    backward = grad is not None
    if backward:
        dy, sums, count = grad
        dy = match_layout(dy, x, view)
    else:
        dy, sums, count = x, mean, mean
    out = x if overwrite and plan.dense and not backward else torch.empty_like(x)  # x is dense: same strides
    from_stats = stats is not None
    running_args, running_flags = _running_args(running, mean)
    with_bias = bias is not None and (not backward or act.needs_pre_activation)
    args = (
        x, dy, out, mean, invstd,
        weight if weight is not None else mean, bias if with_bias else mean,
        sums, count, stats if from_stats else mean, *running_args, float(eps), *_act_args(act, x.dtype),
    )  # fmt: skip
    flags = dict(
        **cfg.blocks, HAS_WEIGHT=weight is not None, HAS_BIAS=with_bias, BACKWARD=backward,
        FROM_STATS=from_stats, **running_flags, ACT=act.code, INPLACE=backward and act.inplace,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    if view.kind == "ncs":
        args += (view.rows * view.channels, view.channels, view.inner, cfg.inner_blocks)
        launch(plan, _elemt_ncs_kernel, cfg.grid, args, flags)
    else:
        args += (view.rows, view.channels, cfg.inner_blocks)
        launch(plan, _elemt_mc_kernel, cfg.grid, args, flags)
    return out


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scratch: None = None,
    *,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> torch.Tensor:
    """``y = act((x - mean) * invstd * weight + bias)`` in x's dtype and memory format."""
    if x.numel() == 0:
        return x if overwrite else torch.empty_like(x)
    return _elemt(x, mean, invstd, weight, bias=bias, act=act, overwrite=overwrite)


def finalize_normalize(
    x: torch.Tensor,
    stats: torch.Tensor,
    *,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    scratch: None = None,
    act: Spec = IDENTITY,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finalize`` then ``normalize`` in one launch: ``(output, mean, invstd)``.

    The normalize kernel computes each channel's mean and invstd from ``stats`` itself; the
    programs that hold a channel's first block also store them and update its running
    statistics. A rank with an empty batch (the others had values) only finalizes.
    """
    if x.numel() == 0:
        mean, invstd = finalize(stats, eps, running, torch.float32)
        return (x if overwrite else torch.empty_like(x)), mean, invstd
    mean_invstd = torch.empty((2, x.shape[1]), dtype=torch.float32, device=x.device)
    mean, invstd = mean_invstd[0], mean_invstd[1]
    out = _elemt(
        x, mean, invstd, weight, bias=bias, stats=stats, running=running, eps=eps, act=act, overwrite=overwrite
    )
    return out, mean, invstd


def backward_prepare(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    act: Spec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Spec]:
    """Nothing to prepare: the kernels apply the activation's derivative (and, in place, its
    inverse) to each value as they load it. Returns the arguments as they came."""
    return grad_out, saved, mean, act


def backward_reduce(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Local ``[sum(dy), sum(dy * (x - mean))]`` per channel, 2C values of mean's dtype."""
    return backward_reduce_affine(grad_out, x, mean, None, weight_dtype=None, bias_dtype=None)[0]


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
    """``backward_reduce`` plus the weight and bias gradients, written by the same merge launch.

    ``(sums, grad_weight, grad_bias)``: ``grad_weight = sum_dy_xmu * invstd`` in
    ``weight_dtype`` and ``grad_bias = sum_dy`` in ``bias_dtype``, each None when its dtype is.
    With an activation, the sums are of ``g = dy * act'(pre)``, ``pre`` recomputed from ``x``,
    ``invstd``, ``weight`` and ``bias`` (in place: ``x`` is the output, inverted).
    """
    channels = x.shape[1]
    grad_weight = None if weight_dtype is None else torch.empty(channels, dtype=weight_dtype, device=x.device)
    grad_bias = None if bias_dtype is None else torch.empty(channels, dtype=bias_dtype, device=x.device)
    if x.numel() == 0:
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return torch.zeros(2 * channels, dtype=mean.dtype, device=x.device), grad_weight, grad_bias
    x, plan = dense(x)
    dy = match_layout(grad_out, x, plan.view)
    part = _reduce(x, plan, dy, mean, act, invstd, weight, bias)
    sums = torch.empty(2 * channels, dtype=mean.dtype, device=x.device)
    _merge(part, sums, plan, True, invstd, grad_weight, grad_bias)
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
    """Input gradient from the global ``sums = [sum_dy, sum_dy_xmu]`` and the global ``count``.

    ``dx = w * invstd * (g - sum_g / n - (x - mean) * invstd**2 * sum_g_xmu / n)`` with
    ``g = dy * act'(pre)`` (``dy`` for the identity), as ``backward_reduce_affine`` forms it.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    return _elemt(x, mean, invstd, weight, bias=bias, grad=(grad_out, sums, count), act=act)
