"""CPU speed of the synced layer at world size 2 (gloo) against single-process F.batch_norm.

    python benchmarks/bench_cpu.py            # writes benchmarks/results/cpu.md and cpu.json

Two processes with one thread each (the machine's two cores, one per rank) run, for every
shape, forward+backward of:
  - ``F.batch_norm`` in training mode on the rank's local tensor (no communication: the target
    is at most 1.5x this),
  - ``syncbn.functional.sync_batch_norm`` synced over both ranks (one gloo all-reduce in each
    direction),
  - the two bare all-reduces alone (2C+1 float64, 2C float32), so the table can split syncbn's
    time into communication and local math.
Measurements alternate between the candidates round by round so that drift hits all of them
alike; each figure is the median over rounds of the mean time per call within a round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import syncbn  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (256, 512)]
TARGET = 1.5


def _bench_rank(rank: int, world: int, init_file: str, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
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

        def f_batch_norm():
            F.batch_norm(x, None, None, weight, bias, True).backward(grad)

        def syncbn_layer():
            syncbn.functional.sync_batch_norm(x, None, None, weight, bias, True).backward(grad)

        def syncbn_unsynced():
            syncbn.functional.sync_batch_norm(x, None, None, weight, bias, True, process_group=alone).backward(grad)

        def collectives():
            dist.all_reduce(stats_buf)
            dist.all_reduce(grad_buf)

        candidates = {
            "F.batch_norm": f_batch_norm,
            "syncbn": syncbn_layer,
            "syncbn unsynced": syncbn_unsynced,
            "all_reduce x2": collectives,
        }
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for fn in candidates.values():  # warm-up
            for _ in range(args.warmup):
                fn()
        for _ in range(args.rounds):
            for name, fn in candidates.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                samples[name].append((time.perf_counter() - start) / args.iters * 1e3)
                x.grad = weight.grad = bias.grad = None
        row = {"shape": list(shape), **{name: statistics.median(v) for name, v in samples.items()}}
        rows.append(row)
        if rank == 0:
            print(
                f"{str(shape):<18} F.batch_norm {row['F.batch_norm']:.3f} ms  syncbn {row['syncbn']:.3f} ms "
                f"({row['syncbn'] / row['F.batch_norm']:.2f}x)  unsynced {row['syncbn unsynced']:.3f} ms  "
                f"all_reduce x2 {row['all_reduce x2']:.3f} ms",
                flush=True,
            )
    # Rank 0 and rank 1 each measured; report the slower rank (the step waits for it).
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        results["rows"] = [
            {k: (max(r[k] for r in per_shape) if k != "shape" else per_shape[0][k]) for k in per_shape[0]}
            for per_shape in zip(*gathered)
        ]
    dist.destroy_process_group()


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def write_results(rows: list[dict], out_dir: Path, world: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": _machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "syncbn": syncbn.__version__,
        "date": datetime.date.today().isoformat(),
        "world_size": world,
        "threads_per_rank": 1,
        "dtype": "float32",
    }
    (out_dir / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# CPU: syncbn at world size 2 (gloo) vs single-process F.batch_norm",
        "",
        f"Machine: {meta['machine']}. Python {meta['python']}, torch {meta['torch']}, syncbn "
        f"{meta['syncbn']}, {meta['date']}. Reproduce: `python benchmarks/bench_cpu.py`.",
        "",
        "Forward+backward per layer, float32, one thread per rank, two ranks on this machine's two "
        "cores. `F.batch_norm` runs on each rank's local tensor with no communication; `syncbn` is "
        "synced over both ranks. `all_reduce x2` is the two bare gloo collectives syncbn makes "
        "(2C+1 float64 forward, 2C backward), so `syncbn - all_reduce` is the local math. Each "
        "figure is the slower rank's median.",
        "",
        "| shape | F.batch_norm (ms) | syncbn (ms) | syncbn / F.batch_norm | all_reduce x2 (ms) | local math (ms) | local math / F.batch_norm | target <= 1.5x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        local = r["syncbn"] - r["all_reduce x2"]
        ratio = r["syncbn"] / r["F.batch_norm"]
        lines.append(
            f"| {tuple(r['shape'])} | {r['F.batch_norm']:.3f} | {r['syncbn']:.3f} | {ratio:.2f}x | "
            f"{r['all_reduce x2']:.3f} | {local:.3f} | {local / r['F.batch_norm']:.2f}x | "
            f"{'met' if ratio <= TARGET else 'missed'} |"
        )
    (out_dir / "cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.get_context("spawn").Manager()
        results = manager.dict()
        mp.start_processes(
            _bench_rank, args=(world, os.path.join(tmp, "init"), args, results), nprocs=world,
            start_method="spawn",
        )
        rows = list(results["rows"])
    if not args.no_write:
        write_results(rows, args.out, world)
        print(f"wrote {args.out / 'cpu.md'}")


if __name__ == "__main__":
    main()
