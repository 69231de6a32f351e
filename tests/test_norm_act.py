"""``syncbn.SyncBatchNormAct`` (fused, and in place) and the activation table, against torch.

    python -m pytest -q tests/test_norm_act.py

The oracle: ``nn.BatchNorm2d`` on the concatenated batch of all ranks, then torch's activation
module (``nn.LeakyReLU(0.2)``, ...), never the table's own formula. The in-place layer is also
held against the fused layer it must equal. Kernel-level tests of the fused activation are in
tests/test_triton_ops.py; compiled layers in tests/test_compile.py.
"""

from __future__ import annotations

import inspect
import math
import os
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import syncbn
from syncbn import activations, settings
from syncbn.functional import DOUBLE_BACKWARD_MESSAGE, training_forward
from tests.oracle import LayerConfig, make_data, make_params

# name -> (activation_param, the torch module computing it)
CASES = {
    "identity": (None, nn.Identity()),
    "relu": (None, nn.ReLU()),
    "leaky_relu": (0.2, nn.LeakyReLU(0.2)),
    "elu": (0.7, nn.ELU(0.7)),
    "silu": (None, nn.SiLU()),
    "gelu": (None, nn.GELU()),
    "hardswish": (None, nn.Hardswish()),
}
INVERTIBLE = ("identity", "leaky_relu", "elu")
# (name, inplace): every activation fused, and the invertible ones in place
LAYERS = [(name, False) for name in CASES] + [(name, True) for name in INVERTIBLE]
LAYER_IDS = [f"{name}{'-inplace' if inplace else ''}" for name, inplace in LAYERS]

# the kinks (0, -3, 3) and both sides of them, where torch's backward kernels pick a side
KINKS = torch.cat([torch.linspace(-6, 6, 241, dtype=torch.float64), torch.tensor([0.0, -3.0, 3.0, -1e-300, 1e-300])])


def test_table_covers_exactly_the_documented_activations():
    assert list(activations.ACTIVATIONS) == list(CASES)
    assert list(activations.CODES.values()) == list(range(len(CASES)))


@pytest.mark.parametrize("name", list(CASES))
def test_derivative_is_autograds_from_the_pre_activation(name):
    param, module = CASES[name]
    z = KINKS.clone().requires_grad_()
    (expected,) = torch.autograd.grad(module(z).sum(), z)
    entry = activations.ACTIVATIONS[name]
    torch.testing.assert_close(entry.derivative(z.detach(), param), expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(entry.fn(z.detach(), param), module(z.detach()))
    assert activations.from_module(module) == (name, param)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_kernels_of_the_table_are_autograds(name):
    """The in-place op and the backward kernel the torch-ops path runs give bitwise what
    autograd through torch's module gives; the inverse and the derivative from the output
    (in place) give back the pre-activation and the derivative."""
    param, module = CASES[name]
    entry = activations.ACTIVATIONS[name]
    z = KINKS.clone()
    dy = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = module(z)
    assert torch.equal(entry.fn_(z.clone(), param), y)
    zr = z.clone().requires_grad_()
    module(zr).backward(dy)
    assert torch.equal(entry.grad(dy, z.clone(), param), zr.grad)
    if name not in INVERTIBLE:
        assert entry.inverse is None and entry.grad_from_output is None
        return
    # elu's inverse divides the output's rounding by alpha * exp(z): 1e-16 / 2.5e-3 at z = -6
    torch.testing.assert_close(entry.inverse(y, param, y.dtype), z, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(entry.grad_from_output(dy, y, param), zr.grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_elu_inverse_is_finite_where_the_output_saturates(dtype):
    alpha = 0.7
    y = torch.tensor([-alpha, -alpha * (1 - torch.finfo(dtype).eps), 0.0], dtype=dtype)
    # as backward inverts a half-precision output: in float32, with the floor of the stored dtype
    z = activations.ACTIVATIONS["elu"].inverse(y.double() if dtype == torch.float64 else y.float(), alpha, dtype)
    floor = math.log(torch.finfo(dtype).eps / 2)
    assert torch.isfinite(z).all() and z[0].item() == pytest.approx(floor, abs=1e-6) and z[2] == 0


def test_from_module_knows_exact_classes_only():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    assert activations.from_module(MyReLU()) is None
    assert activations.from_module(nn.GELU(approximate="tanh")) is None
    assert activations.from_module(nn.PReLU()) is None
    assert activations.from_module(nn.LeakyReLU(0.3, inplace=True)) == ("leaky_relu", 0.3)


def test_signature_is_syncbatchnorms_plus_the_activation():
    params = list(inspect.signature(syncbn.SyncBatchNormAct.__init__).parameters.values())
    base = list(inspect.signature(syncbn.SyncBatchNorm.__init__).parameters.values())
    names = [p.name for p in params]
    assert names == [
        "self", "num_features", "eps", "momentum", "affine", "track_running_stats", "process_group",
        "activation", "activation_param", "inplace", "device", "dtype", "bias",
    ]  # fmt: skip
    for p in base:
        assert params[names.index(p.name)].default == p.default and params[names.index(p.name)].kind == p.kind
    assert params[names.index("activation")].default == "relu"
    assert params[names.index("activation_param")].default is None
    assert params[names.index("inplace")].default is False


def test_defaults_and_bad_activation_arguments():
    assert syncbn.SyncBatchNormAct(3, activation="leaky_relu").activation_param == 0.01
    assert syncbn.SyncBatchNormAct(3, activation="elu").activation_param == 1.0
    assert syncbn.SyncBatchNormAct(3, activation="elu", activation_param=2).activation_param == 2.0
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; choose one of identity, relu, leaky_relu"):
        syncbn.SyncBatchNormAct(3, activation="swish")
    with pytest.raises(ValueError, match="'relu' takes no activation_param"):
        syncbn.SyncBatchNormAct(3, activation="relu", activation_param=0.1)
    with pytest.raises(TypeError, match="negative_slope of 'leaky_relu'.*must be a number, got str"):
        syncbn.SyncBatchNormAct(3, activation="leaky_relu", activation_param="0.1")


def test_inplace_needs_an_invertible_activation():
    for name in ("relu", "silu", "gelu", "hardswish"):
        with pytest.raises(ValueError, match=rf"inplace=True needs an invertible activation.*; got '{name}'$"):
            syncbn.SyncBatchNormAct(3, activation=name, inplace=True)
    for name, param in (("leaky_relu", 0.0), ("leaky_relu", -0.1), ("elu", 0.0), ("elu", float("nan"))):
        with pytest.raises(ValueError, match=rf"got '{name}' with (negative_slope|alpha)={param}"):
            syncbn.SyncBatchNormAct(3, activation=name, activation_param=param, inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool, got str"):
        syncbn.SyncBatchNormAct(3, activation="elu", inplace="yes")
    for name in INVERTIBLE:
        assert syncbn.SyncBatchNormAct(3, activation=name, inplace=True).inplace
    layer = syncbn.SyncBatchNormAct(3)
    layer.inplace = True  # checked at the next call, as at construction
    with pytest.raises(ValueError, match="inplace=True needs an invertible activation"):
        layer(torch.randn(4, 3) * 1)
    layer.activation, layer.activation_param = "leaky_relu", 0.3
    assert layer(torch.randn(4, 3) * 1).min() < 0 and layer._spec() == activations.spec("leaky_relu", 0.3, True)


def test_state_dict_and_repr():
    layer = syncbn.SyncBatchNormAct(4, activation="leaky_relu", activation_param=0.2, bias=False)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4, bias=False).state_dict())
    assert "bias=False" in repr(layer) and "activation='leaky_relu', activation_param=0.2" in repr(layer)
    assert "inplace" not in repr(layer)
    assert "activation='elu', activation_param=1.0, inplace=True" in repr(
        syncbn.SyncBatchNormAct(4, 1e-5, 0.1, activation="elu", inplace=True)
    )
    assert isinstance(layer, syncbn.SyncBatchNorm)


def _layer(name: str, inplace: bool, channels: int = 3, weight=None, bias=None, **kw) -> syncbn.SyncBatchNormAct:
    """The layer for ``CASES[name]``; ``weight`` and ``bias`` copied in its dtype (``dtype=`` in ``kw``)."""
    param, _ = CASES[name]
    layer = syncbn.SyncBatchNormAct(channels, activation=name, activation_param=param, inplace=inplace, **kw)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@pytest.mark.parametrize("name", list(CASES))
def test_eval_is_bitwise_batchnorm_then_torch_module(name):
    param, module = CASES[name]
    plain = nn.BatchNorm2d(3).double()
    weight, bias = make_params(LayerConfig())
    layers = [_layer(name, False, dtype=torch.float64)]
    if name in INVERTIBLE:
        layers.append(_layer(name, True, dtype=torch.float64))
    for m in (*layers, plain):
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3
    x0 = x.clone()
    for layer in layers:
        assert torch.equal(layer.eval()(x), module(plain.eval()(x)))
    assert torch.equal(x, x0)  # eval mode never writes over the input, in place or not


# ---------------------------------------------------------------------------------------------
# One process: the fused layer is bitwise nn.BatchNorm + torch's module (ATen's kernels)

LOCAL_LAYOUTS = {"nchw": ((4, 3, 5, 6), None), "nhwc": ((4, 3, 5, 6), torch.channels_last), "nc": ((9, 3), None)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LOCAL_LAYOUTS))
def test_without_a_group_training_is_bitwise_batchnorm_then_torch_module(layout, dtype):
    shape, fmt = LOCAL_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    weight, bias = torch.tensor([1.5, -0.7, 0.0]), torch.tensor([0.2, -1.0, 0.5])  # a zero and a negative weight
    for name, (_, module) in CASES.items():
        ours = _layer(name, False, weight=weight, bias=bias)
        plain = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
        with torch.no_grad():
            plain.weight.copy_(weight)
            plain.bias.copy_(bias)
        results = []
        for layer in ((ours,), (plain, module)):
            xr = x.clone().requires_grad_()
            y = xr
            for m in layer:
                y = m(y)
            y.backward(dy)
            results.append((y, xr.grad, layer[0].weight.grad, layer[0].bias.grad, layer[0].running_var))
        for what, a, b in zip(("y", "dx", "dw", "db", "running_var"), *results):
            assert torch.equal(a, b), f"{name} {what}"


def _saved_activation_storages(fn, numel: int) -> set[int]:
    """The distinct storages of activation-sized tensors autograd saves while ``fn`` runs."""
    storages = set()

    def pack(t):
        if t.numel() == numel:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize("name, inplace", LAYERS, ids=LAYER_IDS)
def test_saves_one_activation_sized_tensor(name, inplace):
    """Fused: the input, as SyncBatchNorm saves it (nothing more); in place: the output, which
    is the input's storage, overwritten. SyncBatchNorm + torch's module saves two (but the
    identity)."""
    _, module = CASES[name]
    conv = nn.Conv2d(2, 3, 1)
    x = torch.randn(4, 2, 5, 5)
    h = conv(x)
    out = {}
    fused = _layer(name, inplace)
    saved = _saved_activation_storages(lambda: out.setdefault("y", fused(h)), h.numel())
    assert saved == {h.untyped_storage().data_ptr()}
    assert (out["y"] is h) == inplace
    unfused = nn.Sequential(syncbn.SyncBatchNorm(3), module)
    assert len(_saved_activation_storages(lambda: unfused(conv(x)), h.numel())) == (1 if name == "identity" else 2)


# ---------------------------------------------------------------------------------------------
# In place: what it writes, what it refuses, and its gradients against the fused layer's


def _graph_input(shape, dtype=torch.float64, seed=0, memory_format=None):
    """(leaf, h): a leaf that requires grad and a non-leaf copy of it, which the layer may overwrite."""
    gen = torch.Generator().manual_seed(seed)
    leaf = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    if memory_format is not None:
        leaf = leaf.contiguous(memory_format=memory_format)
    leaf.requires_grad_()
    return leaf, leaf * 1


def _grads(layer, shape, dtype=torch.float64, memory_format=None, seed=0):
    leaf, h = _graph_input(shape, dtype, seed, memory_format)
    y = layer(h)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    y.backward(dy)
    return y.detach().clone(), leaf.grad, layer.weight.grad, layer.bias.grad


# Gradients of the in-place layer against the fused one, same data and parameters (weights in
# [0.5, 1.5)). The in-place backward recovers x_hat = (act^-1(y) - b) / w from the stored
# output: the output's rounding, divided by |w|, becomes x_hat's error. float64: 1e-16
# relative, times |y| / |w| < 10 here; float32: 6e-8 relative, the same way, and float32 sums
# over 80 values on both sides.
INPLACE_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", INVERTIBLE)
def test_inplace_gradients_equal_the_fused_layers(name, dtype):
    weight, bias = make_params(LayerConfig(channels=4))
    for fmt in (None, torch.channels_last):
        fused, inplace = (_layer(name, mode, 4, weight, bias, dtype=dtype) for mode in (False, True))
        for got, want, what in zip(
            _grads(inplace, (5, 4, 2, 2), dtype, fmt), _grads(fused, (5, 4, 2, 2), dtype, fmt), "y dx dw db".split()
        ):
            torch.testing.assert_close(got, want, **INPLACE_TOL[dtype], msg=lambda m: f"{name} {fmt} {what}: {m}")


def test_inplace_writes_the_output_over_the_input_and_returns_it():
    for fmt, make in ((None, lambda h: h), (torch.channels_last, lambda h: h), (None, lambda h: h.transpose(2, 3))):
        leaf, h = _graph_input((3, 4, 5, 6), memory_format=fmt)
        h = make(h)  # a transposed view: strides no kernel walks, written back through the view
        expected = _layer("elu", False, 4).double()(h.detach().clone())
        data_ptr = h.data_ptr()
        y = _layer("elu", True, 4).double()(h)
        assert y is h and h.data_ptr() == data_ptr
        torch.testing.assert_close(h, expected, rtol=1e-13, atol=1e-13)
        y.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_inplace_refuses_a_leaf_that_requires_grad_before_writing_anything():
    layer = _layer("leaky_relu", True, 4).double()
    leaf, _ = _graph_input((3, 4, 2, 2))
    before = leaf.detach().clone()
    for x, what in ((leaf, "a leaf tensor"), (leaf[:, :2].view(3, 2, 4), "a view of a leaf tensor")):
        with pytest.raises(
            RuntimeError,
            match=f"inplace=True.*writes its output over its input, and the input is {what} that requires grad",
        ):
            _layer("leaky_relu", True, x.shape[1]).double()(x)
    assert torch.equal(leaf.detach(), before) and int(layer.num_batches_tracked) == 0
    with torch.no_grad():  # nothing to differentiate: a leaf may be written over
        y = layer(leaf)
    assert y.data_ptr() == leaf.data_ptr() and torch.equal(y, leaf) and not torch.equal(leaf, before)


def test_inplace_input_needed_elsewhere_is_a_clear_error_not_wrong_numbers():
    """The layer's input also feeding a layer that saved it (a residual branch, a second head):
    overwriting it would make that layer's backward wrong; autograd's version counter catches
    it at backward."""
    conv, other = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1)
    h = conv(torch.randn(3, 2, 4, 4))
    side = other(h)  # saves h for its weight gradient
    out = _layer("leaky_relu", True, 4)(h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + side.sum()).backward()
    # checkpointing the in-place layer alone reruns it on an input it already overwrote
    h = conv(torch.randn(3, 2, 4, 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        checkpoint(_layer("elu", True, 4), h, use_reentrant=False).sum().backward()


def test_inplace_weight_near_zero_acts_as_eps_with_its_sign():
    """|w| < eps: the layer normalizes with eps of w's sign (+eps for 0), since (y - b) / w
    could not be recovered; its gradient goes to w unchanged. No NaN, and what it computes is
    exactly the fused layer with that effective weight."""
    eps = 1e-5
    weight = torch.tensor([0.0, -0.0, 3e-6, -3e-6, 1.2], dtype=torch.float64)
    effective = torch.tensor([eps, -eps, eps, -eps, 1.2], dtype=torch.float64)
    bias = torch.tensor([0.5, -0.3, 0.1, 0.0, -1.0], dtype=torch.float64)
    for name in INVERTIBLE:
        inplace = _layer(name, True, 5, weight, bias, eps=eps, dtype=torch.float64)
        fused = _layer(name, False, 5, effective, bias, eps=eps, dtype=torch.float64)
        got, want = _grads(inplace, (6, 5, 3), seed=3), _grads(fused, (6, 5, 3), seed=3)
        assert all(torch.isfinite(t).all() for t in got)
        # x_hat is recovered through eps: 1e-16 / 1e-5 relative
        for g, w, what in zip(got, want, "y dx dw db".split()):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name} {what}: {m}")
        assert inplace.weight.grad[:4].abs().min() > 1e-3  # a zero weight gets a gradient and trains


def test_inplace_double_backward_and_eval_mode():
    layer = _layer("elu", True, 4).double()
    _, h = _graph_input((3, 4, 2, 2))
    y = layer(h)
    (grad,) = torch.autograd.grad(y.sum(), layer.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()
    assert DOUBLE_BACKWARD_MESSAGE.startswith("syncbn: double backward")
    _, h = _graph_input((3, 4, 2, 2))
    assert layer.eval()(h) is not h  # eval mode: a new tensor


@pytest.mark.parametrize("name, inplace", LAYERS, ids=LAYER_IDS)
def test_gradcheck_without_a_group(name, inplace):
    """float64 gradcheck of the functional layer (the generic passes when in place, ATen's
    kernels otherwise), weight and bias included."""
    spec = activations.spec(name, CASES[name][0], inplace)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()

    def fn(x, w, b):
        return training_forward(
            x * 1, w, b, running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1,
            eps=1e-5, process_group=None, act=spec,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Several ranks: against nn.BatchNorm + torch's module on the concatenated batch


def _case_layers(ctx, layers, cfg: LayerConfig, data, env):
    """Every (name, inplace) layer on this rank's batch: output, grads, statistics, and how
    many activation-sized tensors were saved for backward."""
    weight, bias = make_params(cfg)
    x, grad = data[ctx.rank]
    out = []
    with mock.patch.dict(os.environ, env):
        for name, inplace in layers:
            layer = _layer(name, inplace, cfg.channels, weight, bias, process_group=ctx.group, dtype=cfg.param_dtype)
            leaf = x.clone().requires_grad_()
            h = leaf * 1  # a non-leaf the in-place layer may overwrite
            result = {}
            saved = _saved_activation_storages(lambda: result.setdefault("y", layer(h)), h.numel())
            result["y"].backward(grad)
            out.append((result["y"].detach(), leaf.grad, layer.weight.grad, layer.bias.grad,
                        layer.running_mean, layer.running_var, len(saved)))  # fmt: skip
    return out


def _oracle(name, cfg, data, weight, bias):
    _, module = CASES[name]
    plain = nn.BatchNorm2d(cfg.channels).double()
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
    x_all = torch.cat([x for x, _ in data]).double().requires_grad_()
    y_all = module(plain(x_all))
    y_all.backward(torch.cat([g for _, g in data]).double())
    return y_all.detach(), x_all.grad, plain


def _check_against_oracle(results, layers, cfg, data, tolerances, sizes):
    """``tolerances[inplace]``: (outputs and input gradients, weight and bias gradients and
    running statistics)."""
    weight, bias = make_params(cfg)
    for i, (name, inplace) in enumerate(layers):
        tol, param_tol = tolerances[inplace]
        y_all, dx_all, plain = _oracle(name, cfg, data, weight, bias)
        per_rank = [r[i] for r in results]
        for rank, (y, dx, _, _, mean, var, saved) in enumerate(per_rank):
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            where = f"{name}{' in place' if inplace else ''}, rank {rank}"
            torch.testing.assert_close(y.double(), y_all[rows], **tol, msg=lambda m: f"{where} y: {m}")
            torch.testing.assert_close(dx.double(), dx_all[rows], **tol, msg=lambda m: f"{where} dx: {m}")
            torch.testing.assert_close(
                mean.double(), plain.running_mean, **param_tol, msg=lambda m: f"{where} mean: {m}"
            )
            torch.testing.assert_close(var.double(), plain.running_var, **param_tol, msg=lambda m: f"{where} var: {m}")
            assert saved == 1, where  # nothing saved beyond the input (in place: the output)
        dw = sum(r[2] for r in per_rank).double()
        db = sum(r[3] for r in per_rank).double()
        torch.testing.assert_close(dw, plain.weight.grad, **param_tol, msg=lambda m: f"{name} dw: {m}")
        torch.testing.assert_close(db, plain.bias.grad, **param_tol, msg=lambda m: f"{name} db: {m}")


# float64 throughout: the layers differ from the oracle by float64 rounding of sums over 100
# values, and in place by x_hat's, recovered from the output (1e-16 relative, over |w| >= 0.5).
_F64 = (dict(rtol=1e-11, atol=1e-11), dict(rtol=1e-11, atol=1e-12))
FLOAT64_TOL = {False: _F64, True: _F64}


@pytest.mark.parametrize(
    "group, sizes", [("w2", [2, 3]), ("w2", [0, 4]), ("w3", [1, 0, 3])], ids=["uneven", "empty-rank", "three-ranks"]
)
def test_training_matches_batchnorm_then_activation_over_the_global_batch(pool, group, sizes):
    cfg = LayerConfig(channels=3, spatial=(4, 5), sizes=[sizes])
    (data,) = make_data(cfg)
    results = pool.run(_case_layers, group=group, args=(LAYERS, cfg, data, {}))
    _check_against_oracle(results, LAYERS, cfg, data, FLOAT64_TOL, sizes)


# Half precision, against the float64 oracle on the same (rounded) inputs; float32 parameters
# and statistics, as under autocast. Outputs and input gradients: the torch-ops path rounds the
# pre-activation to the input's dtype before the activation (as nn.BatchNorm then the activation
# does), then the output, and it rounds g = dy * act'(pre) too (as autograd through the pair
# does); the Triton kernels keep both in float32 and round once: at most a few ulps. Weight and
# bias gradients: float32 sums of those rounded g on the torch-ops path (the kernels': of
# float32 g, about 1e-7). In place, backward inverts the half-precision output: its rounding,
# divided by |w| >= 0.5 (elu: also by alpha * exp(z) near the output's saturation, which these
# data keep above z = -3), is x_hat's error in every term of the weight gradient: a few ulps
# more, measured 2.4e-2 (bfloat16) and 8e-4 (float16) relative.
HALF_TOL = {
    torch.bfloat16: {  # ulp 2**-7, 8 significant bits
        False: (dict(rtol=2e-2, atol=2e-2), dict(rtol=1e-2, atol=1e-2)),
        True: (dict(rtol=2e-2, atol=2e-2), dict(rtol=5e-2, atol=5e-2)),
    },
    torch.float16: {  # ulp 2**-10, 11 significant bits
        False: (dict(rtol=2e-3, atol=2e-3), dict(rtol=2e-3, atol=2e-3)),
        True: (dict(rtol=2e-3, atol=2e-3), dict(rtol=5e-3, atol=5e-3)),
    },
}
HALF_LAYERS = [("relu", False), ("silu", False), ("gelu", False), ("leaky_relu", True), ("elu", True)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_the_oracle(pool, dtype, backend):
    cfg = LayerConfig(channels=3, spatial=(3, 4), sizes=[[2, 3]], dtype=dtype)
    (data,) = make_data(cfg)
    env = {settings.BACKEND.name: backend}
    results = pool.run(_case_layers, group="w2", args=(HALF_LAYERS, cfg, data, env), timeout=120)
    _check_against_oracle(results, HALF_LAYERS, cfg, data, HALF_TOL[cfg.torch_dtype], [2, 3])


def _case_too_few_values(ctx, name, inplace, n):
    layer = _layer(name, inplace, 3, process_group=ctx.group)
    h = torch.randn(n, 3) * 1
    before = h.clone()
    try:
        layer(h)
    except ValueError as err:
        return str(err), torch.equal(h, before), int(layer.num_batches_tracked)
    return "no error", None, None


@pytest.mark.parametrize("name, inplace", [("silu", False), ("elu", True)])
def test_one_value_across_the_group_raises_on_every_rank_and_writes_nothing(pool, name, inplace):
    for message, untouched, batches in pool.run(
        _case_too_few_values, group="w2", args=(name, inplace), per_rank_args=[1, 0]
    ):
        assert message.startswith("Expected more than 1 value per channel when training"), message
        assert untouched and batches == 1  # counted, as nn.BatchNorm counts before raising


def _block(group, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        _layer("silu", False, 6, process_group=group, momentum=None),
        nn.Conv2d(6, 6, 3, padding=1),
        _layer("leaky_relu", True, 6, process_group=group),
        nn.Conv2d(6, 4, 1),
    ).double()  # parameters default-initialised: nothing rounded on the way


def _case_checkpoint(ctx, reentrant, batches):
    plain, checkpointed = _block(ctx.group), _block(ctx.group)
    for x, w in batches:
        (plain(x) * w).sum().backward()
        (checkpoint(checkpointed, x.requires_grad_(reentrant), use_reentrant=reentrant) * w).sum().backward()
    return (
        {k: v.clone() for k, v in plain.state_dict().items()},
        {k: v.clone() for k, v in checkpointed.state_dict().items()},
        {k: p.grad for k, p in plain.named_parameters()},
        {k: p.grad for k, p in checkpointed.named_parameters()},
    )


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_fused_and_inplace_layers(pool, reentrant):
    """The recomputed forward synchronizes again, counts nothing and updates no statistics;
    the in-place layer overwrites the recomputed conv output, not anything checkpoint keeps."""
    gen = torch.Generator().manual_seed(2)
    per_rank = [
        [
            (
                torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64),
                torch.randn(n, 4, 4, 4, generator=gen, dtype=torch.float64),
            )
            for _ in range(2)
        ]
        for n in (2, 3)
    ]
    for state, state_c, grads, grads_c in pool.run(
        _case_checkpoint, group="w2", args=(reentrant,), per_rank_args=per_rank
    ):
        for k in state:
            torch.testing.assert_close(state_c[k], state[k], rtol=1e-12, atol=1e-12, msg=k)
        for k in grads:
            torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-10, atol=1e-10, msg=k)
        assert int(state_c["3.num_batches_tracked"]) == 2


def test_sub_groups_and_debug_mode(pool):
    """Two independent pairs, SYNCBN_DEBUG's checks on: each pair equals the oracle of its own
    global batch."""
    cfg = LayerConfig(channels=3, spatial=(2, 3), sizes=[[2, 3]], seed=7)
    (data,) = make_data(cfg)
    layers = [("gelu", False), ("elu", True)]
    results = pool.run(_case_layers, group="pairs", args=(layers, cfg, data, {settings.DEBUG.name: "1"}))
    for pair in (results[:2], results[2:]):
        _check_against_oracle(pair, layers, cfg, data, FLOAT64_TOL, [2, 3])


def _case_gradcheck_synced(ctx, layers):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    ok = []
    with mock.patch.dict(os.environ, {settings.ALWAYS_SYNC.name: "1"}):
        for name, inplace in layers:
            spec = activations.spec(name, CASES[name][0], inplace)

            def fn(x, w, b, spec=spec):
                return training_forward(
                    x * 1, w, b, running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1,
                    eps=1e-5, process_group=ctx.group, act=spec,
                )  # fmt: skip

            ok.append(torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True))
    return ok


def test_gradcheck_on_the_synced_path(pool):
    """The generic passes (statistics, all-reduce, the two elementwise passes) in a group of
    one with SYNCBN_ALWAYS_SYNC=1, where gradcheck's perturbations stay on one rank."""
    assert pool.run(_case_gradcheck_synced, group="w1", args=(LAYERS,)) == [[True] * len(LAYERS)]
