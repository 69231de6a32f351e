"""The one script to run on a GPU machine: versions, GPU tests, kernel benchmark, a summary last.

    python -m benchmarks.gpu_check                     # from the repository root
    PYTHONPATH=. python benchmarks/gpu_check.py        # the same
    python -m benchmarks.gpu_check --only tests,train  # a subset of the steps

Steps, each a subprocess with its own timeout inside a total budget (``GPU_CHECK_BUDGET_S``,
570 s by default), so one hang cannot eat the lease:

1. device and versions (nvidia-smi, torch, CUDA, Triton, cuDNN);
2. ``tests``: ``pytest tests/test_cuda.py tests/test_triton_ops.py`` (with CUDA present the
   kernel tests run the compiled kernels on CUDA tensors, not the interpreter; test_cuda.py
   checks the fast launch path against the ordinary one, in a CUDA graph too);
3. ``layer``: ``SYNCBN_TEST_DEVICE=cuda pytest tests/test_layer.py tests/test_semantics.py``
   with ``SYNCBN_TRITON_FAST_LAUNCH=1``: the oracle and contract tests on CUDA tensors, 1 to 4
   processes sharing the GPU over gloo, through the fast launch path, and the compiled layer's
   oracle cases (``tests/test_compile.py``, the traced path on CUDA tensors);
4. ``host``: ``benchmarks.host_overhead``, host time per call of the layer and its pieces;
5. ``act``: ``benchmarks.bench_act --cuda``, SyncBatchNormAct against SyncBatchNorm + the
   activation and the 8S copy floor (``--quick`` unless 300 s remain);
6. ``memory``: ``benchmarks.bench_memory --cuda``, peak memory of a DeepLabV3-like network's
   forward+backward, BN + LeakyReLU against SyncBatchNormAct(inplace=True);
7. ``train``: ``benchmarks.bench_train``, the ResNet-50 training step, four BatchNorm choices
   (``--no-fast-launch`` when a test of steps 2-3 failed);
8. ``compile``: ``benchmarks.bench_compile``, training steps under torch.compile (inductor):
   BatchNorm, syncbn traced and syncbn as custom ops with the Triton kernels inside the graph,
   the measurement behind the default ``SYNCBN_COMPILE``. Six inductor compiles of a small
   ResNet and a ResNet-50: minutes; run it alone (``--only compile``) when the budget is short;
9. ``kernels``: ``benchmarks.bench_kernels`` (``--quick`` when less than 200 s remain).

Everything a step prints is streamed and also written to ``$OUT/logs/<step>.log`` ($OUT when
set, else benchmarks/results/scratch/gpu_check), packed into ``$OUT/logs.tar.gz`` at the end
under a lease (at most 8 files come back); the assertion lines of failed tests go to
``$OUT/failures.txt``; the benchmarks' results to ``$OUT/results`` (those of ``act`` and
``memory`` to the logs, in the archive). The summary (step results,
failed tests, the benchmark tables and their targets) is printed last.
Nothing is installed: it uses the machine's python, torch, Triton and pytest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, SCRATCH
from syncbn import settings

# Seconds for all the steps together: a 600 s lease less the time to start and to pack the
# results. A benchmark-local knob, read here only.
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "570"))
STEPS = ("tests", "layer", "host", "act", "memory", "train", "compile", "kernels")
COMPILED_ORACLE_TESTS = "tests/test_compile.py::test_compiled_layer_matches_oracle"
START = time.time()


def remaining() -> float:
    return BUDGET_S - (time.time() - START)


def out_dirs() -> tuple[Path, Path]:
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else SCRATCH / "gpu_check"
    logs, results = base / "logs", base / "results"
    logs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    return logs, results


def step_env() -> dict[str, str]:
    """A step's environment: this one, with the repository on PYTHONPATH, the compiled kernels
    (not Triton's interpreter) and syncbn's default backend."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)
    env.pop(settings.BACKEND.name, None)
    return env


def run_step(name: str, cmd: list[str], timeout: float, log_dir: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` streaming its output to the console and to ``<log_dir>/<name>.log``."""
    timeout = max(1.0, timeout)
    print(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f} s) =====", flush=True)
    log_path = log_dir / f"{name}.log"
    t0 = time.time()
    lines: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True,
        )  # fmt: skip

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                lines.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the step's own process group
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
    seconds = time.time() - t0
    status = "TIMEOUT" if timed_out else ("OK" if proc.returncode == 0 else f"FAIL rc={proc.returncode}")
    return {"name": name, "status": status, "seconds": seconds, "lines": lines, "log": str(log_path)}


def pytest_cmd(paths: list[str], per_test_timeout: int, workers: int = 0) -> list[str]:
    """pytest, with a per-test timeout and ``workers`` processes when the plugins are there.

    Workers matter for the kernel tests: every new tile shape is a Triton compile (about 0.3 s
    of one CPU core), and a few hundred of them dominate the run; each worker compiles its own.
    """
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider", "--durations=8"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={per_test_timeout}")
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]  # 0: in this process (the project's addopts ask for 2)
    else:  # the project's addopts without the xdist options, which pytest would not know
        cmd += ["-o", 'addopts=-ra -m "not soak"']
    return cmd + paths


_SUMMARY_WORDS = (" passed", " failed", " error")


def pytest_result(lines: list[str]) -> tuple[str, list[str]]:
    """The final 'N passed, ...' line and the FAILED/ERROR lines."""
    summary = next(
        (line.strip("= ") for line in reversed(lines) if " in " in line and any(w in line for w in _SUMMARY_WORDS)),
        "no pytest summary",
    )
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return summary, failed


def versions() -> str:
    code = (
        "import torch, triton, sys; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
        "print(f'python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | '"
        "f'cuDNN {torch.backends.cudnn.version()} | Triton {triton.__version__} | '"
        "f'device {torch.cuda.get_device_name(0) if p else None} ({p.multi_processor_count if p else 0} SMs, '"
        "f'{(p.total_memory / 2**30) if p else 0:.0f} GiB)')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    return (out.stdout + out.stderr).strip()


def bench_table(results_dir: Path) -> list[str]:
    files = sorted(results_dir.glob("kernels-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return ["(no benchmark results)"]
    data = json.loads(files[-1].read_text())
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    g = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    out = [
        f"benchmark: {files[-1]}  (copy rate {data['copy_rate_bytes_per_s'] / 1e12:.2f} TB/s)",
        f"{'layer':<20} {'dt':<4} {'lay':<5} {'MB':>6} {'fwd ms':>8} {'f+b ms':>8} {'flr f':>5} {'flr fb':>6} "
        f"{'xBN f':>6} {'xBN fb':>6} {'xTS fb':>6} {'graph fb':>8} {'host us':>7} {'fast fb':>8} {'host fast':>9}",
    ]
    for r in data["cases"]:
        out.append(
            f"{r['shape']:<20} {r['dtype']:<4} {r['layout']:<5} {r['bytes'] / 2**20:6.1f} "
            f"{g(r.get('syncbn_fwd')):>8} {g(r.get('syncbn_fwd_bwd')):>8} {f(r.get('floor_fwd')):>5} "
            f"{f(r.get('floor_fwd_bwd')):>6} {f(r.get('vs_bn_fwd')):>6} {f(r.get('vs_bn_fwd_bwd')):>6} "
            f"{f(r.get('vs_torch_fwd_bwd')):>6} {g(r.get('syncbn_graph_fwd_bwd')):>8} "
            f"{f(r.get('syncbn_host_us'), 0):>7} {g(r.get('fast_fwd_bwd')):>8} {f(r.get('fast_host_us'), 0):>9}"
            + (" ERR" if r.get("errors") else "")
        )
    out.append("targets:")
    for name, value, goal, ok in data["summary"]["targets"]:
        out.append(f"  {'MET   ' if ok else 'MISSED'} {name}: {f(value)} (goal {goal})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--only", default=",".join(STEPS), help=f"a comma-separated subset of {','.join(STEPS)}")
    only = set(ap.parse_args().only.split(","))
    if not only <= set(STEPS):
        ap.error(f"--only takes a comma-separated subset of {','.join(STEPS)}")
    log_dir, results_dir = out_dirs()
    env = step_env()

    print("===== versions =====", flush=True)
    ver = versions()
    print(ver, flush=True)
    smi = (
        subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        if _which("nvidia-smi")
        else "no nvidia-smi"
    )
    print(smi, flush=True)
    (log_dir / "versions.log").write_text(ver + "\n\n" + smi)

    steps = []
    if "tests" in only:
        steps.append(run_step(
            "pytest_gpu", pytest_cmd(["tests/test_cuda.py", "tests/test_triton_ops.py"], 150, workers=4),
            min(210, remaining() - 300), log_dir, env,
        ))  # fmt: skip
    if "layer" in only:
        with settings.TEST_DEVICE.set("cuda"), settings.TRITON_FAST_LAUNCH.set(True):
            steps.append(run_step(
                "pytest_layer_cuda",
                pytest_cmd(["tests/test_layer.py", "tests/test_semantics.py", COMPILED_ORACLE_TESTS], 120),
                min(120, remaining() - 240), log_dir, step_env(),
            ))  # fmt: skip
    if "host" in only:
        steps.append(run_step(
            "host_overhead", [sys.executable, "-m", "benchmarks.host_overhead", "--out", str(results_dir)],
            min(45, remaining() - 200), log_dir, env,
        ))  # fmt: skip
    if "act" in only:
        # Into the logs folder (packed at the end): a lease returns few files.
        act = [sys.executable, "-m", "benchmarks.bench_act", "--cuda", "--out", str(log_dir)]
        if remaining() < 300:
            act.append("--quick")
        steps.append(run_step("bench_act", act, min(120, remaining() - 150), log_dir, env))
    if "memory" in only:
        memory = [sys.executable, "-m", "benchmarks.bench_memory", "--cuda", "--out", str(log_dir)]
        steps.append(run_step("bench_memory", memory, min(90, remaining() - 120), log_dir, env))
    tests_failed = any(s["name"].startswith("pytest") and s["status"] != "OK" for s in steps)
    if "train" in only:
        train = [sys.executable, "-m", "benchmarks.bench_train", "--out", str(results_dir)]
        if tests_failed:
            train.append("--no-fast-launch")
        steps.append(run_step("bench_train", train, min(200, remaining() - 45), log_dir, env))
    if "compile" in only:
        compile_bench = [sys.executable, "-m", "benchmarks.bench_compile", "--out", str(results_dir)]
        limit = 480 if only == {"compile"} else 300  # alone, it may take most of the budget
        steps.append(run_step("bench_compile", compile_bench, min(limit, remaining() - 45), log_dir, env))
    if "kernels" in only:
        if remaining() > 60:
            bench = [sys.executable, "-m", "benchmarks.bench_kernels", "--out", str(results_dir)]
            if remaining() < 200:
                bench.append("--quick")
            steps.append(run_step("bench_kernels", bench, remaining() - 10, log_dir, env))
        else:
            steps.append(
                {"name": "bench_kernels", "status": "SKIP (no time left)", "seconds": 0, "lines": [], "log": ""}
            )
    # The assertion lines of every failure, small enough to come back whatever happens to logs.
    errors = [
        line
        for s in steps
        if s["name"].startswith("pytest")
        for line in s["lines"]
        if line.startswith(("E ", "FAILED", "ERROR"))
    ]
    (log_dir.parent / "failures.txt").write_text("\n".join(errors[:400]) + "\n")

    # ---- summary, last ----
    print("\n" + "=" * 30 + " gpu_check summary " + "=" * 30)
    print(ver)
    failed_all = []
    for s in steps:
        detail = ""
        if s["name"].startswith("pytest") and s["lines"] and s["status"] != "SKIP":
            detail, failed = pytest_result(s["lines"])
            failed_all += failed
        elif s["name"] in ("bench_kernels", "bench_train", "bench_compile", "bench_act", "bench_memory") and s["lines"]:
            detail = next((line for line in reversed(s["lines"]) if line.startswith("# wrote")), s["lines"][-1])[:150]
        elif s["lines"]:
            detail = s["lines"][-1][:150]
        print(f"{s['name']:<20} {s['status']:<14} {s['seconds']:6.0f} s  {detail}")
    if failed_all:
        print(f"failed tests ({len(failed_all)}):")
        for line in failed_all[:15]:
            print("  " + line[:220])
    tables = [*results_dir.glob("train-*.md"), *results_dir.glob("compile-*.md"), *log_dir.glob("act-*.md")]
    for table in sorted(tables) + sorted(log_dir.glob("memory-cuda.md")):
        print("\n".join(line for line in table.read_text().splitlines() if line.startswith("|")))
    print("\n".join(bench_table(results_dir)))
    if os.environ.get("OUT"):
        log_dir = pack_logs(log_dir)
        pack_results(results_dir)
    print(f"logs: {log_dir}  results: {results_dir}  total {time.time() - START:.0f} s")
    ok = all(s["status"] in ("OK",) or s["status"].startswith("SKIP") for s in steps)
    return 0 if ok else 1


# Results read first, kept beside the archive: with logs.tar.gz, results.tar.gz and failures.txt,
# at most 8 files come back from a lease.
SUMMARIES = ("kernels-*.md", "train-*.md", "compile-*.md")


def pack_results(results_dir: Path) -> Path:
    """Every result file in $OUT/results.tar.gz; only the ``SUMMARIES`` stay loose beside it."""
    archive = results_dir.parent / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(results_dir, arcname="results")
    keep = {p for pattern in SUMMARIES for p in results_dir.glob(pattern)}
    for path in results_dir.iterdir():
        if path not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return archive


def pack_logs(log_dir: Path) -> Path:
    """The logs as one $OUT/logs.tar.gz (see ``SUMMARIES``)."""
    archive = log_dir.parent / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(log_dir, arcname="logs")
    shutil.rmtree(log_dir)
    return archive


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


if __name__ == "__main__":
    sys.exit(main())
