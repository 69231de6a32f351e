"""A persistent pool of gloo worker processes for multi-process tests.

Why this exists
---------------
Every ``torch.distributed`` test needs several processes. Spawning a fresh
world per test costs seconds (each process imports torch and joins a gloo
rendezvous), and on a 2-core CI machine that adds up to minutes for a few
dozen tests. Instead, :class:`WorkerPool` starts ``MAX_WORLD`` workers *once*
per pytest session (like PyTorch's ``MultiProcContinuousTest``), creates a
fixed set of named process groups on them, and then runs many small test
*cases* on the already-initialised world.

Writing a case
--------------
A case is a **module-level** function in a test file (it is pickled by
reference, so lambdas and nested functions cannot be used)::

    def _case_sum(ctx: CaseContext, value: float) -> torch.Tensor:
        t = torch.tensor([value * (ctx.rank + 1)])
        dist.all_reduce(t, group=ctx.group)
        return t

    def test_sum(pool):
        results = pool.run(_case_sum, group="w2", args=(1.0,))
        assert [r.item() for r in results] == [3.0, 3.0]

``ctx.rank``/``ctx.world_size`` are relative to the group the case runs on;
always pass ``group=ctx.group`` to collectives (it is ``None`` for ``"w4"``,
the default world). Group names: ``"w1"`` [0], ``"w2"`` [0, 1], ``"w3"``
[0, 1, 2], ``"w4"`` the whole world, ``"odd"`` [1, 3] (does not contain rank
0), and ``"pairs"``: two independent groups [0, 1] and [2, 3] running the case
at the same time. Return values (tensors included, strides and dtypes kept)
come back as a list ordered by global rank, which for every group but
``"pairs"`` is also the order of ranks within the group. Arguments and return
values travel through ``torch.save`` bytes, so they must be picklable (not
``ctx`` itself: a ``ProcessGroup`` is not), and a tensor view carries its
whole storage.

A case that *expects* an exception should catch it itself (e.g. with
``pytest.raises`` inside the case) and return normally: any exception that
escapes a case fails the run.

Failure, timeout and recovery
-----------------------------
* An exception on any rank makes :meth:`WorkerPool.run` raise
  :class:`WorkerError` (an ``AssertionError``) carrying every failing rank's
  traceback. The other ranks get a short grace period to finish; ranks still
  busy after it are almost always blocked in a collective the failing rank
  never reached.
* A rank that does not answer within ``timeout`` seconds (for example a
  collective called by only some ranks) makes ``run`` raise
  :class:`WorkerTimeout`, which names the silent ranks and includes their
  Python stacks at the moment they were given up on.
* A worker that dies (segfault, ``os._exit``) is noticed at once through its
  process sentinel and reported with its exit code.

After any failed run the pool is torn down (workers are killed, never
trusted again: their process groups may be out of step and the failed case
may have left global torch state behind) and the next :meth:`WorkerPool.run`
transparently starts a fresh one, at the price of one start-up (a few
seconds). The process-group timeout (``pg_timeout``) is a second line of
defence: even with no parent watching, gloo gives up on a stuck collective
after that long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import io
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

__all__ = [
    "GROUPS",
    "MAX_WORLD",
    "CaseContext",
    "WorkerError",
    "WorkerPool",
    "WorkerTimeout",
]

MAX_WORLD = 4

#: Named groups: each name maps to one or more disjoint lists of global ranks.
#: A case runs on every rank listed; ``"pairs"`` runs two groups side by side.
#: The dict order is the order in which every worker calls ``dist.new_group``
#: (torch requires all ranks to create every group, in the same order).
GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "w1": ((0,),),
    "w2": ((0, 1),),
    "w3": ((0, 1, 2),),
    "w4": (tuple(range(MAX_WORLD)),),
    "odd": ((1, 3),),
    "pairs": ((0, 1), (2, 3)),
}

#: Environment for the workers: one OpenMP thread each (2-core CI machine),
#: unbuffered output so prints of a worker that is later killed are not lost.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class CaseContext:
    """What a case function learns about where it runs."""

    rank: int
    """Rank within ``group``."""
    world_size: int
    """Size of ``group``."""
    global_rank: int
    """Rank in the default (4-process) world."""
    group: Any
    """The ``ProcessGroup`` to pass to collectives; ``None`` means the default world."""
    group_name: str


class WorkerError(AssertionError):
    """A case failed on at least one rank, or a worker died.

    ``errors`` maps global rank to formatted traceback, ``exitcodes`` maps the
    global rank of dead workers to their exit code, and ``missing`` lists the
    global ranks that gave no answer.
    """

    def __init__(
        self,
        message: str,
        errors: dict[int, str] | None = None,
        exitcodes: dict[int, int | None] | None = None,
        missing: Sequence[int] = (),
    ) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})
        self.exitcodes = dict(exitcodes or {})
        self.missing = list(missing)


class WorkerTimeout(WorkerError, TimeoutError):
    """Some ranks did not answer in time, while none of them reported an error."""


# --------------------------------------------------------------------------
# Serialisation. Everything crossing a pipe goes through torch.save into
# plain bytes: tensors arrive intact (dtype, strides, requires_grad) and, unlike
# torch.multiprocessing's shared-memory pickling, no file descriptor or shm
# segment is created per tensor, so thousands of tasks cannot exhaust fds.
# --------------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    # Only ever loads bytes produced by our own processes.
    return torch.load(io.BytesIO(data), weights_only=False)


def _task_message(seq: int, group_name: str, payload: bytes) -> bytes:
    """Frame a task: a plain-pickled header around the torch.save'd payload.

    The header only holds builtins, so the worker can always read ``seq`` and
    report a payload it cannot unpickle (e.g. the case's module does not
    import) as an ordinary error instead of crashing.
    """
    return pickle.dumps((seq, group_name, payload), protocol=pickle.HIGHEST_PROTOCOL)


_SHUTDOWN = pickle.dumps(None)


# --------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------


def _worker_main(
    global_rank: int,
    world_size: int,
    store_port: int,
    pg_timeout_s: float,
    start_timeout_s: float,
    conn: Connection,
    stack_dump_path: str,
) -> None:
    """Entry point of a worker: join the world, build the groups, serve tasks."""
    # Ctrl-C reaches the whole process group; the parent owns shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    # On request (SIGUSR1, sent by the parent before killing a hung worker)
    # dump every thread's Python stack to a file the parent reads back.
    dump_file = open(stack_dump_path, "a")  # noqa: SIM115 - lives as long as the process
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=dump_file, all_threads=True)

    try:
        # Rendezvous gets the generous start-up timeout: on a loaded machine
        # the workers finish importing torch seconds apart, and a short
        # pg_timeout (as a test may choose) must not make start-up fail.
        # Collectives then get pg_timeout. Without torch's (private) setter,
        # fall back to pg_timeout for both.
        op_timeout = datetime.timedelta(seconds=pg_timeout_s)
        can_retime = hasattr(dist.distributed_c10d, "_set_pg_timeout")
        timeout = datetime.timedelta(seconds=start_timeout_s) if can_retime else op_timeout
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=global_rank, world_size=world_size, timeout=timeout)
        groups = _build_groups(global_rank, timeout)
        if can_retime:
            for ctx in groups.values():
                dist.distributed_c10d._set_pg_timeout(op_timeout, ctx.group)
    except BaseException:
        conn.send_bytes(_dumps(("init-error", traceback.format_exc())))
        return
    conn.send_bytes(_dumps(("ready", None)))

    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # The parent is gone: exit without touching the (shared) world.
        header = pickle.loads(message)
        if header is None:
            break
        reply = _execute(*header, groups)
        try:
            conn.send_bytes(reply)
        except OSError:
            return
    # Clean exit only: a worker being torn down after a failure may be stuck
    # in gloo, and destroying its process group could block.
    dist.destroy_process_group()
    dump_file.close()


def _build_groups(global_rank: int, timeout: datetime.timedelta) -> dict[str, CaseContext]:
    """Create every named group (all ranks, same order); keep this rank's view."""
    contexts: dict[str, CaseContext] = {}
    for name, rank_lists in GROUPS.items():
        for ranks in rank_lists:
            is_world = list(ranks) == list(range(dist.get_world_size()))
            pg = None if is_world else dist.new_group(list(ranks), timeout=timeout)
            if global_rank in ranks:
                contexts[name] = CaseContext(
                    rank=ranks.index(global_rank),
                    world_size=len(ranks),
                    global_rank=global_rank,
                    group=pg,
                    group_name=name,
                )
    return contexts


def _execute(seq: int, group_name: str, payload: bytes, groups: dict[str, CaseContext]) -> bytes:
    """Run one task; always return a reply tagged with its seq, never raise."""
    try:
        fn, args, kwargs, extra = _loads(payload)
        value = fn(groups[group_name], *args, *extra, **kwargs)
        return _dumps(("ok", seq, value))
    except BaseException:  # SystemExit from a case is a failure too
        return _dumps(("error", seq, traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables only while workers are being spawned.

    ``spawn`` children copy the parent's environment at start, so this is how
    the workers get ``OMP_NUM_THREADS=1`` without changing the parent for good.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


class _Generation:
    """One started set of workers; discarded as a whole after any failure."""

    def __init__(self, pg_timeout: float, start_timeout: float) -> None:
        self.tmpdir = tempfile.TemporaryDirectory(prefix="syncbn-pool-")
        # The parent hosts the rendezvous store: port 0 lets the OS choose a
        # free port, so there is no pick-then-bind race with other sessions.
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=start_timeout),
        )
        mp = torch_mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.dump_paths: list[str] = []
        # Registered before anything starts (it sees the lists fill up), so a
        # failure half-way through start-up still kills what was started.
        self._finalizer = weakref.finalize(self, _kill, self.procs, self.conns, self.tmpdir)
        try:
            with _patched_environ(_WORKER_ENV):
                for rank in range(MAX_WORLD):
                    parent_end, child_end = mp.Pipe(duplex=True)
                    self.conns.append(parent_end)
                    dump_path = os.path.join(self.tmpdir.name, f"stack-{rank}.txt")
                    proc = mp.Process(
                        target=_worker_main,
                        args=(
                            rank,
                            MAX_WORLD,
                            self.store.port,
                            pg_timeout,
                            start_timeout,
                            child_end,
                            dump_path,
                        ),
                        name=f"dist-pool-rank{rank}",
                    )
                    proc.start()
                    # Drop our copy of the child's end so its death reads as EOF.
                    child_end.close()
                    self.procs.append(proc)
                    self.dump_paths.append(dump_path)
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stacks(self, ranks: Sequence[int], wait_s: float = 2.0) -> dict[int, str]:
        """Ask hung workers for their Python stacks (best effort, usually ~0.1 s).

        faulthandler writes the dump from the signal handler, so it works even
        while the worker is blocked inside gloo; on a busy 2-core machine the
        worker may need a moment to be scheduled, hence the short poll for the
        file to appear and stop growing.
        """
        if not hasattr(signal, "SIGUSR1"):
            return {}
        asked = []
        for rank in ranks:
            with contextlib.suppress(OSError):
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
                asked.append(rank)
        sizes = dict.fromkeys(asked, 0)
        deadline = time.monotonic() + wait_s
        while sizes and time.monotonic() < deadline:
            time.sleep(0.05)
            for rank, last in list(sizes.items()):
                size = _file_size(self.dump_paths[rank])
                if size and size == last:
                    del sizes[rank]  # non-empty and no longer growing
                else:
                    sizes[rank] = size
        out = {}
        for rank in asked:
            with contextlib.suppress(OSError), open(self.dump_paths[rank]) as f:
                text = f.read().strip()
            if text:
                out[rank] = _trim_stack(text)
        return out

    def kill(self) -> None:
        """Tear down without ceremony: the workers may be stuck in gloo."""
        self._finalizer()
        self.store = None  # closes the rendezvous server

    def shutdown(self, timeout: float) -> None:
        """Ask workers to leave the world cleanly; kill whoever lingers."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(_SHUTDOWN)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _trim_stack(dump: str) -> str:
    """Cut the pool's own plumbing (below ``_execute``) out of a faulthandler dump."""
    kept: list[str] = []
    skipping = False
    for line in dump.splitlines():
        if not line.startswith("  "):  # a "Thread 0x... (most recent call first):" header
            skipping = False
        if not skipping:
            kept.append(line)
        if line.startswith("  ") and line.endswith(" in _execute"):
            skipping = True
    return "\n".join(kept)


def _kill(procs: list[Any], conns: list[Connection], tmpdir: tempfile.TemporaryDirectory[str]) -> None:
    """Terminate, then kill, every worker; release pipes and the temp dir."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
        with contextlib.suppress(ValueError):  # ValueError: somehow still running
            proc.close()  # releases the sentinel fd
    for conn in conns:
        conn.close()
    tmpdir.cleanup()


class WorkerPool:
    """``MAX_WORLD`` spawned gloo workers that run test cases on named groups.

    Workers start lazily on the first :meth:`run` and again after any failed
    run. Use :meth:`close` (or ``with WorkerPool() as pool:``) to shut down;
    a finaliser kills leftover workers if that is forgotten.
    """

    def __init__(
        self,
        *,
        pg_timeout: float = 60.0,
        start_timeout: float = 120.0,
        error_grace: float = 3.0,
    ) -> None:
        """
        Args:
            pg_timeout: gloo collective timeout inside the workers, in seconds; the
                bound on how long a stuck collective can block a worker that
                nobody kills.
            start_timeout: how long starting the workers may take; also the
                rendezvous (store, init, new_group) timeout inside them.
            error_grace: after one rank fails, how long the others get to
                finish before they are presumed stuck in a collective.
        """
        self.pg_timeout = pg_timeout
        self.start_timeout = start_timeout
        self.error_grace = error_grace
        self.starts = 0
        """How many times workers were started (1 + number of restarts)."""
        self._gen: _Generation | None = None
        self._seq = 0

    def __repr__(self) -> str:
        state = "running" if self._gen is not None else "stopped"
        return f"<WorkerPool {state}, started {self.starts}x, {self._seq} tasks>"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Shut the workers down cleanly (they destroy their process group)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.shutdown(timeout)

    def _discard(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.kill()

    def _ensure_started(self) -> _Generation:
        if self._gen is not None and not self._gen.alive():
            self._discard()  # An idle worker died since the last run.
        if self._gen is None:
            self._start()
        assert self._gen is not None
        return self._gen

    def _start(self) -> None:
        gen = _Generation(self.pg_timeout, self.start_timeout)
        self._gen = gen
        self.starts += 1
        try:
            replies = self._collect(gen, range(MAX_WORLD), self.start_timeout, seq=None)
        except BaseException:
            self._discard()
            raise
        if replies.failed:
            raise self._fail(gen, replies, "starting the worker pool")

    # -- running cases -----------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        group: str = "w2",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        per_rank_args: Sequence[Any] | None = None,
        timeout: float = 60.0,
    ) -> list[Any]:
        """Run ``fn(ctx, *args, [per_rank_arg,] **kwargs)`` on every rank of ``group``.

        Returns the return values ordered by global rank (= rank within the
        group, except for ``"pairs"``). ``per_rank_args``, if given, has one
        entry per participating rank in that same order. Raises
        :class:`WorkerError` / :class:`WorkerTimeout` on failure, after which
        the pool restarts on next use.
        """
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; choose from {sorted(GROUPS)}")
        qualname = getattr(fn, "__qualname__", "")
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(f"{qualname} cannot be sent to the workers: cases must be module-level functions")
        ranks = sorted(r for ranks in GROUPS[group] for r in ranks)
        if per_rank_args is not None and len(per_rank_args) != len(ranks):
            raise ValueError(f"per_rank_args has {len(per_rank_args)} entries, group {group!r} has {len(ranks)} ranks")
        self._seq += 1
        # Serialise everything before sending anything: an unpicklable
        # argument then fails here without disturbing the workers.
        messages = [
            _task_message(
                self._seq,
                group,
                _dumps(
                    (
                        fn,
                        tuple(args),
                        dict(kwargs or {}),
                        () if per_rank_args is None else (per_rank_args[i],),
                    )
                ),
            )
            for i in range(len(ranks))
        ]
        gen = self._ensure_started()
        try:
            for rank, message in zip(ranks, messages):
                with contextlib.suppress(OSError):  # a dead worker shows up below
                    gen.conns[rank].send_bytes(message)
            replies = self._collect(gen, ranks, timeout, seq=self._seq)
        except BaseException:
            self._discard()  # e.g. KeyboardInterrupt mid-case: workers are in an unknown state
            raise
        if replies.failed:
            name = f"{getattr(fn, '__module__', '?')}.{qualname}"
            raise self._fail(gen, replies, f"case {name} on group {group!r}")
        return [replies.values[r] for r in ranks]

    def _fail(self, gen: _Generation, replies: _Replies, what: str) -> WorkerError:
        """Grab the stuck ranks' stacks, tear the pool down, build the error."""
        replies.stacks = gen.stacks(replies.missing)
        self._discard()
        return replies.to_error(what)

    def _collect(self, gen: _Generation, ranks: Sequence[int], timeout: float, seq: int | None) -> _Replies:
        """Wait for one reply per rank, a death, or the deadline; never longer."""
        replies = _Replies(timeout=timeout, grace=self.error_grace)
        pending = set(ranks)
        broken: set[int] = set()  # pipe hit EOF: the worker is dying, await its sentinel
        deadline = time.monotonic() + timeout
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            by_conn = {gen.conns[r]: r for r in pending - broken}
            by_sentinel = {gen.procs[r].sentinel: r for r in pending}
            # Blocks (no polling) until a reply arrives or a worker exits.
            ready = wait([*by_conn, *by_sentinel], timeout=deadline - now)
            # Replies first: a worker may answer and then exit.
            for obj in ready:
                if obj in by_conn and by_conn[obj] in pending:
                    rank = by_conn[obj]
                    try:
                        data = obj.recv_bytes()
                    except (EOFError, OSError):
                        broken.add(rank)  # died; its sentinel reports it
                        continue
                    pending.discard(rank)
                    try:
                        reply = _loads(data)
                    except Exception:  # e.g. a returned object of a class the parent lacks
                        tb = traceback.format_exc()
                        replies.errors[rank] = f"its reply could not be unpickled:\n{tb}"
                    else:
                        replies.add(rank, reply, seq)
            for obj in ready:
                if obj in by_sentinel and by_sentinel[obj] in pending:
                    rank = by_sentinel[obj]
                    proc = gen.procs[rank]
                    proc.join(1.0)
                    pending.discard(rank)
                    replies.exitcodes[rank] = proc.exitcode
            if replies.failed and not replies.in_grace:
                # Someone failed: the rest get a short grace, then are presumed stuck.
                replies.in_grace = True
                deadline = min(deadline, time.monotonic() + self.error_grace)
        replies.missing = sorted(pending)
        return replies


@dataclasses.dataclass
class _Replies:
    """What came back from one task (or from start-up, with ``seq=None``)."""

    timeout: float
    grace: float
    values: dict[int, Any] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    exitcodes: dict[int, int | None] = dataclasses.field(default_factory=dict)
    missing: list[int] = dataclasses.field(default_factory=list)
    stacks: dict[int, str] = dataclasses.field(default_factory=dict)
    in_grace: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.exitcodes or self.missing)

    def add(self, rank: int, reply: tuple[Any, ...], seq: int | None) -> None:
        kind = reply[0]
        if seq is None:  # start-up handshake: ("ready", None) / ("init-error", tb)
            if kind != "ready":
                self.errors[rank] = reply[1]
            return
        if reply[1] != seq:
            self.errors[rank] = f"protocol error: reply for task {reply[1]}, expected {seq}"
        elif kind == "ok":
            self.values[rank] = reply[2]
        else:
            self.errors[rank] = reply[2]

    def to_error(self, what: str) -> WorkerError:
        parts: list[str] = []
        for rank in sorted(self.errors):
            parts.append(f"--- global rank {rank} raised:\n{self.errors[rank].rstrip()}")
        for rank in sorted(self.exitcodes):
            parts.append(f"--- global rank {rank} died: {_describe_exit(self.exitcodes[rank])}")
        if self.missing:
            if self.in_grace:
                why = (
                    f"were still running {self.grace:g} s after another rank failed "
                    "(probably blocked in a collective the failing rank never reached)"
                )
            else:
                why = f"did not answer within {self.timeout:g} s"
            parts.append(f"--- global ranks {self.missing} {why}")
            if self.values:
                parts.append(f"--- global ranks {sorted(self.values)} returned normally")
            for rank, stack in sorted(self.stacks.items()):
                parts.append(f"--- Python stack of global rank {rank} when given up on:\n{stack}")
        summary = ", ".join(
            filter(
                None,
                [
                    f"ranks {sorted(self.errors)} raised" if self.errors else "",
                    f"ranks {sorted(self.exitcodes)} died" if self.exitcodes else "",
                    f"ranks {self.missing} did not answer" if self.missing else "",
                ],
            )
        )
        message = f"{what} failed: {summary}. The worker pool was shut down and restarts on next use.\n" + "\n".join(
            parts
        )
        cls = WorkerTimeout if not (self.errors or self.exitcodes) else WorkerError
        return cls(message, errors=self.errors, exitcodes=self.exitcodes, missing=self.missing)
