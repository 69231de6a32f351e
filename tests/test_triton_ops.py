"""The Triton kernels against the torch-ops path, op by op, on the same tensors.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_ops.py     # CPU, no GPU needed

Without CUDA the kernels run on CPU tensors under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); with CUDA (benchmarks/gpu_check.py) the same tests run the compiled kernels
on CUDA tensors. Shapes are tiny and awkward on purpose: the interpreter runs every program in
Python, and odd sizes are where tiling bugs live. Every case runs twice: with the default launch
rules, and with tiny tiles and many programs so that every channel is split over many tiles and
the merge kernel loops.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from syncbn import activations, settings
from syncbn.functional import sync_batch_norm, training_forward
from syncbn.ops import backend_name, launch_plan, reference
from syncbn.ops.launch_plan import Plan, Tuning
from syncbn.passes import RunningStats
from tests.oracle import away_from_kinks, layer_pair

triton_ops = pytest.importorskip("syncbn.ops.triton", reason="triton is not installed")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from syncbn.ops import fast_launch  # noqa: E402  (imports triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = (torch.float16, torch.bfloat16)

CASES = [
    pytest.param((5, 3), None, id="2d-N5-C3"),  # (N, C): the (M, C) path
    pytest.param((4, 3, 7), None, id="ncl-L7"),  # (N, C, L), odd L
    pytest.param((2, 3, 7, 7), None, id="nchw-hw49"),  # H*W = 49, not a power of two
    pytest.param((2, 3, 7, 7), torch.channels_last, id="nhwc-hw49"),
    pytest.param((1, 5, 3, 3), None, id="nchw-N1"),  # a single sample
    pytest.param((3, 6, 2, 3, 4), None, id="ncdhw"),
    pytest.param((3, 6, 2, 3, 4), torch.channels_last_3d, id="ndhwc"),
    pytest.param((2, 1, 48, 40), None, id="one-big-channel"),  # C = 1, 3840 values
    pytest.param((2, 130, 3, 3), None, id="nchw-C130"),  # non-power-of-two C > 128
    pytest.param((2, 130, 3, 3), torch.channels_last, id="nhwc-C130"),
    pytest.param((6, 4, 1, 1), None, id="nchw-hw1"),  # contiguous with S = 1: the (M, C) path
]

# Outputs in x's dtype: (rtol, atol). Both sides compute in float32 and round once.
OUT_TOL = {
    torch.float32: (1e-5, 1e-5),  # float32 math in another order: a few ulp
    torch.float16: (1e-3, 2e-3),  # one float16 rounding apart at most (ulp 2**-10)
    torch.bfloat16: (8e-3, 1.6e-2),  # one bfloat16 rounding apart at most (ulp 2**-7)
}

# Launch rules shrunk so that tiny tensors get what big ones get on a GPU: many tiles per channel
# (the merge kernel loops over them), and tiles of many steps (the reduce loop, odd and even
# step counts).
MANY_TILES = Tuning(
    tile_bytes=256, reduce_programs_per_sm=4, workspace_fraction=100.0, max_tiles=64,
    merge_step=4, sm_count=8,
)  # fmt: skip
LONG_TILES = Tuning(
    tile_bytes=64, reduce_programs_per_sm=3, workspace_fraction=100.0, max_tiles=64,
    merge_step=2, sm_count=1,
)  # fmt: skip
TILINGS = {"default-tiles": None, "many-tiles": MANY_TILES, "long-tiles": LONG_TILES}


@pytest.fixture(params=list(TILINGS))
def tiling(request, monkeypatch):
    if TILINGS[request.param] is not None:
        monkeypatch.setattr(launch_plan, "TUNING", TILINGS[request.param])
    return request.param


def make_input(shape, dtype, memory_format=None, mean=3.0, std=2.0, seed=0):
    """Random input with a different mean per channel, rounded to ``dtype``, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    channel_offset = torch.arange(shape[1], dtype=torch.float64).view((1, -1) + (1,) * (len(shape) - 2))
    x = (x + 0.25 * channel_offset).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.to(DEVICE)


def randn_like(x, seed):
    """Random values shaped, typed and laid out like ``x``."""
    g = torch.Generator().manual_seed(seed)
    return torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))


def exact_sums(dy, x, mean):
    """[sum dy, sum dy * (x - mean)] and the same sums of absolute values, in float64."""
    dims = [0] + list(range(2, x.dim()))
    xmu = x.double() - mean.double().view((1, -1) + (1,) * (x.dim() - 2))
    terms = (dy.double(), dy.double() * xmu)
    return torch.cat([t.sum(dims) for t in terms]), torch.cat([t.abs().sum(dims) for t in terms])


def moments(packed):
    """(count, mean, biased var) in float64 from a packed [sum, sum of squares, count]."""
    c = (packed.numel() - 1) // 2
    n = packed[-1]
    mean = packed[:c] / n
    return n, mean, packed[c : 2 * c] / n - mean * mean


def assert_same_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if x.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt, x.dim()):
            assert out.is_contiguous(memory_format=fmt) == x.is_contiguous(memory_format=fmt), fmt


# Every dtype with the default tiling; the shrunk tilings (loops over many tiles and steps, the
# same code whatever the dtype) once in single and once in half precision. On CUDA the shrunk
# tilings run in bfloat16 only: every tile shape is a compile.
DTYPE_TILINGS = [
    pytest.param(dtype, tiling, id=f"{tiling}-{str(dtype).removeprefix('torch.')}")
    for dtype, tiling in [
        (torch.float32, "default-tiles"),
        (torch.float16, "default-tiles"),
        (torch.bfloat16, "default-tiles"),
        (torch.bfloat16, "many-tiles"),
        (torch.float32 if DEVICE.type == "cpu" else torch.bfloat16, "long-tiles"),
    ]
]


@pytest.mark.parametrize("dtype, tiling", DTYPE_TILINGS, indirect=["tiling"])
@pytest.mark.parametrize("shape, memory_format", CASES)
def test_ops_match_reference(shape, memory_format, dtype, tiling):
    x = make_input(shape, dtype, memory_format)
    channels = shape[1]

    stats = triton_ops.local_stats(x)
    ref_stats = reference.local_stats(x)
    assert stats.dtype == torch.float64 and stats.shape == (2 * channels + 1,)
    n, mean, var = moments(stats)
    ref_n, ref_mean, ref_var = moments(ref_stats)
    assert n.item() == ref_n.item() == x.numel() // channels
    # float32 tile sums of shifted values, merged in float64: a few float32 ulps of the spread.
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6 * ref_var.max().sqrt().item())
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-9)

    # From here on both sides get the same inputs, so each op is checked on its own.
    ref_mean32, ref_invstd = reference.finalize(ref_stats, 1e-5, None, torch.float32)
    weight = torch.randn(channels, device=DEVICE)
    bias = torch.randn(channels, device=DEVICE)
    rtol, atol = OUT_TOL[dtype]
    y = triton_ops.normalize(x, ref_mean32, ref_invstd, weight, bias)
    assert_same_layout(y, x)
    torch.testing.assert_close(y, reference.normalize(x, ref_mean32, ref_invstd, weight, bias), rtol=rtol, atol=atol)

    dy = randn_like(x, seed=1)
    sums = triton_ops.backward_reduce(dy, x, ref_mean32)
    ref_sums = reference.backward_reduce(dy, x, ref_mean32)
    assert sums.dtype == ref_mean32.dtype and sums.shape == (2 * channels,)
    exact, abs_sums = exact_sums(dy, x, ref_mean32)
    # float32 sums of products: error a small multiple of eps32 times the sum of |terms|. Each
    # side against the float64 sums (ATen's CUDA reduction of half inputs is the looser one).
    assert ((sums.double() - exact).abs() <= 1e-5 * abs_sums + 1e-6).all()
    assert ((ref_sums.double() - exact).abs() <= 1e-3 * abs_sums + 1e-6).all()

    count = ref_stats[-1]
    grad_in = triton_ops.backward_elemt(dy, x, ref_mean32, ref_invstd, weight, ref_sums, count)
    assert_same_layout(grad_in, x)
    ref_grad_in = reference.backward_elemt(dy, x, ref_mean32, ref_invstd, weight, ref_sums, count)
    # float32: dx is a difference of O(1) terms, so compare with an absolute floor as well.
    torch.testing.assert_close(grad_in, ref_grad_in, rtol=rtol, atol=max(atol, 1e-5))


@pytest.mark.parametrize("shape, memory_format", CASES)
def test_fused_ops_match_their_parts(shape, memory_format, tiling):
    """``finalize_normalize`` and ``backward_reduce_affine`` (one launch each, what the layer
    calls) give bit for bit what the separate kernels give: mean, invstd, running statistics
    (each channel updated once, by exactly one program), output, sums, weight and bias grads."""
    # Which program finalizes a channel depends on the layout and the tiling, not the dtype:
    # one dtype per case keeps the interpreter's time down.
    dtype = torch.float32 if memory_format is None else torch.bfloat16
    if DEVICE.type == "cuda" and tiling != "default-tiles" and dtype != torch.bfloat16:
        pytest.skip("on CUDA the shrunk tilings run in bfloat16 only: every tile shape is a compile")
    x = make_input(shape, dtype, memory_format)
    channels = shape[1]
    stats = triton_ops.local_stats(x)
    weight = torch.randn(channels, device=DEVICE)
    bias = torch.randn(channels, device=DEVICE)
    running = [torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE) + 0.5]
    parts_running = [t.clone() for t in running]
    y, mean, invstd = triton_ops.finalize_normalize(
        x, stats, eps=1e-5, weight=weight, bias=bias, running=RunningStats(*running, 0.1)
    )
    parts_mean, parts_invstd = triton_ops.finalize(stats, 1e-5, RunningStats(*parts_running, 0.1), torch.float32)
    assert torch.equal(mean, parts_mean) and torch.equal(invstd, parts_invstd)
    assert torch.equal(running[0], parts_running[0]) and torch.equal(running[1], parts_running[1])
    assert_same_layout(y, x)
    assert torch.equal(y, triton_ops.normalize(x, mean, invstd, weight, bias))

    dy = randn_like(x, seed=1)
    sums, grad_weight, grad_bias = triton_ops.backward_reduce_affine(
        dy, x, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.bfloat16
    )
    assert torch.equal(sums, triton_ops.backward_reduce(dy, x, mean))
    assert grad_weight.dtype == torch.float32 and grad_bias.dtype == torch.bfloat16
    assert torch.equal(grad_weight, sums[channels:] * invstd)
    if DEVICE.type == "cuda":
        assert torch.equal(grad_bias, sums[:channels].to(torch.bfloat16))
    else:  # Triton's interpreter rounds float32 to bfloat16 toward zero, not to nearest
        torch.testing.assert_close(grad_bias.float(), sums[:channels], rtol=2**-7, atol=0)
    no_affine = triton_ops.backward_reduce_affine(dy, x, mean, invstd, weight_dtype=None, bias_dtype=None)
    assert no_affine[1:] == (None, None)


@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_fused_forward_on_an_empty_rank_still_finalizes(momentum_kind):
    # Another rank had the values: this one has none, but its running statistics and the
    # mean/invstd its backward needs come from the same all-reduced statistics.
    stats = reference.local_stats(make_input((4, 5, 3), torch.float32))
    momentum = 0.1 if momentum_kind == "float" else torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
    running = [torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)]
    ref_running = [t.clone() for t in running]
    x = torch.empty((0, 5, 3), device=DEVICE)
    y, mean, invstd = triton_ops.finalize_normalize(
        x, stats, eps=1e-5, weight=None, bias=None, running=RunningStats(*running, momentum)
    )
    ref_y, ref_mean, ref_invstd = reference.finalize_normalize(
        x, stats, eps=1e-5, weight=None, bias=None, running=RunningStats(*ref_running, momentum)
    )
    assert y.shape == x.shape
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(invstd, ref_invstd, rtol=1e-6, atol=0)
    for got, want in zip(running, ref_running):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    sums, grad_weight, grad_bias = triton_ops.backward_reduce_affine(
        x, x, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.float32
    )
    assert not sums.any() and not grad_weight.any() and not grad_bias.any()


@pytest.mark.parametrize("running", ["buffers", "no-buffers", "half-buffers"])
@pytest.mark.parametrize("momentum", [0.1, 1 / 3, 1.0], ids=["m0.1", "m1/3", "m1"])
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_finalize(running, momentum, momentum_kind):
    channels = 7  # not a power of two
    x = make_input((4, channels, 3), torch.float32)
    stats = reference.local_stats(x)
    if momentum_kind == "tensor":  # as SyncBatchNorm(momentum=None) passes it: float64, 0-d
        momentum = torch.tensor(momentum, dtype=torch.float64, device=DEVICE)
    buf_dtype = torch.bfloat16 if running == "half-buffers" else torch.float32
    rm = torch.randn(channels, device=DEVICE).to(buf_dtype)
    rv = (torch.rand(channels, device=DEVICE) + 0.5).to(buf_dtype)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with_buffers = running != "no-buffers"
    mean, invstd = triton_ops.finalize(
        stats, 1e-5, RunningStats(rm, rv, momentum) if with_buffers else None, torch.float32
    )
    ref_mean, ref_invstd = reference.finalize(
        stats, 1e-5, RunningStats(rm_ref, rv_ref, momentum) if with_buffers else None, torch.float32
    )
    # The same float64 formulas rounded once to float32 (eps travels as float32: 1e-8 relative).
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(invstd, ref_invstd, rtol=1e-6, atol=0)
    # Running buffers: the same lerp in float32 (bfloat16 buffers: one rounding apart).
    tol = dict(rtol=8e-3, atol=1e-2) if buf_dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rm, rm_ref, **tol)
    torch.testing.assert_close(rv, rv_ref, **tol)
    if not with_buffers:
        assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)


@pytest.mark.parametrize("affine", ["weight-and-bias", "weight-only", "bias-only", "neither"])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_optional_weight_and_bias(affine, memory_format):
    x = make_input((2, 5, 3, 3), torch.float32, memory_format)
    stats = reference.local_stats(x)
    mean, invstd = reference.finalize(stats, 1e-5, None, torch.float32)
    weight = torch.randn(5, device=DEVICE) if affine in ("weight-and-bias", "weight-only") else None
    bias = torch.randn(5, device=DEVICE) if affine in ("weight-and-bias", "bias-only") else None
    # float32 math in another order.
    torch.testing.assert_close(
        triton_ops.normalize(x, mean, invstd, weight, bias),
        reference.normalize(x, mean, invstd, weight, bias), rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    dy = randn_like(x, 2)
    sums = reference.backward_reduce(dy, x, mean)
    torch.testing.assert_close(
        triton_ops.backward_elemt(dy, x, mean, invstd, weight, sums, stats[-1]),
        reference.backward_elemt(dy, x, mean, invstd, weight, sums, stats[-1]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "x_format, dy_kind",
    [
        (torch.channels_last, "contiguous"),  # grad in another memory format: one copy
        (None, "channels_last"),
        (None, "expanded"),  # as y.sum().backward() gives: stride 0 everywhere
        (torch.channels_last, "expanded"),
    ],
    ids=["x-nhwc-dy-nchw", "x-nchw-dy-nhwc", "x-nchw-dy-expanded", "x-nhwc-dy-expanded"],
)
def test_grad_out_in_another_layout(x_format, dy_kind):
    x = make_input((2, 6, 5, 5), torch.bfloat16, x_format)
    stats = reference.local_stats(x)
    mean, invstd = reference.finalize(stats, 1e-5, None, torch.float32)
    if dy_kind == "expanded":
        dy = torch.ones((), dtype=x.dtype, device=DEVICE).expand(x.shape)
    else:
        dy = randn_like(x, 3)
        dy = dy.contiguous(memory_format=torch.channels_last if dy_kind == "channels_last" else torch.contiguous_format)
    weight = torch.randn(6, device=DEVICE)
    sums = triton_ops.backward_reduce(dy, x, mean)
    # Against float64 sums, not the torch path: on CPU, bfloat16 x and dy in different memory
    # formats make torch's native_batch_norm_backward round these sums to bfloat16.
    truth, abs_sums = exact_sums(dy, x, mean)
    # float32 sums of products: error a small multiple of eps32 times the sum of |terms|.
    assert ((sums.double() - truth).abs() <= 1e-5 * abs_sums + 1e-6).all()
    ref_sums = truth.float()
    grad_in = triton_ops.backward_elemt(dy, x, mean, invstd, weight, ref_sums, stats[-1])
    assert_same_layout(grad_in, x)
    rtol, atol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(
        grad_in, reference.backward_elemt(dy, x, mean, invstd, weight, ref_sums, stats[-1]),
        rtol=rtol, atol=atol,
    )  # fmt: skip


# --- the fused activation ------------------------------------------------------------------

# The kernels' activation helpers, probed one by one (globals of this module for the kernel).
_activate, _activation_grad = triton_ops._activate, triton_ops._activation_grad
_inverse, _grad_from_output = triton_ops._inverse, triton_ops._grad_from_output


@triton.jit
def _activation_probe_kernel(z_ptr, out_ptr, n, param, floor, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    z = tl.load(z_ptr + i, mask=mask, other=0.0)
    y = _activate(z, param, ACT)
    tl.store(out_ptr + i, y, mask=mask)
    tl.store(out_ptr + BLOCK + i, _activation_grad(z, param, ACT), mask=mask)
    tl.store(out_ptr + 2 * BLOCK + i, _inverse(y, param, floor, ACT), mask=mask)
    tl.store(out_ptr + 3 * BLOCK + i, _grad_from_output(y, param, ACT), mask=mask)


ACT_PARAMS = {"leaky_relu": 0.2, "elu": 0.7}


@pytest.mark.parametrize("name", list(activations.ACTIVATIONS))
def test_activation_helpers_match_the_table(name):
    """act, act' (with torch's sides at the kinks), and for the invertible ones the inverse and
    act' from the output, in float32, against ``syncbn.activations`` (torch's formulas)."""
    entry, param = activations.ACTIVATIONS[name], ACT_PARAMS.get(name)
    kinks = [0.0, -0.0, -3.0, 3.0, 1e-30, -1e-30]
    z = torch.cat([torch.linspace(-6, 6, 113), torch.tensor(kinks)]).to(DEVICE)
    block = triton.next_power_of_2(z.numel())
    out = torch.zeros(4, block, device=DEVICE)
    floor = activations.elu_inverse_floor(torch.float32)
    _activation_probe_kernel[(1,)](z, out, z.numel(), param or 0.0, floor, ACT=activations.CODES[name], BLOCK=block)
    y, grad, inverse, grad_from_output = out[:, : z.numel()]
    # float32 exp, erf and division in another order: a few ulps
    torch.testing.assert_close(y, entry.fn(z, param), rtol=4e-6, atol=1e-6)
    torch.testing.assert_close(grad, entry.derivative(z, param), rtol=4e-6, atol=1e-6)
    at_kinks = slice(-len(kinks), None)
    assert torch.equal(grad[at_kinks], entry.derivative(z, param)[at_kinks]), "a kink takes torch's side"
    if entry.inverse is not None:
        # elu's inverse divides y's float32 rounding by alpha * exp(z): 2.5e-3 at z = -6
        torch.testing.assert_close(inverse, z, rtol=1e-6, atol=1e-4 if name == "elu" else 1e-6)
        torch.testing.assert_close(grad_from_output, entry.derivative(z, param), rtol=1e-6, atol=1e-6)


def _fused_case(name, inplace, shape, fmt, dtype, tiling="default-tiles"):
    spec = activations.spec(name, ACT_PARAMS.get(name), inplace)
    layout = "x".join(map(str, shape)) + ("-nhwc" if fmt else "")
    label = f"{name}{'-inplace' if inplace else ''}-{layout}-{str(dtype).removeprefix('torch.')}-{tiling}"
    return pytest.param(spec, shape, fmt, dtype, tiling, id=label)


FUSED_SPECS = [(n, False) for n in activations.ACTIVATIONS if n != "identity"]
FUSED_SPECS += [(n, True) for n in ("identity", "leaky_relu", "elu")]
# Every activation (and in-place mode) in both layouts, float32, default tiles; a few of them in
# half precision, other ranks and many tiles (the interpreter runs every program in Python).
FUSED_CASES = [
    *(
        _fused_case(n, i, (2, 3, 7, 7), fmt, torch.float32)
        for n, i in FUSED_SPECS
        for fmt in (None, torch.channels_last)
    ),
    _fused_case("gelu", False, (2, 3, 7, 7), None, torch.bfloat16),
    _fused_case("elu", True, (2, 3, 7, 7), torch.channels_last, torch.float16),
    _fused_case("hardswish", False, (5, 3), None, torch.float32),
    _fused_case("leaky_relu", True, (3, 6, 2, 3, 4), None, torch.bfloat16),
    _fused_case("silu", False, (2, 1, 48, 40), None, torch.float32, tiling="many-tiles"),
    _fused_case("elu", True, (2, 130, 3, 3), torch.channels_last, torch.float32, tiling="long-tiles"),
]


def _pre_and_grad64(x, y, mean, invstd, weight, bias, spec):
    """float64 (pre-activation, x - mean) of the input ``x`` as the fused layer defines them."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    xmu = x.double() - mean.double().view(view)
    pre = xmu * (invstd.double() * weight.double()).view(view) + bias.double().view(view)
    return pre, xmu


@pytest.mark.parametrize("spec, shape, fmt, dtype, tiling_name", FUSED_CASES)
def test_fused_activation_ops_match_reference(spec, shape, fmt, dtype, tiling_name, monkeypatch):
    """``finalize_normalize``, ``backward_reduce_affine`` and ``backward_elemt`` with an
    activation (in place: backward from the output, written over the input) against the
    torch-ops path on the same tensors and against float64 sums."""
    if TILINGS[tiling_name] is not None:
        monkeypatch.setattr(launch_plan, "TUNING", TILINGS[tiling_name])
    x = make_input(shape, dtype, fmt, mean=0.5, std=1.5)
    channels = shape[1]
    stats = triton_ops.local_stats(x)
    gen = torch.Generator().manual_seed(4)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(DEVICE)
    bias = torch.randn(channels, generator=gen).to(DEVICE)
    y, mean, invstd = triton_ops.finalize_normalize(
        x, stats, eps=1e-5, weight=weight, bias=bias, running=None, act=spec
    )
    ref_y, _, _ = reference.finalize_normalize(x, stats, eps=1e-5, weight=weight, bias=bias, running=None, act=spec)
    assert_same_layout(y, x)
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(y, ref_y, rtol=rtol, atol=atol)
    over = x.clone()
    written = triton_ops.finalize_normalize(
        over, stats, eps=1e-5, weight=weight, bias=bias, running=None, act=spec, overwrite=True
    )[0]
    assert written.data_ptr() == over.data_ptr() and torch.equal(over, y)

    saved = y if spec.inplace else x
    dy = randn_like(x, seed=1)
    sums, grad_weight, grad_bias = triton_ops.backward_reduce_affine(
        dy,
        saved,
        mean,
        invstd,
        weight_dtype=torch.float32,
        bias_dtype=torch.float32,
        act=spec,
        weight=weight,
        bias=bias,
    )
    ref_sums, _, _ = reference.backward_reduce_affine(
        dy, saved, mean, invstd, weight_dtype=None, bias_dtype=None, act=spec, weight=weight, bias=bias
    )
    pre, xmu = _pre_and_grad64(x, y, mean, invstd, weight, bias, spec)
    g = dy.double() * spec.entry.derivative(pre, spec.param)
    dims = [0, *range(2, x.dim())]
    exact = torch.cat([g.sum(dims), (g * xmu).sum(dims)])
    abs_sums = torch.cat([g.abs().sum(dims), (g * xmu).abs().sum(dims)])
    # float32 sums of products (6e-8 of the sum of |terms|); in place, x - mean recovered from the
    # stored output (its rounding over |w| >= 0.5) and, for the kernels' side, x itself rounded
    # to half precision in the half cases: both against float64 sums of the true values.
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for side in (sums, ref_sums):
        assert ((side.double() - exact).abs() <= bound * abs_sums + 1e-5).all(), (side, exact)
    torch.testing.assert_close(grad_weight, sums[channels:] * invstd)
    torch.testing.assert_close(grad_bias, sums[:channels])

    count = stats[-1]
    grad_in = triton_ops.backward_elemt(dy, saved, mean, invstd, weight, ref_sums, count, act=spec, bias=bias)
    ref_grad_in = reference.backward_elemt(dy, saved, mean, invstd, weight, ref_sums, count, act=spec, bias=bias)
    assert_same_layout(grad_in, x)
    # dx = scale * g + (x - mean) * a + c: O(1) terms, float32 in another order (in place: from
    # the stored output on both sides); half precision: rounded once at the end.
    keep = away_from_kinks(pre, spec.entry.kinks, dtype)
    tol = dict(rtol=rtol, atol=max(atol, 1e-4 if spec.inplace else 1e-5))
    torch.testing.assert_close(grad_in[keep], ref_grad_in[keep], **tol)


@pytest.mark.parametrize("inplace", [False, True], ids=["fused", "inplace"])
def test_fused_layer_makes_six_launches_per_forward_and_backward(inplace, monkeypatch):
    """The activation lives in the existing passes: no launch of its own either way."""
    launches = []
    real = triton_ops.launch

    def recording(plan, kernel, grid, args, consts):
        launches.append(kernel.fn.__name__.split("_")[1])
        return real(plan, kernel, grid, args, consts)

    monkeypatch.setattr(triton_ops, "launch", recording)
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    spec = activations.spec("elu" if inplace else "silu", inplace=inplace)
    x = make_input((2, 3, 4, 4), torch.float32).requires_grad_()
    h = x * 1
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    bias = torch.zeros(3, device=DEVICE, requires_grad=True)
    y = training_forward(
        h, weight, bias, running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1, eps=1e-5,
        process_group=None, act=spec,
    )  # fmt: skip
    assert launches == ["reduce", "merge", "elemt"] and (y is h) == inplace
    y.backward(torch.ones_like(y))
    assert launches == ["reduce", "merge", "elemt"] * 2


def test_strided_input_is_copied_once_and_correct():
    base = make_input((3, 8, 6, 5), torch.float32)
    for x in (base[:, ::2], base.transpose(2, 3)):  # a channel slice, a spatial transpose
        assert not x.is_contiguous() and not x.movedim(1, -1).is_contiguous()
        stats = triton_ops.local_stats(x)
        ref_stats = reference.local_stats(x)
        # Same as the main test: float32 tile sums merged in float64.
        torch.testing.assert_close(moments(stats)[2], moments(ref_stats)[2], rtol=1e-5, atol=1e-9)
        mean, invstd = reference.finalize(ref_stats, 1e-5, None, torch.float32)
        y = triton_ops.normalize(x, mean, invstd, None, None)
        torch.testing.assert_close(y, reference.normalize(x, mean, invstd, None, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, memory_format",
    [((2, 3, 16, 16), None), ((2, 3, 16, 16), torch.channels_last), ((256, 3), None), ((1, 1, 64, 64), None)],
    ids=["nchw", "nhwc", "2d", "one-channel"],
)
def test_statistics_are_stable_at_large_mean(shape, memory_format, tiling):
    # mean 1e4, std 1: a float32 sum of squares minus the squared mean goes negative here.
    x = make_input(shape, torch.float32, memory_format, mean=1e4, std=1.0)
    n, mean, var = moments(triton_ops.local_stats(x))
    x64 = x.double().movedim(1, -1).reshape(-1, shape[1])
    # float32 x - pivot is exact and pivots travel apart from the shifted means: measured <= 3e-7
    # (rounding each tile's mean to float32 before merging gave 2e-5 here).
    torch.testing.assert_close(var, x64.var(0, unbiased=False), rtol=2e-6, atol=0)
    torch.testing.assert_close(mean, x64.mean(0), rtol=0, atol=1e-3)  # an ulp of 1e4 in float32
    mean32, invstd = triton_ops.finalize(triton_ops.local_stats(x), 1e-5, None, torch.float32)
    y = triton_ops.normalize(x, mean32, invstd, None, None)
    y64 = (x64 - x64.mean(0)) / (x64.var(0, unbiased=False) + 1e-5).sqrt()
    # y inherits the float32 mean's rounding (half an ulp of 1e4, 5e-4) times invstd (about 1).
    torch.testing.assert_close(y.double().movedim(1, -1).reshape(-1, shape[1]), y64, rtol=0, atol=2e-3)


def test_empty_input():
    x = torch.empty((0, 4, 3, 3), device=DEVICE)
    stats = triton_ops.local_stats(x)
    assert stats.shape == (9,) and not stats.any()
    mean, invstd = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    assert triton_ops.normalize(x, mean, invstd, None, None).shape == x.shape
    assert not triton_ops.backward_reduce(x, x, mean).any()
    assert (
        triton_ops.backward_elemt(x, x, mean, invstd, None, torch.zeros(8, device=DEVICE), stats[-1]).shape == x.shape
    )


def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(settings.BACKEND.name, raising=False)
    assert backend_name(x) == "torch"  # CPU tensors take the torch path by default
    assert backend_name(x.double()) == "torch"
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    assert backend_name(x) == "triton"  # the CI hook
    assert backend_name(x.double()) == "torch"  # float64 always stays on the torch path
    monkeypatch.setenv(settings.BACKEND.name, "torch")
    assert backend_name(x.cuda() if torch.cuda.is_available() else x) == "torch"


KERNEL_NAMES = [
    "_reduce_ncs_kernel",
    "_reduce_mc_kernel",
    "_merge_kernel",
    "_finalize_kernel",
    "_elemt_ncs_kernel",
    "_elemt_mc_kernel",
]


@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_six_launches_per_forward_and_backward(memory_format, monkeypatch):
    """Host time per launch is what bounds eager speed on small layers: the layer's forward and
    backward make three kernel launches each (reduce, merge, elementwise) and nothing else."""
    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches.append(self.name.split("_")[1])
                return launch(*args, **kwargs)

            return run

    for name in KERNEL_NAMES:
        monkeypatch.setattr(triton_ops, name, Counting(name, getattr(triton_ops, name)))
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    x = make_input((2, 3, 4, 4), torch.float32, memory_format).requires_grad_()
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    bias = torch.zeros(3, device=DEVICE, requires_grad=True)
    running = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = sync_batch_norm(x, *running, weight, bias, training=True)
    assert launches == ["reduce", "merge", "elemt"]
    y.backward(torch.ones_like(y))
    assert launches == ["reduce", "merge", "elemt"] * 2
    assert x.grad is not None and weight.grad is not None and bias.grad is not None


class FakeCompiled:
    """What Triton's JIT returns from a launch: the compiled kernel and its launcher."""

    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self):
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


class FakeKernel:
    arg_names = ["x_ptr", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.ordinary = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.ordinary.append((grid, args, kwargs))
            return self.compiled

        return launch


def test_fast_launch_reuses_the_compiled_kernel_per_specialization(monkeypatch):
    """The fast launch path's bookkeeping, with a fake kernel (the real one runs in
    tests/test_cuda.py): first launch of a specialization through Triton, the next ones
    straight to its launcher with every argument in signature order; anything that changes the
    specialization (a constexpr, num_warps, a dtype, 16-byte alignment) goes through Triton again."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    plan = Plan(None, True, None, None, cuda=True)
    kernel = FakeKernel()
    buf = torch.zeros(16)
    aligned, misaligned = buf[:8], buf[1:9]
    consts = dict(BLOCK=64, FLAG=True, num_warps=4)

    monkeypatch.setenv(settings.TRITON_FAST_LAUNCH.name, "0")
    for _ in range(2):
        fast_launch.launch(plan, kernel, 7, (aligned, 5), consts)
    assert len(kernel.ordinary) == 2 and not kernel.compiled.direct and not plan.launches

    monkeypatch.setenv(settings.TRITON_FAST_LAUNCH.name, "1")
    fast_launch.launch(plan, kernel, 7, (aligned, 5), consts)
    fast_launch.launch(plan, kernel, 9, (aligned, 6), consts)
    assert len(kernel.ordinary) == 3
    # grid (x, y, z), stream, function, metadata, launch metadata and hooks (none), then every
    # parameter in signature order: runtime arguments, then constexprs
    direct = kernel.compiled.direct[0]
    assert direct[:9] == (9, 1, 1, 1234, "function-handle", "packed-metadata", None, None, None)
    assert direct[9] is aligned and direct[10:] == (6, 64, True)

    for args, kw in [((misaligned, 5), consts), ((aligned, 5), dict(consts, FLAG=False)),
                     ((aligned, 5), dict(consts, num_warps=8)), ((aligned.double(), 5), consts)]:  # fmt: skip
        before = len(kernel.ordinary)
        fast_launch.launch(plan, kernel, 7, args, kw)
        assert len(kernel.ordinary) == before + 1, kw  # a new specialization: through Triton
        fast_launch.launch(plan, kernel, 7, args, kw)
        assert len(kernel.ordinary) == before + 1, kw  # and then direct

    # A launch hook set (a profiler): through Triton, so that the hook sees every launch.
    hooks = fast_launch.triton.knobs.runtime.launch_enter_hook
    hook = lambda metadata: None  # noqa: E731
    hooks.add(hook)
    try:
        before = len(kernel.ordinary)
        fast_launch.launch(plan, kernel, 7, (aligned, 5), consts)
        assert len(kernel.ordinary) == before + 1
    finally:
        hooks.remove(hook)

    interpreter_plan = Plan(None, True, None, None, cuda=False)
    for _ in range(2):
        fast_launch.launch(interpreter_plan, kernel, 7, (aligned, 5), consts)
    assert not interpreter_plan.launches
    missing = dict(BLOCK=64, num_warps=4)  # FLAG not given: no safe argument order, no caching
    assert fast_launch.constexpr_tail(kernel, (aligned, 5), missing) is None
    # A Triton older than 3.3 (launcher without the constexprs): never directly launched.
    monkeypatch.setattr(fast_launch, "LAUNCHER_TAKES_ALL_PARAMS", False)
    old_triton_plan = Plan(None, True, None, None, cuda=True)
    for _ in range(2):
        fast_launch.launch(old_triton_plan, kernel, 7, (aligned, 5), consts)
    assert not old_triton_plan.launches


@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_every_launch_passes_runtime_args_positionally_and_constexprs_by_name(memory_format, monkeypatch):
    """The fast path's argument order rests on this: each launch gives exactly the kernel's
    runtime parameters, in order, positionally, and every constexpr by name."""
    seen = []
    real = triton_ops.launch

    def recording(plan, kernel, grid, args, consts):
        seen.append((kernel, args, consts))
        return real(plan, kernel, grid, args, consts)

    monkeypatch.setattr(triton_ops, "launch", recording)
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    x = make_input((2, 3, 4, 4), torch.float32, memory_format).requires_grad_()
    for affine in (True, False):
        weight = torch.ones(3, device=DEVICE, requires_grad=True) if affine else None
        bias = torch.zeros(3, device=DEVICE, requires_grad=True) if affine else None
        sync_batch_norm(
            x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), weight, bias, training=True
        ).sum().backward()
        for spec in (activations.spec("gelu"), activations.spec("leaky_relu", inplace=True)):  # SyncBatchNormAct's
            training_forward(
                x * 1, weight, bias, running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1,
                eps=1e-5, process_group=None, act=spec,
            ).sum().backward()  # fmt: skip
    assert len(seen) == 36
    for kernel, args, consts in seen:
        params = list(inspect.signature(kernel.fn).parameters.values())  # JIT and interpreter alike
        name = kernel.fn.__name__
        assert [p.name for p in params] == kernel.arg_names, name
        constexpr_positions = {i for i, p in enumerate(params) if "constexpr" in str(p.annotation)}
        assert constexpr_positions == set(range(len(args), len(params))), name
        tail = fast_launch.constexpr_tail(kernel, args, consts)
        assert tail is not None and len(args) + len(tail) == len(params), name


def test_import_syncbn_does_not_import_triton():
    code = "import sys, syncbn; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- the layer with the kernels forced: SyncBatchNorm (triton) against nn.BatchNorm ---------


def _train_two_steps(module, x_steps, dys):
    outs, grads = [], []
    for x, dy in zip(x_steps, dys):
        x = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(dy)
        outs.append(y.detach())
        grads.append((x.grad, module.weight.grad, module.bias.grad))
    return outs, grads


@pytest.mark.parametrize(
    "shape, memory_format, dtype, momentum",
    [
        ((4, 6, 5, 5), None, torch.float32, 0.1),
        ((4, 6, 5, 5), torch.channels_last, torch.float32, None),  # cumulative average
        ((3, 5, 2, 3, 4), torch.channels_last_3d, torch.float32, 0.3),
        ((6, 10), None, torch.float32, 0.1),
        ((4, 6, 5, 5), torch.channels_last, torch.bfloat16, 0.1),
    ],
    ids=["nchw", "nhwc-momentum-none", "ndhwc", "2d", "nhwc-bf16"],
)
def test_layer_with_triton_backend(monkeypatch, shape, memory_format, dtype, momentum):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    ours, theirs = layer_pair(shape, momentum, DEVICE)
    xs = [make_input(shape, dtype, memory_format, seed=s) for s in (10, 11)]
    dys = [randn_like(x, s) for x, s in zip(xs, (20, 21))]
    if dtype in HALF:  # the reference: float32 BatchNorm on the same (rounded) values
        y_ours, g_ours = _train_two_steps(ours, xs, dys)
        y_ref, g_ref = _train_two_steps(theirs, [x.float() for x in xs], [d.float() for d in dys])
    else:
        y_ours, g_ours = _train_two_steps(ours, xs, dys)
        y_ref, g_ref = _train_two_steps(theirs, xs, dys)
    rtol, atol = OUT_TOL[dtype]
    for a, b in zip(y_ours, y_ref):
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol)
    for (gx, gw, gb), (rx, rw, rb) in zip(g_ours, g_ref):
        torch.testing.assert_close(gx.float(), rx, rtol=rtol, atol=atol)
        # weight/bias grads: float32 sums over at most ~150 values.
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)
    # Running statistics: float64 vs float32 statistics of the same values.
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
    assert y_ours[0].is_contiguous(memory_format=memory_format or torch.contiguous_format)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="gloo on CPU tensors; tests/test_cuda.py covers NCCL")
def test_layer_with_triton_backend_synced_world_of_one(monkeypatch, tmp_path):
    import torch.distributed as dist

    import syncbn

    monkeypatch.setenv(settings.BACKEND.name, "triton")
    monkeypatch.setenv(settings.ALWAYS_SYNC.name, "1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ours, theirs = syncbn.SyncBatchNorm(6), nn.BatchNorm2d(6)
        x = make_input((4, 6, 5, 5), torch.float32, torch.channels_last)
        dy = randn_like(x, 5)
        (y_ours,), ((gx, gw, gb),) = _train_two_steps(ours, [x], [dy])
        (y_ref,), ((rx, rw, rb),) = _train_two_steps(theirs, [x], [dy])
        # float32 math in another order, as above.
        torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
