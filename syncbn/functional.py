"""``sync_batch_norm``: batch normalization whose batch is the union of all ranks' batches.

The oracle is single-process ``F.batch_norm`` on the concatenation of every rank's input. The
autograd Function below gets there with one all-reduce per pass (see ``syncbn.distributed``):

forward   local (sum, sum of squares, count) -> all_reduce -> global mean, invstd; running
          statistics updated on the device -> y = (x - mean) * invstd * weight + bias
backward  local (sum_dy, sum_dy_xmu) -> all_reduce -> dx from the global sums; weight and bias
          gradients stay local (DDP averages them like any other gradient)

The only host read-back is the global-count rule, and only on a rank whose own count is 0 or 1:
any other rank knows the global count is at least 2 without asking.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed
from .ops import backend_for
from .ops.reference import stat_dtype

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
            "syncbn: expected a floating-point input (float64, float32, float16 or bfloat16), "
            f"got {input.dtype}"
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


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized batch norm; see the module docstring for the two passes."""

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
    ) -> torch.Tensor:
        ops = backend_for(input)
        channels = input.shape[1]
        local_count = input.numel() // channels if channels else 0
        ctx.sync, ctx.process_group = sync, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype

        stats, scratch = ops.forward_stats(input)  # float64 [sum, sum of squares, count]
        if sync:
            distributed.all_reduce_sum(stats, process_group)
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
                ctx.empty = True
                ctx.mark_non_differentiable()
                return torch.empty_like(input)
        ctx.empty = False

        mean, invstd = ops.finalize(
            stats, eps, running_mean, running_var, momentum, stat_dtype(input.dtype)
        )
        output = ops.normalize(input, mean, invstd, weight, bias, scratch)
        ctx.save_for_backward(input, weight, mean, invstd, stats[-1])
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if ctx.empty:
            return (None,) * 9
        input, weight, mean, invstd, count = ctx.saved_tensors
        channels = input.shape[1]
        ops = backend_for(input)

        sums = ops.backward_reduce(grad_output, input, mean)  # [sum_dy, sum_dy_xmu], local
        if need_weight:
            grad_weight = (sums[channels:] * invstd).to(weight.dtype)
        if need_bias:
            # A copy: the all-reduce below works in place on sums.
            grad_bias = sums[:channels].to(ctx.bias_dtype, copy=True)
        if need_input:
            if ctx.sync:
                distributed.all_reduce_sum(sums, ctx.process_group)
            grad_input = ops.backward_elemt(grad_output, input, mean, invstd, weight, sums, count)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


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
    group of one rank, nothing is communicated.

    Every rank of the group must call it in the same order with the same channel count.
    """
    check_input(input, _num_channels(weight, bias, running_mean, running_var))
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if momentum is None:
        raise TypeError(
            "syncbn: momentum must be a float or a 0-d tensor; for a cumulative average pass "
            "1 / num_batches_tracked (SyncBatchNorm(momentum=None) does this)"
        )
    size = distributed.sync_world_size(process_group)
    return SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, process_group, size > 0
    )
