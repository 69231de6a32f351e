"""The benchmarks' own arithmetic and reports, and the GPU training benchmark's code at toy size on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_comm import bytes_received, plot

REPO = Path(__file__).resolve().parents[1]


def test_all_reduce_payload_is_flat_and_all_gather_grows_with_world():
    small, large = bytes_received(2, 256), bytes_received(4096, 256)
    assert small["syncbn_result"] == large["syncbn_result"] == (2 * 256 + 1) * 8
    assert large["syncbn_received"] < 2 * (2 * 256 + 1) * 8  # ring all-reduce: < 2x the buffer
    assert large["torch_result"] == 4096 * (2 * 256 + 1) * 4
    assert large["torch_received"] / small["torch_received"] == 4095


def test_comm_plot_is_written(tmp_path):
    measured = [{"world": w, "channels": c, "syncbn all_reduce": 1.0, "torch all_gather": 2.0} for w in (2, 4) for c in (64, 128)]
    computed = [bytes_received(w, c) for c in (256, 2048) for w in (2, 4, 8)]
    path = tmp_path / "comm.png"
    plot(measured, computed, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_training_benchmark_code_runs_as_a_cpu_smoke_test(tmp_path):
    """bench_train's GPU comparison (ResNet-50, interleaved blocks, launch modes, report) at toy
    size on the CPU, so that a GPU lease is not spent finding a bug in it."""
    cmd = [sys.executable, "benchmarks/bench_train.py", "--smoke", "--warmup", "1", "--steps", "1", "--blocks", "2", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "train-smoke-test-on-cpu.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["batch 2, bf16 autocast, channels_last", "batch 2, float32"]
    for row in data["rows"]:
        assert all(row[c] > 0 for c in ("batchnorm", "syncbn", "syncbn-fast-launch"))
    assert "syncbn, fast launch / BatchNorm2d" in (tmp_path / "train-smoke-test-on-cpu.md").read_text()
    assert (tmp_path / "train-smoke-test-on-cpu.png").read_bytes()[:4] == b"\x89PNG"
