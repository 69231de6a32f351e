"""Speed of the fused layer: SyncBatchNormAct against SyncBatchNorm followed by the activation.

    python -m benchmarks.bench_act [--quick]          # CPU, 2 gloo ranks; results in benchmarks/results/scratch/
    python -m benchmarks.bench_act --save             # a full CPU run: replaces benchmarks/results/act-cpu.*
    python -m benchmarks.bench_act --cuda [--quick]   # one GPU (benchmarks/gpu_check.py runs it)

Forward+backward of a synchronized BatchNorm + activation layer, three ways:

- ``SyncBatchNorm + act``: ``syncbn.SyncBatchNorm`` then torch's activation module in place
  (``nn.ReLU(inplace=True)``, ...), as model zoos build the pair;
- ``SyncBatchNormAct``: the activation fused into the two elementwise passes;
- ``SyncBatchNormAct(inplace=True)``: for leaky_relu, the in-place layer. It writes over its
  input, so in its rows every candidate first copies the input (``x.clone()``, the same for all).

CPU: two processes with one thread each (the machine's two cores), the layer synced over both
(gloo), candidates interleaved round by round (``time_interleaved``); each figure is the slower
rank's median, ms. Target: the fused layer not slower than the pair (ratio <= 1.0).

GPU (``--cuda``): the synced path at world size 1 (a 1-process NCCL group,
``SYNCBN_ALWAYS_SYNC=1``), device time with L2 flushed (``bench_kernels``' method), float32 and
bfloat16, NCHW and NHWC. The floor is the copy time of the 8S bytes a fused forward+backward
must move (S the activation's bytes: read x twice and write y; read x and dy twice and write
dx). Targets: fused forward+backward at least 0.80 of the floor's speed, and at least 1.3x
faster than the pair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import syncbn
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
    paired_ratio,
    run_world,
    save_figure,
    slowest_rank,
    slug,
    time_interleaved,
    write_results,
)

# (activation, its parameter, torch's module for the pair, whether the in-place layer is timed)
ACTIVATIONS = [
    ("relu", None, lambda: nn.ReLU(inplace=True), False),
    ("silu", None, lambda: nn.SiLU(inplace=True), False),
    ("leaky_relu", 0.01, lambda: nn.LeakyReLU(0.01, inplace=True), True),
]
PAIR, FUSED, INPLACE = "SyncBatchNorm + act", "SyncBatchNormAct", "SyncBatchNormAct(inplace=True)"
CPU_LAYERS = [
    ((8, 64, 56, 56), "contiguous"),
    ((8, 64, 56, 56), "channels_last"),
    ((8, 256, 28, 28), "contiguous"),
    ((256, 512), "contiguous"),
    ((2, 32, 16, 28, 28), "contiguous"),
]
CPU_QUICK_LAYERS = [((4, 64, 28, 28), "contiguous"), ((4, 64, 28, 28), "channels_last")]
FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
FULL = {"rounds": 40, "iters": 6, "warmup": 5}
QUICK = {"rounds": 3, "iters": 2, "warmup": 1}
CPU_TARGET = 1.0
FLOOR_TARGET, PAIR_TARGET = 0.80, 1.3
GPU_LAYERS = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (2, 64, 400, 608)]
GPU_QUICK_LAYERS = [(32, 64, 112, 112)]


def candidates(shape, memory_format, act, param, module, timed_inplace, group, device, dtype=torch.float32):
    """``{(activation, copy first): {provider: fn}}``: forward+backward closures on one input."""
    channels = shape[1]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()

    def layer(**kw):
        return syncbn.SyncBatchNormAct(channels, process_group=group, activation_param=param, device=device, **kw)

    bn, act_module = syncbn.SyncBatchNorm(channels, process_group=group, device=device), module()
    fused = layer(activation=act)
    params = (bn.weight, bn.bias, fused.weight, fused.bias)

    def fwd_bwd(forward, copy):
        def run():
            h = x.clone() if copy else x
            torch.autograd.grad(forward(h), (x, *params), grad, allow_unused=True)

        return run

    groups = {(act, False): {PAIR: fwd_bwd(lambda h: act_module(bn(h)), False), FUSED: fwd_bwd(fused, False)}}
    if timed_inplace:
        inplace = layer(activation=act, inplace=True)
        params += (inplace.weight, inplace.bias)
        groups[(act, True)] = {
            PAIR: fwd_bwd(lambda h: act_module(bn(h)), True),
            FUSED: fwd_bwd(fused, True),
            INPLACE: fwd_bwd(inplace, True),
        }
    return groups


def _cpu_rank(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    rows = []
    for shape, layout in CPU_QUICK_LAYERS if args.quick else CPU_LAYERS:
        for act, param, module, timed_inplace in ACTIVATIONS:
            groups = candidates(shape, FORMATS[layout], act, param, module, timed_inplace, None, "cpu")
            for (name, copy), fns in groups.items():
                times = time_interleaved(
                    fns, rounds=args.rounds, iters=args.iters, warmup=args.warmup, barrier=dist.barrier
                )
                rows += [
                    Row.measured(t, provider, "forward+backward", shape=shape, dtype="float32", layout=layout,
                                 device="cpu", activation=name, copy_first=copy, world_size=world,
                                 threads_per_rank=1, vs_pair=paired_ratio(t, times[PAIR]))
                    for provider, t in times.items()
                ]  # fmt: skip
                if rank == 0:
                    ms = {p: t.median for p, t in times.items()}
                    text = "  ".join(f"{p} {v:.3f} ms" for p, v in ms.items())
                    print(f"{str(shape):<20} {layout:<14} {name:<11}{' (copy first)' if copy else '':<13} {text} "
                          f"(fused / pair {paired_ratio(times[FUSED], times[PAIR]):.2f})", flush=True)  # fmt: skip
    return slowest_rank(rows)


def _cases(rows: list[Row]) -> list[dict]:
    """One dict per (shape, layout, dtype, activation, copy first): provider -> Row."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        key = (tuple(r.shape), r.layout, r.dtype, r.extras["activation"], r.extras["copy_first"])
        keyed.setdefault(key, {})[r.provider] = r
    return [{"key": k, **v} for k, v in keyed.items()]


def cpu_report(rows: list[Row], world: int, out_dir: Path, quick: bool) -> Path:
    m = meta(world_size=world, threads_per_rank=1, dtype="float32")
    lines = [
        "# CPU: SyncBatchNormAct against SyncBatchNorm + the activation, world size 2 (gloo)",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_act{' --quick' if quick else ' --save'}`.",
        "",
        "Forward+backward per layer, float32, one thread per rank, two ranks on this machine's two "
        "cores, the layer synced over both; each time is the slower rank's median over "
        "interleaved rounds (ms), each ratio the median over rounds of the ratio within a round. "
        "`SyncBatchNorm + act` is syncbn's SyncBatchNorm then torch's "
        "activation module in place; the in-place rows copy the input first for every candidate.",
        "",
        f"| layer | layout | activation | {PAIR} | {FUSED} | fused / pair | <= {CPU_TARGET} | {INPLACE} |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    ratios = []
    for case in _cases(rows):
        shape, layout, _, act, copy = case["key"]
        ratio = case[FUSED].extras["vs_pair"]
        if not copy:
            ratios.append(ratio)
        inplace = f"{case[INPLACE].median_ms:.3f}" if INPLACE in case else "-"
        lines.append(
            f"| {shape} | {layout} | {act}{' (copy first)' if copy else ''} | {case[PAIR].median_ms:.3f} | "
            f"{case[FUSED].median_ms:.3f} | {ratio:.2f} | {'met' if ratio <= CPU_TARGET else 'missed'} | {inplace} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| fused not slower than the pair (fused / pair <= {CPU_TARGET}) on every layer | median "
        f"{statistics.median(ratios):.2f}, worst {max(ratios):.2f} | {'yes' if max(ratios) <= CPU_TARGET else 'no'} |",
    ]
    if max(ratios) > CPU_TARGET:
        lines += [
            "",
            f"Where the fused layer is slower (by up to {100 * (max(ratios) - 1):.0f}%): on the CPU the fused "
            "backward reads the input once more to recompute the pre-activation, where the pair's in-place "
            "activation module keeps its output for its own backward; relu and leaky_relu then cost a pass more "
            "than they save, silu (whose module copies its input) comes out ahead. The two gloo round trips "
            "that both pay make up most of each step here, and the differences are within this machine's "
            "run-to-run spread of a few percent.",
        ]
    plot(rows, out_dir / "act-cpu.png", m)
    return write_results("act-cpu", m, rows, lines, out_dir)


def plot(rows: list[Row], path: Path, m: dict) -> None:
    cases = [c for c in _cases(rows) if not c["key"][4]]
    labels = [f"{'x'.join(map(str, c['key'][0]))}\n{c['key'][1]}\n{c['key'][3]}" for c in cases]
    fig, ax = new_figure(figsize=(max(6, 0.7 * len(cases)), 4))
    ax.bar(range(len(cases)), [c[FUSED].extras["vs_pair"] for c in cases], color="#4c72b0")
    ax.axhline(CPU_TARGET, color="black", linewidth=0.8, label=f"target {CPU_TARGET}")
    ax.set_xticks(range(len(cases)), labels, fontsize=6)
    ax.set_ylabel(f"{FUSED} / ({PAIR}), forward+backward")
    ax.set_title(f"2 gloo ranks, 1 thread each, float32; torch {m['torch']}, {m['date']}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_cuda(args: argparse.Namespace, out: Path) -> Path:
    """Device time of the three ways on one GPU, against the copy floor (see the module doc)."""
    from benchmarks.bench_kernels import bench, env_info, init_world, layouts_for, measure_copy_rate
    from syncbn import settings

    env = env_info()
    with settings.ALWAYS_SYNC.set(True):
        group = init_world()
        copy_rate = measure_copy_rate(args.warmup_ms, args.rep_ms)
        print(f"# {env['device']} | copy {copy_rate / 1e12:.2f} TB/s | torch {env['torch']} | Triton {env['triton']}")
        rows = []
        for shape in GPU_QUICK_LAYERS if args.quick else GPU_LAYERS:
            for dtype in (torch.float32, torch.bfloat16):
                for lname, fmt in layouts_for(shape).items():
                    nbytes = x_bytes(shape, dtype)
                    for act, param, module, timed_inplace in ACTIVATIONS:
                        groups = candidates(shape, fmt, act, param, module, timed_inplace, group, "cuda", dtype)
                        for (name, copy), fns in groups.items():
                            times = {p: bench(fn, args.warmup_ms, args.rep_ms) for p, fn in fns.items()}
                            floor_ms = 8 * nbytes / copy_rate * 1e3
                            for p, t in times.items():
                                rows.append(Row.measured(
                                    t, p, "forward+backward", shape=shape, dtype=dtype_name(dtype), layout=lname,
                                    device=env["device"], activation=name, copy_first=copy, bytes=nbytes,
                                    floor_ms=floor_ms,
                                ))  # fmt: skip
                            ms = {p: t.median for p, t in times.items()}
                            print(f"{str(shape):<20} {dtype_name(dtype):<8} {lname:<5} {name:<11}"
                                  f"{' (copy)' if copy else '':<8} pair {ms[PAIR]:.3f} fused {ms[FUSED]:.3f} ms "
                                  f"floor/fused {floor_ms / ms[FUSED]:.2f} pair/fused {ms[PAIR] / ms[FUSED]:.2f}",
                                  flush=True)  # fmt: skip
                    torch.cuda.empty_cache()
        dist.destroy_process_group()
    return cuda_report(rows, env, copy_rate, out, args.quick)


def x_bytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()


def cuda_report(rows: list[Row], env: dict, copy_rate: float, out_dir: Path, quick: bool) -> Path:
    lines = [
        f"# GPU: SyncBatchNormAct against SyncBatchNorm + the activation ({env['device']})",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, {env['date']}; copy rate "
        f"{copy_rate / 1e12:.2f} TB/s. Reproduce: `python -m benchmarks.bench_act --cuda"
        f"{' --quick' if quick else ''}`.",
        "",
        "| layer | dtype | layout | activation | pair (ms) | fused (ms) | in place (ms) | floor / fused "
        f"| >= {FLOOR_TARGET} | pair / fused | >= {PAIR_TARGET} |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    floor_ratios, pair_ratios = [], []
    for case in _cases(rows):
        shape, layout, dtype, act, copy = case["key"]
        fused, pair = case[FUSED].median_ms, case[PAIR].median_ms
        floor = case[FUSED].extras["floor_ms"] / fused
        speedup = pair / fused
        if not copy:
            floor_ratios.append(floor)
            pair_ratios.append(speedup)
        inplace = f"{case[INPLACE].median_ms:.3f}" if INPLACE in case else "-"
        lines.append(
            f"| {shape} | {dtype} | {layout} | {act}{' (copy first)' if copy else ''} | {pair:.3f} | {fused:.3f} | "
            f"{inplace} | {floor:.2f} | {'met' if floor >= FLOOR_TARGET else 'missed'} | {speedup:.2f} | "
            f"{'met' if speedup >= PAIR_TARGET else 'missed'} |"
        )
    gm = lambda v: statistics.geometric_mean(v)  # noqa: E731
    lines += [
        "",
        "## Targets (rows without the copy)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| fused forward+backward >= {FLOOR_TARGET} of the 8S copy floor | geomean {gm(floor_ratios):.2f}, worst "
        f"{min(floor_ratios):.2f} | {'yes' if min(floor_ratios) >= FLOOR_TARGET else 'no'} |",
        f"| fused >= {PAIR_TARGET}x faster than the pair | geomean {gm(pair_ratios):.2f}x, worst "
        f"{min(pair_ratios):.2f}x | {'yes' if min(pair_ratios) >= PAIR_TARGET else 'no'} |",
    ]
    return write_results(f"act-{slug(env['device'])}", {**env, "copy_rate": copy_rate}, rows, lines, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_act", description=__doc__.splitlines()[0])
    add_count_args(parser, FULL, QUICK)
    parser.add_argument("--cuda", action="store_true", help="time on one GPU instead (needs CUDA)")
    parser.add_argument("--warmup-ms", type=int, default=25, help="--cuda: warm-up budget per timing, ms")
    parser.add_argument("--rep-ms", type=int, default=100, help="--cuda: repetition budget per timing, ms")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args, reduced="--quick" if args.quick else None)
    if args.cuda:
        if not torch.cuda.is_available():
            sys.exit("benchmarks.bench_act --cuda needs a CUDA device")
        print(f"wrote {run_cuda(args, out)}")
        return
    fill_counts(args, FULL, QUICK, args.quick)
    world = 2
    rows = run_world(world, _cpu_rank, args)
    print(f"wrote {cpu_report(rows, world, out, args.quick)}")


if __name__ == "__main__":
    main()
