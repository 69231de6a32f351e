"""The torch-ops backend (syncbn.ops.reference), each of its paths, against float64 formulas.

    python -m pytest -q tests/test_reference_ops.py

The CPU path picks its ATen kernels by layout and size (pivot-centred statistics for large
contiguous (N, C, S) input, broadcast addcmul where channels are the contiguous axis, the
eval-mode batch-norm kernel otherwise, ATen's own training kernels without a group); every path
must give what the float64 formulas give, in the input's dtype and memory format.
"""

from __future__ import annotations

import pytest
import torch

from syncbn.ops import reference
from syncbn.passes import RunningStats

CASES = [
    pytest.param((4, 8, 32, 32), None, True, id="nchw-pivot"),  # >= PIVOT_MIN_VALUES: centred scratch
    pytest.param((2, 3, 4, 5), None, False, id="nchw-small"),  # below it: ATen's statistics
    pytest.param((4, 8, 32, 32), torch.channels_last, False, id="nhwc"),  # channels contiguous
    pytest.param((2, 5, 3, 4, 6), torch.channels_last_3d, False, id="ndhwc"),
    pytest.param((64, 24), None, False, id="2d"),
    pytest.param((6, 4, 1, 1), None, False, id="nchw-hw1"),  # contiguous with S = 1
    pytest.param((2, 6, 70000), None, False, id="ncl-long-row"),  # S past PIVOT_MAX_ROW
]
# Outputs in x's dtype: (rtol, atol); each path rounds once from float32 (float64) math.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 2e-2),
}


def _input(shape, dtype, memory_format, seed=0, mean=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean
    offset = torch.arange(shape[1], dtype=torch.float64).view((1, -1) + (1,) * (len(shape) - 2))
    x = (x + offset).to(dtype)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def _dims(x):
    return [0, *range(2, x.dim())]


def _layout_kept(y, x):
    fmt = reference.memory_format_of(x)
    return y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, memory_format, pivot", CASES)
def test_every_path_matches_float64_formulas(shape, memory_format, pivot, dtype):
    if pivot and dtype == torch.bfloat16:
        pivot = False  # half precision takes the statistics of its float32 upcast, no scratch
    x = _input(shape, dtype, memory_format)
    channels = shape[1]
    x64 = x.double()
    count = x.numel() // channels
    weight = torch.linspace(0.5, 1.5, channels, dtype=reference.stat_dtype(dtype))
    bias = torch.linspace(-1, 1, channels, dtype=weight.dtype)
    mean64, var64 = x64.mean(_dims(x)), x64.var(_dims(x), unbiased=False)

    stats, scratch = reference.forward_stats(x)
    assert (scratch is not None) == pivot
    assert stats.dtype == torch.float64 and stats[-1].item() == count
    torch.testing.assert_close(stats[:channels], mean64 * count, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)

    running = RunningStats(torch.zeros(channels, dtype=weight.dtype), torch.ones(channels, dtype=weight.dtype), 0.1)
    y, mean, invstd = reference.finalize_normalize(
        x, stats, eps=1e-5, weight=weight, bias=bias, running=running, scratch=scratch
    )
    rtol, atol = TOL[dtype]
    shape_c = (1, -1) + (1,) * (x.dim() - 2)
    y64 = (x64 - mean64.view(shape_c)) / (var64 + 1e-5).sqrt().view(shape_c) * weight.double().view(
        shape_c
    ) + bias.double().view(shape_c)
    assert _layout_kept(y, x)
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
    stat_tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), mean64, **stat_tol)
    torch.testing.assert_close(invstd.double(), (var64 + 1e-5).rsqrt(), **stat_tol)
    torch.testing.assert_close(running.mean.double(), 0.1 * mean64, **stat_tol)
    torch.testing.assert_close(running.var.double(), 0.9 + 0.1 * var64 * count / (count - 1), **stat_tol)

    dy = _input(shape, dtype, memory_format, seed=1, mean=0.0)
    dy64 = dy.double()
    xmu64 = x64 - mean.double().view(shape_c)  # the backward works with the mean it was given
    sums, grad_weight, grad_bias = reference.backward_reduce_affine(
        dy, x, mean, invstd, weight_dtype=weight.dtype, bias_dtype=weight.dtype
    )
    sum_dy64, sum_dy_xmu64 = dy64.sum(_dims(x)), (dy64 * xmu64).sum(_dims(x))
    sum_tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sums.double(), torch.cat([sum_dy64, sum_dy_xmu64]), **sum_tol)
    torch.testing.assert_close(grad_bias.double(), sum_dy64, **sum_tol)
    torch.testing.assert_close(grad_weight.double(), sum_dy_xmu64 * invstd.double(), **sum_tol)
    assert grad_bias.data_ptr() != sums.data_ptr()  # the caller all-reduces sums in place

    grad_in = reference.backward_elemt(dy, x, mean, invstd, weight, sums, stats[-1])
    inv = invstd.double().view(shape_c)
    grad64 = (
        weight.double().view(shape_c)
        * inv
        * (dy64 - sum_dy64.view(shape_c) / count - xmu64 * inv * inv * sum_dy_xmu64.view(shape_c) / count)
    )
    assert _layout_kept(grad_in, x)
    torch.testing.assert_close(grad_in.double(), grad64, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "shape, memory_format", [((5, 3, 4, 4), None), ((5, 3, 4, 4), torch.channels_last), ((9, 4), None)]
)
@pytest.mark.parametrize("momentum", [0.1, "tensor"])
def test_local_kernel_is_batch_norm_itself(shape, memory_format, momentum):
    """Without a group the CPU path is ATen's own training kernel: bit for bit nn.BatchNorm."""
    channels = shape[1]
    x = _input(shape, torch.float32, memory_format).requires_grad_()
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(channels)
    weight, bias = ref.weight.detach().clone(), ref.bias.detach().clone()
    running = RunningStats(
        torch.zeros(channels),
        torch.ones(channels),
        torch.tensor(0.1, dtype=torch.float64) if momentum == "tensor" else momentum,
    )
    y, mean, invstd = reference.local_batch_norm(x.detach(), weight, bias, running, 1e-5)
    y_ref = ref(x)
    assert torch.equal(y, y_ref.detach()) and _layout_kept(y, x)
    assert torch.equal(running.mean, ref.running_mean) and torch.equal(running.var, ref.running_var)
    dy = _input(shape, torch.float32, memory_format, seed=1, mean=0.0)
    grad_in, grad_weight, grad_bias = reference.local_batch_norm_backward(
        dy, x.detach(), weight, mean, invstd, 1e-5, (True, True, True)
    )
    y_ref.backward(dy)
    assert torch.equal(grad_in, x.grad) and torch.equal(grad_weight, ref.weight.grad)
    assert torch.equal(grad_bias, ref.bias.grad)


def test_local_kernel_declines_what_it_cannot_do_exactly():
    x = torch.randn(4, 3, 2, 2).bfloat16()
    # half precision with no float32 parameter: ATen would keep the statistics in bfloat16
    assert reference.local_batch_norm(x, None, None, None, 1e-5) is None
    assert reference.local_batch_norm(x, torch.ones(3), torch.zeros(3), None, 1e-5) is not None
