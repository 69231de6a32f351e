"""``sync_batch_norm``: batch normalization whose batch is the union of all ranks' batches.

The oracle is single-process ``F.batch_norm`` on the concatenation of every rank's input. The
passes themselves live in ``syncbn.passes``; here are the two ways in:

- eager mode: ``SyncBatchNormFunction``, an autograd Function around the two passes (the
  cheapest per call: no dispatcher);
- under ``torch.compile``: torch ops the compiler traces and fuses (``syncbn.traced``), or,
  with ``SYNCBN_COMPILE=ops`` or ``SYNCBN_DEBUG=1``, the custom ops of ``syncbn.custom_ops``,
  which the compiler treats as opaque nodes running the eager code.

``training_forward`` picks one; the module (``syncbn.nn``) and ``sync_batch_norm`` both call it.
Every rank of a group must take the same way: the choice depends only on the settings (the
same on every rank) and on whether the code is compiled, never on the local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import activations, custom_ops, distributed
from .dtypes import FLOAT_DTYPES
from .passes import Call, RunningStats, backward_pass, count_batch, forward_pass, in_backward_pass


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


def _zero_grads(ctx, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
    """The gradients of a layer that normalized nothing (an empty global batch): zeros, as
    nn.BatchNorm gives, and no collective (every rank of the group is in the same case)."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (
        torch.zeros_like(input) if need_input else None,
        torch.zeros_like(weight) if need_weight else None,
        torch.zeros_like(bias) if need_bias else None,
    )


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized batch norm in eager mode (see ``syncbn.passes``).

    ``running`` is what ``count_batch`` says the batch updates, ``call`` how it computes and
    communicates; neither is differentiable. With an in-place activation (``call.act.inplace``)
    the output is written over the input, which is marked dirty and returned, and only the
    output is saved for backward; otherwise the input is.
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running: RunningStats | None,
        call: Call,
    ) -> torch.Tensor:
        act = call.act
        output, mean, invstd, count = forward_pass(input, weight, bias, running, call, overwrite=act.inplace)
        ctx.call = call
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.empty = mean is None
        if act.inplace:
            ctx.mark_dirty(input)  # output is input
        if ctx.empty:  # the output stays differentiable (as nn.BatchNorm's); its gradients are zeros
            ctx.save_for_backward(input, weight, bias)
        else:
            saved = output if act.inplace else input
            ctx.save_for_backward(saved, weight, bias if act.needs_pre_activation else None, mean, invstd, count)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.empty:
            return (*_zero_grads(ctx, *ctx.saved_tensors), None, None)
        saved, weight, bias, mean, invstd, count = ctx.saved_tensors
        needs_grad = ctx.needs_input_grad[:3]
        args = (grad_output, saved, weight, bias, mean, invstd, count, ctx.call, needs_grad, ctx.bias_dtype)
        if not torch.is_grad_enabled():  # the usual backward, create_graph=False
            return (*backward_pass(*args), None, None)
        with torch.no_grad():
            grads = backward_pass(*args)
        needs = grad_output.requires_grad or saved.requires_grad or (weight is not None and weight.requires_grad)
        return (*_guard_double_backward(grads, needs), None, None)


def _check_overwritable(input: torch.Tensor) -> None:
    """Refuse, before anything is written or sent, an input autograd forbids writing in place."""
    base = input._base if input._base is not None else input
    if torch.is_grad_enabled() and base.is_leaf and base.requires_grad:
        what = "a view of a leaf tensor" if base is not input else "a leaf tensor"
        raise RuntimeError(
            f"syncbn: SyncBatchNormAct(inplace=True) writes its output over its input, and the input is {what} "
            "that requires grad, which autograd does not allow to change in place; feed it the output of "
            "another layer, or use inplace=False"
        )


def training_forward(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | torch.Tensor | None,
    eps: float,
    process_group: dist.ProcessGroup | None,
    layer: torch.nn.Module | None = None,
    act: activations.Spec = activations.IDENTITY,
) -> torch.Tensor:
    """Training mode, input checked: the autograd Function in eager mode; when compiling, the
    traced ops, or the custom op (``SYNCBN_COMPILE=ops``, and in debug mode: its checks read
    back on the host).

    ``num_batches_tracked`` (None: not counted) and ``momentum`` (None: cumulative average,
    which needs the counter) go to ``count_batch``: here in eager mode, inside the op or the
    traced ops when compiling (where a recomputation must not count again). ``act``: the
    activation, fused into the passes in eager mode and in the custom ops; in the traced ops,
    torch's functional activation after the normalization, which inductor fuses with it. In
    place, eager mode writes the output over ``input`` and saves only the output; compiled code
    is functional and writes a new tensor (the custom ops save only the output; in the traced
    ops, the compiler chooses what to save), with the same effective weight (``inplace_weight``).
    """
    if torch.compiler.is_compiling():
        # Imported here, at trace time (dynamo runs imports): its torch.compiler decorator
        # imports torch._dynamo, and with it Triton, which plain `import syncbn` must not.
        from . import traced

        sync, trace = traced.compile_time_choices(process_group)
        if trace:
            output = traced.training_forward(
                input,
                traced.inplace_weight(weight, eps) if act.inplace else weight,
                bias,
                running_mean=running_mean,
                running_var=running_var,
                num_batches_tracked=num_batches_tracked,
                momentum=momentum,
                eps=eps,
                process_group=process_group,
                sync=sync,
            )
            return output if act.code == activations.IDENTITY.code else act.entry.fn(output, act.param)
        return custom_ops.sync_batch_norm_op(
            input,
            weight,
            bias,
            running_mean=running_mean,
            running_var=running_var,
            num_batches_tracked=num_batches_tracked,
            momentum=momentum,
            call=Call(eps, process_group, sync, layer, act),
        )
    if act.inplace:
        _check_overwritable(input)
    call = Call(eps, process_group, distributed.sync_world_size(process_group) > 0, layer, act)
    running = count_batch(running_mean, running_var, num_batches_tracked, momentum, recomputed=in_backward_pass())
    return SyncBatchNormFunction.apply(input, weight, bias, running, call)


def eval_forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Eval mode: no communication. Without running statistics, the batch's own (as torch's
    SyncBatchNorm does)."""
    if input.shape[1] == 0:
        return input.clone()  # no channels (F.batch_norm would index channel 0)
    batch_stats = running_mean is None and running_var is None
    return F.batch_norm(input, running_mean, running_var, weight, bias, batch_stats, 0.0, eps)


def _num_channels(*tensors: torch.Tensor | None) -> int | None:
    for t in tensors:
        if t is not None:
            return t.numel()
    return None


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
        return eval_forward(input, running_mean, running_var, weight, bias, eps)
    return training_forward(
        input,
        weight,
        bias,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=None,
        momentum=momentum,
        eps=eps,
        process_group=process_group,
    )
