"""``SyncBatchNorm``: a drop-in ``torch.nn.SyncBatchNorm`` that is exact, lean and runs on CPU too.

It subclasses ``torch.nn.modules.batchnorm._BatchNorm`` so that its state_dict keys are those of
``nn.BatchNorm1d/2d/3d`` (checkpoints move both ways) and so that code testing
``isinstance(m, _BatchNorm)`` (no-weight-decay rules, freezing helpers) keeps working.

Also here: ``SyncBatchNormAct`` (the same, then an activation: the BatchNorm + activation layers
of model zoos) and ``BatchNormXd`` (single-process BatchNorm of any input rank, what revert
makes of a layer whose dimensionality is not known).
"""

from __future__ import annotations

import copy
import inspect
from numbers import Real

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations
from .functional import check_input, eval_forward, training_forward

# torch's BatchNorm takes ``bias=`` since 2.13; on older torch syncbn drops the bias itself.
_TORCH_BATCHNORM_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _check_options(num_features: object, eps: object, momentum: object, process_group: object) -> None:
    """TypeError or ValueError, naming the argument, for options nn.BatchNorm would take silently
    and fail on later (or never): the layer is built once, the check costs nothing per call."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"syncbn: num_features must be an int, got {type(num_features).__name__}")
    if num_features < 0:
        raise ValueError(f"syncbn: num_features must be >= 0, got {num_features}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"syncbn: eps must be a number, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"syncbn: eps must be >= 0, got {eps}")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, Real):
            raise TypeError(f"syncbn: momentum must be a number or None, got {type(momentum).__name__}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"syncbn: momentum must be in [0, 1] (the weight of the new statistic), got {momentum}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        what = type(process_group).__name__
        raise TypeError(f"syncbn: process_group must be a torch.distributed.ProcessGroup or None, got {what}")


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the union of the batches of all ranks in ``process_group``.

    In training mode every rank's output is what ``nn.BatchNorm{1,2,3}d`` would give on the
    concatenation of all ranks' inputs, whatever each rank's batch size (a rank may hold zero
    samples); running statistics follow the same global batch and are identical on every rank.
    Forward and backward each make one ``all_reduce`` of ``2C + 1`` (forward) or ``2C``
    (backward) values. In eval mode, without an initialized process group, or in a group of
    one rank, it is plain BatchNorm with no communication.

    Args:
        num_features: C in an input of shape (N, C, *), 2 to 5 dimensions.
        eps: added to the variance for numerical stability.
        momentum: weight of the new batch statistic in the running statistics; ``None`` for a
            cumulative moving average.
        affine: learnable per-channel weight and bias.
        track_running_stats: keep running mean and variance (used in eval mode).
        process_group: the ranks to synchronize with; ``None`` is the whole world.
        bias: with ``affine``, a learnable bias too (``bias=False``: weight only, ``bias`` is None).

    Shape:
        input (N, C, *) of float64, float32, float16 or bfloat16, contiguous or channels_last;
        output of the same shape, dtype and memory format.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        _check_options(num_features, eps, momentum, process_group)
        factory = {"device": device, "dtype": dtype}
        if _TORCH_BATCHNORM_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory, bias=bias)
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.process_group = process_group

    # For syncbn.revert_sync_batchnorm (see syncbn.convert). ``converted_from``: the class
    # convert_sync_batchnorm replaced, which revert gives back. Without one (a layer built
    # directly, or converted from a synchronized class such as torch.nn.SyncBatchNorm), the
    # dimensionality decides: ``batchnorm_dim`` (1, 2 or 3, set by conversion from an
    # nn.BatchNormNd, or by hand), else the input rank last seen in forward (0: none yet), else
    # BatchNormXd. Class-level defaults, so layers built or pickled without them read None / 0.
    converted_from: type[nn.Module] | None = None
    batchnorm_dim: int | None = None
    _input_dim: int = 0
    # The layer's path in its model, for SYNCBN_DEBUG and error messages (syncbn.distributed):
    # set by convert_sync_batchnorm, or found on first need; None: not known yet.
    _syncbn_name: str | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_input(input, self.num_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(input, activations.IDENTITY)

    def _normalize(self, input: torch.Tensor, act: activations.Spec) -> torch.Tensor:
        """The layer's normalization with ``act`` fused in (``SyncBatchNormAct``'s activation)."""
        self._check_input_dim(input)
        # One int compare; records the input rank for revert. Not while compiling: writing a
        # module attribute from compiled code costs a recompilation on the next call.
        if not torch.compiler.is_compiling() and input.dim() != self._input_dim:
            self._input_dim = input.dim()
        if not self.training:
            output = eval_forward(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            return output if act.code == activations.IDENTITY.code else act.entry.fn(output, act.param)
        tracked = self.track_running_stats
        return training_forward(
            input,
            self.weight,
            self.bias,
            running_mean=self.running_mean if tracked else None,
            running_var=self.running_var if tracked else None,
            num_batches_tracked=self.num_batches_tracked if tracked else None,
            momentum=self.momentum,
            eps=self.eps,
            process_group=self.process_group,
            layer=self,
            act=act,
        )

    def __deepcopy__(self, memo: dict) -> SyncBatchNorm:
        # A ProcessGroup is a process-wide communicator handle that cannot be copied (deepcopy
        # of torch.nn.SyncBatchNorm with a group fails): a deep copy of the layer (an EMA model,
        # a frozen teacher) synchronizes over the same group. Everything else as the default.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


class SyncBatchNormAct(SyncBatchNorm):
    r"""``SyncBatchNorm`` followed by an activation, in one elementwise pass each way.

    The normalization is ``SyncBatchNorm``'s; the activation is one of ``syncbn.activations``
    with torch's functional formula: ``"identity"``, ``"relu"``, ``"leaky_relu"``
    (``activation_param``: the negative slope, default 0.01), ``"elu"`` (alpha, default 1.0),
    ``"silu"``, ``"gelu"`` (exact, not the tanh approximation) or ``"hardswish"``. The
    state_dict keys are those of ``nn.BatchNorm2d``.

    Fused: in training mode the forward writes ``act(normalize(x))`` from the normalize pass,
    and the backward takes the activation's derivative at the pre-activation it recomputes
    from the saved input and statistics, so the layer saves for backward exactly what
    ``SyncBatchNorm`` saves (the input). The result is that of ``nn.BatchNorm`` followed by
    torch's functional activation (bitwise without a process group on CPU). Eval mode runs
    ``F.batch_norm`` then the activation.

    In place (``inplace=True``, for identity, leaky_relu with a positive slope and elu with a
    positive alpha: activations that can be inverted): only the output is saved, and backward
    recovers the pre-activation and the normalized input from it, which saves one
    activation-sized tensor per layer. In eager training mode the output is written over the
    input, which is returned (as ``nn.ReLU(inplace=True)`` does): the input then holds the
    output, and autograd's version counter makes any other use of it that needs the old values
    in backward an error. The input must not be a leaf tensor that requires grad (or a view of
    one). Under ``torch.compile``, and in eval mode, the output is a new tensor and the input
    is left alone. A weight with ``|w| < eps`` acts as ``eps`` with w's sign (``+eps`` for 0)
    in training mode, since ``(y - bias) / w`` could not be recovered otherwise; its gradient
    is applied to ``w`` unchanged (straight through, so a zero-initialised weight trains).

    ``convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` into this
    layer. It keeps timm's ``drop`` and ``act`` children (so the state_dict keys stay timm's and
    revert gives them back). When the table has an entry for ``act`` (``nn.ReLU``, ``nn.SiLU``,
    ...), ``activation`` computes it and the child is not called; otherwise ``activation`` is
    ``"identity"`` and ``act`` runs as a module after it (``apply_act_module``): nothing is
    ever dropped. The activation is fused when ``drop`` is ``nn.Identity`` (or absent);
    otherwise the layer normalizes, runs ``drop``, then the activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, bias: as for
            ``SyncBatchNorm``.
        activation: the activation's name in ``syncbn.activations.ACTIVATIONS``.
        activation_param: its parameter (negative slope, alpha), None for torch's default;
            only ``"leaky_relu"`` and ``"elu"`` take one.
        inplace: save only the output for backward (see above); ValueError for an activation
            that cannot be inverted.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        activation: str = "relu",
        activation_param: float | None = None,
        inplace: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        spec = activations.spec(activation, activation_param, inplace)  # bad arguments fail before any allocation
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias=bias
        )
        self.activation, self.activation_param, self.inplace = spec.name, spec.param, spec.inplace
        self._act_spec = spec

    # True when the ``act`` child (a converted timm layer's) is an activation the table has no
    # entry for; ``activation`` is then "identity" and the child runs after it.
    apply_act_module: bool = False
    # Class-level defaults for layers pickled before these existed.
    inplace: bool = False
    _act_spec: activations.Spec = activations.IDENTITY

    def _spec(self) -> activations.Spec:
        """The checked ``Spec`` of ``activation``, ``activation_param`` and ``inplace``, kept
        until one of them changes (one tuple compare per call, no lookup that dynamo traces)."""
        spec = self._act_spec
        if (spec.name, spec.param, spec.inplace) != (self.activation, self.activation_param, self.inplace):
            spec = self._act_spec = activations.spec(self.activation, self.activation_param, self.inplace)
        return spec

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        drop = self._modules.get("drop")
        if drop is not None and type(drop) is not nn.Identity:  # a converted timm layer's dropout
            output = activations.apply(drop(super().forward(input)), self.activation, self.activation_param)
        else:
            output = self._normalize(input, self._spec())
        if self.apply_act_module:
            output = self.act(output)
        return output

    def extra_repr(self) -> str:
        param = "" if self.activation_param is None else f", activation_param={self.activation_param}"
        inplace = ", inplace=True" if self.inplace else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{param}{inplace}"


class BatchNormXd(_BatchNorm):
    """Single-process BatchNorm for input of 2 to 5 dimensions, like mmengine's ``_BatchNormXd``.

    What ``revert_sync_batchnorm`` makes of a layer whose dimensionality is not known.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")
