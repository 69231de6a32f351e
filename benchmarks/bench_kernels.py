"""Kernel benchmark on one GPU: syncbn's synced path against F.batch_norm and torch's SyncBN path.

    python -m benchmarks.bench_kernels [--quick] [--out DIR]   # results in benchmarks/results/scratch/
    python -m benchmarks.bench_kernels --save                  # a full run, into benchmarks/results/

For every layer below (ResNet stages, detection, video, projection heads; large and small), in
float32 and bfloat16, contiguous and channels_last where that applies, it times forward and
forward+backward of

- syncbn: ``syncbn.functional.sync_batch_norm`` on its synced path (a 1-process NCCL group made
  in this process, ``SYNCBN_ALWAYS_SYNC=1``: both all-reduces run);
- ``F.batch_norm`` (cuDNN or ATen, no communication);
- torch's SyncBN synced path: ``torch.nn.modules._functions.SyncBatchNorm.apply`` at world
  size 1 (what ``torch.nn.SyncBatchNorm`` runs in training with a process group);

with weight, bias and running statistics in float32 (the AMP setting for bfloat16 input). Times
are medians of ``benchmarks.common.time_calls_within`` (``triton.testing.do_bench``'s method:
CUDA events, L2 flushed before every call, warm-up first); backward is ``torch.autograd.grad``
for input, weight and bias, so nothing accumulates. The copy floor: forward moves 3S bytes
(read x twice, write y), forward+backward 8S, S the activation's bytes, at the device-to-device
copy rate measured in this run. For the layers of 32 MB and more it also times each syncbn
kernel pass alone (``--no-breakdown`` skips it). Two diagnostics per case, outside the targets:
syncbn forward+backward replayed from a CUDA graph (device time without Python), and the
Python time to issue it eagerly.

Writes ``kernels-<gpu>.md`` and ``.json`` and prints one line per case while it runs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (
    Row,
    add_output_args,
    dtype_name,
    output_dir,
    slug,
    time_calls,
    time_calls_within,
    versions,
    write_results,
)
from syncbn import settings
from syncbn.functional import sync_batch_norm
from syncbn.ops import backend_name

# (shape, what it is): the layers the targets are set on first, then more shapes and sizes.
LAYERS = [
    ((32, 64, 112, 112), "ResNet stem"),
    ((32, 256, 56, 56), "ResNet stage 1"),
    ((32, 2048, 7, 7), "ResNet stage 4"),
    ((2, 256, 200, 336), "detection FPN"),
    ((4, 64, 16, 56, 56), "video / 3-D"),
    ((4096, 2048), "projection head (1d)"),
    ((32, 1024, 14, 14), "ResNet stage 3"),
    ((2, 256, 56, 56), "small batch"),
    ((8, 2048), "tiny 1d"),
    ((2, 64, 400, 608), "detection stem"),
]
QUICK = [(32, 64, 112, 112), (32, 2048, 7, 7), (2, 64, 400, 608), (4096, 2048)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BIG = 32 * 2**20  # "layers of 32 MB and more"
EPS, MOMENTUM = 1e-5, 0.1


def layouts_for(shape):
    if len(shape) == 4:
        return {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    if len(shape) == 5:
        return {"NCDHW": torch.contiguous_format, "NDHWC": torch.channels_last_3d}
    return {"NC": torch.contiguous_format}


FAST, GRAPH, PASSES_PROVIDER = "syncbn fast launch", "syncbn, CUDA graph", "syncbn.ops.triton"
PASS_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward"}


def bench(fn, warmup_ms, rep_ms):
    """do_bench-style timing on the GPU: L2 flushed before each call."""
    return time_calls_within(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, device="cuda", flush_l2=True)


def measure_copy_rate(warmup, rep):
    """Device-to-device copy rate in bytes per second, counting bytes read plus written."""
    n = 2**28  # 1 GiB of float32 each way
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(functools.partial(dst.copy_, src), warmup, rep).median
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3)


def init_world():
    """A 1-process NCCL group in this process (the caller forces the synced path at world size 1)."""
    store_path = os.path.join(tempfile.mkdtemp(prefix="syncbn-bench-"), "store")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    return dist.group.WORLD


def torch_syncbn_fn():
    """torch's SyncBN autograd Function, checked against the signature this script expects."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBN

    params = list(inspect.signature(TorchSyncBN.forward).parameters)[1:]
    expected = ["input", "weight", "bias", "running_mean", "running_var", "eps", "momentum",
                "process_group", "world_size"]  # fmt: skip
    if params != expected:
        print(f"warning: torch SyncBatchNorm.forward takes {params}, expected {expected}")
    return TorchSyncBN


def env_info():
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except Exception:  # noqa: BLE001 - informative only
        driver = "unknown"
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "python": sys.version.split()[0],
        "syncbn": versions()["syncbn"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_case(shape, dtype, memory_format, lname, note, group, torch_sync, warmup, rep):
    """The case's rows: each provider forward and forward+backward, and syncbn's diagnostics."""
    channels = shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=memory_format)
    w = torch.ones(channels, device="cuda", requires_grad=True)
    b = torch.zeros(channels, device="cuda", requires_grad=True)
    rm = torch.zeros(channels, device="cuda")
    rv = torch.ones(channels, device="cuda")
    assert backend_name(x) == "triton", "syncbn would not use the Triton kernels here"
    layout_kind = "channels_last" if memory_format != torch.contiguous_format else "contiguous"
    case = dict(shape=shape, dtype=dtype_name(dtype), layout=lname, device=torch.cuda.get_device_name())
    extras = dict(note=note, layout_kind=layout_kind, bytes=x.numel() * x.element_size())

    def row(timing, provider, mode, **more):
        return Row.measured(timing, provider, PASS_NAMES[mode], **case, **extras, **more)

    def failed(provider, mode, e):
        return row(None, provider, mode, error=f"{type(e).__name__}: {e}"[:300])

    providers = {
        "syncbn": lambda: sync_batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, group),
        "F.batch_norm": lambda: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS),
        "torch SyncBN": lambda: torch_sync.apply(x, w, b, rm, rv, EPS, MOMENTUM, group, 1),
    }
    rows = []
    for name, fwd in providers.items():

        def fwd_bwd(fwd=fwd):
            y = fwd()
            torch.autograd.grad(y, (x, w, b), dy)

        mode = "fwd"
        try:
            rows.append(row(bench(fwd, warmup, rep), name, mode))
            mode = "fwd_bwd"
            timing = bench(fwd_bwd, warmup, rep)
        except Exception as e:  # noqa: BLE001 - record and go on: one provider may not support a case
            rows.append(failed(name, mode, e))
            continue
        if name != "syncbn":
            rows.append(row(timing, name, "fwd_bwd"))
            continue
        rows.append(row(timing, name, "fwd_bwd", host_us=host_time_us(fwd_bwd)))
        if GRAPH_TIMING["enabled"]:
            rows.append(row(graph_time(fwd_bwd, warmup, rep), GRAPH, "fwd_bwd"))
        # The same with SYNCBN_TRITON_FAST_LAUNCH=1: eager forward+backward and host time.
        with settings.TRITON_FAST_LAUNCH.set(True):
            try:
                rows.append(row(bench(fwd_bwd, warmup, rep), FAST, "fwd_bwd", host_us=host_time_us(fwd_bwd)))
            except Exception as e:  # noqa: BLE001 - recorded in the case's errors
                rows.append(failed(FAST, "fwd_bwd", e))
    return rows


GRAPH_TIMING = {"enabled": True}


def host_time_us(fn, calls=20):
    """Python-side time per call: enqueue only (the queue does not fill in 20 calls)."""
    return time_calls(fn, warmup=1, reps=1, iters=calls, device="cuda", clock="host").median * 1e3


def graph_time(fn, warmup, rep):
    """``fn`` captured once in a CUDA graph and replayed: device time, no host."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        timing = bench(graph.replay, warmup, rep)
        del graph
        return timing
    except Exception as e:  # noqa: BLE001 - a diagnostic column: turn it off, keep the run
        print(f"warning: CUDA-graph timing failed ({type(e).__name__}: {str(e)[:200]}); column disabled")
        GRAPH_TIMING["enabled"] = False
        torch.cuda.synchronize()
        return None


def run_breakdown(shape, dtype, memory_format, lname, warmup, rep):
    """Each syncbn kernel pass alone (Triton backend ops), and its achieved bytes per second."""
    from syncbn.ops import triton as ops

    channels = shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=memory_format)
    w = torch.ones(channels, device="cuda")
    b = torch.zeros(channels, device="cuda")
    rm, rv = torch.zeros(channels, device="cuda"), torch.ones(channels, device="cuda")
    from syncbn.passes import RunningStats

    stats = ops.local_stats(x)
    running = RunningStats(rm, rv, MOMENTUM)
    _, mean, invstd = ops.finalize_normalize(x, stats, eps=EPS, weight=w, bias=b, running=running)
    sums = ops.backward_reduce(dy, x, mean)
    s_bytes = x.numel() * x.element_size()
    passes = {  # name: (fn, bytes moved at the floor); the calls the layer makes
        "local_stats": (lambda: ops.local_stats(x), s_bytes),
        "finalize_normalize": (
            lambda: ops.finalize_normalize(x, stats, eps=EPS, weight=w, bias=b, running=running),
            2 * s_bytes,
        ),
        "backward_reduce_affine": (
            lambda: ops.backward_reduce_affine(
                dy, x, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.float32
            ),
            2 * s_bytes,
        ),
        "backward_elemt": (lambda: ops.backward_elemt(dy, x, mean, invstd, w, sums, stats[-1]), 3 * s_bytes),
    }
    rows = []
    for name, (fn, nbytes) in passes.items():
        timing = bench(fn, warmup, rep)
        rows.append(
            Row.measured(
                timing, PASSES_PROVIDER, name, shape=shape, dtype=dtype_name(dtype), layout=lname,
                device=torch.cuda.get_device_name(), bytes=nbytes, bytes_per_s=nbytes / (timing.median * 1e-3),
            )
        )  # fmt: skip
    return rows


SHORT_DTYPE = {dtype_name(dtype): short for short, dtype in DTYPES.items()}
KEYS = {"syncbn": "syncbn", "F.batch_norm": "bn", "torch SyncBN": "torch", FAST: "fast", GRAPH: "syncbn_graph"}


def case_summary(rows, copy_rate):
    """One case's line of the report from its rows: medians, floor fractions, speedups, errors."""
    first = rows[0]
    nbytes = first.extras["bytes"]
    case = {"shape": str(tuple(first.shape)), "note": first.extras["note"], "dtype": SHORT_DTYPE[first.dtype],
            "layout": first.layout, "layout_kind": first.extras["layout_kind"], "bytes": nbytes}  # fmt: skip
    errs = []
    for r in rows:
        mode = {v: k for k, v in PASS_NAMES.items()}[r.pass_]
        k = KEYS[r.provider]
        if "error" in r.extras:
            errs.append(f"{r.provider}: {r.extras['error']}")
            continue
        case[f"{k}_{mode}"] = r.median_ms
        if "host_us" in r.extras:
            case[f"{k}_host_us"] = r.extras["host_us"]
    if errs:
        case["errors"] = "; ".join(errs)
    if "syncbn_fwd" in case and "syncbn_fwd_bwd" in case:
        case["floor_fwd"] = 3 * nbytes / copy_rate / (case["syncbn_fwd"] * 1e-3)
        case["floor_fwd_bwd"] = 8 * nbytes / copy_rate / (case["syncbn_fwd_bwd"] * 1e-3)
        for k in ("bn", "torch"):
            for mode in ("fwd", "fwd_bwd"):
                if f"{k}_{mode}" in case:
                    case[f"vs_{k}_{mode}"] = case[f"{k}_{mode}"] / case[f"syncbn_{mode}"]
    if "fast_fwd_bwd" in case:  # the same speedups with fast launch, forward+backward
        for k in ("bn", "torch"):
            if f"{k}_fwd_bwd" in case:
                case[f"vs_{k}_fwd_bwd_fast"] = case[f"{k}_fwd_bwd"] / case["fast_fwd_bwd"]
    return case


def cases_of(rows, copy_rate):
    """The report's lines, one per (layer, dtype, layout), from the layer rows (not the passes')."""
    groups = {}
    for r in rows:
        if r.provider != PASSES_PROVIDER:
            groups.setdefault((str(r.shape), r.dtype, r.layout), []).append(r)
    return [case_summary(group, copy_rate) for group in groups.values()]


PASSES = ("local_stats", "finalize_normalize", "backward_reduce_affine", "backward_elemt")


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_ms(v):
    """A time in ms with 4 significant digits (0.01234, 1.245)."""
    return "-" if v is None else f"{v:.4g}"


def summarize(cases):
    """Floor fractions and speedups over the cases, and the targets met or missed."""

    def med(key, pred):
        vals = [r[key] for r in cases if pred(r) and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    groups = sorted({(r["dtype"], r["layout_kind"]) for r in cases})
    floor = []
    for dtype, kind in groups:
        pred = lambda r, d=dtype, k=kind: r["dtype"] == d and r["layout_kind"] == k and r["bytes"] >= BIG  # noqa: E731
        n = sum(1 for r in cases if pred(r))
        if n:
            floor.append({
                "dtype": dtype, "layouts": kind, "layers": n,
                "fwd": med("floor_fwd", pred), "fwd_bwd": med("floor_fwd_bwd", pred),
            })  # fmt: skip
    speed = {}
    for label, pred in [("all", lambda r: True), ("fp32", lambda r: r["dtype"] == "fp32"),
                        ("bf16", lambda r: r["dtype"] == "bf16")]:  # fmt: skip
        sel = [r for r in cases if pred(r)]
        speed[label] = {
            "vs_torch_syncbn_fwd": geomean([r.get("vs_torch_fwd") for r in sel]),
            "vs_torch_syncbn_fwd_bwd": geomean([r.get("vs_torch_fwd_bwd") for r in sel]),
            "vs_batch_norm_fwd": geomean([r.get("vs_bn_fwd") for r in sel]),
            "vs_batch_norm_fwd_bwd": geomean([r.get("vs_bn_fwd_bwd") for r in sel]),
            "vs_torch_syncbn_fwd_bwd_fast": geomean([r.get("vs_torch_fwd_bwd_fast") for r in sel]),
            "vs_batch_norm_fwd_bwd_fast": geomean([r.get("vs_bn_fwd_bwd_fast") for r in sel]),
        }
    targets = []
    for f in floor:
        for mode in ("fwd", "fwd_bwd"):
            v = f[mode]
            label = f"floor fraction {mode}, {f['dtype']} {f['layouts']} (median of {f['layers']} layers >= 32 MB)"
            targets.append((label,
                            v, 0.80, v is not None and v >= 0.80))  # fmt: skip
    t = speed["all"]["vs_torch_syncbn_fwd_bwd"]
    targets.append(("fwd+bwd speedup vs torch SyncBN path (geomean, all)", t, 4.0, t is not None and t >= 4.0))
    for mode in ("fwd", "fwd_bwd"):
        v = speed["fp32"][f"vs_batch_norm_{mode}"]
        targets.append((f"{mode} speedup vs F.batch_norm, fp32 (geomean)", v, 1.0, v is not None and v >= 1.0))
        v = speed["bf16"][f"vs_batch_norm_{mode}"]
        targets.append((f"{mode} speedup vs F.batch_norm, bf16 (geomean)", v, 2.0, v is not None and v >= 2.0))
    # With SYNCBN_TRITON_FAST_LAUNCH=1 (not the default yet): the forward+backward targets again.
    t = speed["all"]["vs_torch_syncbn_fwd_bwd_fast"]
    targets.append(
        ("fast launch: fwd+bwd speedup vs torch SyncBN path (geomean, all)", t, 4.0, t is not None and t >= 4.0)
    )
    for label, goal in (("fp32", 1.0), ("bf16", 2.0)):
        v = speed[label]["vs_batch_norm_fwd_bwd_fast"]
        targets.append(
            (f"fast launch: fwd_bwd speedup vs F.batch_norm, {label} (geomean)", v, goal, v is not None and v >= goal)
        )
    return {"floor": floor, "speedups": speed, "targets": targets}


def argv_text(args):
    out = ["--quick"] if args.quick else []
    out += ["--save"] if args.save else []
    out += [f"--tuning {args.tuning}"] if args.tuning else []
    out += [f"--layers '{args.layers}'"] if args.layers else []
    return out


def write_report(out_dir, env, copy_rate, rows, args, wall_s):
    """``kernels-<gpu>.md`` and ``.json`` from the rows; (the markdown's path, the summary)."""
    cases = cases_of(rows, copy_rate)
    summary = summarize(cases)
    passes = {}  # (shape, dtype, layout): {pass: row} of the per-pass timings
    for r in rows:
        if r.provider == PASSES_PROVIDER:
            passes.setdefault((str(tuple(r.shape)), SHORT_DTYPE[r.dtype], r.layout), {})[r.pass_] = r
    lines = [
        f"# syncbn kernels on {env['device']}",
        "",
        f"Device {env['device']} ({env['sms']} SMs, {env['memory_gib']} GiB), driver {env['driver']}, "
        f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), Triton {env['triton']}, "
        f"Python {env['python']}; {env['date']}." + (f" Launch rules: {env['tuning']}." if env.get("tuning") else ""),
        "",
        f"Command: `python -m benchmarks.bench_kernels{' '.join([''] + (argv_text(args)))}`; "
        f"{wall_s:.0f} s. Times: median in ms of `benchmarks.common.time_calls_within`, `triton.testing.do_bench`'s "
        f"method (CUDA events, L2 flushed before each call, warmup {args.warmup} ms, rep {args.rep} ms). "
        "syncbn = synced path "
        "(1-process NCCL group, `SYNCBN_ALWAYS_SYNC=1`, both all-reduces included); torch SyncBN = "
        "`torch.nn.modules._functions.SyncBatchNorm.apply` at world size 1; weight, bias and running "
        "statistics float32.",
        "",
        f"Device-to-device copy rate measured in this run: {copy_rate / 1e12:.2f} TB/s (bytes read + "
        "written). Floor fraction = (3S forward, 8S forward+backward) / copy rate / measured time.",
        "",
        "Columns after the speedups (diagnostics): syncbn forward+backward replayed from "
        "a CUDA graph (device time without Python), the Python time to issue one eager "
        "forward+backward, and the eager forward+backward and its host time with "
        "`SYNCBN_TRITON_FAST_LAUNCH=1` (compiled kernels relaunched directly; not the default yet). "
        "Where the host time exceeds the device time plus about 60-85 us (the L2 flush before "
        "each timed call gives the host that head start), the eager numbers are host-bound.",
        "",
        "| layer | dtype | layout | MB | syncbn fwd | syncbn f+b | F.bn fwd | F.bn f+b | torch SyncBN fwd "
        "| torch SyncBN f+b | floor fwd | floor f+b | x F.bn fwd | x F.bn f+b | x torch f+b "
        "| syncbn f+b graph | host us f+b | f+b fast launch | host us fast |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cases:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['bytes'] / 2**20:.1f} "
            f"| {fmt_ms(r.get('syncbn_fwd'))} | {fmt_ms(r.get('syncbn_fwd_bwd'))} "
            f"| {fmt_ms(r.get('bn_fwd'))} | {fmt_ms(r.get('bn_fwd_bwd'))} "
            f"| {fmt_ms(r.get('torch_fwd'))} | {fmt_ms(r.get('torch_fwd_bwd'))} "
            f"| {fmt(r.get('floor_fwd'), 2)} | {fmt(r.get('floor_fwd_bwd'), 2)} "
            f"| {fmt(r.get('vs_bn_fwd'), 2)} | {fmt(r.get('vs_bn_fwd_bwd'), 2)} | {fmt(r.get('vs_torch_fwd_bwd'), 2)} "
            f"| {fmt_ms(r.get('syncbn_graph_fwd_bwd'))} | {fmt(r.get('syncbn_host_us'), 0)} "
            f"| {fmt_ms(r.get('fast_fwd_bwd'))} | {fmt(r.get('fast_host_us'), 0)} |"
        )
    errors = [(r["shape"], r["dtype"], r["layout"], r["errors"]) for r in cases if r.get("errors")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {s} {d} {layout}: {e}" for s, d, layout, e in errors]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for name, value, goal, ok in summary["targets"]:
        lines.append(f"| {name} | {fmt(value, 2)} | {goal} | {'yes' if ok else '**no**'} |")
    lines += ["", "Geometric-mean speedups of syncbn (x = other time / syncbn time):", ""]
    lines += [
        "| set | vs torch SyncBN fwd | vs torch SyncBN f+b | vs F.bn fwd | vs F.bn f+b "
        "| fast launch: vs torch SyncBN f+b | fast launch: vs F.bn f+b |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in summary["speedups"].items():
        lines.append(
            f"| {label} | {fmt(s['vs_torch_syncbn_fwd'], 2)} | {fmt(s['vs_torch_syncbn_fwd_bwd'], 2)} "
            f"| {fmt(s['vs_batch_norm_fwd'], 2)} | {fmt(s['vs_batch_norm_fwd_bwd'], 2)} "
            f"| {fmt(s['vs_torch_syncbn_fwd_bwd_fast'], 2)} | {fmt(s['vs_batch_norm_fwd_bwd_fast'], 2)} |"
        )
    if passes:
        lines += ["", "## syncbn passes alone (Triton backend ops, no collective)", "",
                  "Fraction = bytes at the floor (stats S, normalize 2S, backward reduce 2S, backward "
                  "elementwise 3S) / copy rate / time. Each pass includes its small second kernel "
                  "(the tile merge) and its allocations.", "",
                  "| layer | dtype | layout | local_stats | finalize_normalize | backward_reduce_affine "
                  "| backward_elemt |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for (shape, dname, lname), by_pass in passes.items():
            cells = []
            for name in PASSES:
                p = by_pass[name]
                frac = p.extras["bytes_per_s"] / copy_rate
                cells.append(f"{p.median_ms * 1e3:.1f} us ({frac:.2f})")
            lines.append(f"| {shape} | {dname} | {lname} | " + " | ".join(cells) + " |")
    md = write_results(
        f"kernels-{slug(env['device'])}", env, rows, lines, out_dir,
        copy_rate_bytes_per_s=copy_rate, cases=cases, summary=summary, args=vars(args), wall_s=wall_s,
    )  # fmt: skip
    return md, summary


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="four layers only")
    ap.add_argument("--warmup", type=int, default=25, help="warm-up budget per timing, ms")
    ap.add_argument("--rep", type=int, default=100, help="repetition budget per timing, ms")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-pass timings")
    ap.add_argument(
        "--tuning", default="", help="launch-rule overrides, e.g. tile_bytes=16384,reduce_programs_per_sm=4"
    )
    ap.add_argument("--layers", default="", help="only layers whose shape contains this text, e.g. '2048'")
    add_output_args(ap)
    args = ap.parse_args(argv)
    subset = " and ".join(flag for flag, on in (("--quick", args.quick), ("--layers", args.layers)) if on)
    out = output_dir(ap, args, reduced=subset)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.bench_kernels needs a CUDA device")
    # the synced path at world size 1: both all-reduces run
    with settings.ALWAYS_SYNC.set(True):
        run(args, out)


def run(args, out):
    t0 = time.time()
    env = env_info()
    if args.tuning:
        import dataclasses

        from syncbn.ops import launch_plan

        fields = {f.name: f.type for f in dataclasses.fields(launch_plan.Tuning)}
        overrides = {}
        for item in args.tuning.split(","):
            key, value = item.split("=")
            overrides[key] = float(value) if "float" in str(fields[key]) else int(value)
        launch_plan.TUNING = dataclasses.replace(launch_plan.TUNING, **overrides)
        env["tuning"] = str(launch_plan.TUNING)
        print(f"# tuning: {launch_plan.TUNING}", flush=True)
    print(f"# {env['device']} | driver {env['driver']} | torch {env['torch']} | CUDA {env['cuda']} "
          f"| Triton {env['triton']} | {env['date']}", flush=True)  # fmt: skip
    group = init_world()
    torch_sync = torch_syncbn_fn()
    copy_rate = measure_copy_rate(args.warmup, args.rep)
    print(f"# device-to-device copy: {copy_rate / 1e12:.2f} TB/s (read + written)", flush=True)

    layers = [(s, n) for s, n in LAYERS if (not args.quick or s in QUICK) and args.layers in str(s)]
    rows = []
    for shape, note in layers:
        for dname, dtype in DTYPES.items():
            for lname, memory_format in layouts_for(shape).items():
                nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
                case_rows = run_case(shape, dtype, memory_format, lname, note, group, torch_sync, args.warmup, args.rep)
                rows += case_rows
                case = case_summary(case_rows, copy_rate)
                errs = case.get("errors")
                print(
                    f"{str(shape):>22} {dname} {lname:<5} {nbytes / 2**20:7.1f} MB | syncbn "
                    f"{fmt_ms(case.get('syncbn_fwd'))} / {fmt_ms(case.get('syncbn_fwd_bwd'))} ms | F.bn "
                    f"{fmt_ms(case.get('bn_fwd'))} / {fmt_ms(case.get('bn_fwd_bwd'))} | torch SyncBN "
                    f"{fmt_ms(case.get('torch_fwd'))} / {fmt_ms(case.get('torch_fwd_bwd'))} | floor "
                    f"{fmt(case.get('floor_fwd'), 2)} / {fmt(case.get('floor_fwd_bwd'), 2)} | graph f+b "
                    f"{fmt_ms(case.get('syncbn_graph_fwd_bwd'))} | host {fmt(case.get('syncbn_host_us'), 0)} us"
                    + (f" | ERR {errs[:120]}" if errs else ""),
                    flush=True,
                )
                if nbytes >= BIG and not args.no_breakdown:
                    rows += run_breakdown(shape, dtype, memory_format, lname, args.warmup // 2, args.rep // 2)
                torch.cuda.empty_cache()

    wall_s = time.time() - t0
    md, summary = write_report(out, env, copy_rate, rows, args, wall_s)
    print(f"\n# wrote {md} ({wall_s:.0f} s)")
    for name, value, goal, ok in summary["targets"]:
        print(f"# target {'MET   ' if ok else 'MISSED'} {name}: {fmt(value, 2)} (goal {goal})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
