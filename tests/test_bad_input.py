"""Inputs at the edges, on 2 gloo ranks against the oracle where there is one.

NaN and inf propagate exactly as in ``nn.BatchNorm`` on the concatenated batch (their channels
only, nothing hangs); zero channels give empty output with no collective; 65536 channels of a
few values each; non-contiguous, transposed and expanded inputs (and expanded gradients);
nothing requiring grad; ``torch.no_grad``; ``torch.inference_mode``; double backward raises a
clear error instead of returning a silently wrong second derivative.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn as nn

import syncbn
from syncbn import settings
from tests.test_semantics import count_collectives

BACKENDS = {"torch": {settings.BACKEND.name: "torch"}, "triton": {settings.BACKEND.name: "triton"}}
# float32 layer against a float64 oracle on the same values
TOL = dict(rtol=1e-5, atol=1e-5)


def _oracle(xs, gs, channels, momentum=0.1, weight=None, bias=None):
    """float64 nn.BatchNorm on the concatenated batch: per-rank y and dx, dw, db, running stats."""
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[xs[0].dim()]
    ref = bn(channels, momentum=momentum).double()
    with torch.no_grad():
        if weight is not None:
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
    x = torch.cat(xs).double().requires_grad_()
    y = ref(x)
    y.backward(torch.cat(gs).double())
    sizes = [t.shape[0] for t in xs]
    return {
        "y": y.detach().split(sizes), "dx": x.grad.split(sizes), "dw": ref.weight.grad, "db": ref.bias.grad,
        "running_mean": ref.running_mean, "running_var": ref.running_var,
    }  # fmt: skip


def _case_layer(ctx, env, channels, data, weight, bias):
    """Train one step on this rank's (x, grad); return everything the oracle has."""
    x, g = data
    with mock.patch.dict(os.environ, env):
        layer = syncbn.SyncBatchNorm(channels, process_group=ctx.group)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
    return {
        "y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
        "running_mean": layer.running_mean, "running_var": layer.running_var,
    }  # fmt: skip


def _close_or_both_nonfinite(got, want, **tol):
    """Equal where the oracle is finite; non-finite (inf or NaN) where it is not.

    Only the running statistics need the looser rule: for a channel holding +inf,
    nn.BatchNorm's running mean becomes inf, syncbn's NaN (its statistics are centred on a
    pivot, and inf - inf is NaN). Either way the channel's statistics are gone until reset.
    """
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], **tol)


def _check(results, want, **tol):
    tol = tol or TOL
    for r, got in enumerate(results):
        for key in ("y", "dx"):
            torch.testing.assert_close(
                got[key].double(), want[key][r], equal_nan=True, **tol, msg=lambda m: f"rank {r} {key}: {m}"
            )
        for key in ("running_mean", "running_var"):
            _close_or_both_nonfinite(got[key].double(), want[key], **tol)
    for key in ("dw", "db"):
        total = sum(got[key].double() for got in results)
        torch.testing.assert_close(total, want[key], equal_nan=True, **tol, msg=lambda m: f"{key}: {m}")


def _params(channels, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)


# ---------------------------------------------------------------------------------------------
# NaN and inf


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nan_and_inf_propagate_as_batchnorm(pool, backend):
    gen = torch.Generator().manual_seed(0)
    channels = 4
    xs = [torch.randn(n, channels, 3, 3, generator=gen) for n in (2, 3)]
    xs[0][1, 0, 2, 2] = float("nan")  # channel 0: a NaN on rank 0
    xs[1][0, 1, 0, 1] = float("inf")  # channel 1: +inf on rank 1
    xs[0][0, 2, 1, 1] = float("inf")  # channel 2: +inf and -inf on different ranks
    xs[1][2, 2, 0, 0] = float("-inf")
    gs = [torch.randn(x.shape, generator=gen) for x in xs]
    weight, bias = _params(channels)
    results = pool.run(
        _case_layer,
        group="w2",
        args=(BACKENDS[backend], channels),
        per_rank_args=list(zip(xs, gs)),
        kwargs=dict(weight=weight, bias=bias),
    )
    want = _oracle(xs, gs, channels, weight=weight.double(), bias=bias.double())
    _check(results, want)
    for got in results:  # channel 3 is untouched by the others' non-finite values
        assert torch.isfinite(got["y"][:, 3]).all() and torch.isfinite(got["dx"][:, 3]).all()
        assert torch.isnan(got["y"][:, :3]).all()


# ---------------------------------------------------------------------------------------------
# Zero channels


def _case_zero_channels(ctx, backend_env, n):
    with mock.patch.dict(os.environ, backend_env):
        layer = syncbn.SyncBatchNorm(0, process_group=ctx.group)
        x = torch.randn(n, 0, 4, 4, requires_grad=True)
        with count_collectives() as calls:
            y = layer(x)
            y.sum().backward()
        layer.eval()
        y_eval = layer(x)
    return tuple(y.shape), tuple(y_eval.shape), calls, int(layer.num_batches_tracked), x.grad


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_zero_channels_is_empty_and_silent(pool, backend):
    for rank, (shape, eval_shape, calls, batches, grad) in enumerate(
        pool.run(_case_zero_channels, group="w2", args=(BACKENDS[backend],), per_rank_args=[3, 0])
    ):
        n = 3 if rank == 0 else 0
        assert shape == eval_shape == (n, 0, 4, 4)
        assert calls == []  # nothing to synchronize: no collective, nothing to wait for
        assert batches == 1
        assert grad is None or grad.numel() == 0


def test_zero_channels_without_process_group():
    layer = syncbn.SyncBatchNorm(0)
    assert layer(torch.randn(2, 0)).shape == (2, 0)
    assert syncbn.functional.sync_batch_norm(torch.randn(2, 0, 3), None, None, training=True).shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------------
# Many channels, few values each


def test_65536_channels(pool):
    channels = 65536
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, channels, generator=gen) * 3 + 1 for n in (2, 1)]
    gs = [torch.randn(x.shape, generator=gen) for x in xs]
    weight, bias = _params(channels)
    results = pool.run(
        _case_layer,
        group="w2",
        args=(BACKENDS["torch"], channels),
        per_rank_args=list(zip(xs, gs)),
        kwargs=dict(weight=weight, bias=bias),
        timeout=120,
    )
    # 3 values per channel: a variance of 3 values, float32 rounding of values of order 10
    _check(results, _oracle(xs, gs, channels, weight=weight.double(), bias=bias.double()), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Strides: non-contiguous, transposed and expanded inputs; expanded gradients


def _make_view(base: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sliced":  # every other column: non-contiguous, not dense
        return base[..., ::2]
    if kind == "transposed":  # dense, neither contiguous nor channels_last
        return base.transpose(2, 3)
    if kind == "channel-sliced":  # every other channel
        return base[:, ::2]
    if kind == "expanded":  # one sample repeated: stride 0 along N
        return base[:1].expand(base.shape[0], -1, -1, -1)
    raise AssertionError(kind)


def _case_views(ctx, env, kind, grad_kind, base):
    with mock.patch.dict(os.environ, env):
        x = _make_view(base, kind)
        channels = x.shape[1]
        layer = syncbn.SyncBatchNorm(channels, process_group=ctx.group)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
        leaf = base.clone().requires_grad_()
        xv = _make_view(leaf, kind)
        y = layer(xv)
        g = (
            torch.ones(1, 1, 1, 1).expand_as(y)
            if grad_kind == "expanded"
            else torch.linspace(-1, 1, y.numel()).view_as(y)
        )
        (dx,) = torch.autograd.grad(y, xv, g)
        return y.detach(), dx, xv.detach(), layer.running_var


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", ["sliced", "transposed", "channel-sliced", "expanded"])
def test_views_and_expanded_tensors(pool, kind, backend):
    gen = torch.Generator().manual_seed(2)
    bases = [torch.randn(n, 4, 3, 6, generator=gen) + 2 for n in (3, 2)]
    grad_kind = "expanded" if kind == "expanded" else "dense"
    results = pool.run(_case_views, group="w2", args=(BACKENDS[backend], kind, grad_kind), per_rank_args=bases)
    xs = [r[2] for r in results]
    channels = xs[0].shape[1]
    gs = [torch.ones_like(x) if grad_kind == "expanded" else torch.linspace(-1, 1, x.numel()).view_as(x) for x in xs]
    weight = torch.linspace(0.5, 1.5, channels, dtype=torch.float64)
    want = _oracle(xs, gs, channels, weight=weight, bias=torch.zeros(channels, dtype=torch.float64))
    for r, (y, dx, _, running_var) in enumerate(results):
        torch.testing.assert_close(y.double(), want["y"][r], **TOL)
        torch.testing.assert_close(dx.double(), want["dx"][r], **TOL)
        torch.testing.assert_close(running_var.double(), want["running_var"], **TOL)


# ---------------------------------------------------------------------------------------------
# Gradients off: requires_grad=False everywhere, torch.no_grad, torch.inference_mode


def _case_no_grad(ctx, mode, x):
    layer = syncbn.SyncBatchNorm(3, process_group=ctx.group)
    with count_collectives() as calls:
        if mode == "requires_grad_off":
            layer.requires_grad_(False)
            y = layer(x)
        elif mode == "no_grad":
            with torch.no_grad():
                y = layer(x.requires_grad_())
        elif mode == "inference_mode":
            with torch.inference_mode():
                y = layer(x)
            inference = y.is_inference()
        else:
            raise AssertionError(mode)
    out = {"y": y, "requires_grad": y.requires_grad, "calls": [c[0] for c in calls]}
    out["running_mean"], out["running_var"] = layer.running_mean.clone(), layer.running_var.clone()
    out["buffers_inference"] = any(b.is_inference() for b in layer.buffers())
    if mode == "inference_mode":
        out["y"] = y.clone()  # an inference tensor cannot be saved as it is
        out["inference"] = inference
    # the layer still trains normally afterwards
    layer.requires_grad_(True)
    layer(x.detach().requires_grad_()).sum().backward()
    out["trains_after"] = layer.weight.grad is not None
    return out


@pytest.mark.parametrize("mode", ["requires_grad_off", "no_grad", "inference_mode"])
def test_gradients_off(pool, mode):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 3, 4, generator=gen) for n in (2, 5)]
    results = pool.run(_case_no_grad, group="w2", args=(mode,), per_rank_args=xs)
    want = _oracle(xs, [torch.zeros_like(x) for x in xs], 3)
    for r, got in enumerate(results):
        assert got["requires_grad"] is False
        assert got["calls"] == ["all_reduce"]  # the forward's only: there is no backward
        assert not got["buffers_inference"] and got["trains_after"]
        torch.testing.assert_close(got["y"].double(), want["y"][r], **TOL)
        torch.testing.assert_close(got["running_mean"].double(), want["running_mean"], **TOL)
        torch.testing.assert_close(got["running_var"].double(), want["running_var"], **TOL)
        if mode == "inference_mode":
            assert got["inference"]


def test_inference_mode_eval_and_no_group():
    layer = syncbn.SyncBatchNorm(3)
    ref = nn.BatchNorm1d(3)
    x = torch.randn(4, 3)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), ref(x))
        layer.eval(), ref.eval()
        torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)


# ---------------------------------------------------------------------------------------------
# Double backward


def _case_double_backward(ctx, x):
    layer = syncbn.SyncBatchNorm(3, process_group=ctx.group).double()
    x = x.clone().requires_grad_()
    y = layer(x)
    gx, gw = torch.autograd.grad((y * y.detach()).sum(), (x, layer.weight), create_graph=True)
    first_order = gx.detach().clone()
    try:
        (gx.square().sum() + gw.sum()).backward()  # a gradient penalty
    except RuntimeError as err:
        return first_order, str(err)
    return first_order, "no error"


def test_double_backward_raises_a_clear_error(pool):
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 3, 2, generator=gen, dtype=torch.float64) for n in (2, 3)]
    results = pool.run(_case_double_backward, group="w2", per_rank_args=xs)
    ys = _oracle(xs, [torch.zeros_like(x) for x in xs], 3)["y"]
    want = _oracle(xs, [y.clone() for y in ys], 3)  # d/dx sum(y * y.detach()) = J^T y
    for r, (first_order, message) in enumerate(results):
        assert message.startswith("syncbn: double backward"), message
        # create_graph=True still gives the right first-order gradient
        torch.testing.assert_close(first_order, want["dx"][r], rtol=1e-9, atol=1e-9)


def test_double_backward_without_process_group():
    layer = syncbn.SyncBatchNorm(3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="syncbn: double backward"):
        gx.sum().backward()
    # plain first-order use is unaffected
    layer(x).pow(3).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_features="4"), TypeError, "num_features must be an int, got str"),
        (dict(num_features=4.0), TypeError, "num_features must be an int, got float"),
        (dict(num_features=-1), ValueError, "num_features must be >= 0, got -1"),
        (dict(num_features=4, eps=-1e-5), ValueError, "eps must be >= 0"),
        (dict(num_features=4, eps="1e-5"), TypeError, "eps must be a number, got str"),
        (dict(num_features=4, momentum=1.5), ValueError, "momentum must be in [0, 1]"),
        (dict(num_features=4, momentum="0.1"), TypeError, "momentum must be a number or None, got str"),
        (
            dict(num_features=4, process_group="world"),
            TypeError,
            "process_group must be a torch.distributed.ProcessGroup",
        ),
    ],
)
def test_constructor_rejects_bad_options_by_name(kwargs, error, message):
    with pytest.raises(error) as err:
        syncbn.SyncBatchNorm(**kwargs)
    assert message in str(err.value)
    with pytest.raises(error):
        syncbn.SyncBatchNormAct(**kwargs)
