"""Collectives and process groups.

The layer makes exactly one ``all_reduce(SUM)`` per pass over its process group: a float64
buffer of ``2C + 1`` values in forward, ``2C`` values in backward. The payload does not grow
with the world size, uneven and empty ranks need nothing but addition, and nothing is read
back to the host, so the collective can run asynchronously on the device stream.

Whether to communicate at all is decided per call from the group's size: no initialized
process group, or a group of one, means plain BatchNorm math with no collective, unless
``SYNCBN_ALWAYS_SYNC=1`` asks for the collective anyway (to time the synced path on one device).

Failures. A collective only completes when every rank of the group makes the same one, so the
classic SyncBatchNorm failure is a hang: a rank died, raised before reaching a layer, skipped a
layer or called the layers in another order. Two defences live here:

- ``SYNCBN_DEBUG=1`` (``check_consistency``): before each of the layer's collectives the ranks
  all-gather a small int64 descriptor of the call (pass, per-group call number, channels,
  dtype, group size, a hash of the layer's name) and every rank raises the same
  ``RuntimeError`` naming the ranks that differ, instead of mixing statistics of different
  layers or hanging later. Off, it costs one environment lookup per pass: no collective, no
  host read-back.
- ``collective_error``: a failed collective (gloo raises when a peer's connection drops or the
  process group's timeout expires) is re-raised with the layer, the pass and the likely causes,
  chained to the original error.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.distributed as dist

from . import settings


def debug_enabled() -> bool:
    """True when ``SYNCBN_DEBUG`` asks for the cross-rank consistency checks (read per call)."""
    return settings.DEBUG.get()  # the whole cost when off: a dict lookup


def is_initialized() -> bool:
    """True when a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def sync_world_size(process_group: dist.ProcessGroup | None) -> int:
    """Number of ranks the layer synchronizes with, or 0 when it must not communicate.

    0 means: no initialized process group, this rank is not a member of ``process_group``, or a
    group of one rank (unless ``SYNCBN_ALWAYS_SYNC=1``).
    """
    if not is_initialized():
        return 0
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size < 0:
        # get_world_size returns -1 for a group this rank does not belong to.
        raise RuntimeError("syncbn: this rank is not a member of the layer's process_group")
    if size == 1 and not settings.ALWAYS_SYNC.get():
        return 0
    return size


def all_reduce_sum(buffer: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place SUM all-reduce of ``buffer`` over ``process_group`` (the world when None)."""
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
    return buffer


def create_syncbn_process_group(group_size: int) -> dist.ProcessGroup:
    """Split the world into consecutive groups of ``group_size`` ranks; return this rank's group.

    Ranks ``[0, group_size)`` form the first group, ``[group_size, 2 * group_size)`` the
    second, and so on. ``torch.distributed.new_group`` must be called by every rank of the
    world for every group, members or not, in the same order, so every rank creates all the
    groups here and keeps its own. Call it once, on every rank, after
    ``init_process_group``, and reuse the result.

    The usual use is to synchronize BatchNorm within a node, where communication is cheap,
    and not across nodes. ``torchrun`` numbers ranks node by node, so with 8 GPUs per node::

        dist.init_process_group("nccl")
        group = syncbn.create_syncbn_process_group(8)   # or int(os.environ["LOCAL_WORLD_SIZE"])
        model = syncbn.convert_sync_batchnorm(model, process_group=group)

    Raises RuntimeError without an initialized default process group, and ValueError when
    ``group_size`` is not a positive integer dividing the world size.
    """
    if not is_initialized():
        raise RuntimeError("syncbn.create_syncbn_process_group: call torch.distributed.init_process_group first")
    world_size = dist.get_world_size()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if world_size % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the world size {world_size}: "
            "the groups must all have the same size"
        )
    rank = dist.get_rank()
    own_group = None
    for start in range(0, world_size, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)  # a collective over the whole world
        if rank in ranks:
            own_group = group
    return own_group


# ---------------------------------------------------------------------------------------------
# Layer names (for SYNCBN_DEBUG's comparison and for error messages)


def layer_name(layer: torch.nn.Module | None) -> str:
    """The layer's name in its model, or "" when unknown.

    ``convert_sync_batchnorm`` records each layer's path in the converted model. A layer built
    directly as ``syncbn.SyncBatchNorm`` is named on first need (debug mode, an error) from the
    call stack: its path in the outermost module on the stack that contains it (the model
    whose forward is running, or one held by a local variable of a calling function:
    ``layer1.0.bn1``), else the name of the variable or list that holds the layer itself
    (``bn``, ``layers[1]``). Eager mode only: under ``torch.compile`` a layer has the name it
    was given before (by conversion, or by an eager call in debug mode).
    """
    if layer is None:
        return ""
    name = getattr(layer, "_syncbn_name", None)
    if name is None:
        name = _name_from_stack(layer)
    return name or ""


def _is_syncbn_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and hasattr(type(module), "_syncbn_name")


def _module_candidates(var: str, value: object) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(value, torch.nn.Module):
        return [(var, value)]
    if isinstance(value, (list, tuple)) and len(value) <= 256:
        return [(f"{var}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.nn.Module)]
    return []


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _match_in_frame(frame, layer: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """The first local of ``frame`` that is (or holds) a module containing ``layer``."""
    try:
        local_vars = list(frame.f_locals.items())
    except Exception:  # a frame whose locals cannot be read
        return None
    try:
        for var, value in local_vars:
            for label, module in _module_candidates(var, value):
                if module is layer and label == "self":
                    continue  # the layer's own forward: says nothing about where it sits
                if module is layer:
                    return module, label  # the layer itself in a variable: named after it
                if any(m is layer for m in module.modules()):
                    return module, ""  # a model holding it: paths from the model's root
    except Exception:  # an exotic object on the stack: a name is not worth an error
        return None
    return None


def _name_from_stack(layer: torch.nn.Module) -> str | None:
    """Name ``layer`` (and every unnamed syncbn layer next to it) from the modules on the stack.

    The outermost module wins, so that every layer of a model gets its path from the model's
    root whichever submodule's forward is on the stack; the same module found again further out
    (the variable that holds the model, the caller's caller) keeps the innermost label.
    """
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        # syncbn's and torch's own frames hold the layer under their parameter names
        # (``layer``, ``args``): only the caller's code says where it sits.
        match = None if frame.f_code.co_filename.startswith(_LIBRARY_DIRS) else _match_in_frame(frame, layer)
        if match is not None and (found is None or match[0] is not found[0]):
            found = match
        frame = frame.f_back
    if found is None:
        return None
    root, prefix = found
    for path, module in root.named_modules():
        if _is_syncbn_layer(module) and module._syncbn_name is None:
            module._syncbn_name = ".".join(p for p in (prefix, path) if p)
    return layer._syncbn_name


def _describe_layer(name: str, channels: int) -> str:
    return f"layer '{name}'" if name else f"an unnamed SyncBatchNorm({channels})"


# ---------------------------------------------------------------------------------------------
# SYNCBN_DEBUG: the ranks compare their calls before each collective

_PASSES = {"forward": 0, "backward": 1}
_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
#: Synced calls made in debug mode, per process group name (forward and backward together).
_debug_calls: dict[str, int] = {}


def reset_debug_state() -> None:
    """Forget the per-group call numbers (every rank must do it at the same point)."""
    _debug_calls.clear()


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "little")


def _group_of(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return process_group if process_group is not None else dist.distributed_c10d._get_default_group()


def check_consistency(
    pass_name: str,
    process_group: dist.ProcessGroup | None,
    channels: int,
    dtype: torch.dtype,
    name: str,
    device: torch.device,
    input_grad: bool | None = None,
) -> None:
    """Raise the same RuntimeError on every rank when the ranks are not making the same call.

    One ``all_gather`` of a 7-value int64 descriptor per check, read back on the host (debug
    mode only). ``input_grad`` (backward) is whether this rank's backward makes the gradient
    all-reduce: ranks that disagree would otherwise leave one of them waiting.
    """
    group = _group_of(process_group)
    key = group.group_name
    call = _debug_calls.get(key, 0)
    _debug_calls[key] = call + 1
    size = dist.get_world_size(group)
    descriptor = [
        _PASSES[pass_name], call, channels, _DTYPE_CODES.get(dtype, 0), size, _name_hash(name),
        -1 if input_grad is None else int(input_grad),
    ]  # fmt: skip
    mine = torch.tensor(descriptor, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as err:
        what = f"{pass_name} consistency check (the all_gather of SYNCBN_DEBUG=1)"
        raise collective_error(err, what, process_group, name, channels) from err
    rows = [tuple(t.tolist()) for t in gathered]
    if all(row == rows[0] for row in rows):
        return
    # Every rank saw the same rows, so every rank is here: one more collective for the names.
    names: list[object] = [None] * size
    try:
        dist.all_gather_object(names, name, group=group)
    except Exception:  # the names only improve the message
        names = [name if r == dist.get_rank(group) else None for r in range(size)]
    raise RuntimeError(_mismatch_message(rows, names, dist.get_rank(group)))


def _mismatch_message(rows: list[tuple[int, ...]], names: list[object], rank: int) -> str:
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(row, []).append(r)
    # The largest set of agreeing ranks (the one holding rank 0 on a tie) is the reference.
    reference = max(groups.values(), key=lambda ranks: (len(ranks), -ranks[0]))
    differing = [r for r in range(len(rows)) if r not in reference]
    labels = ("pass", "call number", "channels", "dtype", "group size", "layer", "input gradient")
    fields = [labels[i] for i in range(len(labels)) if len({row[i] for row in rows}) > 1]

    def describe(r: int) -> str:
        p, call, channels, dtype, size, _, input_grad = rows[r]
        pass_name = "backward" if p == 1 else "forward"
        name = names[r] if isinstance(names[r], str) else None
        layer = _describe_layer(name, channels) if name is not None else "a layer whose name did not arrive"
        extra = "" if input_grad < 0 else (", with input gradient" if input_grad else ", without input gradient")
        return (
            f"  rank {r}: {pass_name} call #{call} of {layer} ({channels} channels, "
            f"{_DTYPE_NAMES.get(dtype, 'unknown dtype')}, group of {size}{extra})"
        )

    return (
        f"syncbn (SYNCBN_DEBUG=1): the ranks of a process group of {len(rows)} are not making the "
        f"same SyncBatchNorm call (differing: {', '.join(fields)}); rank(s) {differing} differ from "
        f"rank(s) {reference}:\n"
        + "\n".join(describe(r) for r in range(len(rows)))
        + f"\nThis is rank {rank}. Every rank of the group must call the synchronized BatchNorm "
        "layers in the same order, forward and backward, with the same number of channels and "
        "dtype (a rank that skips a layer, runs a different branch of the model or skips a "
        "backward pass leaves the others waiting or mixes the statistics of different layers)."
    )


def collective_error(
    err: BaseException,
    what: str,
    process_group: dist.ProcessGroup | None,
    name: str,
    channels: int,
) -> BaseException:
    """``err`` (a failed collective) re-raised with the layer, the pass and the likely causes."""
    try:
        size = f" of {dist.get_world_size(process_group)} ranks"
    except Exception:
        size = ""
    message = (
        f"syncbn: the {what} of {_describe_layer(name, channels)} over a process group"
        f"{size} failed: {err}\nLikely causes: another rank died or raised before reaching this "
        "layer; a rank skipped this layer or calls the synchronized layers in another order (run "
        "with SYNCBN_DEBUG=1 to have the ranks compare their calls); or the process group's "
        "timeout (init_process_group(timeout=...)) expired while another rank was still busy. "
        "See 'Troubleshooting' in the syncbn README."
    )
    try:
        return type(err)(message)
    except Exception:
        return RuntimeError(message)
