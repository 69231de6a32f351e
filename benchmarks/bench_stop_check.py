"""What launch/train.py's stop agreement costs: one all-reduce of one integer after every step.

    python benchmarks/bench_stop_check.py --save      # writes benchmarks/results/stop-check.{json,md}
    python benchmarks/bench_stop_check.py --quick     # a smoke run, written to a scratch folder

On W gloo processes of this machine (one thread each), in interleaved rounds: the agreement alone
(``checkpoint.StopSignal.agreed()``, a MAX all-reduce of one int64), one training step of
launch/train.py's model at its defaults (ResNet of width 16, 3x16x16 synthetic images, batch 16
per rank, syncbn, DDP, SGD), and the same step followed by the agreement. Each figure is the median
over rounds of the mean ms per call, on the slowest rank.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))
import checkpoint  # noqa: E402  (launch/checkpoint.py)
import train  # noqa: E402

import syncbn  # noqa: E402
from benchmarks.common import RESULTS, interleaved_medians, meta, meta_line, run_world, slowest_rank, write_results  # noqa: E402


def _timings(rank: int, args: argparse.Namespace) -> dict[str, float]:
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
    return interleaved_medians(candidates, args.rounds, args.iters, args.warmup, barrier=torch.distributed.barrier)


def _measure(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    times = _timings(rank, args)
    gc.collect()  # DDP's reducer goes before the process group: in the other order gloo can abort at exit
    return slowest_rank([{"world": world, **times}], labels=("world",))


def report(rows: list[dict], out_dir: Path) -> None:
    m = meta(rounds=ARGS.rounds, iters=ARGS.iters)
    lines = [
        "# launch/train.py's stop agreement: one all-reduce of one int64 after every step",
        "",
        meta_line(m) + " Reproduce: `python benchmarks/bench_stop_check.py --save`.",
        "",
        "gloo, processes on this machine with one thread each; slowest rank's median over interleaved rounds. "
        "The step: launch/train.py's ResNet (width 16) on a batch of 16 3x16x16 images per rank, syncbn, DDP, SGD.",
        "",
        "| W | agreement alone (ms) | step (ms) | step + agreement (ms) | added per step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        added = 100 * (r["step + agreement"] - r["step"]) / r["step"]
        cells = [f"{r['agreement']:.3f}", f"{r['step']:.2f}", f"{r['step + agreement']:.2f}", f"{added:+.1f}%"]
        lines.append(f"| {r['world']} | {' | '.join(cells)} |")
    write_results("stop-check", m, rows, lines, out_dir)
    print("\n".join(lines))
    print(f"\nwritten to {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="numbers of processes (default 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20, help="calls per round and candidate")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few rounds, to check the script")
    parser.add_argument("--save", action="store_true", help=f"write to {RESULTS} (default: a scratch folder)")
    ARGS = parser.parse_args()
    if ARGS.quick:
        ARGS.rounds, ARGS.iters, ARGS.warmup = 2, 3, 1
    rows = [run_world(world, _measure, ARGS)[0] for world in ARGS.worlds]
    report(rows, RESULTS if ARGS.save else Path(tempfile.mkdtemp(prefix="stop-check-")))
