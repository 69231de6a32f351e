"""The activations ``syncbn.SyncBatchNormAct`` applies after the normalization, defined once.

Each entry holds everything about one activation: its name and parameter (with torch's
default), its formula as torch's functional op, its derivative written from the
pre-activation ``z`` (the normalized output), and the torch module that computes exactly that
formula (how ``convert_sync_batchnorm`` recognizes the activation of a model zoo's layer).
The derivatives follow torch's backward kernels at the kinks (relu: 0 at 0, leaky_relu and
elu: the negative side at 0, hardswish: the outer pieces at -3 and 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class Activation:
    name: str
    #: ``fn(z, param)``: the activation, as torch's functional op.
    fn: Callable[[torch.Tensor, float | None], torch.Tensor]
    #: ``derivative(z, param)``: d fn / d z, elementwise, from the pre-activation z.
    derivative: Callable[[torch.Tensor, float | None], torch.Tensor]
    #: the torch module that computes exactly ``fn``, and what it calls the parameter
    module: type[nn.Module]
    param_name: str | None = None
    default_param: float | None = None
    #: attributes the module must have to compute ``fn`` (nn.GELU has a tanh approximation too)
    module_config: tuple[tuple[str, object], ...] = ()


def _identity(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return z


def _one(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return torch.ones_like(z)


def _relu_grad(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _leaky_relu_grad(z: torch.Tensor, slope: float | None) -> torch.Tensor:
    return torch.ones_like(z).masked_fill_(z <= 0, slope)


def _elu_grad(z: torch.Tensor, alpha: float | None) -> torch.Tensor:
    return torch.where(z > 0, 1.0, alpha * torch.exp(z))


def _silu_grad(z: torch.Tensor, param: float | None) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z: torch.Tensor, param: float | None) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _hardswish_grad(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", _identity, _one, nn.Identity),
        Activation("relu", lambda z, _: F.relu(z), _relu_grad, nn.ReLU),
        Activation("leaky_relu", F.leaky_relu, _leaky_relu_grad, nn.LeakyReLU, "negative_slope", 0.01),
        Activation("elu", F.elu, _elu_grad, nn.ELU, "alpha", 1.0),
        Activation("silu", lambda z, _: F.silu(z), _silu_grad, nn.SiLU),
        Activation("gelu", lambda z, _: F.gelu(z), _gelu_grad, nn.GELU, module_config=(("approximate", "none"),)),
        Activation("hardswish", lambda z, _: F.hardswish(z), _hardswish_grad, nn.Hardswish),
    )
}


def resolve(name: str, param: float | None) -> tuple[str, float | None]:
    """Check an activation name and parameter; returns them with torch's default filled in."""
    activation = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if activation is None:
        raise ValueError(f"syncbn: unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    if activation.param_name is None:
        if param is not None:
            raise ValueError(f"syncbn: activation {name!r} takes no activation_param, got {param!r}")
        return name, None
    if param is None:
        return name, activation.default_param
    if not isinstance(param, Real) or isinstance(param, bool):
        raise TypeError(
            f"syncbn: activation_param ({activation.param_name} of {name!r}) must be a number, "
            f"got {type(param).__name__}"
        )
    return name, float(param)


def apply(z: torch.Tensor, name: str, param: float | None) -> torch.Tensor:
    return ACTIVATIONS[name].fn(z, param)


def from_module(module: nn.Module) -> tuple[str, float | None] | None:
    """``(name, param)`` of the entry whose formula ``module`` computes, or None.

    Exact classes only: a subclass may compute something else.
    """
    for activation in ACTIVATIONS.values():
        config = activation.module_config
        if type(module) is activation.module and all(getattr(module, k, None) == v for k, v in config):
            param = getattr(module, activation.param_name) if activation.param_name else None
            return activation.name, param
    return None
