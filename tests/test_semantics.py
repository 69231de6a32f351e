"""Contract details beyond the oracle sweep: collectives, edge counts, errors, numerics, gradcheck."""

from __future__ import annotations

import contextlib
import inspect
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from syncbn import settings
from syncbn.functional import sync_batch_norm

DEVICE = settings.TEST_DEVICE.get()
# Without CUDA, SYNCBN_TEST_DEVICE=cuda skips this file (tests/conftest.py).
pytestmark = pytest.mark.test_device


@contextlib.contextmanager
def count_collectives():
    """Record every collective call made through torch.distributed (name, shape, dtype)."""
    calls: list[tuple[str, tuple, torch.dtype | None]] = []
    originals = {
        name: getattr(dist, name)
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter")
        if hasattr(dist, name)
    }

    def wrap(name, fn):
        def wrapper(tensor, *args, **kwargs):
            t = tensor if isinstance(tensor, torch.Tensor) else None
            calls.append((name, tuple(t.shape) if t is not None else (), t.dtype if t is not None else None))
            return fn(tensor, *args, **kwargs)

        return wrapper

    with contextlib.ExitStack() as stack:
        for name, fn in originals.items():
            stack.enter_context(mock.patch.object(dist, name, wrap(name, fn)))
        yield calls


def _rand(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# One collective per pass, of the right size, and none where there is nothing to synchronize.


def _case_count_collectives(ctx, channels, n, always_sync):
    env = {settings.ALWAYS_SYNC.name: "1"} if always_sync else {}
    layer = syncbn.SyncBatchNorm(channels, process_group=ctx.group).to(DEVICE)
    x = _rand((n, channels, 4, 4), ctx.rank).requires_grad_()
    with mock.patch.dict(os.environ, env), count_collectives() as forward_calls:
        y = layer(x)
    with mock.patch.dict(os.environ, env), count_collectives() as backward_calls:
        y.sum().backward()
    layer.eval()
    with count_collectives() as eval_calls:
        layer(x)
    return forward_calls, backward_calls, eval_calls


@pytest.mark.parametrize("group,sizes", [("w2", [2, 3]), ("w4", [1, 0, 2, 3]), ("odd", [0, 4])])
def test_one_all_reduce_per_pass(pool, group, sizes):
    channels = 5
    results = pool.run(_case_count_collectives_sized, group=group, args=(channels,), per_rank_args=sizes)
    for forward_calls, backward_calls, eval_calls in results:
        assert forward_calls == [("all_reduce", (2 * channels + 1,), torch.float64)]
        assert len(backward_calls) == 1 and backward_calls[0][:2] == ("all_reduce", (2 * channels,))
        assert eval_calls == []


def _case_count_collectives_sized(ctx, channels, n):
    return _case_count_collectives(ctx, channels, n, False)


def test_group_of_one_does_not_communicate_unless_forced(pool):
    [(fwd, bwd, _)] = pool.run(_case_count_collectives, group="w1", args=(3, 4, False))
    assert fwd == [] and bwd == []
    [(fwd, bwd, _)] = pool.run(_case_count_collectives, group="w1", args=(3, 4, True))
    assert fwd == [("all_reduce", (7,), torch.float64)]
    assert len(bwd) == 1 and bwd[0][:2] == ("all_reduce", (6,))


def test_without_process_group_is_plain_batch_norm():
    assert not dist.is_initialized()
    layer = syncbn.SyncBatchNorm(4, momentum=None).double()
    ref = nn.BatchNorm2d(4, momentum=None).double()
    for step in range(3):
        x = _rand((5, 4, 3, 3), step, torch.float64).cpu()
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer(xs).pow(2).sum().backward()
        ref(xr).pow(2).sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# No host read-back on the training path (only a rank with <= 1 value per channel may read).


def _case_no_host_sync(ctx, n):
    layer = syncbn.SyncBatchNorm(3, process_group=ctx.group).to(DEVICE)
    x = _rand((n, 3, 2, 2), ctx.rank).requires_grad_()

    def forbidden(*args, **kwargs):
        raise AssertionError("host read-back on the training path")

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "__bool__", "nonzero"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, forbidden))
        y = layer(x)
        y.backward(torch.ones_like(y))
    return True


def test_no_host_read_back_when_local_count_at_least_two(pool):
    assert pool.run(_case_no_host_sync, group="w2", per_rank_args=[1, 3]) == [True, True]


# ---------------------------------------------------------------------------------------------
# Global count rules: 1 value -> ValueError on every rank; 0 values -> empty output, no error.


def _case_count_rule(ctx, shape):
    layer = syncbn.SyncBatchNorm(3, process_group=ctx.group)
    layer.running_mean.fill_(0.25)
    x = torch.randn(shape, requires_grad=True)
    try:
        y = layer(x)
    except ValueError as err:
        outcome = ("ValueError", str(err))
    else:
        y.sum().backward()
        outcome = ("ok", tuple(y.shape))
    # the group must still be usable: nobody is left inside a collective
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.group)
    return outcome, layer.running_mean.clone(), int(layer.num_batches_tracked), t.item()


def test_one_value_per_channel_across_group_raises_on_every_rank(pool):
    results = pool.run(_case_count_rule, group="w3", per_rank_args=[(0, 3), (1, 3), (0, 3)])
    for (kind, message), _, _, total in results:
        assert kind == "ValueError"
        assert message.startswith("Expected more than 1 value per channel when training")
        assert total == 3.0


def test_empty_global_batch_is_a_no_op(pool):
    results = pool.run(_case_count_rule, group="w2", per_rank_args=[(0, 3, 2), (0, 3, 2)])
    for (kind, shape), running_mean, batches, _ in results:
        assert (kind, shape) == ("ok", (0, 3, 2))
        assert torch.equal(running_mean, torch.full((3,), 0.25))  # untouched
        assert batches == 1  # as nn.BatchNorm on an empty batch


def _case_empty_global_batch_grads(ctx, compiled: bool, act: str):
    if act == "none":
        layer = syncbn.SyncBatchNorm(3, process_group=ctx.group)
    else:
        layer = syncbn.SyncBatchNormAct(3, activation="elu", inplace=act == "inplace", process_group=ctx.group)
    forward = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    x = torch.zeros(0, 3, 2, requires_grad=True)
    forward(x * 1).sum().backward()  # a non-leaf, which the in-place layer may write over
    return x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("act", ["none", "fused", "inplace"], ids=["SyncBatchNorm", "SyncBatchNormAct", "inplace"])
def test_empty_global_batch_gives_zero_gradients(pool, compiled, act):
    bn = nn.BatchNorm1d(3)
    x = torch.zeros(0, 3, 2, requires_grad=True)
    bn(x).sum().backward()
    assert torch.equal(bn.weight.grad, torch.zeros(3))  # what syncbn must match: zeros, not None
    for dx, dw, db in pool.run(_case_empty_global_batch_grads, group="w2", args=(compiled, act), timeout=120):
        assert dx.shape == (0, 3, 2)
        for grad in (dw, db):
            assert grad is not None and grad.dtype == torch.float32 and torch.equal(grad, torch.zeros(3))


def test_one_sample_spread_thin_is_fine(pool):
    # one value on each of two ranks: a global count of 2 is a valid batch
    results = pool.run(_case_count_rule, group="w2", per_rank_args=[(1, 3), (1, 3)])
    assert [r[0][0] for r in results] == ["ok", "ok"]


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming expected and actual.


@pytest.mark.parametrize(
    "shape,dtype,exc,match",
    [
        ((4,), torch.float32, ValueError, "expected 2D to 5D input.*got 1D"),
        ((2, 3, 2, 2, 2, 2), torch.float32, ValueError, "expected 2D to 5D input.*got 6D"),
        ((4, 5, 2), torch.float32, ValueError, "expected input with 3 channels.*got 5"),
        ((4, 3, 2), torch.int64, TypeError, "floating-point.*torch.int64"),
        ((4, 3, 2), torch.bool, TypeError, "floating-point.*torch.bool"),
    ],
)
def test_bad_input_errors(shape, dtype, exc, match):
    layer = syncbn.SyncBatchNorm(3)
    with pytest.raises(exc, match=match):
        layer(torch.zeros(shape, dtype=dtype))
    with pytest.raises(exc, match=match):
        sync_batch_norm(torch.zeros(shape, dtype=dtype), None, None, torch.ones(3), torch.zeros(3), training=True)


def test_single_process_one_value_raises():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        syncbn.SyncBatchNorm(3)(torch.randn(1, 3))


def test_functional_rejects_momentum_none():
    with pytest.raises(TypeError, match="momentum"):
        sync_batch_norm(torch.randn(4, 3), None, None, training=True, momentum=None)


# ---------------------------------------------------------------------------------------------
# Drop-in: constructor, class hierarchy, state_dict, eval behaviour.


def test_constructor_mirrors_torch_syncbatchnorm():
    ours = inspect.signature(syncbn.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert (ours[name].default, ours[name].kind) == (param.default, param.kind), name


@pytest.mark.parametrize("torch_takes_bias", [True, False], ids=["torch-bias-kwarg", "older-torch"])
def test_bias_false_trains_like_batchnorm_without_bias(monkeypatch, torch_takes_bias):
    # torch before 2.13 has no bias= keyword: syncbn then removes the bias itself
    monkeypatch.setattr(syncbn.nn, "_TORCH_BATCHNORM_TAKES_BIAS", torch_takes_bias)
    ours = syncbn.SyncBatchNorm(4, bias=False)
    theirs = nn.BatchNorm2d(4, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours).removeprefix("SyncBatchNorm") == repr(theirs).removeprefix("BatchNorm2d")
    x = torch.randn(3, 4, 2, 2) * 2 + 1
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for layer, xi in zip((ours, theirs), xs):
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
        layer(xi).pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert syncbn.SyncBatchNorm(4).bias is not None


def test_is_a_batchnorm_with_batchnorm2d_state_dict():
    layer = syncbn.SyncBatchNorm(8)
    assert isinstance(layer, _BatchNorm)
    ref = nn.BatchNorm2d(8)
    assert list(layer.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.running_mean.uniform_()
        ref.weight.uniform_()
    ref.num_batches_tracked.fill_(7)
    layer.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), ref.state_dict().values()))
    ref.load_state_dict(syncbn.SyncBatchNorm(8).state_dict())


def test_eval_without_running_stats_uses_local_batch_statistics():
    layer = syncbn.SyncBatchNorm(3, track_running_stats=False).eval()
    x = torch.randn(6, 3, 4)
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, layer.bias, True))


def _case_eval_modes(ctx):
    layer = syncbn.SyncBatchNorm(3, track_running_stats=False, process_group=ctx.group).to(DEVICE).eval()
    x = _rand((4, 3, 2), ctx.rank)
    with count_collectives() as calls:
        y = layer(x)
    return calls, torch.allclose(y, F.batch_norm(x, None, None, layer.weight, layer.bias, True))


def test_eval_modes_never_communicate(pool):
    for calls, local in pool.run(_case_eval_modes, group="w2"):
        assert calls == [] and local


def _case_weight_grad_only(ctx):
    # input that does not require grad (a first layer): weight/bias grads, no backward collective
    layer = syncbn.SyncBatchNorm(3, process_group=ctx.group).to(DEVICE)
    x = _rand((4, 3, 5), ctx.rank)
    y = layer(x)
    with count_collectives() as calls:
        (y * torch.arange(5.0)).sum().backward()
    return calls, layer.weight.grad.cpu(), layer.bias.grad.cpu(), x.cpu()


def test_weight_grad_without_input_grad(pool):
    results = pool.run(_case_weight_grad_only, group="w2")
    x = torch.cat([r[3] for r in results]).double()
    ref = nn.BatchNorm1d(3).double()
    (ref(x) * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    assert all(r[0] == [] for r in results)
    torch.testing.assert_close(sum(r[1].double() for r in results), ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sum(r[2].double() for r in results), ref.bias.grad, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradcheck across 2 ranks. The rank under test ("active") runs the real function of its input;
# the other rank feeds a fixed batch that still depends on the gradcheck input (so both ranks
# take the same backward path) and returns zeros, so its upstream gradient is zero and the
# active rank's Jacobian is exactly that of the global function.


def _case_gradcheck(ctx, active):
    gen = torch.Generator().manual_seed(10 + ctx.rank)
    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.rand(2, dtype=torch.float64, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()
    fixed = torch.randn(2 + ctx.rank, 2, 3, dtype=torch.float64, generator=gen).to(DEVICE)

    def fn(x, weight, bias):
        if ctx.rank == active:
            return sync_batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5, ctx.group)
        y = sync_batch_norm(fixed + 0 * x.sum(), None, None, weight, bias, True, 0.1, 1e-5, ctx.group)
        return torch.zeros_like(x) + 0 * y.sum()

    return torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("active", [0, 1])
def test_gradcheck_across_two_ranks(pool, active):
    assert pool.run(_case_gradcheck, group="w2", args=(active,)) == [True, True]


# ---------------------------------------------------------------------------------------------
# Numerics: large means and huge counts.


def _case_large_mean(ctx, data):
    x, grad = data
    x = x.to(DEVICE).requires_grad_()
    w = torch.linspace(0.5, 1.5, x.shape[1], device=DEVICE)
    y = sync_batch_norm(x, None, None, w, None, True, 0.1, 1e-5, ctx.group)
    y.backward(grad.to(DEVICE))
    return y.detach().cpu(), x.grad.cpu()


def test_float32_with_mean_1e4_matches_float64_within_twice_batch_norm_error(pool):
    gen = torch.Generator().manual_seed(3)
    xs = [(torch.randn(n, 4, 8, 8, generator=gen, dtype=torch.float64) + 1e4).float() for n in (5, 3)]
    gs = [torch.randn(x.shape, generator=gen) for x in xs]
    results = pool.run(_case_large_mean, group="w2", per_rank_args=list(zip(xs, gs)))
    x, g = torch.cat(xs), torch.cat(gs)
    w = torch.linspace(0.5, 1.5, 4)

    def fwd_bwd(x, g, w):
        x = x.clone().requires_grad_()
        y = F.batch_norm(x, None, None, w, None, True, 0.1, 1e-5)
        y.backward(g)
        return y.detach(), x.grad

    exact_y, exact_dx = fwd_bwd(x.double(), g.double(), w.double())
    bn_y, bn_dx = fwd_bwd(x, g, w)
    ours_y, ours_dx = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
    for ours, bn, exact, what in ((ours_y, bn_y, exact_y, "output"), (ours_dx, bn_dx, exact_dx, "grad_input")):
        err_ours = (ours.double() - exact).abs().max().item()
        err_bn = (bn.double() - exact).abs().max().item()
        assert err_ours <= 2 * err_bn, f"{what}: syncbn error {err_ours:.3g} > 2 x F.batch_norm error {err_bn:.3g}"
    # and the variance did not collapse (the classic sum(x*x) failure gives zero or negative)
    normalized = ours_y.double() / w.double().view(1, -1, 1, 1)
    assert torch.allclose(normalized.var(dim=(0, 2, 3), correction=0), torch.ones(4, dtype=torch.float64), rtol=1e-3)


def _case_huge_count(ctx, numel, seed):
    gen = torch.Generator().manual_seed(seed + ctx.rank)
    x = (torch.randn(numel, generator=gen) * 2 + 3).view(1, 1, -1)
    layer = syncbn.SyncBatchNorm(1, momentum=1.0, process_group=ctx.group).to(DEVICE)
    layer(x.to(DEVICE))
    return layer.running_mean.cpu(), layer.running_var.cpu()


def test_running_var_exact_past_2_pow_24_values_per_channel(pool):
    numel = 2**23 + 3  # per rank: 2**24 + 6 values in the channel across the group
    results = pool.run(_case_huge_count, group="w2", args=(numel, 77), timeout=120)
    gen0, gen1 = torch.Generator().manual_seed(77), torch.Generator().manual_seed(78)
    x = torch.cat([torch.randn(numel, generator=gen0) * 2 + 3, torch.randn(numel, generator=gen1) * 2 + 3]).double()
    n = x.numel()
    assert n > 2**24
    mean, var_unbiased = x.mean(), x.var(correction=1)
    for running_mean, running_var in results:  # momentum 1: the running values are the batch's
        assert running_mean.item() == pytest.approx(mean.item(), rel=1e-6)
        assert running_var.item() == pytest.approx(var_unbiased.item(), rel=1e-6)
