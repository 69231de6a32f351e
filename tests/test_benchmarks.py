"""The benchmarks' own arithmetic and reports, and the GPU training and compile benchmarks' code at toy size on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_comm import bytes_received, plot

REPO = Path(__file__).resolve().parents[1]


def test_all_reduce_payload_is_flat_and_all_gather_grows_with_world():
    small, large = bytes_received(2, 256), bytes_received(4096, 256)
    assert small["syncbn_result"] == large["syncbn_result"] == (2 * 256 + 1) * 8
    assert large["syncbn_received"] < 2 * (2 * 256 + 1) * 8  # ring all-reduce: < 2x the buffer
    assert large["torch_result"] == 4096 * (2 * 256 + 1) * 4
    assert large["torch_received"] / small["torch_received"] == 4095


def test_comm_plot_is_written(tmp_path):
    measured = [
        {"world": w, "channels": c, "syncbn all_reduce": 1.0, "torch all_gather": 2.0}
        for w in (2, 4)
        for c in (64, 128)
    ]
    computed = [bytes_received(w, c) for c in (256, 2048) for w in (2, 4, 8)]
    path = tmp_path / "comm.png"
    plot(measured, computed, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_training_benchmark_code_runs_as_a_cpu_smoke_test(tmp_path):
    """bench_train's GPU comparison (ResNet-50, interleaved blocks, launch modes, report) at toy
    size on the CPU, so that a GPU lease is not spent finding a bug in it."""
    cmd = [
        sys.executable,
        "benchmarks/bench_train.py",
        "--smoke",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--blocks",
        "2",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "train-smoke-test-on-cpu.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["batch 2, bf16 autocast, channels_last", "batch 2, float32"]
    for row in data["rows"]:
        assert all(row[c] > 0 for c in ("batchnorm", "syncbn", "syncbn-fast-launch"))
    assert "syncbn, fast launch / BatchNorm2d" in (tmp_path / "train-smoke-test-on-cpu.md").read_text()
    assert (tmp_path / "train-smoke-test-on-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_kernel_benchmark_report_from_synthetic_timings(tmp_path):
    """bench_kernels' rows, targets and report (which only a GPU can time), from made-up timings."""
    import argparse

    from benchmarks import bench_kernels as bk

    def timing(ms):
        return {"fwd": (ms, ms, ms), "fwd_bwd": (2 * ms, 2 * ms, 2 * ms)}

    rows = []
    for dname, layout_kind in (("fp32", "contiguous"), ("bf16", "channels_last")):
        res = {
            "syncbn": dict(timing(0.1), host_us_fwd_bwd=300.0, graph_fwd_bwd=0.15),
            "F.batch_norm": timing(0.2),
            "torch SyncBN": timing(0.5),
            "syncbn fast launch": {"fwd_bwd": (0.1, 0.1, 0.1), "host_us_fwd_bwd": 120.0},
        }
        rows.append(bk.make_row("(32, 64, 112, 112)", "", dname, "NCHW", layout_kind, bk.BIG, res, 3e12))
    broken = {"syncbn": timing(0.1), "F.batch_norm": timing(0.2), "torch SyncBN": {"error": "RuntimeError: x"}}
    rows.append(bk.make_row("(8, 2048)", "", "fp32", "NC", "contiguous", 1000, broken, 3e12))
    row = rows[0]
    assert row["vs_bn_fwd_bwd"] == 2.0 and row["vs_torch_fwd_bwd"] == 5.0 and row["vs_bn_fwd_bwd_fast"] == 4.0
    assert abs(row["floor_fwd_bwd"] - 8 * bk.BIG / 3e12 / 0.2e-3) < 1e-12
    assert rows[2]["errors"] == "torch SyncBN: RuntimeError: x" and "vs_torch_fwd_bwd" not in rows[2]

    summary = bk.summarize(rows)
    targets = {name: (value, ok) for name, value, goal, ok in summary["targets"]}
    assert targets["fast launch: fwd+bwd speedup vs torch SyncBN path (geomean, all)"][0] > 5.0
    assert targets["fwd_bwd speedup vs F.batch_norm, fp32 (geomean)"] == (2.0, True)
    passes = {n: {"ms": 0.05, "bytes": bk.BIG, "bytes_per_s": bk.BIG / 0.05e-3} for n in bk.PASSES}
    breakdown = [{"shape": "(32, 64, 112, 112)", "dtype": "fp32", "layout": "NCHW", "passes": passes}]
    env = {"device": "Test GPU", "sms": 1, "memory_gib": 1, "driver": "-", "torch": "-", "cuda": "-",
           "triton": "-", "cudnn": "-", "python": "-", "date": "-"}  # fmt: skip
    args = argparse.Namespace(quick=True, tuning="", layers="", warmup=1, rep=1, out=tmp_path)
    md = bk.write_report(tmp_path, env, 3e12, rows, breakdown, summary, args, 1.0)
    text = md.read_text()
    assert "f+b fast launch" in text and "finalize_normalize" in text and "**no**" in text
    assert json.loads((tmp_path / "kernels-test-gpu.json").read_text())["summary"]["targets"]


def test_compile_benchmark_runs_as_a_smoke_test(tmp_path):
    """bench_compile's whole code path (worlds of 1 and 2, the five variants, the raw
    all-reduces, report, targets, plot) on a toy model with aot_eager."""
    from benchmarks.bench_compile import ALL_REDUCE, VARIANTS

    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--smoke", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "compile-smoke-test-on-cpu.json").read_text())
    assert data["meta"]["backend"] == "aot_eager" and data["meta"]["torch"] == torch.__version__
    assert [(r["model"], r["world"]) for r in data["rows"]] == [("toy ResNet", 1), ("toy ResNet", 2)]
    for row in data["rows"]:
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
