"""The activations ``syncbn.SyncBatchNormAct`` applies after the normalization, defined once.

Each entry holds everything about one activation: its name and parameter (with torch's
default), its formula as torch's functional op, its derivative written from the
pre-activation ``z`` (the normalized output), the torch module that computes exactly that
formula (how ``convert_sync_batchnorm`` recognizes the activation of a model zoo's layer),
and the ATen kernels the torch-ops path runs (the in-place op, the backward kernel autograd
itself runs for the functional op). Invertible activations (identity, leaky_relu and elu with
a positive parameter) also have their inverse and their derivative written from the output,
which is all the in-place layer keeps for backward.
The derivatives follow torch's backward kernels at the kinks (relu: 0 at 0, leaky_relu and
elu: the negative side at 0, hardswish: the outer pieces at -3 and 3). The Triton kernels
(``syncbn.ops.triton``) implement the same formulas under the entries' ``code``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

_aten = torch.ops.aten

Fn = Callable[[torch.Tensor, float | None], torch.Tensor]
GradFn = Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Activation:
    name: str
    #: ``fn(z, param)``: the activation, as torch's functional op.
    fn: Fn
    #: ``derivative(z, param)``: d fn / d z, elementwise, from the pre-activation z.
    derivative: Fn
    #: the torch module that computes exactly ``fn``, and what it calls the parameter
    module: type[nn.Module]
    #: ``fn_(z, param)``: ``fn`` written over z (the same ATen kernel)
    fn_: Fn
    #: ``grad(dy, z, param)``: ``dy * derivative(z)`` written over z, by the ATen kernel autograd
    #: runs for ``fn`` (bitwise autograd's gradient)
    grad: GradFn
    param_name: str | None = None
    default_param: float | None = None
    #: attributes the module must have to compute ``fn`` (nn.GELU has a tanh approximation too)
    module_config: tuple[tuple[str, object], ...] = ()
    #: where the derivative jumps (torch's backward kernels take the sides given above): two
    #: computations of the same pre-activation that round differently may fall on either side
    kinks: tuple[float, ...] = ()
    #: invertible activations only (for a positive parameter, where there is one):
    #: ``inverse(y, param, stored)``: z from y = fn(z), y having been stored in dtype ``stored``;
    #: ``grad_from_output(dy, y, param)``: dy * fn'(z)
    inverse: Callable[[torch.Tensor, float | None, torch.dtype], torch.Tensor] | None = None
    grad_from_output: GradFn | None = None


def _identity(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return z


def _one(z: torch.Tensor, param: float | None) -> torch.Tensor:
    return torch.ones_like(z)


def _pass_grad(dy: torch.Tensor, z: torch.Tensor, param: float | None) -> torch.Tensor:
    return dy


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


def elu_inverse_floor(dtype: torch.dtype) -> float:
    """The smallest ``y / alpha`` elu's inverse takes, for an output stored in ``dtype``.

    ``elu(z) = alpha * (exp(z) - 1)`` rounds to ``-alpha`` once ``exp(z)`` is below half an ulp
    of 1 (z below about -16.6 in float32, -7.6 in float16, -6.2 in bfloat16): the input is lost
    there. The inverse takes such an output as ``log(eps / 2)``, the edge of that range,
    instead of ``log(0) = -inf``.
    """
    return -1.0 + torch.finfo(dtype).eps / 2


def _elu_inverse(y: torch.Tensor, alpha: float | None, stored: torch.dtype) -> torch.Tensor:
    ratio = (y / alpha).clamp_(min=elu_inverse_floor(stored))
    return torch.where(y > 0, y, ratio.log1p_())


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation(
            "identity", _identity, _one, nn.Identity, fn_=_identity, grad=_pass_grad,
            inverse=lambda y, _, stored: y, grad_from_output=_pass_grad,
        ),
        Activation(
            "relu", lambda z, _: F.relu(z), _relu_grad, nn.ReLU, fn_=lambda z, _: F.relu_(z),
            grad=lambda dy, z, _: _aten.threshold_backward.grad_input(dy, z, 0, grad_input=z), kinks=(0.0,),
        ),
        Activation(
            "leaky_relu", F.leaky_relu, _leaky_relu_grad, nn.LeakyReLU, F.leaky_relu_,
            grad=lambda dy, z, p: _aten.leaky_relu_backward.grad_input(dy, z, p, False, grad_input=z),
            param_name="negative_slope", default_param=0.01, kinks=(0.0,),
            inverse=lambda y, p, stored: F.leaky_relu(y, 1 / p),
            grad_from_output=lambda dy, y, p: _aten.leaky_relu_backward(dy, y, p, True),
        ),
        Activation(
            "elu", F.elu, _elu_grad, nn.ELU, F.elu_,
            grad=lambda dy, z, p: _aten.elu_backward.grad_input(dy, p, 1, 1, False, z, grad_input=z),
            param_name="alpha", default_param=1.0, inverse=_elu_inverse, kinks=(0.0,),
            grad_from_output=lambda dy, y, p: _aten.elu_backward(dy, p, 1, 1, True, y),
        ),
        Activation(
            "silu", lambda z, _: F.silu(z), _silu_grad, nn.SiLU, fn_=lambda z, _: F.silu(z, inplace=True),
            grad=lambda dy, z, _: _aten.silu_backward.grad_input(dy, z, grad_input=z),
        ),
        Activation(
            "gelu", lambda z, _: F.gelu(z), _gelu_grad, nn.GELU, fn_=lambda z, _: torch._C._nn.gelu(z, out=z),
            grad=lambda dy, z, _: _aten.gelu_backward.grad_input(dy, z, grad_input=z),
            module_config=(("approximate", "none"),),
        ),
        Activation(
            "hardswish", lambda z, _: F.hardswish(z), _hardswish_grad, nn.Hardswish,
            fn_=lambda z, _: F.hardswish(z, inplace=True),
            grad=lambda dy, z, _: _aten.hardswish_backward.out(dy, z, out=z), kinks=(-3.0, 3.0),
        ),
    )
}  # fmt: skip

#: name -> the activation's number in the Triton kernels (its place in the table)
CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


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


@dataclass(frozen=True, slots=True)
class Spec:
    """An activation as the passes apply it: fused into the normalization and its backward.

    ``inplace``: the layer keeps only its output for backward (an invertible activation), which
    backward inverts. Built (and checked) once per configuration by ``spec``.
    """

    name: str
    param: float | None
    inplace: bool
    code: int

    @property
    def entry(self) -> Activation:
        return ACTIVATIONS[self.name]

    @property
    def needs_pre_activation(self) -> bool:
        """Whether backward needs the pre-activation (so the bias) and not only the input."""
        return self.code != 0 or self.inplace


@functools.lru_cache(maxsize=256)
def spec(name: str, param: float | None = None, inplace: bool = False) -> Spec:
    """The checked ``Spec`` of an activation; ValueError for ``inplace`` with one that has no inverse."""
    name, param = resolve(name, param)
    if not isinstance(inplace, bool):
        raise TypeError(f"syncbn: inplace must be a bool, got {type(inplace).__name__}")
    activation = ACTIVATIONS[name]
    if inplace and (activation.inverse is None or (param is not None and not param > 0)):
        got = repr(name) if param is None else f"{name!r} with {activation.param_name}={param}"
        raise ValueError(
            "syncbn: inplace=True needs an invertible activation (backward recovers the input from the "
            f"output): identity, leaky_relu with a positive negative_slope or elu with a positive alpha; got {got}"
        )
    return Spec(name, param, inplace, CODES[name])


IDENTITY = spec("identity")


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
