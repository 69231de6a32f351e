"""Quick start: two CPU processes, uneven batches, one synchronized BatchNorm.

    torchrun --standalone --nproc-per-node 2 launch/quickstart.py

Rank r holds 2 + 3r samples. Each rank normalizes only its own rows, yet every rank's
output equals single-process nn.BatchNorm2d over the concatenation of all ranks' samples,
and every rank ends with the same running statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import syncbn


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    # The same data on every rank (seeded); each rank keeps its own slice.
    gen = torch.Generator().manual_seed(0)
    sizes = [2 + 3 * r for r in range(world)]
    batch = torch.randn(sum(sizes), 8, 16, 16, generator=gen) * 2 + 1
    local = batch.split(sizes)[rank]

    layer = syncbn.SyncBatchNorm(8)
    y = layer(local)
    y.square().mean().backward()

    reference = nn.BatchNorm2d(8)
    expected = reference(batch).split(sizes)[rank]
    err = (y - expected).abs().max().item()
    stats_err = (layer.running_var - reference.running_var).abs().max().item()
    lines = [None] * world
    dist.all_gather_object(
        lines,
        f"rank {rank}/{world}: {sizes[rank]:2d} samples, max |y - BatchNorm2d(all ranks)| = {err:.1e}, "
        f"running_var error {stats_err:.1e}",
    )
    if rank == 0:  # rank 0 alone prints
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
