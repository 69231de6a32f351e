"""Train a small ResNet on several processes with synchronized BatchNorm: a template to copy.

    bash launch/run_cpu.sh                                        # 2 CPU processes (gloo), ~30 s
    torchrun --standalone --nproc-per-node 2 launch/train.py      # the same, by hand
    bash launch/run_gpu.sh --amp bf16 --channels-last             # every GPU of this node (NCCL)
    python launch/train.py                                        # one process, no torchrun
    MAX_RESTARTS=3 bash launch/run_cpu.sh --ckpt ckpt.pt --ckpt-every 100 --resume   # survives kills

The syncbn part is one line, marked "syncbn:" below: build the model with ordinary
nn.BatchNorm2d layers, convert them with ``syncbn.convert_sync_batchnorm`` and only then wrap
the model in DistributedDataParallel. Every BatchNorm then normalizes over the global batch (all
ranks' samples), as one process with the whole batch would. The rest is the usual DDP skeleton:
a DistributedSampler, a loss averaged over the global batch, metrics summed over ranks, rank 0
alone prints and saves the checkpoint, every rank loads it to resume.

Preemption (launch/checkpoint.py, next to this file: copy both). On SIGTERM or SIGINT every rank
finishes its step, the ranks agree to stop after the same one, rank 0 writes the checkpoint and
all exit 0. A checkpoint (every epoch, every ``--ckpt-every`` steps, on a signal) holds the model
with its running statistics, the optimizer, the schedule, the position in the epoch and every
rank's RNG states: ``--resume`` continues mid-epoch exactly where the run stopped, bit for bit.

``--precise-bn N`` recomputes every BatchNorm's running statistics over N training batches per
rank before the final evaluation (``syncbn.update_bn_stats``) and prints the validation scores
before and after. ``--bn local`` keeps plain nn.BatchNorm2d (each rank normalizes with its own
few samples) to show what synchronization buys at a small per-rank batch. ``--data synthetic``
(the default) runs anywhere with no download; ``--data digits`` trains on scikit-learn's bundled 8x8 digit
images (``pip install scikit-learn``, or the ``syncbn[digits]`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import checkpoint  # launch/checkpoint.py, next to this file: signals, checkpoint file, exact resume
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset

import syncbn


def option(default, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None):
    """A Config field that is also a command-line option (--name-with-dashes); a number below
    ``minimum`` (or not finite) is rejected."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class Config:
    data: str = option(
        "synthetic",
        "synthetic: generated 3x16x16 images of 10 classes, no download; "
        "digits: scikit-learn's 1797 bundled 8x8 digit images",
        ("synthetic", "digits"),
    )
    epochs: int = option(3, "passes over the training set", minimum=1)
    batch_size: int = option(16, "samples per rank per step (the global batch is this times the world size)", minimum=1)
    lr: float = option(0.1, "peak SGD learning rate, cosine-decayed to 0 over the run", minimum=0)
    weight_decay: float = option(5e-4, "SGD weight decay", minimum=0)
    width: int = option(16, "channels of the first stage (doubled at each of the two later stages)", minimum=1)
    # At least 4: the validation set is a quarter as many images and must not be empty.
    train_size: int = option(4096, "synthetic training images (validation: a quarter as many more)", minimum=4)
    bn: str = option(
        "sync", "sync: syncbn.SyncBatchNorm over all ranks; local: plain nn.BatchNorm2d per rank", ("sync", "local")
    )
    precise_bn: int = option(
        0,
        "before the final evaluation, recompute every BatchNorm's running statistics over N training batches "
        "per rank (syncbn.update_bn_stats; the checkpoint keeps those of training); 0: off",
    )
    backend: str = option(
        "auto",
        "auto: nccl with CUDA tensors when CUDA is present, else gloo with CPU tensors",
        ("auto", "nccl", "gloo"),
    )
    channels_last: bool = option(False, "train in the channels_last memory format")
    amp: str = option(
        "none", "bf16: torch.autocast to bfloat16 (CPU and GPU); parameters stay float32", ("none", "bf16")
    )
    augment: bool = option(False, "mirror each training image left-right with probability 1/2 (draws from the RNG)")
    ckpt: str = option(
        "", "checkpoint file, written by rank 0 after every epoch, every --ckpt-every steps and on SIGTERM/SIGINT"
    )
    ckpt_every: int = option(0, "also write the checkpoint every this many steps (0: not within epochs)", minimum=0)
    resume: bool = option(False, "continue from --ckpt if that file exists (a requeued job can always pass it)")
    timeout: float = option(
        600.0, "seconds to wait for the other ranks, at start-up and in every collective, before failing", minimum=1
    )
    seed: int = option(0, "seed of the data, the initial weights and the shuffling")


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Train a small ResNet with synchronized BatchNorm (see the top of this file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flags = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        if f.type == "bool":
            parser.add_argument(flags[f.name], action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(
                flags[f.name], type=kind, default=f.default, choices=f.metadata["choices"], help=f.metadata["help"]
            )
    args = parser.parse_args(argv)
    # A bad value stops here with argparse's one-line error (exit code 2), before any process
    # group or data exists, instead of failing later inside the run with a traceback.
    for f in dataclasses.fields(Config):
        low, value = f.metadata["minimum"], getattr(args, f.name)
        if low is not None and not low <= value < math.inf:  # NaN fails the comparison too
            bound = f">= {low}" if f.type == "int" else f"a finite number >= {low}"
            parser.error(f"argument {flags[f.name]}: must be {bound}, got {value}")
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error(
            "argument --backend: nccl needs CUDA and torch sees no CUDA device; "
            "use --backend gloo, as launch/run_cpu.sh does"
        )
    if args.ckpt_every and not args.ckpt:
        parser.error("argument --ckpt-every: needs --ckpt, the file to write")
    if args.ckpt and not os.path.isdir(os.path.dirname(os.path.abspath(args.ckpt))):
        parser.error(f"argument --ckpt: the directory of {args.ckpt} does not exist")
    return Config(**vars(args))


# ---------------------------------------------------------------------------------------------
# Model: a ResNet with three stages of one BasicBlock each (8 conv layers, 9 BatchNorm layers)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (He et al., 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # match the shape of the residual branch
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 4 * width, 2),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# Data: built identically on every rank (seeded); the sampler gives each rank its share


def synthetic_dataset(n: int, seed: int, num_classes: int = 10, size: int = 16) -> TensorDataset:
    """Noisy, shifted, re-lit copies of one smooth random colour pattern per class."""
    gen = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=gen), size=size, mode="bilinear")
    labels = torch.randint(num_classes, (n,), generator=gen)
    images = templates[labels]
    shifts = torch.randint(-3, 4, (n, 2), generator=gen)
    images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    contrast = torch.rand(n, 1, 1, 1, generator=gen) * 1.5 + 0.25
    brightness = torch.randn(n, 3, 1, 1, generator=gen) * 0.5
    images = images * contrast + brightness + torch.randn(images.shape, generator=gen)
    return TensorDataset(images, labels)


def digits_dataset() -> TensorDataset:
    """scikit-learn's 8x8 digits (1797 images, values 0..16), as (N, 1, 8, 8) floats."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("--data digits needs scikit-learn: pip install scikit-learn (or syncbn[digits])")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    return TensorDataset((images - 4.9) / 6.0, torch.tensor(digits.target))  # about zero mean, unit std


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (draws from the RNG of the images' device)."""
    flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset, int, int]:
    """(train, validation, input channels, classes)."""
    if cfg.data == "digits":
        full = digits_dataset()
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = len(full) // 5
        images, labels = full.tensors
        val = TensorDataset(images[order[:n_val]], labels[order[:n_val]])
        train = TensorDataset(images[order[n_val:]], labels[order[n_val:]])
        return train, val, 1, 10
    full = synthetic_dataset(cfg.train_size + cfg.train_size // 4, seed=cfg.seed)
    images, labels = full.tensors
    train = TensorDataset(images[: cfg.train_size], labels[: cfg.train_size])
    val = TensorDataset(images[cfg.train_size :], labels[cfg.train_size :])
    return train, val, 3, 10


# ---------------------------------------------------------------------------------------------
# Logging


class Progress:
    """Rank 0's one-line progress bar: redrawn in place on a terminal; in a log file, one line
    every 10 s at most (short epochs print nothing until their summary)."""

    def __init__(self, total: int, prefix: str, enabled: bool) -> None:
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.tty = enabled and sys.stdout.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, status) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.2 if self.tty else 10.0) or (done == self.total and not self.tty):
            return  # (a log file gets the epoch's summary line right after its last step)
        self.last = now
        filled = 30 * done // self.total
        line = f"{self.prefix} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {status()}"
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.tty:
            print("\r\033[K", end="", flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, memory_format, autocast) -> tuple[float, float, int]:
    """Mean loss and accuracy over the whole validation set (each rank scores its share).

    ``model`` is the bare model, not the DDP wrapper: DDP's forward would broadcast buffers (a
    collective), and ranks with a different number of validation batches would then wait on each
    other. In eval mode the BatchNorm layers use their running statistics, so no communication
    is needed at all.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in DataLoader(dataset, batch_size=256):
        x, y = x.to(device, memory_format=memory_format), y.to(device)
        with autocast:
            logits = model(x)
        totals += torch.stack(
            [
                F.cross_entropy(logits.float(), y, reduction="sum"),
                (logits.argmax(1) == y).sum(),
                torch.tensor(len(y), device=device),
            ]
        ).double()
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return loss_sum / count, correct / count, int(count)


# ---------------------------------------------------------------------------------------------
# Training


def main(cfg: Config) -> None:
    # Distributed setup. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; without
    # it this is a single process and the BatchNorm layers are plain BatchNorm.
    distributed = "RANK" in os.environ
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = 0, 0, 1
    if distributed:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.timeout)
    if distributed:
        # With a timeout, a group that cannot form (a peer that died or never came) is an error
        # after --timeout, so that torchrun can restart the workers, instead of a 30-minute wait.
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    host_group = checkpoint.host_group(timeout)  # the stop flag and RNG states travel on CPU tensors
    master = rank == 0  # rank 0 alone prints and writes the checkpoint
    if master and (warning := checkpoint.shared_store_warning()):
        print(warning, flush=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")

    # Data: each rank sees a different 1/world of the shuffled training set every epoch.
    train_set, val_set, in_channels, num_classes = build_datasets(cfg)
    sampler = checkpoint.ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    # The loader draws a seed for its worker processes at every epoch: from a generator of its own,
    # seeded per epoch as the sampler is, not from the global RNG that a checkpoint restores.
    loader_rng = torch.Generator()
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, generator=loader_rng)
    val_share = Subset(val_set, range(rank, len(val_set), world))  # every sample scored exactly once
    if len(loader) == 0:
        sys.exit(f"--batch-size {cfg.batch_size} is larger than a rank's share of {len(train_set)} images")
    if cfg.precise_bn < 0:
        sys.exit(f"--precise-bn {cfg.precise_bn}: give a number of batches, or 0 for off")

    # Model, optimizer, schedule.
    model = ResNet(in_channels, num_classes, cfg.width)
    if cfg.bn == "sync":
        model = syncbn.convert_sync_batchnorm(model)  # syncbn: every BatchNorm2d -> syncbn.SyncBatchNorm
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True
    )
    total_steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    # From here on (augmentation), each rank draws its own numbers; a checkpoint saves the states.
    torch.manual_seed(cfg.seed + 1 + rank)
    random.seed(cfg.seed + 1 + rank)

    ckpt = checkpoint.Checkpoint(cfg.ckpt, cfg, model, optimizer, scheduler, device, host_group)
    start = checkpoint.Position()  # epoch 0, step 0
    if cfg.resume and cfg.ckpt and os.path.exists(cfg.ckpt):
        try:  # every rank loads it: model, optimizer, schedule, its RNG states, the position
            start = ckpt.resume()
        except checkpoint.CheckpointError as error:
            sys.exit(f"train.py: {error}")
        if master:
            where = f"epoch {start.epoch + 1}, step {start.batches}/{len(loader)}" if start.batches else ""
            print(f"resumed from {cfg.ckpt}: {start.epoch} epoch(s) done{', then ' + where if where else ''}")
    elif cfg.resume and master:
        print(f"--resume: no checkpoint at {cfg.ckpt or '(no --ckpt given)'}, starting from scratch")
    checkpoint.check_same_position(start, cfg.ckpt, host_group)

    raw_model = model
    if distributed:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    if master:
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in raw_model.modules())
        bn_kind = "syncbn.SyncBatchNorm" if cfg.bn == "sync" else "nn.BatchNorm2d (not synchronized)"
        if cfg.bn == "sync" and world == 1:
            bn_kind += " (one process: plain BatchNorm, nothing to synchronize)"
        n_params = sum(p.numel() for p in raw_model.parameters())
        shape = "x".join(map(str, train_set.tensors[0].shape[1:]))
        print(
            f"{world} process(es), backend {backend if distributed else 'none'}, {device.type} tensors, "
            f"amp {cfg.amp}, {'channels_last' if cfg.channels_last else 'contiguous'}"
        )
        print(f"model: ResNet, {n_params / 1e3:.0f}k parameters, {n_bn} x {bn_kind}")
        print(
            f"data: {cfg.data}, {len(train_set)} train / {len(val_set)} val images of {shape}, batch "
            f"{cfg.batch_size} per rank ({cfg.batch_size * world} global), {len(loader)} steps per epoch",
            flush=True,
        )

    stop = checkpoint.StopSignal(host_group)  # from here on SIGTERM/SIGINT stop the run after a step
    stopped_by = None
    images_per_s = []
    for epoch in range(start.epoch, cfg.epochs):
        first = start.batches if epoch == start.epoch else 0  # steps of this epoch done before a resume
        sampler.set_epoch(epoch, skip=first * cfg.batch_size)  # a different shuffle every epoch, the same on every rank
        loader_rng.manual_seed(cfg.seed + epoch)
        model.train()
        totals = torch.tensor(start.totals if first else [0.0] * 3, dtype=torch.float64, device=device)
        progress = Progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", master)
        start_time = time.perf_counter()
        for step, (x, y) in enumerate(loader, start=first):
            x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
            if cfg.augment:
                x = random_flip(x)
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)  # mean over this rank's batch; DDP averages over ranks
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                totals += torch.stack(
                    [loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)]
                ).double()
            progress.update(step + 1, lambda: f"loss {loss.item():.3f}")
            # Every rank, after every step: did a signal reach any rank? Then all stop here.
            stopped_by = stop.agreed()
            steps_done = epoch * len(loader) + step + 1
            if cfg.ckpt and (stopped_by or (cfg.ckpt_every and steps_done % cfg.ckpt_every == 0)):
                ckpt.save(checkpoint.Position(epoch, step + 1, totals.tolist()))
            if stopped_by:
                break
        progress.close()
        if stopped_by:
            break
        loss_sum, correct, count = all_reduce_sum(totals).tolist()  # waits for every rank's last step
        elapsed = time.perf_counter() - start_time
        rate = (len(loader) - first) * cfg.batch_size * world / elapsed  # the steps trained in this process
        if first < len(loader):  # (a run resumed after the epoch's last step trained nothing here)
            images_per_s.append(rate)
        val_loss, val_acc, n_val = evaluate(raw_model, val_share, device, memory_format, autocast)
        if cfg.ckpt:
            ckpt.save(checkpoint.Position(epoch + 1))  # every rank calls it, rank 0 writes
        if master:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {loss_sum / count:.3f} acc {100 * correct / count:5.1f}%  "
                f"|  val loss {val_loss:.3f} acc {100 * val_acc:5.1f}%  "
                f"|  {rate:,.0f} images/s  {elapsed:.1f} s",
                flush=True,
            )
        if epoch + 1 < cfg.epochs and (stopped_by := stop.agreed()):  # a signal during the evaluation
            break

    if stopped_by and master:  # the checkpoint holds the progress; the resumed run evaluates
        saved = f"checkpoint {cfg.ckpt} written" if cfg.ckpt else "no --ckpt given, nothing saved"
        print(f"stopped by {stopped_by} after step {scheduler.last_epoch} of {total_steps}; {saved}", flush=True)
    if not images_per_s and not stopped_by:  # resumed after the last epoch: nothing trained, report the checkpoint
        val_loss, val_acc, n_val = evaluate(raw_model, val_share, device, memory_format, autocast)
    if cfg.precise_bn and not stopped_by:
        # Precise BN: the running statistics of the final weights, exact over every rank's batches.
        def bn_forward(model: nn.Module, batch) -> None:
            with autocast:
                model(batch[0].to(memory_format=memory_format))

        def scores() -> str:
            return f"val acc {100 * val_acc:.1f}% ({round(val_acc * n_val)}/{n_val}), val loss {val_loss:.3f}"

        if master:
            print(f"precise BN: before  {scores()}", flush=True)
        start = time.perf_counter()
        syncbn.update_bn_stats(raw_model, loader, num_batches=cfg.precise_bn, forward=bn_forward)
        elapsed = time.perf_counter() - start
        val_loss, val_acc, n_val = evaluate(raw_model, val_share, device, memory_format, autocast)
        if master:
            used = min(cfg.precise_bn, len(loader))
            print(
                f"precise BN: after   {scores()} (statistics over {used} batches per rank, {elapsed:.1f} s)", flush=True
            )
    if master and not stopped_by:
        speed = f", {sum(images_per_s) / len(images_per_s):,.0f} train images/s" if images_per_s else ""
        saved = f"; checkpoint {cfg.ckpt}" if cfg.ckpt else ""
        print(
            f"final: val acc {100 * val_acc:.1f}% ({round(val_acc * n_val)}/{n_val}), val loss {val_loss:.3f} "
            f"after {cfg.epochs} epochs{speed} (bn {cfg.bn}){saved}",
            flush=True,
        )
    if distributed:
        # Drop the DDP wrapper (its reducer holds gloo work objects) before the process group:
        # in the other order, torch 2.13 with gloo sometimes aborts the process at exit.
        del model
        gc.collect()
        # No rank tears gloo down while another still uses it: one leaving early can take the
        # other down with it at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config())
