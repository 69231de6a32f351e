"""What every benchmark here shares: a gloo world of N local processes, timing, and the report.

Each benchmark writes ``<name>.json`` (meta + rows), ``<name>.md`` (a table) and, where it plots,
``<name>.png`` to ``benchmarks/results/``; the meta block names the machine, versions and date.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
# syncbn.ops.triton.FAST_LAUNCH_ENV, named here without importing Triton.
FAST_LAUNCH_ENV = "SYNCBN_TRITON_FAST_LAUNCH"


@contextlib.contextmanager
def fast_launch(on: bool = True):
    """syncbn's Triton launches inside the block: direct (``on``) or through Triton's launcher;
    ``SYNCBN_TRITON_FAST_LAUNCH`` restored after (read per launch, so this takes effect at once)."""
    saved = os.environ.get(FAST_LAUNCH_ENV)
    os.environ[FAST_LAUNCH_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FAST_LAUNCH_ENV, None)
        else:
            os.environ[FAST_LAUNCH_ENV] = saved


def machine() -> str:
    """CPU model and core count (and the GPU when there is one)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    if torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name()}"
    return text


def meta(**extra: Any) -> dict:
    import syncbn

    return {
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "syncbn": syncbn.__version__,
        "date": datetime.date.today().isoformat(),
        **extra,
    }


def meta_line(m: dict) -> str:
    return f"Machine: {m['machine']}. Python {m['python']}, torch {m['torch']}, syncbn {m['syncbn']}, {m['date']}."


def write_results(name: str, meta_block: dict, rows: list[dict], markdown: list[str], out_dir: Path = RESULTS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta_block, "rows": rows}, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text("\n".join(markdown) + "\n")


def _rank_main(rank: int, world: int, init_file: str, fn: Callable, args: tuple, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        value = fn(rank, world, *args)
        if rank == 0:
            results["value"] = value
    finally:
        dist.destroy_process_group()


def run_world(world: int, fn: Callable, *args: Any) -> Any:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo processes; rank 0's return value.

    ``fn`` must be a module-level function. A rank that fails or hangs past the process group's
    timeout (120 s) makes the whole run fail instead of waiting forever.
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            results = manager.dict()
            mp.start_processes(
                _rank_main,
                args=(world, os.path.join(tmp, "init"), fn, args, results),
                nprocs=world,
                start_method="spawn",
            )
            return results["value"]


def slowest_rank(rows: list[dict], labels: tuple[str, ...] = ()) -> list[dict]:
    """Every rank's ``rows`` merged: each timing the maximum over ranks (a synced step waits for
    the slowest), the ``labels`` keys (shape, channels, ...) taken as they are. Collective."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    return [{k: (per[0][k] if k in labels else max(r[k] for r in per)) for k in per[0]} for per in zip(*everyone)]


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write as PNG and release a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]],
    rounds: int,
    iters: int,
    warmup: int,
    barrier: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Median over rounds of the mean ms per call, candidates alternating round by round.

    Alternating means drift (other load, frequency changes) hits every candidate alike.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            if barrier is not None:
                barrier()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}
