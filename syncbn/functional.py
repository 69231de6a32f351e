"""``sync_batch_norm``: batch normalization whose batch is the union of all ranks' batches.

The oracle is single-process ``F.batch_norm`` on the concatenation of every rank's input. The
autograd Function below gets there with one all-reduce per pass (see ``syncbn.distributed``):

forward   local (sum, sum of squares, count) -> all_reduce -> global mean, invstd; running
          statistics updated on the device -> y = (x - mean) * invstd * weight + bias
backward  local (sum_dy, sum_dy_xmu) -> all_reduce -> dx from the global sums; weight and bias
          gradients stay local (DDP averages them like any other gradient)

The only host read-back is the global-count rule, and only on a rank whose own count is 0 or 1:
any other rank knows the global count is at least 2 without asking.

The two passes (``forward_pass``, ``backward_pass``) are plain functions shared by two wrappers:
the autograd Function below (eager mode: the cheapest per call) and the custom ops of
``syncbn.custom_ops`` (under ``torch.compile``, where they are opaque to the compiler, collective,
host read-back and running-statistics update included).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed
from .ops import backend_for

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_input(input: torch.Tensor, num_features: int | None = None) -> None:
    """Raise a clear error for input the layer cannot normalize.

    ValueError for the wrong number of dimensions or channels, TypeError for a dtype that is
    not floating point.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"syncbn: expected a torch.Tensor input, got {type(input).__name__}")
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"syncbn: expected 2D to 5D input of shape (N, C, *), got {input.dim()}D input "
            f"of shape {tuple(input.shape)}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"syncbn: expected a floating-point input (float64, float32, float16 or bfloat16), got {input.dtype}"
        )
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"syncbn: expected input with {num_features} channels (dim 1), got "
            f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
        )


def _num_channels(*tensors: torch.Tensor | None) -> int | None:
    for t in tensors:
        if t is not None:
            return t.numel()
    return None


_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    A training-mode forward called then is a recomputation: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) reruns the forward inside backward to rebuild
    what it did not save. The recomputed forward still makes its all-reduce (every rank
    recomputes, and the statistics must be rebuilt), but it must not update the running
    statistics a second time. One call into the engine's thread-local state, no host sync.
    """
    return _current_graph_task_id is not None and _current_graph_task_id() != -1


def _name(layer: torch.nn.Module | str | None) -> str:
    return layer if isinstance(layer, str) else distributed.layer_name(layer)


def forward_pass(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float | torch.Tensor,
    eps: float,
    process_group: dist.ProcessGroup | None,
    sync: bool,
    layer: torch.nn.Module | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The training-mode forward: ``(output, mean, invstd, count)``.

    ``mean`` and friends are None when there is nothing to normalize (no channels, or an empty
    batch across the group): the output is then empty and there is no backward. ``layer`` (the
    module, or its name) only names the layer in debug checks and error messages. Shared by
    the autograd Function (eager) and the custom op (``torch.compile``).
    """
    channels = input.shape[1]
    if channels == 0:
        # No statistics to share: every rank of the group has the same C (a layer property).
        return torch.empty_like(input), None, None, None
    if sync and distributed.debug_enabled():
        distributed.check_consistency("forward", process_group, channels, input.dtype, _name(layer), input.device)
    ops = backend_for(input)
    local_count = input.numel() // channels

    stats, scratch = ops.forward_stats(input)  # float64 [sum, sum of squares, count]
    if sync:
        try:
            distributed.all_reduce_sum(stats, process_group)
        except RuntimeError as err:
            raise distributed.collective_error(
                err, "forward all-reduce", process_group, _name(layer), channels
            ) from err
    if local_count <= 1:
        # Only here may the global count be below 2; every rank with a count <= 1 reads it,
        # so all ranks of a group with a global count of 0 or 1 take the same branch.
        global_count = int(stats[-1].item())
        if global_count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel across the process group (this rank's input size: {tuple(input.shape)})"
            )
        if global_count == 0:
            return torch.empty_like(input), None, None, None

    output, mean, invstd = ops.finalize_normalize(
        input, stats, eps, weight, bias, running_mean, running_var, momentum, scratch
    )
    return output, mean, invstd, stats[-1]


def backward_pass(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    count: torch.Tensor,
    process_group: dist.ProcessGroup | None,
    sync: bool,
    needs_grad: tuple[bool, bool, bool],
    bias_dtype: torch.dtype | None,
    layer: torch.nn.Module | str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)``, None where ``needs_grad`` says not needed.

    The all-reduce happens only when the input gradient is needed (weight and bias gradients
    are local): every rank of the group must agree on that, as on everything else.
    """
    need_input, need_weight, need_bias = needs_grad
    channels = input.shape[1]
    if sync and distributed.debug_enabled():
        distributed.check_consistency(
            "backward", process_group, channels, input.dtype, _name(layer), input.device, input_grad=need_input
        )
    ops = backend_for(input)
    grad_input = None
    # [sum_dy, sum_dy_xmu], local, and the weight and bias gradients (never views of sums,
    # which the all-reduce below changes in place)
    sums, grad_weight, grad_bias = ops.backward_reduce_affine(
        grad_output, input, mean, invstd, weight.dtype if need_weight else None, bias_dtype if need_bias else None
    )
    if need_input:
        if sync:
            try:
                distributed.all_reduce_sum(sums, process_group)
            except RuntimeError as err:
                raise distributed.collective_error(
                    err, "backward all-reduce", process_group, _name(layer), channels
                ) from err
        grad_input = ops.backward_elemt(grad_output, input, mean, invstd, weight, sums, count)
    return grad_input, grad_weight, grad_bias


DOUBLE_BACKWARD_MESSAGE = (
    "syncbn: double backward (differentiating through the gradient of a SyncBatchNorm layer, as "
    "a gradient penalty or create_graph=True followed by another backward does) is not "
    "supported; use nn.BatchNorm for that part of the model, or compute the penalty without "
    "differentiating through the synchronized layers"
)


def _guard_double_backward(grads: tuple, inputs_need_grad: bool) -> tuple:
    """Make a second differentiation through ``grads`` raise ``DOUBLE_BACKWARD_MESSAGE``.

    What ``torch.autograd.function.once_differentiable`` does, with a message naming syncbn,
    and armed also when only the saved input or weight (not the incoming gradient) requires
    grad, as in a gradient penalty: the backward formulas here are not differentiable, so the
    second derivative would silently miss this layer.
    """
    if not inputs_need_grad:
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    delayed_error = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if delayed_error is None:
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    err_fn = delayed_error(DOUBLE_BACKWARD_MESSAGE.encode(), len(present))
    armed = err_fn(*[grads[i].detach().requires_grad_() for i in present])
    if not isinstance(armed, tuple):
        armed = (armed,)
    out = list(grads)
    for i, g in zip(present, armed):
        out[i] = g
    return tuple(out)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized batch norm in eager mode; see the module docstring.

    Under ``torch.compile`` the same two passes run as custom ops instead (``syncbn.custom_ops``),
    which the compiler treats as opaque: an autograd Function costs less per call in eager.
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float | torch.Tensor,
        eps: float,
        process_group: dist.ProcessGroup | None,
        sync: bool,
        layer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        output, mean, invstd, count = forward_pass(
            input, weight, bias, running_mean, running_var, momentum, eps, process_group, sync, layer
        )
        ctx.sync, ctx.process_group, ctx.layer = sync, process_group, layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.empty = mean is None
        if ctx.empty:  # the output stays differentiable (as nn.BatchNorm's); its backward is empty
            return output
        ctx.save_for_backward(input, weight, mean, invstd, count)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.empty:
            return (None,) * 10
        input, weight, mean, invstd, count = ctx.saved_tensors
        args = (
            grad_output, input, weight, mean, invstd, count, ctx.process_group, ctx.sync,
            ctx.needs_input_grad[:3], ctx.bias_dtype, ctx.layer,
        )  # fmt: skip
        if not torch.is_grad_enabled():  # the usual backward, create_graph=False
            return (*backward_pass(*args), None, None, None, None, None, None, None)
        with torch.no_grad():
            grads = backward_pass(*args)
        needs = grad_output.requires_grad or input.requires_grad or (weight is not None and weight.requires_grad)
        return (*_guard_double_backward(grads, needs), None, None, None, None, None, None, None)


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Batch normalization synchronized over ``process_group`` (the world when None).

    Same arguments as ``torch.nn.functional.batch_norm`` plus ``process_group``. In training
    mode the batch statistics are those of the concatenated batch of all ranks in the group,
    and ``running_mean`` / ``running_var`` (when given) are updated in place with them
    (unbiased variance, weight ``momentum`` for the new value; a 0-d tensor ``momentum`` is
    read on the device). Outside training mode, without an initialized process group, or in a
    group of one rank, nothing is communicated. A forward recomputed during backward
    (activation checkpointing) does not update the running statistics again.

    Every rank of the group must call it in the same order with the same channel count.
    """
    check_input(input, _num_channels(weight, bias, running_mean, running_var))
    if not training:
        if input.shape[1] == 0:
            return input.clone()  # no channels (F.batch_norm would index channel 0)
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if momentum is None:
        raise TypeError(
            "syncbn: momentum must be a float or a 0-d tensor; for a cumulative average pass "
            "1 / num_batches_tracked (SyncBatchNorm(momentum=None) does this)"
        )
    if not torch.compiler.is_compiling() and in_backward_pass():
        running_mean = running_var = None  # a checkpointed forward, recomputed
    return _training_forward(input, running_mean, running_var, weight, bias, momentum, eps, process_group)


def _training_forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float | torch.Tensor,
    eps: float,
    process_group: dist.ProcessGroup | None,
    layer: torch.nn.Module | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    cumulative: bool = False,
) -> torch.Tensor:
    """Training mode, input checked: the autograd Function in eager, the custom ops when compiling.

    ``num_batches_tracked`` (compiling only) is counted inside the op, ``cumulative`` meaning
    momentum=None; in eager mode the module counts it before calling.
    """
    sync = distributed.sync_world_size(process_group) > 0
    if torch.compiler.is_compiling():
        name = "" if layer is None else (layer._syncbn_name or "")
        return custom_ops.sync_batch_norm_op(
            input, weight, bias, running_mean, running_var, momentum, eps, process_group, sync, name,
            num_batches_tracked, cumulative,
        )  # fmt: skip
    return SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, process_group, sync, layer
    )


# Registers the torch.ops.syncbn custom ops; it needs the passes defined above.
from . import custom_ops  # noqa: E402
