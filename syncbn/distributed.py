"""Collectives and process groups.

The layer makes exactly one ``all_reduce(SUM)`` per pass over its process group: a float64
buffer of ``2C + 1`` values in forward, ``2C`` values in backward. The payload does not grow
with the world size, uneven and empty ranks need nothing but addition, and nothing is read
back to the host, so the collective can run asynchronously on the device stream.

Whether to communicate at all is decided per call from the group's size: no initialized
process group, or a group of one, means plain BatchNorm math with no collective, unless
``SYNCBN_ALWAYS_SYNC=1`` asks for the collective anyway (to time the synced path on one device).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ALWAYS_SYNC_ENV = "SYNCBN_ALWAYS_SYNC"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
    if size == 1 and not _env_flag(ALWAYS_SYNC_ENV):
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
        raise RuntimeError(
            "syncbn.create_syncbn_process_group: call torch.distributed.init_process_group first"
        )
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
