"""Stop on a signal, save, and resume exactly: the part of launch/train.py that survives preemption.

Copy it along with train.py. Four pieces:

- ``StopSignal``: on SIGTERM (what SLURM and Kubernetes send before preempting a job, and what
  torchrun forwards to its workers) or SIGINT (Ctrl-C), every rank finishes its current step and
  all ranks agree, through one small all-reduce per step, to stop after the same step.
- ``Checkpoint.save``: rank 0 writes the file atomically (a temporary file in the same directory,
  fsync, ``os.replace``), so a save cut short leaves the previous checkpoint as it was.
- ``Checkpoint.resume``: loads and checks the file (readable, written by train.py, the same
  options and number of processes); anything else is a ``CheckpointError`` naming the file and
  the problem.
- ``ResumableSampler`` and the RNG states: where in its epoch the run stopped, and every rank's
  random-number generators, so that a resumed run retraces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import random
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

FORMAT = "launch/train.py checkpoint, version 1"
# Options a resumed run may change: where the checkpoint is and how often it is written, how long
# to wait for peers, and the backend (a checkpoint moves between GPU and CPU machines). Any other
# difference would make it a different run from the one it continues.
FREE_OPTIONS = ("ckpt", "resume", "ckpt_every", "timeout", "backend")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


@dataclass
class Position:
    """Where training stands: ``batches`` steps of epoch ``epoch`` done (0: at its start), and
    this rank's running sums over those steps (loss sum, correct predictions, samples)."""

    epoch: int = 0
    batches: int = 0
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


class StopSignal:
    """SIGTERM or SIGINT: stop after the current step, on every rank after the same step.

    A signal may reach the ranks at different moments, or only some of them (torchrun forwards
    the one it gets to all its workers, SLURM signals every task, ``kill`` reaches one process).
    The handler only notes it: ``agreed()``, which every rank calls after every step, all-reduces
    the notes, so that all ranks see the stop at the same step. After the first signal the
    default action is back: a second one ends the process at once.

    Install it once start-up is done. Before that a signal keeps its default action and ends the
    process at once, losing nothing (nothing has been trained since the checkpoint), whereas a
    noted signal would wait for blocking calls such as ``init_process_group``, which do not return
    to Python until their timeout when a peer is missing.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.received = 0  # the number of the signal this rank got, 0 for none
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame) -> None:
        self.received = signum  # no print here: the signal may interrupt a print
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self) -> str | None:
        """The name of a signal some rank received, or None. A collective: every rank calls it."""
        flag = torch.tensor([self.received])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag)).name if flag else None


def host_group(timeout: datetime.timedelta) -> dist.ProcessGroup | None:
    """The group for the small collectives on CPU tensors (the stop flag, the RNG states): the
    default group when it is gloo; beside NCCL, a gloo group of the same ranks, so that these
    need no CUDA tensor and no device synchronization."""
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way: ``set_epoch(epoch, skip)`` leaves out
    this rank's first ``skip`` samples of the epoch, those trained on before the checkpoint. The
    order itself depends only on the seed and the epoch, as DistributedSampler's does."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def rng_state(device: torch.device) -> dict:
    """This rank's random-number generators (add numpy's if your data pipeline draws from it)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:  # (a checkpoint from a CPU run has none)
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpoint:
    """The checkpoint file at ``path`` and what it holds: the bare model (the plain model's keys,
    as SyncBatchNorm has BatchNorm2d's, so it also loads without syncbn or DDP), the optimizer,
    the schedule, the options, where training stands, and every rank's RNG states and sums."""

    def __init__(self, path: str, config, model, optimizer, scheduler, device, group=None) -> None:
        self.path, self.config, self.device, self.group = path, config, device, group
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def save(self, position: Position) -> None:
        """Rank 0 writes the file, atomically. A collective: every rank calls it after the same
        step, to hand rank 0 its RNG states and running sums."""
        mine = {"rng": rng_state(self.device), "totals": position.totals}
        ranks = [mine]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size(self.group) if dist.get_rank() == 0 else None
            dist.gather_object(mine, ranks, dst=0, group=self.group)
            if dist.get_rank() != 0:
                return
        state = {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": position.epoch,
            "batches": position.batches,
            "config": dataclasses.asdict(self.config),
            "ranks": ranks,
        }
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points to it
        os.replace(temporary, self.path)  # atomic: the old checkpoint or the new one, never half of one
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)  # and so is the new name
        finally:
            os.close(directory)

    def resume(self) -> Position:
        """Load the file into the model, optimizer and schedule, restore this rank's RNG states,
        and return where training stands. Every rank calls it."""
        path = self.path
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:  # truncated, corrupt, or not a torch file at all
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {first_line}); it is truncated or "
                "corrupt. Restore a good copy, or delete it to start from scratch"
            ) from error
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = (
                f"format {state['format']!r}" if isinstance(state, dict) and "format" in state else "no format entry"
            )
            raise CheckpointError(
                f"checkpoint {path} was not written by this version of launch/train.py ({found}, expected {FORMAT!r})"
            )
        saved, now = state["config"], dataclasses.asdict(self.config)
        changed = [name for name in now if name not in FREE_OPTIONS and saved.get(name) != now[name]]
        if changed:
            flags = ", ".join(f"--{n.replace('_', '-')} {saved.get(n)} (this run: {now[n]})" for n in changed)
            raise CheckpointError(
                f"checkpoint {path} was written with other options: {flags}. Resume with the options it "
                "was written with, or give this run another --ckpt"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        if len(state["ranks"]) != world:
            raise CheckpointError(
                f"checkpoint {path} was written by {len(state['ranks'])} process(es), this run has {world}: the "
                "data order, the schedule and each rank's random states continue only on as many processes"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {error}") from error
        mine = state["ranks"][dist.get_rank() if dist.is_initialized() else 0]
        set_rng_state(mine["rng"], self.device)
        return Position(state["epoch"], state["batches"], mine["totals"])


def check_same_position(position: Position, path: str, group=None) -> None:
    """Raise on every rank unless all ranks start from the same point: a checkpoint on a disk that
    only some nodes see would have the others start from scratch, and the ranks would diverge."""
    if not dist.is_initialized():
        return
    positions = [None] * dist.get_world_size(group)
    dist.all_gather_object(positions, (position.epoch, position.batches), group=group)
    if len(set(positions)) > 1:
        seen = ", ".join(f"rank {r}: epoch {e} step {b}" for r, (e, b) in enumerate(positions))
        raise CheckpointError(
            f"the ranks start from different points ({seen}): every rank must see the same "
            f"checkpoint {path} (on several nodes, put it on a shared filesystem)"
        )


def shared_store_warning() -> str | None:
    """A warning for torchrun runs that can restart while sharing the rendezvous store, or None.

    torchrun (c10d rendezvous) hands its workers the TCPStore its agent keeps for the whole job,
    and a restarted worker group reuses it with the keys of the previous attempt still in it. A
    new gloo group may then read a dead worker's address (``Gloo connectFullMesh failed ...
    Connection refused``, costing a restart) or a port that a new worker now listens on, where it
    waits until the timeout. With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torchrun gives every
    attempt a fresh store, as launch/run_cpu.sh and launch/run_gpu.sh do.
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return (
            "warning: torchrun shares one rendezvous store across restarts, and a restarted group may "
            "read the previous attempt's addresses from it; start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/run_cpu.sh and run_gpu.sh do)"
        )
    return None
