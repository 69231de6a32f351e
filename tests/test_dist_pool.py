"""Tests of the multi-process harness itself (``tests/dist_pool.py``).

Case functions (``_case_*``) are module-level so the workers can unpickle them.
The failure tests each cost one pool restart (a few seconds); everything else
reuses the session pool.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_pool import GROUPS, CaseContext, WorkerError, WorkerPool, WorkerTimeout

# ---------------------------------------------------------------- cases


def _case_identity(ctx: CaseContext) -> dict[str, object]:
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "global_rank": ctx.global_rank,
        "group_name": ctx.group_name,
        "is_world": ctx.group is None,
        "dist_rank": dist.get_rank(ctx.group),
        "dist_size": dist.get_world_size(ctx.group),
    }


def _case_all_reduce_marker(ctx: CaseContext) -> float:
    # Global rank r contributes 10**r: the sum spells out exactly who took part.
    t = torch.tensor([10.0**ctx.global_rank], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.group)
    return t.item()


def _case_echo(ctx: CaseContext, *args: object, **kwargs: object) -> tuple[int, tuple, dict]:
    return ctx.global_rank, args, kwargs


def _case_round_trip(ctx: CaseContext, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Check the tensors that arrived, send back modified copies with the same layout."""
    seen = {name: (t.dtype, t.shape, t.stride(), t.requires_grad) for name, t in tensors.items()}
    out = {}
    for name, t in tensors.items():
        back = t.detach().clone(memory_format=torch.preserve_format) + ctx.rank
        out[name] = back.requires_grad_(t.requires_grad)
    return {"seen": seen, "back": out}


def _case_only_rank0_all_reduce(ctx: CaseContext) -> None:
    if ctx.rank == 0:
        dist.all_reduce(torch.ones(1), group=ctx.group)


def _case_rank1_raises_before_collective(ctx: CaseContext) -> None:
    if ctx.rank == 1:
        raise ValueError("marker-7f3a from rank one")
    dist.all_reduce(torch.ones(1), group=ctx.group)  # rank 0 now waits forever


def _case_exit_on_rank1(ctx: CaseContext) -> None:
    if ctx.rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1), group=ctx.group)


def _case_pid(ctx: CaseContext) -> int:
    return os.getpid()


def _case_open_fds(ctx: CaseContext, payload: torch.Tensor) -> tuple[int, torch.Tensor]:
    dist.all_reduce(payload, group=ctx.group)
    return len(os.listdir("/proc/self/fd")), payload


def _case_worker_env(ctx: CaseContext) -> tuple[str | None, int]:
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


# ---------------------------------------------------------------- tests


def _started(pool: WorkerPool) -> int:
    """Make sure the workers are up (a test may run alone); return the start count."""
    pool.run(_case_pid, group="w4")
    return pool.starts


def test_constructing_a_pool_starts_nothing() -> None:
    before = set(multiprocessing.active_children())
    pool = WorkerPool()
    assert pool.starts == 0
    assert set(multiprocessing.active_children()) == before
    pool.close()  # closing a never-started pool is a no-op


@pytest.mark.parametrize("group", list(GROUPS))
def test_context_matches_torch_view_of_the_group(pool: WorkerPool, group: str) -> None:
    infos = pool.run(_case_identity, group=group)
    members = GROUPS[group]
    expected_global = sorted(r for ranks in members for r in ranks)
    assert [i["global_rank"] for i in infos] == expected_global
    for info in infos:
        (ranks,) = [rs for rs in members if info["global_rank"] in rs]
        assert info["rank"] == info["dist_rank"] == ranks.index(info["global_rank"])
        assert info["world_size"] == info["dist_size"] == len(ranks)
        assert info["group_name"] == group
        assert info["is_world"] == (group == "w4")


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("w1", [1.0]),
        ("w2", [11.0] * 2),
        ("w3", [111.0] * 3),
        ("w4", [1111.0] * 4),
        ("odd", [1010.0] * 2),
        ("pairs", [11.0, 11.0, 1100.0, 1100.0]),  # nothing leaks between the two pairs
    ],
)
def test_all_reduce_stays_inside_the_group(pool: WorkerPool, group: str, expected: list) -> None:
    assert pool.run(_case_all_reduce_marker, group=group) == expected


def test_args_kwargs_and_per_rank_args_are_routed_by_rank(pool: WorkerPool) -> None:
    got = pool.run(_case_echo, group="odd", args=(1, "x"), kwargs={"k": 2}, per_rank_args=["a", "b"])
    assert got == [(1, (1, "x", "a"), {"k": 2}), (3, (1, "x", "b"), {"k": 2})]

    got = pool.run(_case_echo, group="pairs", per_rank_args=[10, 11, 12, 13])
    assert [(g, a) for g, a, _ in got] == [(0, (10,)), (1, (11,)), (2, (12,)), (3, (13,))]


def test_bad_requests_fail_in_the_parent_without_starting_workers() -> None:
    pool = WorkerPool()
    with pytest.raises(ValueError, match="unknown group"):
        pool.run(_case_echo, group="w5")
    with pytest.raises(ValueError, match="module-level"):
        pool.run(lambda ctx: None, group="w2")
    with pytest.raises(ValueError, match="per_rank_args has 3 entries"):
        pool.run(_case_echo, group="w2", per_rank_args=[1, 2, 3])
    assert pool.starts == 0


def test_tensors_round_trip_with_dtype_and_layout(pool: WorkerPool) -> None:
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64),
        "bf16": torch.randn(4, 6).to(torch.bfloat16),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "transposed": torch.randn(4, 7).t(),
        "leaf_with_grad": torch.randn(3, requires_grad=True),
    }
    results = pool.run(_case_round_trip, group="w2", args=(tensors,))
    for rank, result in enumerate(results):
        for name, t in tensors.items():
            assert result["seen"][name] == (t.dtype, t.shape, t.stride(), t.requires_grad), name
            back = result["back"][name]
            assert back.dtype == t.dtype and back.stride() == t.stride(), name
            assert back.requires_grad == t.requires_grad, name
            torch.testing.assert_close(back, t.detach() + rank, rtol=0, atol=0)


def test_workers_are_single_threaded(pool: WorkerPool) -> None:
    assert pool.run(_case_worker_env, group="w4") == [("1", 1)] * 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_many_tasks_leak_no_file_descriptors(pool: WorkerPool) -> None:
    payload = torch.ones(256, 64)
    pool.run(_case_open_fds, group="w4", args=(payload,))  # warm up
    parent_before = len(os.listdir("/proc/self/fd"))
    first = [n for n, _ in pool.run(_case_open_fds, group="w4", args=(payload,))]
    for _ in range(300):
        results = pool.run(_case_open_fds, group="w4", args=(payload,))
    assert all(torch.equal(t, payload * 4) for _, t in results)
    assert [n for n, _ in results] == first
    assert len(os.listdir("/proc/self/fd")) == parent_before


def test_exception_on_one_rank_reports_its_traceback_and_pool_recovers(
    pool: WorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 1 raises; rank 0 is then stuck in a collective rank 1 never joins.
    # It must be given up on after the grace period, not the 60 s timeout.
    monkeypatch.setattr(pool, "error_grace", 0.5)
    starts = _started(pool)
    start = time.monotonic()
    with pytest.raises(WorkerError) as excinfo:
        pool.run(_case_rank1_raises_before_collective, group="w2", timeout=60)
    assert time.monotonic() - start < 15  # grace + stack dump + kill; far below 60 s
    assert not isinstance(excinfo.value, WorkerTimeout)
    assert list(excinfo.value.errors) == [1] and excinfo.value.missing == [0]
    message = str(excinfo.value)
    assert "global rank 1 raised" in message
    assert "ValueError: marker-7f3a from rank one" in message
    assert 'in _case_rank1_raises_before_collective\n    raise ValueError("marker-7f3a' in message
    assert "global ranks [0] were still running 0.5 s after another rank failed" in message
    assert pool.run(_case_all_reduce_marker, group="w2") == [11.0, 11.0]
    assert pool.starts == starts + 1


def test_collective_called_by_one_rank_times_out_and_pool_recovers(pool: WorkerPool) -> None:
    starts = _started(pool)
    start = time.monotonic()
    with pytest.raises(WorkerTimeout) as excinfo:
        pool.run(_case_only_rank0_all_reduce, group="w2", timeout=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 15  # timeout + stack dump + kill, even on a loaded machine
    assert isinstance(excinfo.value, TimeoutError)
    assert excinfo.value.missing == [0]
    message = str(excinfo.value)
    assert "global ranks [0] did not answer within 3 s" in message
    assert "in _case_only_rank0_all_reduce" in message  # stack of the stuck rank
    assert pool.run(_case_all_reduce_marker, group="w4") == [1111.0] * 4
    assert pool.starts == starts + 1


def test_gloo_timeout_fails_the_case_without_a_parent_timeout() -> None:
    # A dedicated pool whose process groups give up after 2 s: the stuck
    # collective raises inside the worker long before the run's own timeout.
    with WorkerPool(pg_timeout=2) as short:
        _started(short)  # keep the start-up out of the timing
        start = time.monotonic()
        with pytest.raises(WorkerError) as excinfo:
            short.run(_case_only_rank0_all_reduce, group="w2", timeout=60)
        assert time.monotonic() - start < 15
        assert not isinstance(excinfo.value, WorkerTimeout)
        assert list(excinfo.value.errors) == [0]
        assert "Timed out" in str(excinfo.value)  # gloo: "Timed out waiting 2000ms for recv ..."


def test_dead_worker_is_reported_with_exit_code_and_pool_recovers(pool: WorkerPool) -> None:
    starts = _started(pool)
    start = time.monotonic()
    with pytest.raises(WorkerError) as excinfo:
        pool.run(_case_exit_on_rank1, group="odd", timeout=60)
    assert time.monotonic() - start < 10  # noticed via the sentinel, not the timeout
    assert excinfo.value.exitcodes == {3: 3}
    assert "global rank 3 died: exit code 3" in str(excinfo.value)
    assert pool.run(_case_all_reduce_marker, group="odd") == [1010.0, 1010.0]
    assert pool.starts == starts + 1


def test_worker_killed_between_runs_is_replaced(pool: WorkerPool) -> None:
    pids = pool.run(_case_pid, group="w4")
    starts = pool.starts
    os.kill(pids[2], signal.SIGKILL)
    # Wait until the parent can reap it (a zombie whose threads are still
    # exiting counts as alive); only then is "died while idle" deterministic.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pids[2] in {p.pid for p in multiprocessing.active_children()}:
        time.sleep(0.02)
    assert pool.run(_case_all_reduce_marker, group="w4") == [1111.0] * 4
    assert pool.starts == starts + 1
    assert pids[2] not in pool.run(_case_pid, group="w4")
