"""The ``syncbn`` command (also ``python -m syncbn``).

    syncbn info                          # versions, backends, CUDA and Triton, the path a tensor takes
    syncbn verify                        # 2 local processes (gloo): syncbn against the oracle
    syncbn verify --nproc 8 --backend nccl
    torchrun --nproc-per-node 8 -m syncbn verify     # or join the world torchrun set up
    syncbn bench [--quick]               # the benchmarks that fit this machine (source checkout)
    syncbn bench --save                  # a full run, replacing the committed benchmarks/results/

``verify`` is the command to run first on a new machine or cluster: it prints a PASS/FAIL table
and exits non-zero on any failure, on a rank that crashes, and on a hang (``--timeout``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def info() -> int:
    """Print what a bug report needs: versions, backends, devices, and the layer's code path."""
    import torch
    import torch.distributed as dist

    import syncbn
    from syncbn import settings
    from syncbn.ops import TRITON_DTYPES, backend_name, triton_backend

    print(f"syncbn      {syncbn.__version__}  ({os.path.dirname(syncbn.__file__)})")
    print(f"python      {platform.python_version()}  ({platform.platform()})")
    print(f"torch       {torch.__version__}  (CUDA build: {torch.version.cuda or 'no'})")

    # Triton: importable at all, and whether syncbn's kernels load with it.
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    kernels = triton_backend() is not None
    interpret = os.environ.get("TRITON_INTERPRET", "")
    print(
        f"triton      {triton_version}; syncbn kernels load: {_yes(kernels)}"
        + (f"; TRITON_INTERPRET={interpret}" if interpret else "")
    )

    # torch.distributed and its backends.
    if not dist.is_available():
        print("distributed not available in this torch build")
    else:
        backends = {
            "gloo": dist.is_gloo_available(),
            "nccl": dist.is_nccl_available(),
            "mpi": dist.is_mpi_available(),
            "ucc": getattr(dist, "is_ucc_available", lambda: False)(),
        }
        print("distributed " + ", ".join(f"{name}: {_yes(ok)}" for name, ok in backends.items()))
        if backends["nccl"] and torch.cuda.is_available():
            print(f"            NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")

    # CUDA devices.
    if torch.cuda.is_available():
        print(f"cuda        {torch.cuda.device_count()} device(s)")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(
                f"            cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB"
            )
    else:
        print("cuda        not available")

    # Which implementation of the local passes a tensor takes (syncbn.ops.backend_name).
    print("layer path  (the local statistics / normalize / backward passes)")
    half = "/".join(str(d).removeprefix("torch.") for d in TRITON_DTYPES)
    for device in ("cpu", "cuda"):
        for dtypes, example in ((half, torch.float32), ("float64", torch.float64)):
            if device == "cpu" or torch.cuda.is_available():
                path, note = backend_name(torch.empty(0, dtype=example, device=device)), ""
            else:
                # No CUDA tensor can be made here; syncbn.ops.backend_name's rule for one:
                forced = settings.BACKEND.get() == "torch"
                use_triton = example in TRITON_DTYPES and kernels and not forced
                path, note = ("triton" if use_triton else "torch"), " (no CUDA device here)"
            print(f"            {device.upper()} tensor, {dtypes}: {_describe_path(path)}{note}")
    print("            communication: per layer, one all_reduce of 2C+1 float64 values in forward")
    print("            and one of 2C in backward, when the process group has more than one rank")
    if kernels:
        fast = settings.TRITON_FAST_LAUNCH.get()
        print(
            "            kernel launches: "
            + (
                "direct (SYNCBN_TRITON_FAST_LAUNCH=1)"
                if fast
                else "through Triton's launcher (SYNCBN_TRITON_FAST_LAUNCH=1: direct, experimental)"
            )
        )

    print("environment (syncbn.settings)")
    for name, value, _ in settings.describe():
        print(f"            {name}: {value}")
    known = {var.name for var in settings.VARIABLES}
    unknown = sorted(k for k in os.environ if k.startswith("SYNCBN_") and k not in known)
    if unknown:
        print(f"            not syncbn variables (misspelt?): {', '.join(unknown)}")
    return 0


def _describe_path(name: str) -> str:
    return {"triton": "Triton kernels (syncbn.ops.triton)", "torch": "torch ops (syncbn.ops.reference)"}[name]


def verify(nproc: int | None, backend: str, timeout: float) -> int:
    from syncbn import verify as verify_mod

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Started by torchrun (or another launcher): join that world instead of spawning one.
        return verify_mod.run_in_world(backend, timeout)
    return verify_mod.run_local(2 if nproc is None else nproc, backend, timeout)


# (module in benchmarks/, arguments) per machine kind; --quick, --save and --out are passed on.
BENCHMARKS = {
    "cpu": [("bench_cpu", []), ("bench_comm", []), ("bench_train", ["--cpu"]), ("bench_act", []), ("bench_memory", [])],
    "gpu": [
        ("bench_kernels", []),
        ("bench_train", []),
        ("bench_comm", []),
        ("bench_act", ["--cuda"]),
        ("bench_memory", ["--cuda"]),
    ],
}


def _progress(done: int, total: int, label: str, width: int = 24) -> str:
    filled = width * done // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"


def bench(quick: bool, save: bool, out: str | None, timeout: float) -> int:
    """Run the repository's benchmarks that fit this machine, one subprocess each, with progress.

    Results go to a scratch folder (benchmarks/results/scratch/, git-ignored) or ``out``; only a
    full run with ``save`` replaces the committed ones in benchmarks/results/. The benchmarks
    live in the source tree (``benchmarks/``), not in the installed package: this works from a
    checkout installed with ``pip install -e .``.
    """
    import subprocess
    import time
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parents[1]
    bench_dir = repo / "benchmarks"
    if not (bench_dir / "common.py").exists():
        print(
            f"syncbn bench: no benchmarks/ folder next to the package ({bench_dir}); run it from "
            "a source checkout installed with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    if quick and save:
        print(
            "syncbn bench: --save replaces the committed results and needs a full run; drop --quick "
            "(without --save, results go to benchmarks/results/scratch/)",
            file=sys.stderr,
        )
        return 2
    # the benchmarks' own folders (benchmarks.common.RESULTS and SCRATCH)
    if out:
        results = Path(out).resolve()
    elif save:
        results = bench_dir / "results"
    else:
        results = bench_dir / "results" / "scratch"
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    plan = BENCHMARKS[kind]
    print(
        f"syncbn bench: {len(plan)} benchmarks for this {kind.upper()} machine"
        f"{' (quick)' if quick else ''}; results in {results}",
        flush=True,
    )
    failed = []
    for i, (name, args) in enumerate(plan):
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *args, *(["--quick"] if quick else [])]
        cmd += ["--save"] if save else ["--out", str(results)]
        print(_progress(i, len(plan), f"running benchmarks.{name} ..."), flush=True)
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
            ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            ok, tail = False, [f"timed out after {timeout:.0f} s"]
        status = "done" if ok else "FAILED"
        print(_progress(i + 1, len(plan), f"benchmarks.{name} {status} in {time.time() - start:.0f} s"), flush=True)
        for line in tail:
            print(f"    {line}")
        if not ok:
            failed.append(name)
    print(f"syncbn bench: results in {results}", flush=True)
    if failed:
        print(f"syncbn bench: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="syncbn", description="Synchronized BatchNorm for PyTorch: environment report and self-test."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="print versions, backends, CUDA/Triton status and the layer's code path")
    p = commands.add_parser(
        "verify",
        help="check syncbn against the single-process BatchNorm oracle on N processes",
        description="Run syncbn.SyncBatchNorm on N processes with uneven and empty per-rank batches "
        "of several shapes and dtypes, compare with single-process float64 nn.BatchNorm on the "
        "concatenated batch, print a PASS/FAIL table. Exit code 0 only if every check passed. "
        "Under torchrun (RANK and WORLD_SIZE set) it joins that world instead of starting processes.",
    )
    p.add_argument("--nproc", type=int, default=None, help="processes to start (default 2; ignored under torchrun)")
    p.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="auto: nccl with CUDA tensors when CUDA is available, else gloo with CPU tensors",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds before a hung run is stopped and reported as FAIL (default 180)",
    )
    p = commands.add_parser(
        "bench",
        help="run the benchmarks that fit this machine (CPU or GPU); results to benchmarks/results/scratch/",
        description="Run the repository's benchmarks for this machine: on CPU the layer at world size 2 "
        "(bench_cpu), communication (bench_comm), a training step (bench_train --cpu), BatchNorm + "
        "activation speed (bench_act) and saved memory (bench_memory); on a GPU the kernels "
        "(bench_kernels), ResNet-50 training steps (bench_train), communication, and bench_act and "
        "bench_memory with --cuda. Results "
        "go to benchmarks/results/scratch/ (git-ignored); only a full run with --save replaces the "
        "committed benchmarks/results/. Needs a source checkout (pip install -e .).",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not numbers to quote")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--save", action="store_true", help="a full run: replace the committed benchmarks/results/")
    where.add_argument("--out", default=None, help="results folder (default benchmarks/results/scratch/)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark (default 1800)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "bench":
        return bench(args.quick, args.save, args.out, args.timeout)
    return verify(args.nproc, args.backend, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
