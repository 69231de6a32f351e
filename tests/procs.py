"""Run a command (torchrun, accelerate launch, the syncbn CLI) as a test would: with a deadline.

On timeout the whole process tree the command started is killed, not just the direct child,
so no worker outlives the test. A process group is not enough: torchrun starts each worker in
a session of its own, so the tree is collected from /proc (parent links) before anything is
killed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc; just ``pid`` elsewhere)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a job scheduler ending a job does."""
    for member in _tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(
    args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``args``; return the completed process (stdout and stderr merged into ``.stdout``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)} did not finish in {timeout:g} s; output:\n{out}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def run_until_line(args: list[str], marker: str, timeout: float) -> str:
    """Run ``args`` until a line containing ``marker`` is printed, then SIGKILL its whole tree.

    The way a preempted job dies: no clean shutdown, no chance to write anything more. Returns
    the output up to and including that line.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {marker!r} within {timeout:g} s:\n{''.join(seen)}") from None
            if line is None:
                raise AssertionError(f"exited (code {proc.wait()}) before printing {marker!r}:\n{''.join(seen)}")
            seen.append(line)
            if marker in line:
                return "".join(seen)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
        reader.join(10)


def python(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter."""
    return run([sys.executable, *args], timeout=timeout, env=env)


def torchrun(*args: str, nproc: int = 2, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` with this interpreter."""
    return python("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args, timeout=timeout)
