"""Compile every kernel launch of the benchmark layers for a GPU target, without a GPU.

    python -m benchmarks.aot_compile [--arch 90] [--quick]
    python -m benchmarks.aot_compile --resnet50     # count a ResNet-50's compiles

Runs the real launchers of ``syncbn.ops.triton`` on ``meta`` tensors with the kernels replaced by
recorders, then compiles each distinct launch with ``triton.compile`` for ``sm_<arch>`` (the
specialization the JIT would apply: 16-byte aligned pointers, integers divisible by 16 and equal
to 1, except the arguments a kernel lists in ``do_not_specialize``). For each it prints the
registers and spills (``cuobjdump --dump-resource-usage``, the copy Triton ships) and the widths
of the global loads and stores in the PTX: ``v4.b32`` is 16 bytes, ``b16`` a single half.
A compile error here is a compile error on the GPU; the GPU runs Triton 3.6, so a clean run with
another Triton version is evidence, not proof.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.bench_kernels import DTYPES, LAYERS, QUICK, layouts_for
from syncbn import activations
from syncbn.ops import launch_plan
from syncbn.ops import triton as K
from syncbn.passes import RunningStats

KERNELS = ["_reduce_ncs_kernel", "_reduce_mc_kernel", "_merge_kernel", "_finalize_kernel",
           "_elemt_ncs_kernel", "_elemt_mc_kernel"]  # fmt: skip
# Every activation of the table, and the in-place ones (what SyncBatchNormAct launches).
FUSED_ACTIVATIONS = [
    *(activations.spec(name) for name in activations.ACTIVATIONS if name != "identity"),
    *(activations.spec(name, inplace=True) for name in ("identity", "leaky_relu", "elu")),
]
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


class Recorder:
    def __init__(self, name, jit_fn, calls):
        self.name, self.jit_fn, self.calls = name, jit_fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, self.jit_fn, args, kwargs))

        return launch


def record_layer(shape, dtype, memory_format, variants=False):
    calls = []
    saved = {n: getattr(K, n) for n in KERNELS}
    for n in KERNELS:
        setattr(K, n, Recorder(n, saved[n], calls))
    try:
        c = shape[1]
        x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)
        f32 = dict(dtype=torch.float32, device="meta")
        w, b = torch.empty(c, **f32), torch.empty(c, **f32)
        running = torch.empty(c, **f32), torch.empty(c, **f32)
        count = torch.empty((), dtype=torch.float64, device="meta")
        # What the layer launches: statistics, fused finalize + normalize, backward reduce with
        # the weight and bias gradients, input gradient.
        stats = K.local_stats(x)
        _, mean, invstd = K.finalize_normalize(
            x, stats, eps=1e-5, weight=w, bias=b, running=RunningStats(*running, 0.1)
        )
        sums, _, _ = K.backward_reduce_affine(
            torch.empty_like(x), x, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.float32
        )
        K.backward_elemt(torch.empty_like(x), x, mean, invstd, w, sums, count)
        if variants:  # the other constexpr branches: tensor momentum, no buffers, no affine
            K.finalize_normalize(x, stats, eps=1e-5, weight=w, bias=b, running=RunningStats(*running, count))
            K.finalize_normalize(x, stats, eps=1e-5, weight=None, bias=None, running=None)
            K.backward_reduce_affine(torch.empty_like(x), x, mean, invstd, weight_dtype=None, bias_dtype=None)
            K.backward_elemt(torch.empty_like(x), x, mean, invstd, None, sums, count)
            K.finalize(stats, 1e-5, RunningStats(*running, 0.1), torch.float32)  # a rank with an empty batch
            K.normalize(x, mean, invstd, w, b)  # the separate kernels (benchmarked apart)
            for act in FUSED_ACTIVATIONS:  # SyncBatchNormAct: each activation's constexpr branch
                K.finalize_normalize(x, stats, eps=1e-5, weight=w, bias=b, running=None, act=act)
                K.backward_reduce_affine(
                    torch.empty_like(x), x, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.float32,
                    act=act, weight=w, bias=b,
                )  # fmt: skip
                K.backward_elemt(torch.empty_like(x), x, mean, invstd, w, sums, count, act=act, bias=b)
    finally:
        for n in KERNELS:
            setattr(K, n, saved[n])
    return calls


def signature_of(jit_fn, args, kwargs):
    names = jit_fn.arg_names
    no_spec = {names[i] if isinstance(i, int) else i for i in (jit_fn.do_not_specialize or [])}
    constexpr_names = {names[i] for i in jit_fn.constexprs} if hasattr(jit_fn, "constexprs") else set()
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if name in constexpr_names:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TRITON_DTYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if name not in no_spec and v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if abs(v) < 2**31 else "i64"
                if name not in no_spec and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, consts, attrs


def resource_usage(cubin: bytes):
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None,
            int(local.group(1)) if local else None)  # fmt: skip


def compile_key(name: str, sig: dict, consts: dict, attrs: dict, kw: dict) -> tuple:
    """What makes two launches one compile: kernel, signature, constexprs, alignment, warps."""
    return (name, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(attrs)),
            kw.get("num_warps", 4))  # fmt: skip


def resnet50_bn_shapes(batch: int, image: int = 224) -> list[tuple[int, ...]]:
    """Input shapes of a ResNet-50's 53 BatchNorm layers, in order."""
    shapes = [(batch, 64, image // 2, image // 2)]
    side = image // 4
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            shapes.append((batch, planes, side, side))  # bn1, before the stride
            side //= stride if i == 0 else 1
            shapes += [(batch, planes, side, side), (batch, 4 * planes, side, side)]  # bn2, bn3
            if i == 0:
                shapes.append((batch, 4 * planes, side, side))  # the downsample branch
    return shapes


def count_resnet50_compiles() -> None:
    """Distinct kernel specializations (= Triton compiles) of a ResNet-50's training step."""
    configs = (
        (64, torch.bfloat16, torch.channels_last, "batch 64 bf16 channels_last"),
        (32, torch.float32, torch.contiguous_format, "batch 32 float32 NCHW"),
    )
    for batch, dtype, fmt, label in configs:
        shapes = resnet50_bn_shapes(batch)
        keys = set()
        for shape in shapes:
            for name, jit_fn, a, kw in record_layer(shape, dtype, fmt):
                keys.add(compile_key(name, *signature_of(jit_fn, a, kw), kw))
        print(
            f"ResNet-50, {label}: {len(shapes)} BatchNorm layers, {len(set(shapes))} distinct shapes, "
            f"{len(keys)} distinct compiles"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.aot_compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--resnet50", action="store_true", help="only count the compiles of a ResNet-50 step")
    args = ap.parse_args(argv)
    launch_plan.TUNING = launch_plan.Tuning(sm_count=args.sms)
    if args.resnet50:
        count_resnet50_compiles()
        return 0
    target = GPUTarget("cuda", args.arch, 32)

    seen = {}
    failures = 0
    for shape, _ in LAYERS:
        if args.quick and shape not in QUICK:
            continue
        for dname, dtype in DTYPES.items():
            for lname, fmt in layouts_for(shape).items():
                first = not seen
                for name, jit_fn, a, kw in record_layer(shape, dtype, fmt, variants=first):
                    sig, consts, attrs = signature_of(jit_fn, a, kw)
                    key = compile_key(name, sig, consts, attrs, kw)
                    if key in seen:
                        seen[key]["layers"].append(f"{shape} {dname} {lname}")
                        continue
                    t0 = time.time()
                    try:
                        k = triton.compile(
                            ASTSource(fn=jit_fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=target, options={"num_warps": kw.get("num_warps", 4)},
                        )  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - report every failure
                        failures += 1
                        print(f"FAILED {name} {consts} for {shape} {dname} {lname}: {type(e).__name__}: {e}")
                        seen[key] = {"layers": [f"{shape} {dname} {lname}"], "failed": True}
                        continue
                    ptx = k.asm["ptx"]
                    loads = Counter(re.findall(r"ld\.global(?:\.[\w]+)*", ptx))
                    stores = Counter(re.findall(r"st\.global(?:\.[\w]+)*", ptx))
                    regs, stack, local = resource_usage(k.asm["cubin"])
                    seen[key] = {"layers": [f"{shape} {dname} {lname}"]}
                    shown = {k_: v for k_, v in consts.items() if k_.isupper()}
                    print(f"{name:<19} {str(shown):<62} warps={kw.get('num_warps', 4)} regs={regs} "
                          f"stack={stack} local={local} {time.time() - t0:4.1f}s | ld {dict(loads)} | st {dict(stores)}"
                          f" | first: {shape} {dname} {lname}")  # fmt: skip
    print(f"\n{len(seen)} distinct compiles, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
