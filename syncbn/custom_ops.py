"""The two passes as custom operators: compiled code with ``SYNCBN_COMPILE=ops`` or ``SYNCBN_DEBUG=1``.

    torch.ops.syncbn.forward    local statistics, all-reduce, running-statistics update, normalize
                                and activate
    torch.ops.syncbn.backward   local gradient sums, all-reduce, input gradient

By default compiled code runs the traced layer of ``syncbn.traced``, which the compiler fuses
with the ops around it. These ops keep what only the eager code does: syncbn's Triton kernels
inside a compiled graph, and the debug mode's checks read back on the host.

Why custom ops. Dynamo can trace the eager autograd Function in simple cases (torch 2.13 turns
its in-place ``dist.all_reduce`` into a functional collective), but not the layer's
data-dependent parts: the global-count rule reads the count back to the host on a rank with
at most one sample, ``SYNCBN_DEBUG`` compares descriptors on the host, and the Triton
launchers pick configurations in Python. A graph break there is an error under
``fullgraph=True``. As custom ops, each pass is one opaque node: the compiler sees its
shapes (``register_fake``) and its backward (``register_autograd``); the running statistics and
``num_batches_tracked`` come back as outputs that are copied into the buffers right after it
(an op with an autograd formula must be functional); and inside it runs the same code as
eager mode, whichever backend (``syncbn.ops.backend_for``) the tensors take, so the layer
computes in compiled code exactly what it computes in eager mode.

Why only under compile. The dispatcher costs tens of microseconds per call on the host, more
than the whole layer on small CPU tensors, so eager mode keeps the autograd Function
(``syncbn.functional``) and ``syncbn.functional.training_forward`` picks the ops only while
``torch.compiler.is_compiling()``.

The process group travels as its name (custom ops take no ProcessGroup objects) and is
resolved inside the op, the way torch's functional collectives do it; "" is the default group.
The fused activation travels as its name, parameter and ``inplace`` flag. An in-place layer's
forward op writes a new output (the op is functional) and its backward reads that output
instead of the input, as in eager mode.
Outputs have exactly the strides the fake functions promise (inductor asserts them): the
output and the input gradient are laid out like ``torch.empty_like(input)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import activations
from .dtypes import stat_dtype
from .passes import Call, backward_pass, count_batch, forward_pass, in_backward_pass


def _resolve_group(group_name: str) -> dist.ProcessGroup | None:
    if not group_name:
        return None
    return dist.distributed_c10d._resolve_process_group(group_name)


def _like_input(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``torch.empty_like(input)`` (one copy when they differ).

    A fresh tensor with the input's strides means a dense input, whose strides empty_like
    keeps: the usual case, no allocation. A transposed, sliced or expanded input is where the
    backends and empty_like may lay the result out differently.
    """
    if t.stride() == input.stride():
        return t
    out = torch.empty_like(input)
    return t if t.stride() == out.stride() else out.copy_(t)


@torch.library.custom_op("syncbn::forward", mutates_args=())
def _forward_op(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum_tensor: torch.Tensor | None,
    momentum: float,
    cumulative: bool,
    eps: float,
    group_name: str,
    sync: bool,
    name: str,
    act_name: str,
    act_param: float | None,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, mean, invstd, count, new_running_mean, new_running_var, new_num_batches_tracked)``.

    Functional (an op with an autograd formula may not mutate its inputs): the updated running
    statistics and batch counter come back as new tensors, empty when there are none, and the
    caller copies them into the buffers. The counter is counted here, not in traced code, so
    that a recomputation in backward (activation checkpointing around compiled code) changes
    none of them; ``cumulative`` (momentum=None) takes the momentum from the counter.
    ``mean`` and ``invstd`` are zeros when nothing was normalized.
    """
    new_mean, new_var, new_count = (
        t.clone() if t is not None else None for t in (running_mean, running_var, num_batches_tracked)
    )
    momentum_arg = None if cumulative else (momentum if momentum_tensor is None else momentum_tensor)
    running = count_batch(new_mean, new_var, new_count, momentum_arg, recomputed=in_backward_pass())
    call = Call(eps, _resolve_group(group_name), sync, name, activations.spec(act_name, act_param, inplace))
    output, mean, invstd, count = forward_pass(input, weight, bias, running, call)
    none = input.new_empty((0,))
    buffers = tuple(none.clone() if t is None else t for t in (new_mean, new_var, new_count))
    if mean is None:  # no channels, or no sample in the whole group
        channels = input.shape[1]
        zeros = input.new_zeros((channels,), dtype=stat_dtype(input.dtype))
        return (output, zeros, zeros.clone(), input.new_zeros((), dtype=torch.float64), *buffers)
    if count is None:  # the one-call local kernel ran: the count is this batch's own
        count = torch.tensor(float(input.numel() // input.shape[1]), dtype=torch.float64, device=input.device)
    if mean.untyped_storage().data_ptr() == invstd.untyped_storage().data_ptr():
        invstd = invstd.clone()  # outputs must not share storage (Triton's finalize packs them)
    return (_like_input(output, input), mean, invstd, count.clone(), *buffers)


@_forward_op.register_fake
def _forward_fake(
    input, weight, bias, running_mean, running_var, num_batches_tracked, momentum_tensor, momentum,
    cumulative, eps, group_name, sync, name, act_name, act_param, inplace,
):  # fmt: skip
    channels = input.shape[1]
    dtype = stat_dtype(input.dtype)
    buffers = tuple(
        torch.empty_like(t) if t is not None else input.new_empty((0,))
        for t in (running_mean, running_var, num_batches_tracked)
    )
    return (
        torch.empty_like(input),
        input.new_empty((channels,), dtype=dtype),
        input.new_empty((channels,), dtype=dtype),
        input.new_empty((), dtype=torch.float64),
        *buffers,
    )


@torch.library.custom_op("syncbn::backward", mutates_args=())
def _backward_op(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    count: torch.Tensor,
    group_name: str,
    sync: bool,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    name: str,
    eps: float,
    act_name: str,
    act_param: float | None,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_input, grad_weight, grad_bias)``; an unneeded one is an empty tensor.

    ``saved`` is the forward's input, or its output for an in-place activation.
    ``grad_bias`` is in the statistics dtype (the caller casts it to the bias's dtype).
    """
    channels = saved.shape[1]
    empty = channels == 0 or (saved.numel() == 0 and int(count.item()) == 0)
    if empty:
        # Nothing was normalized (the eager Function has no backward at all here): no
        # collective, and every rank of the group is in this same case.
        grads = (torch.zeros_like(saved), mean.new_zeros((channels,)), mean.new_zeros((channels,)))
        if weight is not None:
            grads = (grads[0], grads[1].to(weight.dtype), grads[2])
    else:
        call = Call(eps, _resolve_group(group_name), sync, name, activations.spec(act_name, act_param, inplace))
        grads = backward_pass(
            grad_output, saved, weight, bias, mean, invstd, count, call, (need_input, need_weight, need_bias),
            mean.dtype,
        )  # fmt: skip
    grad_input, grad_weight, grad_bias = grads
    return (
        _like_input(grad_input, saved) if need_input else saved.new_empty((0,)),
        grad_weight if need_weight else saved.new_empty((0,)),
        grad_bias if need_bias else saved.new_empty((0,)),
    )


@_backward_op.register_fake
def _backward_fake(
    grad_output, saved, weight, bias, mean, invstd, count, group_name, sync, need_input, need_weight, need_bias,
    name, eps, act_name, act_param, inplace,
):  # fmt: skip
    channels = saved.shape[1]
    return (
        torch.empty_like(saved) if need_input else saved.new_empty((0,)),
        weight.new_empty((channels,)) if need_weight else saved.new_empty((0,)),
        mean.new_empty((channels,)) if need_bias else saved.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, *_, eps, group_name, sync, name, act_name, act_param, inplace = inputs
    y, mean, invstd, count, *buffers = output
    needs_bias = activations.spec(act_name, act_param, inplace).needs_pre_activation
    ctx.save_for_backward(y if inplace else input, weight, bias if needs_bias else None, mean, invstd, count)
    ctx.group_name, ctx.sync, ctx.name, ctx.eps = group_name, sync, name, eps
    ctx.act = (act_name, act_param, inplace)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, count, *buffers)


def _backward(ctx, grad_output, *_grads_of_non_differentiable):
    saved, weight, bias, mean, invstd, count = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_input, grad_weight, grad_bias = _backward_op(
        grad_output, saved, weight, bias, mean, invstd, count, ctx.group_name, ctx.sync,
        need_input, need_weight, need_bias, ctx.name, ctx.eps, *ctx.act,
    )  # fmt: skip
    return (
        grad_input if need_input else None,
        grad_weight if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
        *(None,) * 13,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def sync_batch_norm_op(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | torch.Tensor | None,
    call: Call,
) -> torch.Tensor:
    """The training-mode layer through ``torch.ops.syncbn.forward`` (what compiled code calls).

    The op applies ``count_batch`` itself (``momentum=None``: the cumulative average, from the
    counter), so that a recomputation in backward counts nothing. ``call.act`` is fused in; in
    place, the output is a new tensor (the op is functional) and only it is saved.
    """
    momentum_tensor = momentum if isinstance(momentum, torch.Tensor) else None
    momentum_float = 0.0 if momentum_tensor is not None or momentum is None else float(momentum)
    group_name = call.process_group.group_name if (call.sync and call.process_group is not None) else ""
    name = call.layer if isinstance(call.layer, str) else (getattr(call.layer, "_syncbn_name", None) or "")
    act = call.act
    output, _, _, _, *new_buffers = _forward_op(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum_tensor,
        momentum_float, momentum is None, float(call.eps), group_name, call.sync, name,
        act.name, act.param, act.inplace,
    )  # fmt: skip
    with torch.no_grad():
        for buffer, new in zip((running_mean, running_var, num_batches_tracked), new_buffers):
            if buffer is not None:
                buffer.copy_(new)
    return output
