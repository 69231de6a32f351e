"""``syncbn.SyncBatchNormAct`` and the activation table, against torch's own modules.

    python -m pytest -q tests/test_norm_act.py

The oracle: ``nn.BatchNorm2d`` on the concatenated batch of all ranks, then torch's activation
module (``nn.LeakyReLU(0.2)``, ...), never the table's own formula.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import syncbn
from syncbn import activations
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


def test_table_covers_exactly_the_documented_activations():
    assert list(activations.ACTIVATIONS) == list(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_derivative_is_autograds_from_the_pre_activation(name):
    param, module = CASES[name]
    # the kinks (0, -3, 3) and both sides of them, where torch's backward kernels pick a side
    z = torch.cat([torch.linspace(-6, 6, 241, dtype=torch.float64), torch.tensor([0.0, -3.0, 3.0, -1e-300, 1e-300])])
    z.requires_grad_()
    (expected,) = torch.autograd.grad(module(z).sum(), z)
    entry = activations.ACTIVATIONS[name]
    torch.testing.assert_close(entry.derivative(z.detach(), param), expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(entry.fn(z.detach(), param), module(z.detach()))
    assert activations.from_module(module) == (name, param)


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


def test_state_dict_and_repr():
    layer = syncbn.SyncBatchNormAct(4, activation="leaky_relu", activation_param=0.2, bias=False)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4, bias=False).state_dict())
    assert "bias=False" in repr(layer) and "activation='leaky_relu', activation_param=0.2" in repr(layer)
    assert isinstance(layer, syncbn.SyncBatchNorm)


@pytest.mark.parametrize("name", list(CASES))
def test_eval_is_bitwise_batchnorm_then_torch_module(name):
    param, module = CASES[name]
    layer = syncbn.SyncBatchNormAct(3, activation=name, activation_param=param).double()
    plain = nn.BatchNorm2d(3).double()
    weight, bias = make_params(LayerConfig())
    with torch.no_grad():
        for m in (layer, plain):
            m.weight.copy_(weight)
            m.bias.copy_(bias)
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3
    assert torch.equal(layer.eval()(x), module(plain.eval()(x)))


def _case_training(ctx, name: str, param, cfg: LayerConfig, data):
    layer = syncbn.SyncBatchNormAct(cfg.channels, activation=name, activation_param=param, process_group=ctx.group)
    layer.double()
    weight, bias = make_params(cfg)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x, grad = data[ctx.rank]
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var


@pytest.mark.parametrize("sizes", [[2, 3], [0, 4]], ids=["uneven", "empty-rank"])
def test_training_matches_batchnorm_then_activation_over_the_global_batch(pool, sizes):
    cfg = LayerConfig(channels=3, spatial=(4, 5), sizes=[sizes])
    (data,) = make_data(cfg)
    x_all = torch.cat([x for x, _ in data]).requires_grad_()
    grad_all = torch.cat([g for _, g in data])
    weight, bias = make_params(cfg)
    for name, (param, module) in CASES.items():
        plain = nn.BatchNorm2d(cfg.channels).double()
        with torch.no_grad():
            plain.weight.copy_(weight)
            plain.bias.copy_(bias)
        x_all.grad = None
        y_all = module(plain(x_all))
        y_all.backward(grad_all)
        results = pool.run(_case_training, group="w2", args=(name, param, cfg, data))
        for rank, (y, dx, _, _, mean, var) in enumerate(results):
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            where = f"{name}, rank {rank}"
            torch.testing.assert_close(y, y_all[rows].detach(), rtol=1e-12, atol=1e-12, msg=lambda m: f"{where} y: {m}")
            torch.testing.assert_close(dx, x_all.grad[rows], rtol=1e-11, atol=1e-12, msg=lambda m: f"{where} dx: {m}")
            torch.testing.assert_close(mean, plain.running_mean, rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(var, plain.running_var, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(sum(r[2] for r in results), plain.weight.grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(sum(r[3] for r in results), plain.bias.grad, rtol=1e-11, atol=1e-12)
