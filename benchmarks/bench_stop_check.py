"""What launch/train.py's stop agreement costs: one all-reduce of one integer after every step.

    python -m benchmarks.bench_stop_check [--quick]        # results in benchmarks/results/scratch/
    python -m benchmarks.bench_stop_check --worlds 2 4 --save   # replaces benchmarks/results/stop-check.{json,md}

On W gloo processes of this machine (one thread each), in interleaved rounds: the agreement alone
(``checkpoint.StopSignal.agreed()``, a MAX all-reduce of one int64), one training step of
launch/train.py's model at its defaults (ResNet of width 16, 3x16x16 synthetic images, batch 16
per rank, syncbn, DDP, SGD), and the same step followed by the agreement. Each figure is the
median over rounds of ms per call, on the slowest rank.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import syncbn
from benchmarks.common import (
    Row,
    add_count_args,
    add_output_args,
    fill_counts,
    launch_module,
    meta,
    meta_line,
    output_dir,
    run_world,
    slowest_rank,
    time_interleaved,
    write_results,
)

FULL = {"rounds": 15, "iters": 20, "warmup": 5}
QUICK = {"rounds": 2, "iters": 3, "warmup": 1}


def _timings(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    checkpoint, train = launch_module("checkpoint"), launch_module("train")
    cfg = train.parse_config([])  # the defaults
    torch.manual_seed(cfg.seed)
    model = DDP(syncbn.convert_sync_batchnorm(train.ResNet(3, 10, cfg.width)))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(rank)
    batches = [
        (torch.randn(cfg.batch_size, 3, 16, 16, generator=gen), torch.randint(10, (cfg.batch_size,))) for _ in range(8)
    ]
    stop = checkpoint.StopSignal()
    count = [0]

    def step():
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    candidates = {"agreement": stop.agreed, "step": step, "step + agreement": lambda: (step(), stop.agreed())}
    times = time_interleaved(candidates, rounds=args.rounds, iters=args.iters, warmup=args.warmup, barrier=dist.barrier)
    return [
        Row.measured(
            t,
            provider,
            "training step" if "step" in provider else "all-reduce",
            shape=(cfg.batch_size, 3, 16, 16),
            dtype="float32",
            layout="contiguous",
            device="cpu",
            world_size=world,
            threads_per_rank=1,
        )  # fmt: skip
        for provider, t in times.items()
    ]


def _measure(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    rows = _timings(rank, world, args)
    gc.collect()  # DDP's reducer goes before the process group: in the other order gloo can abort at exit
    return slowest_rank(rows)


def report(rows: list[Row], args: argparse.Namespace, out_dir) -> None:
    m = meta(rounds=args.rounds, iters=args.iters)
    lines = [
        "# launch/train.py's stop agreement: one all-reduce of one int64 after every step",
        "",
        meta_line(m) + " Reproduce: `python -m benchmarks.bench_stop_check --worlds 2 4 --save`.",
        "",
        "gloo, processes on this machine with one thread each; slowest rank's median over interleaved rounds. "
        "The step: launch/train.py's ResNet (width 16) on a batch of 16 3x16x16 images per rank, syncbn, DDP, SGD.",
        "",
        "| W | agreement alone (ms) | step (ms) | step + agreement (ms) | added per step |",
        "|---|---|---|---|---|",
    ]
    for world in dict.fromkeys(r.extras["world_size"] for r in rows):
        ms = {r.provider: r.median_ms for r in rows if r.extras["world_size"] == world}
        added = 100 * (ms["step + agreement"] - ms["step"]) / ms["step"]
        cells = [f"{ms['agreement']:.3f}", f"{ms['step']:.2f}", f"{ms['step + agreement']:.2f}", f"{added:+.1f}%"]
        lines.append(f"| {world} | {' | '.join(cells)} |")
    md = write_results("stop-check", m, rows, lines, out_dir)
    print("\n".join(lines))
    print(f"\nwrote {md}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_stop_check", description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="numbers of processes (default 2)")
    add_count_args(parser, FULL, QUICK)
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args, reduced="--quick" if args.quick else None)
    fill_counts(args, FULL, QUICK, args.quick)
    rows = [row for world in args.worlds for row in run_world(world, _measure, args)]
    report(rows, args, out)


if __name__ == "__main__":
    main()
