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


def process_tree(pid: int) -> list[int]:
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
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, one thread per process, the repository importable, and ``env``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}


def _popen(args: list[str], env: dict[str, str] | None, cwd: Path) -> subprocess.Popen:
    """``args`` started with this environment, stdout and stderr merged, no stdin."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def run(
    args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``args``; return the completed process (stdout and stderr merged into ``.stdout``)."""
    proc = _popen(args, env, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)} did not finish in {timeout:g} s; output:\n{out}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


class Started:
    """A command running in the background, its output (stdout and stderr merged) collected line
    by line; ``finish`` or ``kill`` ends it and everything it started."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.args = args
        self.proc = _popen(args, env, cwd)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float) -> str:
        """Block until a line containing ``marker`` is printed; return that line. Raise if the
        command exits first or ``timeout`` seconds pass (then the command is killed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line with {marker!r} within {timeout:g} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"exited (code {self.proc.wait()}) before printing {marker!r}:\n{self.output}")
            if marker in line:
                return line

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the command to exit; past ``timeout`` seconds, kill it and raise."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{' '.join(self.args)} did not finish in {timeout:g} s; output:\n{self.output}"
            ) from None
        self._reader.join(10)
        return subprocess.CompletedProcess(self.args, self.proc.returncode, self.output, None)

    def kill(self) -> None:
        """SIGKILL the command and everything below it (nothing if it has exited)."""
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc.wait()
        self._reader.join(10)


def run_until_line(args: list[str], marker: str, timeout: float) -> str:
    """Run ``args`` until a line containing ``marker`` is printed, then SIGKILL its whole tree.

    The way a preempted job dies: no clean shutdown, no chance to write anything more. Returns
    the output up to and including that line.
    """
    started = Started(args)
    try:
        started.wait_for(marker, timeout)
        return "".join(started.lines)
    finally:
        started.kill()


def python(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter."""
    return run([sys.executable, *args], timeout=timeout, env=env)


def torchrun_command(*args: str, nproc: int = 2, options: tuple[str, ...] = ("--standalone",)) -> list[str]:
    """``torchrun OPTIONS --nproc-per-node N ARGS`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *options, f"--nproc-per-node={nproc}", *args]


def torchrun(
    *args: str,
    nproc: int = 2,
    timeout: float,
    options: tuple[str, ...] = ("--standalone",),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``torchrun OPTIONS --nproc-per-node N ARGS`` with this interpreter (``--standalone`` by default)."""
    return run(torchrun_command(*args, nproc=nproc, options=options), timeout=timeout, env=env)
