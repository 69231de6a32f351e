"""The two passes of synchronized batch norm, and the rules around them.

    forward   local (sum, sum of squares, count) -> all_reduce -> global mean, invstd; running
              statistics updated on the device -> y = act((x - mean) * invstd * weight + bias)
    backward  local (sum_g, sum_g_xmu) with g = dy * act'(pre-activation) -> all_reduce -> dx
              from the global sums; weight and bias gradients stay local (DDP averages them
              like any other gradient)

The activation (``Call.act``, a ``syncbn.activations.Spec``; identity for ``SyncBatchNorm``) is
part of the two elementwise passes, not a pass of its own: backward recomputes the
pre-activation from the saved input and statistics, so nothing is saved beyond what the
normalization saves. In place (``Spec.inplace``), only the output is saved, and backward
recovers the pre-activation and the normalized input from it (``inplace_weight``).

Both wrappers of the passes import them from here: the autograd Function of
``syncbn.functional`` (eager mode) and the custom ops of ``syncbn.custom_ops`` (under
``torch.compile``). So do the rules every caller must apply the same way:

- ``count_batch``: nn.BatchNorm's bookkeeping of one training batch (``num_batches_tracked``,
  the cumulative average of ``momentum=None``), skipped for a forward recomputed in backward;
- ``in_backward_pass``: how a recomputed forward (activation checkpointing) is recognised.

The only host read-back is the global-count rule, and only on a rank whose own count is 0 or 1:
any other rank knows the global count is at least 2 without asking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import activations, distributed
from .ops import backend_for


@dataclass(frozen=True, slots=True)
class RunningStats:
    """The running statistics one training batch updates, and the weight of its statistics.

    ``momentum`` is a float, or a 0-d device tensor (the cumulative average of
    ``momentum=None``, ``1 / num_batches_tracked``, never read back to the host).
    """

    mean: torch.Tensor | None
    var: torch.Tensor | None
    momentum: float | torch.Tensor


@dataclass(frozen=True, slots=True)
class Call:
    """How one layer call computes (eps, the fused activation) and communicates: over which
    group, whether at all, and under what name.

    ``layer`` (the module, or its name) only names the layer in debug checks and error messages.
    """

    eps: float
    process_group: dist.ProcessGroup | None
    sync: bool
    layer: torch.nn.Module | str | None = None
    act: activations.Spec = activations.IDENTITY

    @property
    def name(self) -> str:
        layer = self.layer
        return layer if isinstance(layer, str) else distributed.layer_name(layer)


_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    A training-mode forward called then is a recomputation: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) reruns the forward inside backward to rebuild
    what it did not save. The recomputed forward still makes its all-reduce (every rank
    recomputes, and the statistics must be rebuilt), but it must not count the batch or update
    the running statistics a second time. One call into the engine's thread-local state.
    """
    return _current_graph_task_id is not None and _current_graph_task_id() != -1


MOMENTUM_NONE_MESSAGE = (
    "syncbn: momentum must be a float or a 0-d tensor; for a cumulative average pass "
    "1 / num_batches_tracked (SyncBatchNorm(momentum=None) does this)"
)


def count_batch(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | torch.Tensor | None,
    recomputed: bool,
) -> RunningStats | None:
    """nn.BatchNorm's bookkeeping for one training batch: what the batch updates, or None.

    Counts the batch in ``num_batches_tracked`` (in place, when given) and turns
    ``momentum=None`` into the cumulative-average weight ``1 / num_batches_tracked``, kept on
    the device instead of read back as nn.BatchNorm does. A recomputed forward counts nothing
    and updates nothing. Without a counter, ``momentum`` must be a float or a tensor.
    """
    if momentum is None and num_batches_tracked is None:
        raise TypeError(MOMENTUM_NONE_MESSAGE)
    if recomputed:
        return None
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = num_batches_tracked.double().reciprocal()
    if running_mean is None and running_var is None:
        return None
    return RunningStats(running_mean, running_var, momentum)


def inplace_weight(weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """The weight the in-place layer normalizes with: ``weight``, with ``|w| < eps`` raised to ``eps``.

    Backward recovers the normalized input as ``(y - bias) / w`` from the output alone: a weight
    of 0 leaves nothing to recover, a tiny one amplifies the output's rounding. So a channel
    whose ``|w|`` is below the layer's ``eps`` (InPlace-ABN's choice of floor) normalizes with
    ``eps`` of the weight's sign (+eps for 0) in training mode, and the gradient for that
    effective weight goes to ``w`` as it is (straight through), so a weight initialised to 0
    (``zero_init_residual``) trains as in ``nn.BatchNorm``. NaN stays NaN.
    """
    if weight is None:
        return None
    return weight.abs().clamp_(min=eps).copysign_(weight)


def single_value_error(input_shape: torch.Size, sync: bool) -> ValueError:
    """nn.BatchNorm's error for a batch of one value per channel (here: the global batch)."""
    where = "across the process group" if sync else "in the batch"
    return ValueError(
        f"Expected more than 1 value per channel when training, got 1 value per channel {where} "
        f"(this rank's input size: {tuple(input_shape)})"
    )


def forward_pass(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    call: Call,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The training-mode forward: ``(output, mean, invstd, count)``.

    ``mean`` and friends are None when there is nothing to normalize (no channels, or an empty
    batch across the group): the output is then empty and there is no backward. ``overwrite``
    (the in-place layer in eager mode): the output is written over ``input``, and is ``input``.
    """
    channels = input.shape[1]
    if channels == 0:
        # No statistics to share: every rank of the group has the same C (a layer property).
        return (input if overwrite else torch.empty_like(input)), None, None, None
    if call.sync and distributed.debug_enabled():
        distributed.check_consistency("forward", call.process_group, channels, input.dtype, call.name, input.device)
    act = call.act
    if act.inplace:
        weight = inplace_weight(weight, call.eps)
    ops = backend_for(input)
    local_count = input.numel() // channels
    if not call.sync:
        if local_count <= 1:
            return _too_few_values(local_count, input, call, overwrite)
        local = ops.local_batch_norm(input, weight, bias, running, call.eps, act=act, overwrite=overwrite)
        if local is not None:
            return (*local, None)  # count None: the backward takes the one-call kernel too

    stats, scratch = ops.forward_stats(input)  # float64 [sum, sum of squares, count]
    if call.sync:
        _all_reduce(stats, call, "forward all-reduce", channels)
        if local_count <= 1:
            # Only here may the global count be below 2; every rank with a count <= 1 reads it,
            # so all ranks of a group with a global count of 0 or 1 take the same branch.
            global_count = int(stats[-1].item())
            if global_count <= 1:
                return _too_few_values(global_count, input, call, overwrite)

    output, mean, invstd = ops.finalize_normalize(
        input, stats, eps=call.eps, weight=weight, bias=bias, running=running, scratch=scratch,
        act=act, overwrite=overwrite,
    )  # fmt: skip
    if overwrite and output is not input:  # the backend read a copy (strides it cannot walk)
        output = input.copy_(output)
    return output, mean, invstd, stats[-1]


def _too_few_values(
    count: int, input: torch.Tensor, call: Call, overwrite: bool
) -> tuple[torch.Tensor, None, None, None]:
    """The global-count rules: nothing to normalize for 0 values, nn.BatchNorm's error for 1."""
    if count == 1:
        raise single_value_error(input.shape, call.sync)
    return (input if overwrite else torch.empty_like(input)), None, None, None


def backward_pass(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    count: torch.Tensor | None,
    call: Call,
    needs_grad: tuple[bool, bool, bool],
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)``, None where ``needs_grad`` says not needed.

    ``saved`` is the input, or the output for an in-place activation (``call.act.inplace``);
    ``bias`` is needed only when ``call.act.needs_pre_activation``. The all-reduce happens only
    when the input gradient is needed (weight and bias gradients are local): every rank of the
    group must agree on that, as on everything else. ``count`` None means the forward ran the
    backend's one-call local kernel (no group).
    """
    act = call.act
    if act.inplace:
        weight = inplace_weight(weight, call.eps)
    ops = backend_for(saved)
    if count is None:
        return ops.local_batch_norm_backward(
            grad_output, saved, weight, mean, invstd, call.eps, needs_grad, bias=bias, act=act
        )
    need_input, need_weight, need_bias = needs_grad
    channels = saved.shape[1]
    if call.sync and distributed.debug_enabled():
        distributed.check_consistency(
            "backward", call.process_group, channels, saved.dtype, call.name, saved.device, input_grad=need_input
        )
    # What the reduce and elementwise passes read (the torch-ops path works out dy * act' here,
    # once for both; the kernels do it on the fly), then [sum_g, sum_g_xmu], local, and the
    # weight and bias gradients (never views of sums, which the all-reduce changes in place).
    grad, source, centre, act = ops.backward_prepare(grad_output, saved, mean, invstd, weight, bias, act)
    sums, grad_weight, grad_bias = ops.backward_reduce_affine(
        grad,
        source,
        centre,
        invstd,
        weight_dtype=weight.dtype if need_weight else None,
        bias_dtype=bias_dtype if need_bias else None,
        act=act,
        weight=weight,
        bias=bias,
    )
    grad_input = None
    if need_input:
        if call.sync:
            _all_reduce(sums, call, "backward all-reduce", channels)
        grad_input = ops.backward_elemt(grad, source, centre, invstd, weight, sums, count, act=act, bias=bias)
        if grad_input.dtype != saved.dtype:  # the torch-ops path inverts half-precision outputs in float32
            grad_input = grad_input.to(saved.dtype)
    return grad_input, grad_weight, grad_bias


def _all_reduce(buffer: torch.Tensor, call: Call, what: str, channels: int) -> None:
    try:
        distributed.all_reduce_sum(buffer, call.process_group)
    except RuntimeError as err:
        raise distributed.collective_error(err, what, call.process_group, call.name, channels) from err
