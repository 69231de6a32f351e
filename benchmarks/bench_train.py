"""Training-step time with three BatchNorm choices: syncbn, torch.nn.SyncBatchNorm, plain BatchNorm.

    python -m benchmarks.bench_train [--quick]     # GPU: ResNet-50; CPU: a small CNN on 2 gloo ranks
    python -m benchmarks.bench_train --save        # a full run, into benchmarks/results/
    python -m benchmarks.bench_train --smoke       # the GPU benchmark's code on CPU at toy size

GPU (one device): a ResNet-50 (torchvision's when installed, else the one below, same layers)
trained with SGD, at batch 64 with bf16 autocast and channels_last, and at batch 32 in float32.
BatchNorm choices: ``syncbn`` on its synced path (a 1-process NCCL group with
``SYNCBN_ALWAYS_SYNC=1``, both all-reduces per layer run), the same with
``SYNCBN_TRITON_FAST_LAUNCH=1`` (compiled kernels relaunched directly; ``--no-fast-launch``
leaves it out), torch's SyncBN synced path (its autograd Function forced at world size 1, where
``torch.nn.SyncBatchNorm`` itself would skip it), and plain ``nn.BatchNorm2d``. Step time: CUDA
events around blocks of steps, median over blocks, the blocks of the choices interleaved (so
that clock and thermal drift fall on all of them alike). ``--smoke`` runs this code on CPU at
toy size (tests/test_benchmarks.py does).

CPU: a small CNN on 2 gloo processes (one thread each), batch 16 per rank, syncbn against
local ``nn.BatchNorm2d`` (what synchronization costs on a CPU cluster).

Writes ``train-<device>.{json,md,png}`` to benchmarks/results/scratch/ (``--out``: elsewhere;
``--save``: benchmarks/results/, full runs only).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import syncbn
from benchmarks.common import (
    Row,
    add_count_args,
    add_output_args,
    device_name,
    fill_counts,
    meta,
    meta_line,
    new_figure,
    output_dir,
    run_world,
    save_figure,
    slowest_rank,
    slug,
    time_calls,
    time_interleaved,
    write_results,
)
from syncbn import settings

# ---------------------------------------------------------------------------------------------
# Models


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or inplanes != out:
            self.down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet50 when available, else the same architecture (53 BatchNorm layers)."""
    try:
        from torchvision.models import resnet50 as tv_resnet50

        return tv_resnet50(num_classes=num_classes)
    except Exception:  # torchvision missing or broken
        pass
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip


class TorchSyncPath(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's synced autograd Function, forced even at world size 1."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self.num_batches_tracked.add_(1)
        return torch.nn.modules._functions.SyncBatchNorm.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
            self.momentum, self.group, dist.get_world_size(self.group),
        )  # fmt: skip


def with_bn(model: nn.Module, choice: str, group=None) -> nn.Module:
    if choice == "syncbn":
        return syncbn.convert_sync_batchnorm(model, process_group=group)
    if choice == "torch-syncbn":
        for name, child in model.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(model, name, TorchSyncPath(child, group))
            else:
                with_bn(child, choice, group)
        return model
    return model  # plain BatchNorm2d


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor, bf16: bool = False
) -> None:
    """One SGD step: forward (bf16 autocast when asked), cross-entropy, backward, update."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
# GPU: ResNet-50 on one device


GPU_CHOICES = ("batchnorm", "syncbn", "syncbn-fast-launch", "torch-syncbn")
GPU_CONFIGS = ((64, True), (32, False))  # (batch, bf16 autocast + channels_last)
HEADERS = {"batchnorm": "BatchNorm2d", "syncbn": "syncbn", "syncbn-fast-launch": "syncbn, fast launch",
           "torch-syncbn": "torch SyncBN path"}  # fmt: skip


def config_label(batch: int, bf16: bool) -> str:
    return f"batch {batch}, " + ("bf16 autocast, channels_last" if bf16 else "float32")


def gpu_step_rows(
    batch: int, bf16: bool, choices: tuple[str, ...], args: argparse.Namespace, device: torch.device, image: int = 224
) -> list[Row]:
    """Ms per training step of each choice; timed blocks interleaved across the choices, so that
    clock and thermal drift fall on all of them alike. (``device`` is the CPU only in the
    ``--smoke`` run that tests this code.)"""
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, image, image, device=device, generator=gen).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    steps = {}
    for choice in choices:
        torch.manual_seed(0)
        model = with_bn(resnet50(), "syncbn" if choice.startswith("syncbn") else choice)
        model = model.to(device, memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[choice] = functools.partial(train_step, model, opt, x, target, bf16)
    # The warm-up compiles syncbn's kernels for every layer shape.
    times = time_interleaved(
        steps, rounds=args.blocks, iters=args.steps, warmup=args.warmup, device=device,
        context=lambda choice: settings.TRITON_FAST_LAUNCH.set(choice == "syncbn-fast-launch"),
    )  # fmt: skip
    return [
        Row.measured(
            t, choice, "training step", shape=x.shape, dtype="bfloat16 autocast" if bf16 else "float32",
            layout="channels_last" if bf16 else "contiguous", device=device_name(device), model="ResNet-50",
            config=config_label(batch, bf16), steps_per_block=args.steps, blocks=args.blocks,
        )
        for choice, t in times.items()
    ]  # fmt: skip


def step_table(rows: list[Row]) -> list[dict]:
    """One dict per config: ``{"config": ..., choice: median ms per step, ...}``."""
    configs = list(dict.fromkeys(r.extras["config"] for r in rows))
    return [{"config": c, **{r.provider: r.median_ms for r in rows if r.extras["config"] == c}} for c in configs]


def run_gpu(args: argparse.Namespace, out: Path) -> None:
    """The ResNet-50 comparison on one GPU; with ``--smoke``, the same code on the CPU at toy
    size (2 images of 32x32, gloo, without torch's SyncBN path: it has no CPU kernels)."""
    tmp = tempfile.mkdtemp()
    device = torch.device("cpu" if args.smoke else "cuda")
    dist.init_process_group("gloo" if args.smoke else "nccl", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    choices = tuple(
        c for c in GPU_CHOICES
        if not (args.no_fast_launch and c == "syncbn-fast-launch") and not (args.smoke and c == "torch-syncbn")
    )  # fmt: skip
    configs = [(2, bf16) for _, bf16 in GPU_CONFIGS] if args.smoke else GPU_CONFIGS
    image = 32 if args.smoke else 224
    rows = []
    for i, (batch, bf16) in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config_label(batch, bf16)}: {', '.join(choices)} ...", flush=True)
        # the synced path at world size 1: both collectives per layer run
        with settings.ALWAYS_SYNC.set(True):
            config_rows = gpu_step_rows(batch, bf16, choices, args, device, image)
        ms = {r.provider: r.median_ms for r in config_rows}
        for choice in choices:
            print(
                f"    {choice:<20} {ms[choice]:8.2f} ms/step  ({ms[choice] / ms['batchnorm']:.3f}x BatchNorm2d)",
                flush=True,
            )
        rows += config_rows
    dist.destroy_process_group()
    name_of_device = "smoke test on CPU" if args.smoke else torch.cuda.get_device_name()
    name = f"train-{slug(name_of_device)}"
    m = meta()
    others = [c for c in choices if c != "batchnorm"]
    lines = [
        f"# ResNet-50 training step on {name_of_device}",
        "",
        f"{meta_line(m)} CUDA {m['cuda']}, Triton {m['triton']}. Reproduce: `python -m benchmarks.bench_train --save`.",
        "",
        f"SGD step (forward, backward, optimizer) of a ResNet-50 at {image}x{image}, median ms per step "
        f"over {args.blocks} blocks of {args.steps} steps, blocks interleaved across the choices. "
        "syncbn and torch SyncBN run their synced paths at world size 1 (both collectives per "
        'layer, NCCL); BatchNorm2d is plain nn.BatchNorm2d; "fast launch" is syncbn with '
        f"`{settings.TRITON_FAST_LAUNCH.name}=1`. Targets: syncbn within 5% of BatchNorm2d, and faster than it "
        "in bf16.",
        "",
        "| config | "
        + " | ".join(f"{HEADERS[c]} (ms)" for c in choices)
        + " | "
        + " | ".join(f"{HEADERS[c]} / BatchNorm2d" for c in others)
        + " |",
        "|---" * (1 + len(choices) + len(others)) + "|",
    ]
    table = step_table(rows)
    lines += [
        f"| {r['config']} | "
        + " | ".join(f"{r[c]:.2f}" for c in choices)
        + " | "
        + " | ".join(f"{r[c] / r['batchnorm']:.3f}x" for c in others)
        + " |"
        for r in table
    ]
    lines.append(f"\n![step time]({name}.png)")
    md = write_results(name, m, rows, lines, out)
    plot(table, choices, out / f"{name}.png", "ms per step", meta_line(m))
    print(f"wrote {md}")


# ---------------------------------------------------------------------------------------------
# CPU: a small CNN on 2 gloo ranks


def _cpu_rank(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    config = f"small CNN, 32x32, batch {args.cpu_batch} per rank, {world} gloo ranks"
    rows = []
    for choice in ("batchnorm", "syncbn"):
        torch.manual_seed(0)
        model = with_bn(small_cnn(), choice)
        model = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(args.cpu_batch, 3, 32, 32, generator=gen)
        target = torch.randint(0, 10, (args.cpu_batch,), generator=gen)
        t = time_calls(
            functools.partial(train_step, model, opt, x, target),
            warmup=args.warmup, reps=args.blocks, iters=args.steps, barrier=dist.barrier,
        )  # fmt: skip
        rows.append(
            Row.measured(
                t, choice, "training step", shape=x.shape, dtype="float32", layout="contiguous", device="cpu",
                model="small CNN", config=config, world_size=world, threads_per_rank=1,
                steps_per_block=args.steps, blocks=args.blocks,
            )
        )  # fmt: skip
    return slowest_rank(rows)


def run_cpu(args: argparse.Namespace, out: Path) -> None:
    world = 2
    rows = run_world(world, _cpu_rank, args)
    (row,) = step_table(rows)
    print(
        f"{row['config']}: BatchNorm2d {row['batchnorm']:.2f} ms, syncbn {row['syncbn']:.2f} ms per step",
        flush=True,
    )
    m = meta(world_size=world, threads_per_rank=1)
    lines = [
        "# Training step on CPU: syncbn vs local BatchNorm, 2 gloo ranks",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_train --cpu --save`.",
        "",
        "DDP training step (forward, backward with gradient all-reduce, SGD) of a 4-conv CNN "
        "(4 BatchNorm layers) on 32x32 images; one thread per rank; slower rank's median ms per "
        "step. syncbn adds two small all-reduces per BatchNorm layer.",
        "",
        "| config | BatchNorm2d, local (ms) | syncbn (ms) | syncbn / BatchNorm |",
        "|---|---|---|---|",
        f"| {row['config']} | {row['batchnorm']:.2f} | {row['syncbn']:.2f} | {row['syncbn'] / row['batchnorm']:.2f}x |",
        "",
        "![step time](train-cpu.png)",
    ]
    md = write_results("train-cpu", m, rows, lines, out)
    plot([row], ("batchnorm", "syncbn"), out / "train-cpu.png", "ms per step", meta_line(m))
    print(f"wrote {md}")


def plot(rows: list[dict], choices: tuple[str, ...], path: Path, ylabel: str, title: str) -> None:
    fig, ax = new_figure(figsize=(7, 4))
    width = 0.8 / len(choices)
    for i, choice in enumerate(choices):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r[choice] for r in rows], width, label=choice)
    ax.set_xticks([j + width * (len(choices) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["config"] for r in rows], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title, fontsize=7)
    save_figure(fig, path)


# repetitions: warm-up steps, steps per timed block, blocks
FULL = {"warmup": 3, "steps": 8, "blocks": 4}
QUICK = {"warmup": 1, "steps": 2, "blocks": 2}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU benchmark even when CUDA is present")
    add_count_args(parser, FULL, QUICK)
    parser.add_argument(
        "--no-fast-launch", action="store_true", help="GPU: leave out syncbn with SYNCBN_TRITON_FAST_LAUNCH=1"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="the GPU benchmark's code on CPU at toy size (for tests; --quick counts)"
    )
    parser.add_argument("--cpu-batch", type=int, default=16)
    add_output_args(parser)
    args = parser.parse_args()
    reduced = " and ".join(flag for flag, on in (("--quick", args.quick), ("--smoke", args.smoke)) if on)
    out = output_dir(parser, args, reduced)
    fill_counts(args, FULL, QUICK, bool(reduced))
    if args.smoke or (torch.cuda.is_available() and not args.cpu):
        run_gpu(args, out)
    else:
        run_cpu(args, out)


if __name__ == "__main__":
    main()
