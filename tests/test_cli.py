"""The ``syncbn`` command: ``info`` and ``verify``, as a new user runs them, and verify's
failure paths (a wrong layer, a crashing rank, a hung rank) giving FAIL and a non-zero exit;
``bench``'s smoke run, which must leave the committed results alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time

import torch
import torch.distributed as dist

import syncbn
from syncbn import verify
from tests import procs


def test_info():
    result = procs.python("-m", "syncbn", "info", timeout=120)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert f"syncbn      {syncbn.__version__}" in out
    assert f"torch       {torch.__version__}" in out
    assert "gloo: yes" in out
    assert "CPU tensor, float64: torch ops" in out
    assert re.search(r"CUDA tensor, float32/float16/bfloat16: (Triton kernels|torch ops)", out), out
    if "syncbn kernels load: yes" in out:
        assert re.search(r"kernel launches: (through Triton's launcher|direct)", out), out


def _check_table(out: str) -> None:
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL")) or "  FAIL  (" in line]
    assert len(rows) == len(verify.CHECKS) + 2, out  # the layer checks and the two edge rules
    assert all(row.rstrip().endswith("PASS") for row in rows), out
    assert f"PASS: all {len(rows)} checks match" in out


def test_verify_spawns_two_processes():
    result = procs.python("-m", "syncbn", "verify", "--nproc", "2", timeout=180)
    assert result.returncode == 0, result.stdout
    assert "world size 2, backend gloo, cpu tensors" in result.stdout
    _check_table(result.stdout)


def test_verify_joins_the_torchrun_world():
    result = procs.torchrun("-m", "syncbn", "verify", nproc=3, timeout=180)
    assert result.returncode == 0, result.stdout
    assert "world size 3" in result.stdout
    _check_table(result.stdout)
    assert result.stdout.count("syncbn 0.1.0 verify") == 1  # rank 0 alone prints


# --- failure paths --------------------------------------------------------------------------


class _OffByAThousandth(syncbn.SyncBatchNorm):
    """A layer that is slightly wrong: verify must notice."""

    def forward(self, input):
        return super().forward(input) * 1.001


def _case_checks_with_broken_layer(ctx):
    return verify.run_checks(group=ctx.group, layer_cls=_OffByAThousandth)


def test_run_checks_fails_a_wrong_layer_on_every_rank(pool):
    results = pool.run(_case_checks_with_broken_layer, group="w2", timeout=120)
    assert results[0] == results[1]  # the verdict is reduced over the world
    by_name = {r.name: r for r in results[0]}
    for check in verify.CHECKS:
        if check.dtype != torch.bfloat16:  # 0.1% is inside bfloat16's tolerance (1.6%)
            assert not by_name[check.name].passed and by_name[check.name].err_over_tol > 1, check.name
    assert "FAIL" in verify._format(by_name["2-D (N, C)"])


def _crashing_worker(rank, world, port, backend, timeout_s):
    if rank == 1:
        raise RuntimeError("rank 1 broke")  # not a clean exit: multiprocessing exits with 1
    verify._worker(rank, world, port, backend, timeout_s)


def _exit_error_worker(rank, world, port, backend, timeout_s):
    os._exit(verify.EXIT_ERROR if rank == 0 else verify.EXIT_PASS)


def _hanging_worker(rank, world, port, backend, timeout_s):
    # Rank 0 waits in a collective that rank 1, asleep, never joins.
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    if rank == 0:
        dist.all_reduce(torch.ones(1))
    time.sleep(600)


def test_run_local_reports_a_rank_that_raised(capsys):
    assert verify.run_local(2, "gloo", timeout_s=60, grace_s=5, worker=_exit_error_worker) == 1
    assert "FAIL: rank 0 raised" in capsys.readouterr().out


def test_run_local_reports_a_dead_rank_and_stops_the_others(capsys):
    start = time.monotonic()
    assert verify.run_local(2, "gloo", timeout_s=120, grace_s=3, worker=_crashing_worker) == 1
    out = capsys.readouterr().out
    assert "rank 1 died with exit code 1" in out
    assert time.monotonic() - start < 60  # rank 0, stuck waiting for rank 1, was stopped early


def test_run_local_times_out_on_a_hang(capsys):
    start = time.monotonic()
    assert verify.run_local(2, "gloo", timeout_s=6, worker=_hanging_worker) == 1
    assert time.monotonic() - start < 30
    assert "FAIL: timed out after 6 s: ranks [0, 1] did not finish" in capsys.readouterr().out


def test_console_script_entry_point():
    """pyproject's ``syncbn = "syncbn.__main__:main"``: main() returns the exit code."""
    from syncbn.__main__ import main

    assert main(["info"]) == 0
    assert sys.modules["syncbn.__main__"].main is main


def _failed_checks_worker(rank, world, port, backend, timeout_s):
    os._exit(verify.EXIT_FAIL)  # what a rank does after printing a table with a FAIL


def test_run_local_exits_non_zero_when_a_check_failed():
    assert verify.run_local(2, "gloo", timeout_s=60, worker=_failed_checks_worker) == 1


# --- bench ----------------------------------------------------------------------------------

RESULTS = procs.ROOT / "benchmarks" / "results"


def _committed_results() -> dict[str, str]:
    """sha256 of every file in benchmarks/results/ outside the scratch folder."""
    return {
        str(path.relative_to(RESULTS)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(RESULTS.rglob("*"))
        if path.is_file() and "scratch" not in path.relative_to(RESULTS).parts
    }


def test_bench_quick_leaves_the_committed_results_untouched():
    """A smoke run writes to the scratch folder and says so; benchmarks/results/ stays byte for byte."""
    before = _committed_results()
    assert before, "no committed results to protect"
    start = time.time()
    result = procs.python("-m", "syncbn", "bench", "--quick", timeout=600)
    assert result.returncode == 0, result.stdout
    assert _committed_results() == before
    scratch = RESULTS / "scratch"
    assert f"results in {scratch}" in result.stdout
    assert result.stdout.count("done in") == 5, result.stdout  # a progress line per benchmark
    for name in ("cpu.json", "comm.json", "train-cpu.json", "act-cpu.json", "memory.json"):
        assert (scratch / name).stat().st_mtime >= start, name


def test_bench_refuses_to_save_a_quick_run():
    result = procs.python("-m", "syncbn", "bench", "--quick", "--save", timeout=120)
    assert result.returncode == 2, result.stdout
    assert "--save replaces the committed results and needs a full run; drop --quick" in result.stdout
    assert "running" not in result.stdout  # refused before any benchmark started
