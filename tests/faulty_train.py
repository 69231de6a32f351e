"""launch/train.py with faults injected at chosen moments: what the preemption tests run.

    torchrun --max-restarts 2 ... tests/faulty_train.py --fault 0:1:kill:step:5 --fault 1:0:kill:save:2 \\
        --ckpt ckpt.pt ...                                      # and launch/train.py's options

Each ``--fault ATTEMPT:RANK:ACTION:MOMENT:N``: in torchrun's attempt ATTEMPT (its
TORCHELASTIC_RESTART_COUNT; 0 outside torchrun), rank RANK does ACTION at the N-th MOMENT of that
attempt. Moments: ``step`` (inside the forward of the N-th training step), ``save`` (the N-th
checkpoint: rank 0 with half of its bytes in the temporary file, another rank right after it
handed rank 0 its states, while rank 0 writes), ``eval`` (inside the N-th forward
in eval mode), ``start`` (just before init_process_group: the restart itself). Actions: ``kill``
(SIGKILL itself), ``term`` (SIGTERM itself), ``term-agent`` (SIGTERM its parent, the torchrun
agent, which forwards it to every worker).

The signals are real and so is the rest: launch/train.py runs unchanged; only the moment of the
fault is chosen, which a kill from outside cannot do within a few-millisecond step.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "launch"))
import checkpoint  # noqa: E402
import train  # noqa: E402

ACTIONS = {
    "kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "term": lambda: os.kill(os.getpid(), signal.SIGTERM),
    "term-agent": lambda: os.kill(os.getppid(), signal.SIGTERM),
}
MOMENTS = ("step", "eval", "save", "start")


def parse_fault(text: str) -> tuple[int, int, str, str, int]:
    attempt, rank, action, moment, n = text.split(":")
    if action not in ACTIONS or moment not in MOMENTS:
        raise argparse.ArgumentTypeError(f"{text}: ACTION is one of {list(ACTIONS)}, MOMENT one of {MOMENTS}")
    return int(attempt), int(rank), action, moment, int(n)


def install(faults: list[tuple[int, int, str, str, int]]) -> None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    mine = {(moment, n): action for a, r, action, moment, n in faults if (a, r) == (attempt, rank)}
    seen = Counter()

    def arrive(moment: str) -> None:
        seen[moment] += 1
        if (moment, seen[moment]) in mine:
            print(f"fault: rank {rank}, attempt {attempt}: {mine[moment, seen[moment]]} at {moment} {seen[moment]}")
            sys.stdout.flush()
            ACTIONS[mine[moment, seen[moment]]]()

    forward = train.ResNet.forward

    def faulty_forward(self, x):
        arrive("step" if self.training else "eval")
        return forward(self, x)

    save = torch.save
    checkpoint_save = checkpoint.Checkpoint.save

    def faulty_checkpoint_save(self, position):
        checkpoint_save(self, position)
        if rank != 0:  # (rank 0 arrives inside the write)
            arrive("save")

    def faulty_save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # torch's object collectives serialize through torch.save too
            return save(obj, f, *args, **kwargs)
        if ("save", seen["save"] + 1) not in mine:
            seen["save"] += 1
            return save(obj, f, *args, **kwargs)
        data = io.BytesIO()
        save(obj, data, *args, **kwargs)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        arrive("save")
        f.write(data.getvalue()[len(data.getvalue()) // 2 :])  # (still alive: the signal was only noted)

    init_process_group = dist.init_process_group

    def faulty_init(*args, **kwargs):
        arrive("start")
        return init_process_group(*args, **kwargs)

    train.ResNet.forward = faulty_forward
    torch.save = faulty_save
    checkpoint.Checkpoint.save = faulty_checkpoint_save
    dist.init_process_group = faulty_init


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--fault", type=parse_fault, action="append", default=[], help="ATTEMPT:RANK:ACTION:MOMENT:N")
    args, train_args = parser.parse_known_args()  # the rest: launch/train.py's options
    install(args.fault)
    train.main(train.parse_config(train_args))
    print(f"faulty_train: rank {os.environ.get('RANK', '0')} returned from main", flush=True)  # a clean exit follows
