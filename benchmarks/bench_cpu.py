"""CPU speed of the synced layer at world size 2 (gloo) against single-process F.batch_norm.

    python -m benchmarks.bench_cpu [--quick]    # results in benchmarks/results/scratch/
    python -m benchmarks.bench_cpu --save       # a full run: replaces benchmarks/results/cpu.{md,json}

Two processes with one thread each (the machine's two cores, one per rank) run, for every
shape, forward+backward of:
  - ``F.batch_norm`` in training mode on the rank's local tensor (no communication: the target
    is at most 1.5x this),
  - ``syncbn.functional.sync_batch_norm`` synced over both ranks (one gloo all-reduce in each
    direction),
  - the same with a process group of one rank (no communication: the local math alone, under
    the same conditions),
  - the two bare all-reduces alone (2C+1 float64, 2C float32).
Measurements alternate between the candidates round by round so that drift hits all of them
alike; each figure is the median over rounds of the mean time per call within a round, and the
table reports the slower rank (a synced step waits for it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (
    Row,
    add_count_args,
    add_output_args,
    fill_counts,
    meta,
    meta_line,
    output_dir,
    run_world,
    slowest_rank,
    time_interleaved,
    write_results,
)
from syncbn.functional import sync_batch_norm

SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (256, 512)]
TARGET = 1.5
FULL = {"rounds": 15, "iters": 10, "warmup": 10}
QUICK = {"rounds": 3, "iters": 2, "warmup": 2}


def _bench_rank(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    # a group of one rank: syncbn with no communication, the local math alone in these conditions
    alone, _ = dist.new_subgroups(group_size=1)
    rows = []
    for shape in SHAPES:
        channels = shape[1]
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=gen).requires_grad_()
        grad = torch.randn(shape, generator=gen)
        weight = torch.ones(channels, requires_grad=True)
        bias = torch.zeros(channels, requires_grad=True)
        stats_buf = torch.zeros(2 * channels + 1, dtype=torch.float64)
        grad_buf = torch.zeros(2 * channels, dtype=torch.float32)

        def collectives():
            dist.all_reduce(stats_buf)
            dist.all_reduce(grad_buf)

        def f_batch_norm_with_collectives():
            # the control: F.batch_norm with syncbn's two collectives where syncbn makes them
            y = F.batch_norm(x, None, None, weight, bias, True)
            dist.all_reduce(stats_buf)
            y.backward(grad)
            dist.all_reduce(grad_buf)

        candidates = {
            "F.batch_norm": lambda: F.batch_norm(x, None, None, weight, bias, True).backward(grad),
            "syncbn": lambda: sync_batch_norm(x, None, None, weight, bias, True).backward(grad),
            "syncbn unsynced": lambda: sync_batch_norm(x, None, None, weight, bias, True, process_group=alone).backward(
                grad
            ),
            "all_reduce x2": collectives,
            "F.batch_norm + all_reduce x2": f_batch_norm_with_collectives,
        }
        times = time_interleaved(
            candidates, rounds=args.rounds, iters=args.iters, warmup=args.warmup, barrier=dist.barrier
        )
        rows += [
            Row.measured(
                t,
                provider,
                "forward+backward",
                shape=shape,
                dtype="float32",
                layout="contiguous",
                device="cpu",
                world_size=world,
                threads_per_rank=1,
            )
            for provider, t in times.items()
        ]
        if rank == 0:
            ms = {provider: t.median for provider, t in times.items()}
            print(
                f"{str(shape):<18} F.batch_norm {ms['F.batch_norm']:.3f} ms  syncbn {ms['syncbn']:.3f} ms "
                f"({ms['syncbn'] / ms['F.batch_norm']:.2f}x)  unsynced {ms['syncbn unsynced']:.3f} ms  "
                f"all_reduce x2 {ms['all_reduce x2']:.3f} ms",
                flush=True,
            )
    return slowest_rank(rows)


def by_shape(rows: list[Row]) -> list[dict]:
    """One dict per shape: ``{"shape": ..., provider: median ms, ...}`` (the report's table)."""
    shapes: list[list[int]] = []
    for r in rows:
        if r.shape not in shapes:
            shapes.append(r.shape)
    return [{"shape": s, **{r.provider: r.median_ms for r in rows if r.shape == s}} for s in shapes]


def report(rows: list[Row], world: int, out_dir: Path) -> Path:
    m = meta(world_size=world, threads_per_rank=1, dtype="float32")
    lines = [
        "# CPU: syncbn at world size 2 (gloo) vs single-process F.batch_norm",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_cpu --save`.",
        "",
        "Forward+backward per layer, float32, one thread per rank, two ranks on this machine's two "
        "cores. `F.batch_norm` runs on each rank's local tensor with no communication; `syncbn` is "
        "synced over both ranks; `syncbn unsynced` is the same call in a group of one rank (the "
        "local math alone, in the same conditions); `all_reduce x2` is the two bare gloo "
        "collectives syncbn makes (2C+1 float64 forward, 2C float32 backward); `F.batch_norm + "
        "all_reduce x2` is the control: F.batch_norm with those two collectives made where syncbn "
        "makes them (between forward and backward, and after backward), so that it pays the same "
        "waits for the other rank. Each figure is the slower rank's median.",
        "",
        "| shape | F.batch_norm (ms) | syncbn (ms) | syncbn / F.batch_norm | target <= 1.5x | syncbn unsynced (ms) "
        "| unsynced / F.batch_norm | all_reduce x2 (ms) | F.batch_norm + all_reduce x2 (ms) | syncbn / control |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = by_shape(rows)
    for r in table:
        ratio = r["syncbn"] / r["F.batch_norm"]
        lines.append(
            f"| {tuple(r['shape'])} | {r['F.batch_norm']:.3f} | {r['syncbn']:.3f} | {ratio:.2f}x | "
            f"{'met' if ratio <= TARGET else 'missed'} | "
            f"{r['syncbn unsynced']:.3f} | {r['syncbn unsynced'] / r['F.batch_norm']:.2f}x | "
            f"{r['all_reduce x2']:.3f} | {r['F.batch_norm + all_reduce x2']:.3f} | "
            f"{r['syncbn'] / r['F.batch_norm + all_reduce x2']:.2f}x |"
        )
    worst_local = max(r["syncbn unsynced"] / r["F.batch_norm"] for r in table[:2])
    lines += [
        "",
        "Reading it: the local math (`syncbn unsynced`) is within "
        f"{worst_local:.2f}x of F.batch_norm on the two convolution-sized layers, and syncbn "
        "synced costs what the control costs: F.batch_norm itself, made to wait for the same two "
        "collectives, is as slow. Where the 1.5x target is missed, the gap is the two gloo "
        "round trips between processes on this machine (`all_reduce x2`, plus the waits for the "
        "slower rank that any synchronous collective adds), which are several times the 0.2 ms "
        "per all-reduce the target assumed; on the (256, 512) layer they are ten times the whole "
        "F.batch_norm, and the small per-channel tensor ops around them are the rest.",
    ]
    return write_results("cpu", m, rows, lines, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu", description=__doc__.splitlines()[0])
    add_count_args(parser, FULL, QUICK)
    parser.add_argument("--no-write", action="store_true", help="print only")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args, reduced="--quick" if args.quick else None)
    fill_counts(args, FULL, QUICK, args.quick)
    world = 2
    rows = run_world(world, _bench_rank, args)
    if not args.no_write:
        print(f"wrote {report(rows, world, out)}")


if __name__ == "__main__":
    main()
