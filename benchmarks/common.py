"""What every benchmark here shares: the timer, the result row, where results go, a gloo world.

    python -m benchmarks.<name> [--quick] [--save]     # from the repository root

Timing: ``time_calls`` warms up, then times repeated samples of a call and reports the median
and the 20th and 80th percentiles in ms per call, as ``triton.testing.do_bench`` does; CUDA
events on the GPU, ``time.perf_counter`` on the CPU. ``time_interleaved`` takes the same
samples for several candidates, one of each in turn, so that drift on the machine falls on all
of them alike.

Results: every measurement is a ``Row``. A benchmark writes ``<name>.json`` (meta + rows),
``<name>.md`` (a table) and, where it plots, ``<name>.png`` to ``SCRATCH``
(benchmarks/results/scratch/, git-ignored) or to ``--out``. The committed results in
``RESULTS`` (benchmarks/results/) change only through a full run with ``--save``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCRATCH = RESULTS / "scratch"

# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th and 80th percentiles over the samples."""

    median: float
    p20: float
    p80: float
    samples: tuple[float, ...] = dataclasses.field(default=(), compare=False, repr=False)
    """The samples in the order taken (for paired comparisons of interleaved candidates)."""

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        ordered = sorted(samples_ms)
        return cls(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8), tuple(samples_ms))


def paired_ratio(a: Timing, b: Timing) -> float:
    """The median over rounds of ``a``'s sample over ``b``'s of the same round: for candidates of
    ``time_interleaved``, drift that lasts a round cancels, where a ratio of medians keeps it."""
    ratios = sorted(x / y for x, y in zip(a.samples, b.samples, strict=True))
    return _quantile(ratios, 0.5)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (``torch.quantile``'s default)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    # do_bench's size: larger than the L2 of any current GPU.
    return torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")


def _samples_ms(
    fn: Callable[[], Any],
    samples: int,
    iters: int,
    device: torch.device | str | None,
    clock: Literal["device", "host"],
    barrier: Callable[[], Any] | None,
    flush_l2: bool,
) -> list[float]:
    """``samples`` timings of ``iters`` back-to-back calls, each in ms per call."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    if cuda and clock == "device":
        # Events recorded for all samples, one synchronize at the end: the host runs ahead of
        # the device as it does in training (do_bench's way).
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
        for start, end in events:
            if barrier is not None:
                barrier()
            if flush_l2:
                _l2_flush_buffer().zero_()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / iters for start, end in events]
    out = []
    for _ in range(samples):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - start) * 1e3 / iters)
        if cuda:  # host clock: read before the device finishes; the queue drained before the next sample
            torch.cuda.synchronize()
    return out


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int,
    reps: int,
    iters: int = 1,
    device: torch.device | str | None = None,
    clock: Literal["device", "host"] = "device",
    barrier: Callable[[], Any] | None = None,
    flush_l2: bool = False,
) -> Timing:
    """``warmup`` calls, then ``reps`` samples of ``iters`` calls each: ms per call.

    ``device``: where ``fn``'s work runs (None: the CPU); on CUDA the device time between CUDA
    events, unless ``clock="host"``: the time the host takes to issue the calls. ``barrier``
    (e.g. ``dist.barrier``) is called before each sample, so ranks start it together.
    ``flush_l2`` (CUDA) empties the L2 cache before each sample.
    """
    for _ in range(warmup):
        fn()
    return Timing.of(_samples_ms(fn, reps, iters, device, clock, barrier, flush_l2))


def time_calls_within(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    device: torch.device | str | None = None,
    flush_l2: bool = False,
) -> Timing:
    """``time_calls`` with budgets instead of counts, as ``triton.testing.do_bench`` takes them:
    one call's time estimated from five, then as many warm-up calls and samples as fit."""
    estimate = max(time_calls(fn, warmup=1, reps=5, device=device, flush_l2=flush_l2).median, 1e-4)
    warmup, reps = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    return time_calls(fn, warmup=warmup, reps=reps, device=device, flush_l2=flush_l2)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    iters: int,
    warmup: int,
    device: torch.device | str | None = None,
    barrier: Callable[[], Any] | None = None,
    context: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Timing]:
    """``time_calls`` for several candidates: each warmed up, then ``rounds`` rounds of one sample
    of ``iters`` calls per candidate in turn, so that drift (other load, clocks, heat) falls on
    every candidate alike. ``context(name)`` is entered around a candidate's calls (e.g. the
    setting that selects it)."""
    enter = context or (lambda name: contextlib.nullcontext())
    for name, fn in candidates.items():
        with enter(name):
            for _ in range(warmup):
                fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            with enter(name):
                samples[name] += _samples_ms(fn, 1, iters, device, "device", barrier, False)
    return {name: Timing.of(ms) for name, ms in samples.items()}


# ---------------------------------------------------------------------------------------------
# Result rows


def versions() -> dict[str, str | None]:
    """Python, torch, CUDA, Triton and syncbn versions (a fresh dict each call)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str | None]:
    import syncbn

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "syncbn": syncbn.__version__,
    }


def today() -> str:
    return datetime.date.today().isoformat()


@dataclasses.dataclass
class Row:
    """One measurement: which code (``provider``) ran which pass on what input, where, with
    which versions, and how long it took (ms per call; None where it failed, the error in
    ``extras``). ``extras``: whatever else the benchmark records (world size, bytes, ...)."""

    provider: str
    pass_: str  # "forward", "forward+backward", "training step", ... ("pass" in JSON)
    shape: list[int] | None
    dtype: str
    layout: str
    device: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str | None] = dataclasses.field(default_factory=versions)
    date: str = dataclasses.field(default_factory=today)

    @classmethod
    def measured(
        cls,
        timing: Timing | None,
        provider: str,
        pass_: str,
        *,
        shape: Sequence[int] | None,
        dtype: str,
        layout: str,
        device: str,
        **extras: Any,
    ) -> Row:
        ms = (timing.median, timing.p20, timing.p80) if timing is not None else (None, None, None)
        return cls(provider, pass_, None if shape is None else list(shape), dtype, layout, device, *ms, extras=extras)

    @property
    def timing(self) -> Timing | None:
        return None if self.median_ms is None else Timing(self.median_ms, self.p20_ms, self.p80_ms)

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {"provider": fields.pop("provider"), "pass": fields.pop("pass_"), **fields}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        data = dict(data)
        data["pass_"] = data.pop("pass")
        return cls(**data)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device | str | None = None) -> str:
    """``cpu``, or the GPU's name."""
    device = torch.device(device or "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def slug(name: str) -> str:
    """A device name as part of a file name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Where results go, and the report


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--save`` (the committed results) or ``--out DIR``; the default is the scratch folder."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--save", action="store_true", help=f"a full run: replace the committed results in {shown(RESULTS)}/"
    )
    where.add_argument("--out", type=Path, default=None, help=f"results folder (default {shown(SCRATCH)}/)")


def add_count_args(parser: argparse.ArgumentParser, full: dict[str, int], quick: dict[str, int]) -> None:
    """``--quick`` and a ``--<name> N`` per repetition count (resolved by ``fill_counts``)."""
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not numbers to quote")
    for name, n in full.items():
        parser.add_argument(f"--{name}", type=int, help=f"default {n}, {quick[name]} with --quick")


def fill_counts(args: argparse.Namespace, full: dict[str, int], quick: dict[str, int], reduced: bool) -> None:
    """The repetition counts left unset on the command line (None): ``quick``'s for a reduced run,
    else ``full``'s."""
    for name, n in (quick if reduced else full).items():
        if getattr(args, name) is None:
            setattr(args, name, n)


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace, reduced: str | None = None) -> Path:
    """Where this run writes: ``RESULTS`` with ``--save``, else ``--out`` or ``SCRATCH``.

    ``reduced`` names what makes this run less than a full one (``--quick``, ``--smoke``): its
    numbers are not the committed ones, so ``--save`` is refused (exit 2).
    """
    if args.save and reduced:
        parser.error(
            f"--save replaces the committed results and needs a full run; drop {reduced} "
            f"(without --save, results go to {shown(SCRATCH)}/)"
        )
    return RESULTS if args.save else (args.out or SCRATCH)


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (for messages)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


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
    return {"machine": machine(), **versions(), "date": today(), **extra}


def meta_line(m: dict) -> str:
    return f"Machine: {m['machine']}. Python {m['python']}, torch {m['torch']}, syncbn {m['syncbn']}, {m['date']}."


def write_results(
    name: str, meta_block: dict, rows: Sequence[Row], markdown: list[str], out_dir: Path, **more: Any
) -> Path:
    """``<name>.json`` (meta, rows and ``more``) and ``<name>.md``; the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta_block, "rows": [r.to_json() for r in rows], **more}
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(markdown) + "\n")
    return md


def read_rows(path: Path) -> list[Row]:
    return [Row.from_json(r) for r in json.loads(Path(path).read_text())["rows"]]


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots(*args, **kwargs)`` on the file-only Agg backend (no display needed);
    imported here, when a benchmark plots, not when it starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write as PNG (its folder made if need be) and release a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def launch_module(name: str):
    """A module of ``launch/`` (scripts, not a package), loaded from its file and registered under
    its own name, so that ``launch/train.py``'s ``import checkpoint`` finds its sibling."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# A gloo world of local processes


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
        # No rank tears gloo down while another still uses it: a rank leaving early (DDP's
        # reducer still alive) aborted at exit now and then ("terminate called without an
        # active exception").
        dist.barrier()
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


def slowest_rank(rows: list[Row]) -> list[Row]:
    """Every rank's ``rows`` (the same measurements, in the same order) merged: each the slowest
    rank's, since a synced step waits for it. Collective."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    return [max(per, key=lambda r: r.median_ms) for per in zip(*everyone)]
