"""The benchmarks' own arithmetic and reports (the measurements themselves run by hand)."""

from __future__ import annotations

from benchmarks.bench_comm import bytes_received, plot


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
