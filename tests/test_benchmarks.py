"""The benchmarks' timer, result rows and reports, and the GPU training and compile benchmarks' code at
toy size on CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_kernels as bk
from benchmarks.bench_comm import bytes_received, plot
from benchmarks.common import Row, Timing, read_rows, time_calls, time_interleaved

REPO = Path(__file__).resolve().parents[1]


def test_timing_quantiles_match_torch_quantile():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    t = Timing.of(samples)
    expected = torch.quantile(
        torch.tensor(samples, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    )
    assert (t.median, t.p20, t.p80) == pytest.approx(expected.tolist())
    assert Timing.of([7.0]) == Timing(7.0, 7.0, 7.0)


def test_time_calls_reports_ms_per_call():
    calls = []

    def sleep_2ms():
        calls.append(None)
        time.sleep(0.002)

    t = time_calls(sleep_2ms, warmup=2, reps=5, iters=3)
    assert len(calls) == 2 + 5 * 3
    assert 2.0 <= t.p20 <= t.median <= t.p80 < 200  # ms per call, not per sample or in seconds


def test_time_interleaved_alternates_candidates_inside_their_context():
    log = []

    @contextlib.contextmanager
    def selecting(name):
        log.append(f"enter {name}")
        yield

    candidates = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    times = time_interleaved(candidates, rounds=3, iters=2, warmup=1, context=selecting)
    assert set(times) == {"a", "b"} and all(isinstance(t, Timing) for t in times.values())
    warm, timed = log[:4], log[4:]
    assert warm == ["enter a", "a", "enter b", "b"]
    assert timed == ["enter a", "a", "a", "enter b", "b", "b"] * 3  # one sample of each in turn


def test_row_round_trips_through_json():
    row = Row.measured(
        Timing(1.0, 0.9, 1.2), "syncbn", "forward", shape=(8, 64), dtype="float32", layout="NC", device="cpu", world=2
    )
    data = json.loads(json.dumps(row.to_json()))
    assert data["pass"] == "forward" and data["median_ms"] == 1.0 and data["extras"] == {"world": 2}
    assert {"provider", "shape", "dtype", "layout", "device", "versions", "date", "p20_ms", "p80_ms"} <= set(data)
    assert data["versions"]["torch"] == torch.__version__
    assert Row.from_json(data) == row and Row.from_json(data).timing == Timing(1.0, 0.9, 1.2)


def test_all_reduce_payload_is_flat_and_all_gather_grows_with_world():
    small, large = bytes_received(2, 256), bytes_received(4096, 256)
    assert small["syncbn_result"] == large["syncbn_result"] == (2 * 256 + 1) * 8
    assert large["syncbn_received"] < 2 * (2 * 256 + 1) * 8  # ring all-reduce: < 2x the buffer
    assert large["torch_result"] == 4096 * (2 * 256 + 1) * 4
    assert large["torch_received"] / small["torch_received"] == 4095


def test_comm_plot_is_written(tmp_path):
    measured = [
        Row.measured(
            Timing(ms, ms, ms), provider, "forward", shape=[2 * c + 1], dtype="float64", layout="contiguous",
            device="cpu", world=w, channels=c,
        )
        for w in (2, 4)
        for c in (64, 128)
        for provider, ms in (("syncbn all_reduce", 1.0), ("torch all_gather", 2.0))
    ]  # fmt: skip
    computed = [bytes_received(w, c) for c in (256, 2048) for w in (2, 4, 8)]
    path = tmp_path / "comm.png"
    plot(measured, computed, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _module(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<name> args`` from the repository root, as the docs run it."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_gpu_training_benchmark_code_runs_as_a_cpu_smoke_test(tmp_path):
    """bench_train's GPU comparison (ResNet-50, interleaved blocks, launch modes, report) at toy
    size on the CPU, so that a GPU lease is not spent finding a bug in it."""
    out = _module("bench_train", "--smoke", "--warmup", "1", "--steps", "1", "--blocks", "2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = read_rows(tmp_path / "train-smoke-test-on-cpu.json")
    configs = ["batch 2, bf16 autocast, channels_last", "batch 2, float32"]
    assert list(dict.fromkeys(r.extras["config"] for r in rows)) == configs
    assert [r.provider for r in rows] == ["batchnorm", "syncbn", "syncbn-fast-launch"] * 2
    for row in rows:
        assert row.pass_ == "training step" and row.shape == [2, 3, 32, 32] and row.device == "cpu"
        assert 0 < row.p20_ms <= row.median_ms <= row.p80_ms
    assert "syncbn, fast launch / BatchNorm2d" in (tmp_path / "train-smoke-test-on-cpu.md").read_text()
    assert (tmp_path / "train-smoke-test-on-cpu.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "name, reduced",
    [
        ("bench_cpu", "--quick"),
        ("bench_comm", "--quick"),
        ("bench_train", "--smoke"),
        ("bench_kernels", "--quick"),
        ("bench_act", "--quick"),
        ("bench_memory", "--quick"),
    ],  # fmt: skip
)
def test_a_reduced_run_refuses_to_save(name, reduced):
    """--save replaces the committed results: only a full run may, never a smoke one."""
    out = _module(name, reduced, "--save", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--save replaces the committed results and needs a full run; drop {reduced}" in out.stderr


def _case(shape, dtype, layout, layout_kind, nbytes, timings):
    """One case's rows as ``run_case`` makes them, from ``(provider, pass): ms or error``."""
    rows = []
    for (provider, pass_), ms in timings.items():
        extras = {"error": ms} if isinstance(ms, str) else {}
        if provider in ("syncbn", bk.FAST) and pass_ == "forward+backward":
            extras["host_us"] = 300.0 if provider == "syncbn" else 120.0
        timing = None if isinstance(ms, str) else Timing(ms, ms, ms)
        rows.append(Row.measured(timing, provider, pass_, shape=shape, dtype=dtype, layout=layout, device="Test GPU",
                                 note="", layout_kind=layout_kind, bytes=nbytes, **extras))  # fmt: skip
    return rows


def test_kernel_benchmark_report_from_synthetic_timings(tmp_path):
    """bench_kernels' cases, targets and report (which only a GPU can time), from made-up timings."""
    fwd, fwd_bwd = "forward", "forward+backward"
    layer = (32, 64, 112, 112)
    rows = []
    for dtype, layout_kind in (("float32", "contiguous"), ("bfloat16", "channels_last")):
        timings = {("syncbn", fwd): 0.1, ("syncbn", fwd_bwd): 0.2, (bk.GRAPH, fwd_bwd): 0.15,
                   (bk.FAST, fwd_bwd): 0.1, ("F.batch_norm", fwd): 0.2, ("F.batch_norm", fwd_bwd): 0.4,
                   ("torch SyncBN", fwd): 0.5, ("torch SyncBN", fwd_bwd): 1.0}  # fmt: skip
        rows += _case(layer, dtype, "NCHW", layout_kind, bk.BIG, timings)
    broken = {("syncbn", fwd): 0.1, ("syncbn", fwd_bwd): 0.2, ("F.batch_norm", fwd): 0.2,
              ("F.batch_norm", fwd_bwd): 0.4, ("torch SyncBN", fwd): "RuntimeError: x"}  # fmt: skip
    rows += _case((8, 2048), "float32", "NC", "contiguous", 1000, broken)
    rows += [
        Row.measured(Timing(0.05, 0.05, 0.05), bk.PASSES_PROVIDER, name, shape=layer, dtype="float32", layout="NCHW",
                     device="Test GPU", bytes=bk.BIG, bytes_per_s=bk.BIG / 0.05e-3)
        for name in bk.PASSES
    ]  # fmt: skip

    cases = bk.cases_of(rows, 3e12)
    assert [(c["shape"], c["dtype"]) for c in cases] == [
        (str(layer), "fp32"),
        (str(layer), "bf16"),
        ("(8, 2048)", "fp32"),
    ]
    case = cases[0]
    assert case["vs_bn_fwd_bwd"] == 2.0 and case["vs_torch_fwd_bwd"] == 5.0 and case["vs_bn_fwd_bwd_fast"] == 4.0
    assert case["syncbn_graph_fwd_bwd"] == 0.15 and case["syncbn_host_us"] == 300.0 and case["fast_host_us"] == 120.0
    assert abs(case["floor_fwd_bwd"] - 8 * bk.BIG / 3e12 / 0.2e-3) < 1e-12
    assert cases[2]["errors"] == "torch SyncBN: RuntimeError: x" and "vs_torch_fwd_bwd" not in cases[2]

    summary = bk.summarize(cases)
    targets = {name: (value, ok) for name, value, goal, ok in summary["targets"]}
    assert targets["fast launch: fwd+bwd speedup vs torch SyncBN path (geomean, all)"][0] > 5.0
    assert targets["fwd_bwd speedup vs F.batch_norm, fp32 (geomean)"] == (2.0, True)
    env = {"device": "Test GPU", "sms": 1, "memory_gib": 1, "driver": "-", "torch": "-", "cuda": "-",
           "triton": "-", "cudnn": "-", "python": "-", "date": "-"}  # fmt: skip
    args = argparse.Namespace(quick=True, save=False, tuning="", layers="", warmup=1, rep=1, out=tmp_path)
    md, _ = bk.write_report(tmp_path, env, 3e12, rows, args, 1.0)
    text = md.read_text()
    assert "f+b fast launch" in text and "finalize_normalize" in text and "**no**" in text
    assert "`python -m benchmarks.bench_kernels --quick`" in text
    data = json.loads((tmp_path / "kernels-test-gpu.json").read_text())
    assert data["summary"]["targets"] and data["cases"][0]["vs_bn_fwd_bwd"] == 2.0
    assert read_rows(tmp_path / "kernels-test-gpu.json") == rows

    # gpu_check's summary table reads the same file
    from benchmarks import gpu_check

    table = gpu_check.bench_table(tmp_path)
    assert any(line.startswith(str(layer)) and " ERR" not in line for line in table)
    assert table[-1].startswith("  ") and any("MISSED" in line for line in table)


def test_compile_benchmark_runs_as_a_smoke_test(tmp_path):
    """bench_compile's whole code path (worlds of 1 and 2, the five variants, the raw
    all-reduces, report, targets, plot) on a toy model with aot_eager."""
    from benchmarks.bench_compile import ALL_REDUCE, VARIANTS, step_table

    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--smoke", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "compile-smoke-test-on-cpu.json").read_text())
    assert data["meta"]["backend"] == "aot_eager" and data["meta"]["torch"] == torch.__version__
    rows = read_rows(tmp_path / "compile-smoke-test-on-cpu.json")
    assert all(r.pass_ == "training step" and r.device == "cpu" and r.median_ms > 0 for r in rows)
    table = step_table(rows)
    assert [(r["model"], r["world"]) for r in table] == [("toy ResNet", 1), ("toy ResNet", 2)]
    for row in table:
        assert all(row[v] > 0 for v in (*VARIANTS, ALL_REDUCE)), row
    md = (tmp_path / "compile-smoke-test-on-cpu.md").read_text()
    assert "| toy ResNet | 2 | compiled syncbn / (compiled BatchNorm + raw all-reduces) |" in md
    assert (tmp_path / "compile-smoke-test-on-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_compile_benchmark_targets_from_synthetic_timings():
    from benchmarks.bench_compile import ALL_REDUCE, targets

    timings = {"batchnorm": 9.0, "batchnorm compiled": 10.0, "syncbn": 12.0, "syncbn compiled": 10.4}
    one = {t[0]: t[1:] for t in targets({"world": 1, ALL_REDUCE: 0.1, "syncbn compiled, ops": 20.0, **timings})}
    assert one["compiled syncbn / compiled BatchNorm (synced, world 1)"] == (pytest.approx(1.04), "<= 1.05", True)
    assert one["compiled syncbn / eager syncbn"][2] is True
    two = {t[0]: t[1:] for t in targets({"world": 2, ALL_REDUCE: 0.3, "syncbn compiled, ops": 20.0, **timings})}
    assert "compiled syncbn / compiled BatchNorm (synced, world 1)" not in two
    value, _, met = two["compiled syncbn / (compiled BatchNorm + raw all-reduces)"]
    assert value == pytest.approx(10.4 / 10.3) and met is False


def test_memory_benchmark_counts_what_autograd_saves(tmp_path):
    """bench_memory at toy size: the three networks compute the same thing, each BN + activation
    unit saves 2 activation-sized tensors as nn.BatchNorm + LeakyReLU and 1 as SyncBatchNormAct,
    and the report and plot are written (the full run's numbers are in benchmarks/results/)."""
    from benchmarks import bench_memory

    rows = bench_memory.measure(batch=2, size=32)
    for backbone in bench_memory.BACKBONES:
        base, fused, inplace = (r.extras for r in rows if r.extras["backbone"] == backbone)
        assert base["saved_per_unit_with_activation"] == [2]
        assert fused["saved_per_unit_with_activation"] == inplace["saved_per_unit_with_activation"] == [1]
        assert inplace["activation_bytes"] < fused["activation_bytes"] <= base["activation_bytes"]
        assert max(e["max_output_difference"] for e in (base, fused, inplace)) < 1e-4
    md = bench_memory.report(rows, tmp_path, quick=True)
    assert "| pre-activation | SyncBatchNormAct(inplace=True) |" in md.read_text()
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_check_returns_at_most_eight_files(tmp_path):
    """gpu_check's ``host`` step runs on a CPU too: its $OUT holds what a GPU lease brings back,
    at most 8 files no more than 2 folders down (the archives, failures.txt, the summaries), and
    the host-overhead table lists syncbn's layer and its parts."""
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--only", "host"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 3 for p in files), files
    assert {p.name for p in files} >= {"logs.tar.gz", "results.tar.gz", "failures.txt"}
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        report = tar.extractfile("results/host-overhead-cpu.txt").read().decode()
    assert "syncbn fwd+bwd" in report and "backward_pass (no autograd)" in report
