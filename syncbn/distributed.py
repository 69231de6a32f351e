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
