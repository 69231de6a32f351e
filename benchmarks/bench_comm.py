"""Per-layer communication: syncbn's one all-reduce against torch.nn.SyncBatchNorm's all-gather.

    python -m benchmarks.bench_comm [--quick]    # results in benchmarks/results/scratch/
    python -m benchmarks.bench_comm --save       # a full run: replaces benchmarks/results/comm.{json,md,png}

Forward, syncbn all-reduces one float64 buffer of ``2C + 1`` values (sum, sum of squares,
count), whatever the world size W. ``torch.nn.SyncBatchNorm`` all-gathers ``2C + 1`` float32
values from every rank (mean, invstd, count): ``W * (2C + 1)`` values land on every rank, a
payload that grows with the world. (Backward, both all-reduce ``2C`` values.)

Measured: the latency of each forward collective on gloo with 2 and 4 local processes (one
thread each) for C from 64 to 2048, median of interleaved rounds, slowest rank. Computed: the
bytes each rank receives per layer for W = 2 ... 4096 under both schemes, and the result size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import (
    Row,
    add_count_args,
    add_output_args,
    dtype_name,
    fill_counts,
    meta,
    meta_line,
    new_figure,
    output_dir,
    run_world,
    save_figure,
    slowest_rank,
    time_interleaved,
    write_results,
)

# torch 2.13 renamed all_gather_into_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
CHANNELS = [64, 128, 256, 512, 1024, 2048]
WORLDS = [2, 4]
QUICK_WORLDS = [2]  # a smoke run: the code path, not numbers
COMPUTED_WORLDS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
COMPUTED_CHANNELS = [256, 2048]
FULL = {"rounds": 11, "iters": 20, "warmup": 10}
QUICK = {"rounds": 3, "iters": 3, "warmup": 2}
PROVIDERS = {"syncbn all_reduce": torch.float64, "torch all_gather": torch.float32}


def _measure(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    rows = []
    for channels in CHANNELS:
        n = 2 * channels + 1
        ours = torch.zeros(n, dtype=torch.float64)
        local = torch.zeros(n, dtype=torch.float32)
        gathered = torch.zeros(world * n, dtype=torch.float32)
        times = time_interleaved(
            {
                "syncbn all_reduce": lambda: dist.all_reduce(ours),
                "torch all_gather": lambda: ALL_GATHER(gathered, local),
            },
            rounds=args.rounds, iters=args.iters, warmup=args.warmup, barrier=dist.barrier,
        )  # fmt: skip
        rows += [
            Row.measured(
                t, provider, "forward", shape=[n], dtype=dtype_name(PROVIDERS[provider]),
                layout="contiguous", device="cpu", world=world, channels=channels, backend="gloo",
            )
            for provider, t in times.items()
        ]  # fmt: skip
    return slowest_rank(rows)


def latency(measured: list[Row], provider: str, world: int) -> tuple[list[int], list[float]]:
    """(channels, median ms) of one collective at one world size."""
    rows = [r for r in measured if r.provider == provider and r.extras["world"] == world]
    return [r.extras["channels"] for r in rows], [r.median_ms for r in rows]


def bytes_received(world: int, channels: int) -> dict:
    """Bytes one rank receives per layer forward, with ring algorithms, and the result size.

    All-reduce (ring: reduce-scatter then all-gather) moves ``2 (W-1)/W`` of the buffer into each
    rank; all-gather moves the ``W-1`` other ranks' pieces.
    """
    n = 2 * channels + 1
    return {
        "world": world,
        "channels": channels,
        "syncbn_received": 2 * (world - 1) / world * n * 8,
        "syncbn_result": n * 8,
        "torch_received": (world - 1) * n * 4,
        "torch_result": world * n * 4,
    }


def _kib(b: float) -> str:
    return f"{b / 1024:,.1f}"


def plot(measured: list[Row], computed: list[dict], path: Path, title_meta: str) -> None:
    fig, (left, right) = new_figure(1, 2, figsize=(12, 4.5))
    for world in sorted({r.extras["world"] for r in measured}):
        left.plot(*latency(measured, "syncbn all_reduce", world), "o-", label=f"syncbn all-reduce, W={world}")
        left.plot(*latency(measured, "torch all_gather", world), "s--", label=f"torch all-gather, W={world}")
    left.set_xscale("log", base=2)
    left.set_xlabel("channels C")
    left.set_ylabel("latency per layer, forward (ms)")
    left.set_title("measured, gloo on one machine")
    left.legend(fontsize=8)
    for channels in COMPUTED_CHANNELS:
        rows = [r for r in computed if r["channels"] == channels]
        ws = [r["world"] for r in rows]
        right.plot(ws, [r["syncbn_received"] / 1024 for r in rows], "o-", label=f"syncbn, C={channels}")
        right.plot(ws, [r["torch_received"] / 1024 for r in rows], "s--", label=f"torch, C={channels}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("world size W")
    right.set_ylabel("KiB received per rank per layer, forward")
    right.set_title("computed")
    right.legend(fontsize=8)
    fig.suptitle(title_meta, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_comm", description=__doc__.splitlines()[0])
    add_count_args(parser, FULL, QUICK)
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args, reduced="--quick" if args.quick else None)
    fill_counts(args, FULL, QUICK, args.quick)

    measured: list[Row] = []
    worlds = QUICK_WORLDS if args.quick else WORLDS
    for world in worlds:
        print(f"measuring gloo, {world} processes ...", flush=True)
        rows = run_world(world, _measure, args)
        for channels in CHANNELS:
            ms = {r.provider: r.median_ms for r in rows if r.extras["channels"] == channels}
            print(
                f"  W={world} C={channels:5d}  syncbn all_reduce {ms['syncbn all_reduce']:.3f} ms  "
                f"torch all_gather {ms['torch all_gather']:.3f} ms",
                flush=True,
            )
        measured += rows
    computed = [bytes_received(w, c) for c in COMPUTED_CHANNELS for w in COMPUTED_WORLDS]

    m = meta(backend="gloo", threads_per_rank=1)
    lines = [
        "# Communication per layer: syncbn's all-reduce vs torch.nn.SyncBatchNorm's all-gather",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_comm --save`.",
        "",
        "Forward collective of one BatchNorm layer. syncbn: `all_reduce` of 2C+1 float64 values. "
        "torch.nn.SyncBatchNorm: `all_gather` of 2C+1 float32 values per rank (W x (2C+1) "
        "received). Backward, both make one all-reduce of 2C values (not shown).",
        "",
        "## Measured latency (gloo, processes on this machine, one thread each; slowest rank's median)",
        "",
        "| W | C | syncbn all-reduce (ms) | torch all-gather (ms) |",
        "|---|---|---|---|",
    ]
    ms = {(r.extras["world"], r.extras["channels"], r.provider): r.median_ms for r in measured}
    pairs = [(w, c, ms[w, c, "syncbn all_reduce"], ms[w, c, "torch all_gather"]) for w in worlds for c in CHANNELS]
    lines += [f"| {w} | {c} | {ours:.3f} | {theirs:.3f} |" for w, c, ours, theirs in pairs]
    ratios = [ours / theirs for _, _, ours, theirs in pairs]
    faster = "faster" if sorted(ratios)[len(ratios) // 2] < 1 else "slower"
    lines += [
        "",
        f"Here syncbn's all-reduce was {faster} than the all-gather (median ratio "
        f"{sorted(ratios)[len(ratios) // 2]:.2f}, range {min(ratios):.2f}-{max(ratios):.2f}). On one "
        "machine the processes share its cores and loopback, so latency is per-message overhead, "
        "not bytes: gloo's ring all-reduce takes 2(W-1) message steps against the all-gather's "
        "W-1, for payloads of a few KiB either way. What the all-reduce buys is what grows with "
        "the world: bytes per rank stay flat, the all-gather's grow linearly (and torch's layer "
        "adds a device-to-host read of the gathered counts on every call):",
        "",
        "## Computed bytes per rank per layer, forward (ring algorithms)",
        "",
        "| W | C | syncbn received (KiB) | syncbn result (KiB) | torch received (KiB) | torch result (KiB) "
        "| torch / syncbn received |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['world']} | {r['channels']} | {_kib(r['syncbn_received'])} | {_kib(r['syncbn_result'])} | "
        f"{_kib(r['torch_received'])} | {_kib(r['torch_result'])} | {r['torch_received'] / r['syncbn_received']:.1f}x |"
        for r in computed
    ]
    lines += ["", "![measured latency and computed bytes](comm.png)"]
    md = write_results("comm", m, measured, lines, out, computed=computed)
    plot(measured, computed, out / "comm.png", meta_line(m))
    print(f"wrote {md}, comm.json, comm.png")


if __name__ == "__main__":
    main()
