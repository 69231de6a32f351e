"""Population statistics of BatchNorm layers across ranks: precise BN, and identical buffers.

In eval mode a BatchNorm layer normalizes with its running statistics, an exponential average
of batch statistics taken while the weights were still changing. Two tools here:

- ``update_bn_stats`` recomputes them after training ("precise BN", or after averaging weights
  as SWA does): the exact mean and unbiased variance of each layer's inputs over every rank's
  samples of the given batches, identical on every rank;
- ``sync_batchnorm_buffers`` makes the running statistics of local (unsynchronized) BatchNorm
  layers identical on every rank before evaluating, by averaging them or copying rank 0's.

Both take every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics (syncbn's
layers and their subclasses, ``nn.BatchNormNd``, ``torch.nn.SyncBatchNorm``) and leave frozen
layers (``syncbn.is_frozen``) alone. Each communicates with a fixed number of small collectives,
whatever the number of layers and batches: every layer's values are packed in one buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed
from .convert import is_frozen
from .functional import check_input

__all__ = ["sync_batchnorm_buffers", "update_bn_stats"]

_MODES = ("mean", "broadcast")
_NONE = object()  # no batch (a batch itself may be anything, None included)


def _tracked_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers whose running statistics the tools set: not frozen, tracking stats."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
        and not is_frozen(m)
    ]


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _group_rank(process_group: dist.ProcessGroup | None, world: int) -> int:
    return dist.get_rank(process_group) if world else 0


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Re-raise a failed collective with what it was and the likely causes."""
    try:
        yield
    except RuntimeError as err:
        raise RuntimeError(
            f"syncbn: {what} failed: {err}\nEvery rank of the process group must make the same call "
            "with the same model; another rank may have died or raised before it (its own error "
            "says why), or the process group's timeout expired while it was still busy."
        ) from err


# ---------------------------------------------------------------------------------------------
# Batches


def _map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, through tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: _map_tensors(fn, value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_map_tensors(fn, value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(fn, value) for value in batch)
    return batch


def _no_samples(t: torch.Tensor) -> torch.Tensor:
    return t[:0] if t.dim() else t


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``torch.optim.swa_utils.update_bn``'s rule: a tuple or list batch's first element is the input."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    elif isinstance(batch, Mapping):
        raise TypeError(
            "syncbn.update_bn_stats: the batches are dicts (keys "
            f"{sorted(map(str, batch))}); pass forward=, e.g. "
            "forward=lambda model, batch: model(batch['image'])"
        )
    return model(batch)


def _plan(batches: Iterable, num_batches: int | None) -> tuple[Any, Iterable, int]:
    """This rank's first batch (``_NONE``: none), an iterator over the rest, and how many it will use.

    The count comes from ``len(batches)`` where there is one (a DataLoader, a list); an
    iterable without a length is read into a list first, up to ``num_batches``.
    """
    iterator = iter(batches)
    first = next(iterator, _NONE)
    if first is _NONE:
        return _NONE, iterator, 0
    limit = sys.maxsize if num_batches is None else num_batches
    try:
        available = len(batches)  # type: ignore[arg-type]
    except TypeError:
        rest = list(itertools.islice(iterator, limit - 1))
        available, iterator = 1 + len(rest), iter(rest)
    return first, iterator, max(1, min(available, limit))


def _check_num_batches(num_batches: object) -> None:
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"syncbn.update_bn_stats: num_batches must be a positive int or None, got {num_batches!r}")


def _check_layer_groups(model: nn.Module, process_group: dist.ProcessGroup | None, world: int) -> None:
    """Every synchronized layer's group must lie inside ``process_group``.

    The ranks agree on the number of forwards over ``process_group``; a layer synchronizing
    with ranks outside it could be left waiting for a forward that never comes.
    """
    if not world or process_group is None:
        return  # the world holds every group
    outer = set(dist.get_process_group_ranks(process_group))
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or not hasattr(m, "process_group") or is_frozen(m):
            continue
        inner = set(dist.get_process_group_ranks(distributed._group_of(m.process_group)))
        if not inner <= outer:
            raise ValueError(
                f"syncbn.update_bn_stats: layer '{name}' synchronizes over ranks {sorted(inner)}, not all in "
                f"process_group (ranks {sorted(outer)}): pass process_group=None or a group holding the "
                "layers' groups, so that every rank a layer waits for makes the same number of forwards"
            )


def _agree_steps(planned: int, process_group: dist.ProcessGroup | None, world: int, device: torch.device) -> list[int]:
    """Every rank's number of batches, in group-rank order: one all-reduce of one value per rank."""
    if not world:
        return [planned]
    counts = torch.zeros(world, dtype=torch.float64, device=device)
    counts[dist.get_rank(process_group)] = planned
    with _collective("update_bn_stats' all-reduce of the batch counts"):
        distributed.all_reduce_sum(counts, process_group)
    return [int(c) for c in counts.tolist()]


def _empty_batch(
    first: Any, counts: list[int], process_group: dist.ProcessGroup | None, world: int, device: torch.device
) -> Any:
    """A batch with the structure of a real one and zero samples, for the steps past this rank's last.

    A rank with batches cuts its first one; when some rank has none at all, the lowest rank that
    has one broadcasts its cut batch (tensors of 0 rows: a few bytes) to every rank first.
    """
    template = None if first is _NONE else _map_tensors(_no_samples, first)
    if min(counts) == 0:
        source = next(r for r, c in enumerate(counts) if c)
        box = [None]
        if _group_rank(process_group, world) == source:
            box[0] = _map_tensors(lambda t: _no_samples(t).detach().clone().cpu(), first)
        src = dist.get_global_rank(distributed._group_of(process_group), source)
        with _collective("update_bn_stats' broadcast of an empty batch"):
            dist.broadcast_object_list(box, src=src, group=process_group, device=device)
        if template is None:
            template = box[0]
    return template


# ---------------------------------------------------------------------------------------------
# Progress


class _ProgressLine:
    """Progress without tqdm, or into a log: redrawn in place on a terminal; in a file, a line
    every 10 s at most and one at the end."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self.total, self.desc, self.disable = total, desc, disable
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.tty = not disable and sys.stderr.isatty()

    def _write(self, text: str) -> None:
        sys.stderr.write(f"\r{text}\033[K" if self.tty else f"{text}\n")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.disable and self.done < self.total and now - self.last >= (0.1 if self.tty else 10.0):
            self.last = now
            self._write(f"{self.desc}: {self.done}/{self.total} batches")

    def close(self) -> None:
        if not self.disable:
            elapsed = time.perf_counter() - self.start
            self._write(f"{self.desc}: {self.done}/{self.total} batches in {elapsed:.1f} s")
            if self.tty:
                sys.stderr.write("\n")


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on a terminal when tqdm is installed, else ``_ProgressLine``."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc="update_bn_stats", unit="batch")
    return _ProgressLine(total, "update_bn_stats", disable=not enabled)


# ---------------------------------------------------------------------------------------------
# Moments


class _Moments:
    """One layer's inputs so far on this rank: count, float64 mean and sum of squared deviations
    per channel, merged batch by batch (Chan, Golub and LeVeque's pairwise update)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        if count == 0:
            return
        # In float64 from the start: a float32 batch mean rounded to float32 (0.001 at 1e4)
        # would already cost digits of the variance in the merge below.
        mean, var = torch.batch_norm_update_stats(x.detach().double(), None, None, 0.0)
        m2 = var * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total


def _merge(
    moments: list[_Moments], channels: list[int], process_group: dist.ProcessGroup | None, world: int, device
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(count, mean, unbiased variance)`` of every layer over all ranks, identical on every rank.

    The two-pass formula across ranks: one all-reduce of every layer's count and sum gives the
    global means; one all-reduce of ``M2_r + n_r (mean_r - mean)**2`` gives the global sums of
    squared deviations. Deviations from the global mean stay small, so nothing cancels, even for
    a mean far larger than the spread.
    """
    zeros = [torch.zeros(c, dtype=torch.float64, device=device) for c in channels]
    means = [m.mean.to(device) if m.count else z for m, z in zip(moments, zeros)]
    local_counts = [float(m.count) for m in moments]
    sums = torch.cat(
        [torch.tensor(local_counts, dtype=torch.float64, device=device)]
        + [mean * n for mean, n in zip(means, local_counts)]
    )
    if world:
        with _collective("update_bn_stats' all-reduce of the counts and sums"):
            distributed.all_reduce_sum(sums, process_group)
    counts = [int(c) for c in sums[: len(moments)].tolist()]
    global_means = [s / max(n, 1) for s, n in zip(sums[len(moments) :].split(channels), counts)]
    squares = []
    for m, mean_r, mean, z in zip(moments, means, global_means, zeros):
        squares.append((mean_r - mean).square_().mul_(m.count).add_(m.m2.to(device)) if m.count else z)
    deviations = torch.cat(squares)
    if world:
        with _collective("update_bn_stats' all-reduce of the squared deviations"):
            distributed.all_reduce_sum(deviations, process_group)
    variances = [d / max(n - 1, 1) for d, n in zip(deviations.split(channels), counts)]
    return list(zip(counts, global_means, variances))


# ---------------------------------------------------------------------------------------------
# The tools


def update_bn_stats(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = 200,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics over ``batches`` ("precise BN").

    Each rank runs the model on up to ``num_batches`` of its own ``batches`` (None: all of
    them); afterwards every layer's ``running_mean`` and ``running_var`` are the mean and the
    unbiased variance of that layer's inputs over every sample of every rank's batches, as one
    process would compute them over the concatenated data, identical on every rank of
    ``process_group`` (the world when None; without an initialized process group, this process
    alone). This is the population statistic, not an average of batch statistics: batches of
    different sizes weigh by their samples.

    The layers: every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics, i.e.
    syncbn's layers (subclasses included), ``nn.BatchNormNd`` and ``torch.nn.SyncBatchNorm``.
    Frozen layers (``syncbn.freeze_batchnorm``) are left untouched and keep normalizing with
    their running statistics; layers with ``track_running_stats=False`` have nothing to update.

    While it runs, the model is in training mode (``model.train()``, dropout included, as in
    ``torch.optim.swa_utils.update_bn``), under ``torch.no_grad()``, so every layer normalizes
    with batch statistics as in the training forward: synchronized layers with those of the
    global batch, plain layers with their own rank's. Those forwards do not touch the running
    statistics or ``num_batches_tracked``; only the final result is written. Afterwards the
    training flag of every module and every layer's momentum are as they were, and
    ``num_batches_tracked`` keeps its value (a ``momentum=None`` layer that trains on treats the
    new statistics as its average so far).

    Plain BatchNorm layers under DDP (each rank normalizes with its own batch) get the
    population statistics, over all ranks' samples, of the inputs they see when every rank
    normalizes its own batches as in training: identical on every rank, and matched to what
    training taught the following layers, but not what the same model in one process would see
    on the concatenated batch, since the layers before them normalized per rank.

    Uneven and empty batch lists are fine: the ranks first agree on the number of steps (the
    longest list), and a rank that has run out runs the model on a batch of zero samples, cut
    from its first batch; a rank with no batch at all gets one cut from the lowest rank that
    has one. Every tensor in a batch is cut along dim 0, so the model must accept an empty
    batch (syncbn's layers and torch's convolutions, pooling and linear layers do;
    ``x.view(x.size(0), -1)`` does not: ``torch.flatten(x, 1)`` does). When no rank has a
    batch, nothing changes. A layer that saw fewer than 2 values per channel in all is left as
    it was, with a warning.

    ``forward(model, batch)`` runs one batch (its result is ignored). The default follows
    ``torch.optim.swa_utils.update_bn``: a tuple or list batch's first element is the input,
    any other batch is the input itself; dict batches need ``forward`` (which key holds the
    input is the caller's to say). Every tensor in a batch (nested in tuples, lists and dicts)
    is first moved to the device of the model's first parameter. Pass the bare model, not a
    DDP wrapper.

    Communication, over ``process_group``, whatever the number of layers and batches: each
    synchronized layer's own all-reduce per forward, and three more small all-reduces: the
    batch counts (one value per rank) before the first forward, and after the last the
    layers' counts and sums, then their squared deviations from the global means (all layers
    packed in one buffer each); plus, only when some rank has no batch at all, one broadcast of
    an empty batch. Each rank merges its batches in float64 (per-batch two-pass moments, then
    Chan's pairwise update), and the merge across ranks is the two-pass formula, so the result
    is exact in float64 even for means far larger than the spread.

    Rank 0 of the group shows its progress on stderr: a tqdm bar on a terminal (when tqdm is
    installed), else one line, redrawn on a terminal, every 10 s at most in a log file.
    Every synchronized layer's group must be inside ``process_group`` (ValueError otherwise).
    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"syncbn.update_bn_stats: model must be an nn.Module, got {type(model).__name__}")
    _check_num_batches(num_batches)
    layers = _tracked_layers(model)
    if not layers:
        return model
    world = distributed.sync_world_size(process_group)
    _check_layer_groups(model, process_group, world)
    forward = _default_forward if forward is None else forward
    device = _model_device(model)
    first, rest, planned = _plan(batches, num_batches)
    counts = _agree_steps(planned, process_group, world, device)
    steps = max(counts)
    show = _group_rank(process_group, world) == 0
    if steps == 0:
        if show:
            warnings.warn(
                "syncbn.update_bn_stats: no rank has a batch; running statistics left as they were", stacklevel=2
            )
        return model
    empty = _empty_batch(first, counts, process_group, world, device)

    moments = [_Moments() for _ in layers]
    flags = [(m, m.training) for m in model.modules()]
    saved = [(layer, layer.track_running_stats, layer.momentum) for _, layer in layers]
    hooks = []
    progress = _progress(steps, show)
    try:
        for (_, layer), acc in zip(layers, moments):

            def record(module, args, kwargs, acc=acc):
                x = args[0] if args else next(iter(kwargs.values()))
                check_input(x, module.num_features)
                acc.add(x)

            hooks.append(layer.register_forward_pre_hook(record, with_kwargs=True))
            # Batch statistics without touching the running ones; syncbn's layers need a float
            # momentum then (None means: count batches).
            layer.track_running_stats = False
            if layer.momentum is None:
                layer.momentum = 0.0
        model.train()
        with torch.no_grad():
            for step in range(steps):
                batch = first if step == 0 else next(rest, _NONE) if step < planned else _NONE
                batch = empty if batch is _NONE else batch
                forward(model, _map_tensors(lambda t: t.to(device, non_blocking=True), batch))
                progress.update(1)
    finally:
        progress.close()
        for hook in hooks:
            hook.remove()
        for layer, tracked, momentum in saved:
            layer.track_running_stats, layer.momentum = tracked, momentum
        for m, training in flags:
            m.training = training

    channels = [layer.num_features for _, layer in layers]
    starved = []
    with torch.no_grad():
        for (name, layer), (count, mean, var) in zip(layers, _merge(moments, channels, process_group, world, device)):
            if count < 2:
                starved.append(name or "<root>")
                continue
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    if starved and show:
        warnings.warn(
            "syncbn.update_bn_stats: these layers saw fewer than 2 values per channel over all ranks and "
            f"batches and keep their running statistics: {', '.join(starved)}",
            stacklevel=2,
        )
    return model


def sync_batchnorm_buffers(
    model: nn.Module, mode: str = "mean", process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Make every BatchNorm layer's running statistics identical on all ranks of ``process_group``.

    For models with local (unsynchronized) BatchNorm, whose ranks each accumulate their own
    running statistics, before evaluating or saving. One collective for all layers:

    - ``mode="mean"``: ``running_mean`` and ``running_var`` become their average over the ranks,
      with equal weight per rank. Running statistics are linear in the batch statistics, so
      with equal per-rank batches (and the same momentum and step count on every rank) the
      averaged ``running_mean`` is the running average of the global batch means; the
      averaged ``running_var`` is the running average of the ranks' mean (unbiased)
      within-batch variance: the spread the layer normalized with in training, which leaves out
      the spread between the ranks' batch means (``update_bn_stats`` includes it).
      ``num_batches_tracked`` becomes rank 0's.
    - ``mode="broadcast"``: every rank gets rank 0's running statistics and
      ``num_batches_tracked`` (what DDP's ``broadcast_buffers`` does before each forward).

    The layers are those ``update_bn_stats`` recomputes; frozen layers keep theirs (they are
    fixed, usually loaded from the same checkpoint on every rank). Without an initialized
    process group, or in a group of one rank, nothing happens. Every rank of the group must
    call it with the same model. Returns ``model``.
    """
    if mode not in _MODES:
        raise ValueError(f"syncbn.sync_batchnorm_buffers: mode must be 'mean' or 'broadcast', got {mode!r}")
    layers = [layer for _, layer in _tracked_layers(model)]
    world = distributed.sync_world_size(process_group)
    if not layers or not world:
        return model
    device = _model_device(model)
    # [num_batches_tracked per layer (in "mean" mode rank 0's, the others add 0), then each
    # layer's running_mean and running_var], in float64 (exact for every buffer dtype)
    tracked = [layer.num_batches_tracked for layer in layers]
    own = mode == "broadcast" or dist.get_rank(process_group) == 0
    zero = torch.zeros((), dtype=torch.float64, device=device)
    parts = [torch.stack([t.to(device, torch.float64) if t is not None and own else zero for t in tracked])]
    for layer in layers:
        parts += [layer.running_mean.to(device, torch.float64), layer.running_var.to(device, torch.float64)]
    packed = torch.cat(parts)
    if mode == "mean":
        with _collective("sync_batchnorm_buffers' all-reduce"):
            distributed.all_reduce_sum(packed, process_group)
        packed[len(layers) :] /= world
    else:
        src = dist.get_global_rank(distributed._group_of(process_group), 0)
        with _collective("sync_batchnorm_buffers' broadcast"):
            dist.broadcast(packed, src=src, group=process_group)
    stats = packed[len(layers) :].split([c for layer in layers for c in (layer.num_features,) * 2])
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.running_mean.copy_(stats[2 * i])
            layer.running_var.copy_(stats[2 * i + 1])
            if tracked[i] is not None:
                tracked[i].copy_(packed[i])
    return model
