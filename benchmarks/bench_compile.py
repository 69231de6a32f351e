"""Training-step time under torch.compile: plain BatchNorm against syncbn, eager and compiled.

    python -m benchmarks.bench_compile              # CPU: two models, 1 and 2 gloo ranks (~10 min on 2 cores)
    python -m benchmarks.bench_compile --save       # the same, written to benchmarks/results/
    python -m benchmarks.bench_compile --smoke      # toy models, aot_eager: the code path (the tests run it)

Models: a small ResNet (basic blocks, 9 BatchNorm layers) and a ResNet-50-like one (ResNet-50's
bottleneck blocks and stages, one block per stage at a quarter of the width, 17 BatchNorm
layers: a ResNet-50's 53 layers would take inductor minutes per variant to compile on a small
CPU), on 32x32 images; on a GPU torchvision's ResNet-50 at 224x224 instead of the small one,
bf16 autocast and channels_last.

Each model is timed in every world as five variants of one SGD training step (forward,
cross-entropy, backward, update; no DDP, so that only the BatchNorm layers communicate):
``batchnorm`` (nn.BatchNorm2d, local), ``batchnorm compiled``, ``syncbn`` (eager), ``syncbn
compiled`` (the traced layer, ``SYNCBN_COMPILE=traced``, the default) and ``syncbn compiled,
ops`` (``SYNCBN_COMPILE=ops``: each pass one opaque custom op, which on a GPU runs syncbn's
Triton kernels inside the compiled graph). Worlds: one process with ``SYNCBN_ALWAYS_SYNC=1`` (the
synced path, both all-reduces per layer run), and on CPU 2 gloo ranks (one thread each), where
``raw all-reduces`` is the time of the 2 all-reduces per layer alone, as syncbn makes them.
Median ms per step over rounds, the variants alternating round by round; the slower rank's.

Targets (the md lists each as met or missed): compiled syncbn within 1.05x compiled BatchNorm
on the synced path at world size 1; compiled syncbn never slower than eager syncbn; at 2 ranks,
compiled syncbn within compiled BatchNorm plus the raw all-reduces.

Results go to a scratch folder (printed) unless ``--save`` (benchmarks/results/) or ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.bench_train import Bottleneck, plot, resnet50, train_step, with_bn
from benchmarks.common import (
    Row,
    Timing,
    add_output_args,
    device_name,
    meta,
    meta_line,
    output_dir,
    run_world,
    slowest_rank,
    slug,
    time_interleaved,
    write_results,
)
from syncbn import settings

VARIANTS = ("batchnorm", "batchnorm compiled", "syncbn", "syncbn compiled", "syncbn compiled, ops")
ALL_REDUCE = "raw all-reduces"

# ---------------------------------------------------------------------------------------------
# Models


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = None
        if stride != 1 or inplanes != planes:
            self.down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


def _resnet(block: type[nn.Module], widths: tuple[int, ...], blocks: tuple[int, ...], stem: int) -> nn.Module:
    """A CIFAR-style ResNet: a 3x3 stem, stages of ``block`` (stride 2 from the second on), a
    linear head over 10 classes."""
    expansion = getattr(block, "expansion", 1)
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
    inplanes = stem
    for i, (width, count) in enumerate(zip(widths, blocks)):
        for j in range(count):
            layers.append(block(inplanes, width, 2 if (i > 0 and j == 0) else 1))
            inplanes = width * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 10)]
    return nn.Sequential(*layers)


def small_resnet(width: int = 16) -> nn.Module:
    return _resnet(BasicBlock, (width, 2 * width, 4 * width), (1, 1, 1), width)


def resnet50_like(width: int = 16) -> nn.Module:
    return _resnet(Bottleneck, (width, 2 * width, 4 * width, 8 * width), (1, 1, 1, 1), width)


def _toy_resnet() -> nn.Module:
    return _resnet(BasicBlock, (4,), (1,), 4)


# (label, model factory, batch per rank, image size, bf16 autocast + channels_last)
CPU_CONFIGS = (
    ("small ResNet", small_resnet, 16, 32, False),
    ("ResNet-50-like", resnet50_like, 8, 32, False),
)
GPU_CONFIGS = (
    ("small ResNet", small_resnet, 256, 32, False),
    ("ResNet-50", lambda: resnet50(num_classes=10), 64, 224, True),
)
SMOKE_CONFIGS = (("toy ResNet", _toy_resnet, 4, 8, False),)

# ---------------------------------------------------------------------------------------------
# Timing


def time_steps(
    steps: dict[str, Callable[[], None]], args: argparse.Namespace, sync: Callable[[], None]
) -> dict[str, Timing]:
    """Ms per step of each variant: blocks of ``args.iters`` steps ended by ``sync`` (the
    device, and the ranks), the variants' blocks alternating round by round."""

    def block(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.iters):
                step()
            sync()

        return run

    blocks = {name: block(step) for name, step in steps.items()}
    per_block = time_interleaved(blocks, rounds=args.rounds, iters=1, warmup=0, barrier=sync)
    return {
        name: Timing(t.median / args.iters, t.p20 / args.iters, t.p80 / args.iters) for name, t in per_block.items()
    }


def _compiler(backend: str) -> Callable:
    """A backend callable of its own: dynamo reuses a compiled graph for another module of the
    same structure unless the backend differs, and the SYNCBN_COMPILE variants must not share."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return lambda gm, example_inputs: compile_fx(gm, example_inputs)
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)
    return lambda gm, example_inputs: inner(gm, example_inputs)


def _variant_step(
    variant: str, factory: Callable[[], nn.Module], x: torch.Tensor, target: torch.Tensor, bf16: bool, args
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = factory()
    if variant.startswith("syncbn"):
        model = with_bn(model, "syncbn")
    model = model.to(x.device, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model, backend=_compiler(args.backend)) if "compiled" in variant else model
    path = "ops" if variant.endswith("ops") else "traced"

    def step() -> None:
        with settings.COMPILE.set(path):  # read when tracing (the first steps, and any recompile)
            train_step(net, opt, x, target, bf16)

    return step


def _all_reduce_step(model: nn.Module, device: torch.device) -> Callable[[], None]:
    """The layer's collectives alone: per BatchNorm layer, two all-reduces of 2C + 1 float64."""
    buffers = [
        torch.zeros(2 * m.num_features + 1, dtype=torch.float64, device=device)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]

    def step() -> None:
        for buffer in buffers:
            dist.all_reduce(buffer)
            dist.all_reduce(buffer)

    return step


def _measure(rank: int, world: int, args: argparse.Namespace, configs: tuple) -> list[Row]:
    """One world's rows: every model, every variant (collective: all ranks run it)."""
    device = torch.device("cuda" if args.gpu else "cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    rows = []
    for label, factory, batch, image, bf16 in configs:
        gen = torch.Generator().manual_seed(rank)
        fmt = torch.channels_last if bf16 else torch.contiguous_format
        x = torch.randn(batch, 3, image, image, generator=gen).to(device).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (batch,), generator=gen).to(device)
        steps = {}
        for variant in VARIANTS:
            steps[variant] = _variant_step(variant, factory, x, target, bf16, args)
            start = time.perf_counter()
            for _ in range(args.warmup):  # the compiled variants compile here
                steps[variant]()
            sync()
            if rank == 0:
                print(
                    f"    {label}, {world} rank(s): {variant} ready ({time.perf_counter() - start:.1f} s)", flush=True
                )
        steps[ALL_REDUCE] = _all_reduce_step(factory(), device)
        rows += [
            Row.measured(
                t,
                variant,
                "training step",
                shape=x.shape,
                dtype="bfloat16 autocast" if bf16 else "float32",
                layout="channels_last" if bf16 else "contiguous",
                device=device_name(device),
                model=label,
                bn_layers=sum(isinstance(m, nn.BatchNorm2d) for m in factory().modules()),
                world=world,
                backend=args.backend,
                steps_per_block=args.iters,
                blocks=args.rounds,
            )  # fmt: skip
            for variant, t in time_steps(steps, args, sync).items()
        ]
    return slowest_rank(rows)


def _rank_main(rank: int, world: int, args: argparse.Namespace, configs: tuple) -> list[Row]:
    with settings.ALWAYS_SYNC.set(True) if world == 1 else contextlib.nullcontext():
        return _measure(rank, world, args, configs)


def _world_of_one(args: argparse.Namespace, configs: tuple) -> list[Row]:
    """This process alone: a gloo (CPU, one thread) or NCCL (GPU) world of one, the synced path."""
    if args.gpu:
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl" if args.gpu else "gloo", store=store, rank=0, world_size=1)
    try:
        return _rank_main(0, 1, args, configs)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Report


def step_table(rows: list[Row]) -> list[dict]:
    """One dict per (model, world): ``{"model", "batch", "image", "world", variant: ms, ...}``."""
    keys = list(dict.fromkeys((r.extras["model"], r.extras["world"]) for r in rows))
    table = []
    for model, world in keys:
        mine = [r for r in rows if (r.extras["model"], r.extras["world"]) == (model, world)]
        batch, _, image, _ = mine[0].shape
        table.append({
            "model": model, "batch": batch, "image": image, "world": world,
            "bn_layers": mine[0].extras.get("bn_layers"), **{r.provider: r.median_ms for r in mine},
        })  # fmt: skip
    return table


def targets(row: dict) -> list[tuple[str, float, str, bool]]:
    """(name, value, goal, met) of each target a ``step_table`` row can answer."""
    out = []
    compiled, bn_compiled, eager = row["syncbn compiled"], row["batchnorm compiled"], row["syncbn"]
    if row["world"] == 1:
        ratio = compiled / bn_compiled
        out.append(("compiled syncbn / compiled BatchNorm (synced, world 1)", ratio, "<= 1.05", ratio <= 1.05))
    ratio = compiled / eager
    out.append(("compiled syncbn / eager syncbn", ratio, "<= 1.00", ratio <= 1.0))
    if row["world"] > 1:
        budget = bn_compiled + row[ALL_REDUCE]
        out.append(
            (
                "compiled syncbn / (compiled BatchNorm + raw all-reduces)",
                compiled / budget,
                "<= 1.00",
                compiled <= budget,
            )
        )
    return out


def _why_missed(row: dict, target: str, value: float) -> str:
    """By how much a target is missed, and what the row's own numbers say about why."""
    gap = row["syncbn compiled"] - row["batchnorm compiled"]
    text = f"- {row['model']}, world {row['world']}: {target} = {value:.3f}."
    if row["world"] == 1 and "compiled BatchNorm" in target:
        layers = row.get("bn_layers") or 1
        rest = gap - row[ALL_REDUCE]
        text += (
            f" Compiled syncbn takes {gap:.2f} ms more per step than compiled BatchNorm: "
            f"{row[ALL_REDUCE]:.2f} ms are the two collectives per layer themselves (a gloo group of one), "
            f"the other {rest:.2f} ms ({1e3 * rest / layers:.0f} µs per BatchNorm layer, {layers} layers) the "
            "traced layer's own work beyond inductor's BatchNorm: the shift of var_mean's input, the float64 "
            "moments and statistics, the functional collectives' waits, which inductor does not fuse across."
        )
    return text


def report(rows: list[dict], m: dict, name: str, args: argparse.Namespace) -> list[str]:
    """The markdown of ``step_table`` rows."""
    columns = (*VARIANTS, ALL_REDUCE)
    lines = [
        f"# Training step under torch.compile: syncbn against BatchNorm ({m['device']})",
        "",
        f"{meta_line(m)} Backend {args.backend}. Reproduce: `python -m benchmarks.bench_compile --save`.",
        "",
        "SGD step (forward, cross-entropy, backward, update; no DDP) per model and world, median ms "
        f"over {args.rounds} rounds of {args.iters} steps, the variants alternating round by round, "
        "the slower rank's; one thread per rank on CPU. World 1 is the synced path "
        "(`SYNCBN_ALWAYS_SYNC=1`); BatchNorm is local everywhere. `syncbn compiled` is the traced "
        "layer (default), `syncbn compiled, ops` the opaque custom ops (`SYNCBN_COMPILE=ops`); "
        "`raw all-reduces` times syncbn's collectives alone (2 of 2C + 1 float64 per layer).",
        "",
        "| model | batch | world | " + " | ".join(f"{c} (ms)" for c in columns) + " |",
        "|---" * (3 + len(columns)) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[c]:.2f}" for c in columns)
        lines.append(f"| {r['model']} | {r['batch']}x{r['image']}x{r['image']} | {r['world']} | {cells} |")
    lines += ["", "| model | world | target | value | goal | |", "|---|---|---|---|---|---|"]
    for r in rows:
        for target, value, goal, met in targets(r):
            lines.append(
                f"| {r['model']} | {r['world']} | {target} | {value:.3f} | {goal} | {'met' if met else '**missed**'} |"
            )
    notes = [_why_missed(r, target, value) for r in rows for target, value, _, met in targets(r) if not met]
    if notes:
        lines += ["", "Missed targets:", "", *notes]
    lines.append(f"\n![step time]({name}.png)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU benchmark even when CUDA is present")
    parser.add_argument("--smoke", action="store_true", help="toy model, aot_eager, one round: the code path")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default inductor; aot_eager with --smoke)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 3, 1 with --smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, 1 with --smoke)")
    parser.add_argument("--iters", type=int, default=None, help="steps per round (default 4, 1 with --smoke)")
    add_output_args(parser)
    args = parser.parse_args()
    smoke = args.smoke
    out = output_dir(parser, args, reduced="--smoke" if smoke else None)
    args.backend = args.backend or ("aot_eager" if smoke else "inductor")
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.rounds = args.rounds if args.rounds is not None else (1 if smoke else 15)
    args.iters = args.iters if args.iters is not None else (1 if smoke else 4)
    args.gpu = torch.cuda.is_available() and not (args.cpu or smoke)

    configs = SMOKE_CONFIGS if smoke else (GPU_CONFIGS if args.gpu else CPU_CONFIGS)
    worlds = (1,) if args.gpu else (1, 2)
    rows: list[Row] = []
    for world in worlds:
        print(f"world of {world} ({'NCCL' if args.gpu else 'gloo'}): {len(configs)} model(s) ...", flush=True)
        rows += _world_of_one(args, configs) if world == 1 else run_world(world, _rank_main, args, configs)
    table = step_table(rows)
    for r in table:
        print(f"  {r['model']}, world {r['world']}: " + ", ".join(f"{v} {r[v]:.2f} ms" for v in VARIANTS), flush=True)
    device = torch.cuda.get_device_name() if args.gpu else ("smoke test on CPU" if smoke else "cpu")
    name = "compile-" + slug(device)
    m = meta(device=device, backend=args.backend, threads_per_rank=None if args.gpu else 1)
    write_results(name, m, rows, report(table, m, name, args), out)
    plot(
        [dict(r, config=f"{r['model']}, world {r['world']}") for r in table],
        VARIANTS,
        out / f"{name}.png",
        "ms per step",
        meta_line(m),
    )
    for r in table:
        for target, value, goal, met in targets(r):
            print(
                f"  {'MET   ' if met else 'MISSED'} {r['model']}, world {r['world']}: {target} = {value:.3f} ({goal})"
            )
    print(f"wrote {out / (name + '.md')}")


if __name__ == "__main__":
    main()
