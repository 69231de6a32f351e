"""``syncbn verify``: check the layer against the oracle on this machine's or cluster's world.

    syncbn verify                       # 2 local processes, gloo, CPU tensors
    syncbn verify --nproc 8 --backend nccl
    torchrun --nnodes 2 --nproc-per-node 8 ... -m syncbn verify     # join an existing world

The oracle is single-process ``nn.BatchNorm{1,2,3}d`` in float64 on the concatenation of every
rank's batch. Every rank generates the same seeded global batch, runs the
oracle on all of it by itself, feeds its own rows to ``syncbn.SyncBatchNorm`` and compares its
own rows of the output and input gradient, the running statistics and, summed over ranks with
one all-reduce, the weight and bias gradients. The worst error of each check is reduced over
the world (MAX), so every rank ends with the same verdict and rank 0 prints it.

This module is part of the package, not of ``tests/``, because users run ``syncbn verify`` on a
new cluster from an installed copy. The test suite builds on the same pieces: ``Oracle``, the
data maker (``random_steps``, ``random_params``) and the tolerances (``TOLERANCES``,
``PARAM_TOLERANCES``).

Launching: without ``RANK``/``WORLD_SIZE`` in the environment, ``run_local`` starts ``nproc``
processes itself (spawn), hosts their rendezvous on a free port, and watches them with a
deadline: a rank that fails or a collective that hangs gives a FAIL and a non-zero exit code,
never a stuck terminal. Under ``torchrun`` each rank joins the existing world instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from .convert import BATCHNORM_BY_INPUT_DIM
from .dtypes import stat_dtype

__all__ = [
    "Oracle",
    "TOLERANCES",
    "PARAM_TOLERANCES",
    "random_params",
    "random_steps",
    "CHECKS",
    "run_checks",
    "run_local",
    "run_in_world",
]


# ---------------------------------------------------------------------------------------------
# The oracle


class Oracle:
    """Single-process float64 ``nn.BatchNormNd`` over the concatenation of all ranks' batches.

    ``step`` takes one training step's per-rank inputs and output gradients (any float dtype;
    upcast to float64 exactly, so a comparison's tolerance only has to cover the layer's own
    rounding) and returns each rank's rows of the output and input gradient, the global weight
    and bias gradients and the running statistics after the step. ``dtype=torch.float32`` gives
    instead what nn.BatchNorm achieves in single precision on the same values (a measure of how
    well conditioned a case is).
    """

    def __init__(
        self,
        ndim: int,
        channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.dtype = dtype
        self.layer = BATCHNORM_BY_INPUT_DIM[ndim](channels, eps, momentum, affine, track_running_stats, dtype=dtype)
        self.affine, self.track_running_stats = affine, track_running_stats
        with torch.no_grad():
            if weight is not None:
                self.layer.weight.copy_(weight)
            if bias is not None:
                self.layer.bias.copy_(bias)

    def step(self, xs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> dict:
        layer = self.layer
        layer.train()
        sizes = [x.shape[0] for x in xs]
        x = torch.cat([t.detach().cpu().to(self.dtype) for t in xs]).requires_grad_()
        g = torch.cat([t.detach().cpu().to(self.dtype) for t in grads])
        y = layer(x)
        y.backward(g)
        rec = {
            "y": list(y.detach().split(sizes)),
            "dx": list(x.grad.split(sizes)),
            "dw": layer.weight.grad.clone() if self.affine else None,
            "db": layer.bias.grad.clone() if self.affine else None,
        }
        if self.track_running_stats:
            rec.update(
                running_mean=layer.running_mean.clone(),
                running_var=layer.running_var.clone(),
                num_batches_tracked=int(layer.num_batches_tracked),
            )
        layer.zero_grad()
        return rec

    @torch.no_grad()
    def eval(self, x: torch.Tensor) -> torch.Tensor:
        self.layer.eval()
        return self.layer(x.detach().cpu().to(self.dtype))


# (atol, rtol) against the float64 oracle on the same (rounded) inputs, per input dtype: outputs
# and input gradients.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),  # float64 throughout; sums over at most a few thousand values
    torch.float32: (5e-5, 5e-5),  # float32 reductions and elementwise math: a few ulps of values of order 10
    torch.bfloat16: (2e-2, 1.6e-2),  # rounded to bfloat16 once (8 significant bits): 2 ulps
    torch.float16: (4e-3, 2e-3),  # the same for float16 (11 significant bits)
}
# Weight/bias gradients and running statistics: float32 sums (float64 for float64 input) over
# every sample; for half-precision input they are sums of exact inputs, so float32 tolerance.
PARAM_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-3, 1e-4),
    torch.float16: (1e-3, 1e-4),
}


def random_params(channels: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine parameters away from the identity (float64): weights in [0.5, 1.5), any bias."""
    weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    return weight, bias


def random_steps(
    sizes: Sequence[Sequence[int]],
    channels: int,
    spatial: tuple[int, ...],
    dtype: torch.dtype,
    gen: torch.Generator,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps[i][r] = (x, grad_y)``: rank r's batch of ``sizes[i][r]`` samples at step i.

    Each channel has its own mean (std 3) and spread (0.5 to 1.5) at each step, so that a
    wrong statistic cannot hide behind a standard normal; values are rounded to ``dtype``.
    """
    view = (1, channels) + (1,) * len(spatial)
    steps = []
    for step_sizes in sizes:
        shift = torch.randn(channels, generator=gen, dtype=torch.float64).mul_(3).view(view)
        scale = torch.rand(channels, generator=gen, dtype=torch.float64).add_(0.5).view(view)
        step = []
        for n in step_sizes:
            shape = (n, channels, *spatial)
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            step.append((x.to(dtype), g.to(dtype)))
        steps.append(step)
    return steps


# ---------------------------------------------------------------------------------------------
# The checks

# Exit codes of a rank: 0 every check passed, 3 some check failed, 4 the rank raised (1 is
# what Python gives an uncaught exception, so it reads as "died", as any other code does).
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 3, 4

STEPS = 3  # training steps per check, so that running statistics accumulate


def _uneven(world: int, step: int) -> list[int]:
    sizes = [1 + (3 * r + 2 * step) % 5 for r in range(world)]  # 1 to 5 samples, varying
    sizes[0] += max(0, 2 - sum(sizes))  # training needs 2 values per channel (world size 1)
    return sizes


def _one_empty(world: int, step: int) -> list[int]:
    sizes = _uneven(world, step)
    if world > 1:
        sizes[step % world] = 0  # a different rank holds no samples at each step
    sizes[-1] += max(0, 2 - sum(sizes))
    return sizes


@dataclasses.dataclass(frozen=True)
class Check:
    """One layer configuration, run for ``STEPS`` training steps then once in eval mode."""

    name: str
    channels: int
    spatial: tuple[int, ...]
    sizes: Callable[[int, int], list[int]] = _uneven  # (world, step) -> samples per rank
    dtype: torch.dtype = torch.float64
    memory_format: torch.memory_format = torch.contiguous_format
    momentum: float | None = 0.1

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)


CHECKS: list[Check] = [
    Check("2-D (N, C)", 7, ()),
    Check("3-D (N, C, L)", 4, (6,)),
    Check("4-D (N, C, H, W)", 5, (4, 5)),
    Check("4-D channels_last", 5, (4, 5), memory_format=torch.channels_last),
    Check("5-D (N, C, D, H, W)", 3, (2, 3, 4)),
    Check("4-D, one rank empty", 6, (3, 3), sizes=_one_empty),
    Check("4-D, momentum=None", 4, (3, 4), momentum=None),
    Check("4-D float32", 8, (5, 6), dtype=torch.float32),
    Check("4-D float32 channels_last", 8, (5, 6), dtype=torch.float32, memory_format=torch.channels_last),
    Check("4-D bfloat16", 8, (5, 6), sizes=_one_empty, dtype=torch.bfloat16),
]


@dataclasses.dataclass
class Result:
    """The verdict of one check, identical on every rank (reduced over the world)."""

    name: str
    dtype: str
    batches: str
    max_abs_err: float
    err_over_tol: float  # worst |got - expected| / (atol + rtol * |expected|); pass when <= 1
    passed: bool
    note: str = ""


def _make_data(check: Check, world: int, seed: int):
    """Every step's per-rank batches (in the check's dtype) and the affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    weight, bias = random_params(check.channels, gen)
    sizes = [check.sizes(world, step) for step in range(STEPS)]
    return random_steps(sizes, check.channels, check.spatial, check.dtype, gen), weight, bias


def _ratio(got: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> tuple[float, float]:
    """(max abs error, worst error over tolerance) of ``got`` against ``expected``."""
    if expected.numel() == 0:
        return 0.0, 0.0
    err = (got.detach().cpu().double() - expected).abs()
    atol, rtol = tol
    return err.max().item(), (err / (atol + rtol * expected.abs())).max().item()


def _run_check(check: Check, group, rank: int, world: int, device: torch.device, layer_cls) -> tuple[float, float]:
    """This rank's (max abs error, worst error over tolerance) for one check."""
    # The same seed on every rank (not hash(): string hashes differ between processes).
    steps, weight, bias = _make_data(check, world, seed=zlib.crc32(check.name.encode()))
    oracle = Oracle(check.ndim, check.channels, momentum=check.momentum, weight=weight, bias=bias)
    layer = layer_cls(check.channels, momentum=check.momentum, process_group=group)
    layer = layer.to(device=device, dtype=stat_dtype(check.dtype))  # float32 with half input, as under autocast
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    tol, param_tol = TOLERANCES[check.dtype], PARAM_TOLERANCES[check.dtype]
    worst = [0.0, 0.0]

    def record(pair: tuple[float, float]) -> None:
        worst[0], worst[1] = max(worst[0], pair[0]), max(worst[1], pair[1])

    for step in steps:
        xs, gs = [x for x, _ in step], [g for _, g in step]
        expected = oracle.step(xs, gs)
        x = xs[rank].to(device).contiguous(memory_format=check.memory_format).requires_grad_()
        g = gs[rank].to(device).contiguous(memory_format=check.memory_format)
        y = layer(x)
        y.backward(g)
        if y.dtype != check.dtype or not y.is_contiguous(memory_format=check.memory_format):
            record((float("inf"), float("inf")))  # dtype or memory format not kept
        record(_ratio(y, expected["y"][rank], tol))
        record(_ratio(x.grad, expected["dx"][rank], tol))
        record(_ratio(layer.running_mean, expected["running_mean"], param_tol))
        record(_ratio(layer.running_var, expected["running_var"], param_tol))
        if int(layer.num_batches_tracked) != expected["num_batches_tracked"]:
            record((float("inf"), float("inf")))
        # Weight and bias gradients: each rank holds its local part; their sum is the global one.
        grads = torch.cat([layer.weight.grad, layer.bias.grad]).double()
        dist.all_reduce(grads, group=group)
        record(_ratio(grads, torch.cat([expected["dw"], expected["db"]]), param_tol))
        # Running statistics must be bit-identical on every rank.
        stats = torch.cat([layer.running_mean, layer.running_var]).double()
        low, high = stats.clone(), stats.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            record((float("inf"), float("inf")))
        layer.zero_grad()

    # Eval mode: running statistics, no communication; every rank probes with the same batch.
    probe = torch.cat([x for x, _ in steps[0]])[:3]
    layer.eval()
    with torch.no_grad():
        y_eval = layer(probe.to(device).contiguous(memory_format=check.memory_format))
    record(_ratio(y_eval, oracle.eval(probe), tol))
    return worst[0], worst[1]


def _edge_checks(group, world: int, device: torch.device, layer_cls) -> list[tuple[str, str, bool, str]]:
    """The contract's two edge rules: (name, batches, passed on this rank, note) for each."""
    out = []
    # A global batch of one value per channel: ValueError on every rank, none left waiting.
    name, batches = "global batch of 1: ValueError", "1" + "+0" * (world - 1) if world <= 4 else "1 on rank 0"
    layer = layer_cls(4, process_group=group).to(device)
    x = torch.randn(1 if dist.get_rank(group) == 0 else 0, 4, device=device)
    try:
        layer(x)
        out.append((name, batches, False, "no error raised"))
    except ValueError as exc:
        ok = "more than 1 value per channel" in str(exc)
        out.append((name, batches, ok, "" if ok else f"unexpected message: {exc}"))
    # A global batch of zero samples: empty output, running statistics untouched.
    name, batches = "global batch of 0: no-op", "+".join("0" * world) if world <= 4 else "0 per rank"
    layer = layer_cls(4, process_group=group).to(device)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(torch.randn(0, 4, 3, 3, device=device))
    ok = (
        y.shape == (0, 4, 3, 3)
        and torch.equal(layer.running_mean, before[0])
        and torch.equal(layer.running_var, before[1])
    )
    out.append((name, batches, ok, "" if ok else "output shape or running statistics wrong"))
    return out


def _describe_batches(check: Check, world: int) -> str:
    steps = [check.sizes(world, s) for s in range(STEPS)]
    if world <= 4:
        return " ".join("+".join(map(str, sizes)) for sizes in steps)
    low = min(min(sizes) for sizes in steps)
    high = max(max(sizes) for sizes in steps)
    return f"{low}..{high} per rank"


def run_checks(
    group=None,
    device: torch.device | str = "cpu",
    layer_cls=None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every check on this rank of ``group`` (the world when None); collective.

    Every rank of the group must call it. Returns the same list of results on every rank;
    ``on_result`` is called with each as soon as it is known (rank 0 prints with it).
    ``layer_cls`` defaults to ``syncbn.SyncBatchNorm`` (tests pass a broken layer to see FAIL).
    """
    if layer_cls is None:
        from .nn import SyncBatchNorm as layer_cls
    device = torch.device(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    results = []

    def finish(name: str, dtype: str, batches: str, err: float, ratio: float, ok: bool, note: str) -> None:
        # Every rank ends with the worst error and the verdict of the whole world.
        summary = torch.tensor([err, ratio, 0.0 if ok else 1.0], dtype=torch.float64, device=device)
        dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=group)
        err, ratio, failed = summary.tolist()
        passed = not failed and ratio <= 1.0
        res = Result(name, dtype, batches, err, ratio, passed, note if not passed else "")
        results.append(res)
        if on_result is not None:
            on_result(res)

    for check in CHECKS:
        err, ratio = _run_check(check, group, rank, world, device, layer_cls)
        dtype = str(check.dtype).removeprefix("torch.")
        ok = ratio <= 1.0
        finish(check.name, dtype, _describe_batches(check, world), err, ratio, ok, "" if ok else "exceeds tolerance")
    for name, batches, ok, note in _edge_checks(group, world, device, layer_cls):
        finish(name, "float32", batches, 0.0, 0.0, ok, note or "failed on another rank")
    return results


# ---------------------------------------------------------------------------------------------
# Printing

_COLUMNS = ("check", "dtype", "batch per rank, 3 steps", "max |err|", "err/tol", "result")
_WIDTHS = (30, 9, 24, 10, 8, 6)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS)).rstrip()


def _format(res: Result) -> str:
    line = _row(
        (
            res.name,
            res.dtype,
            res.batches,
            f"{res.max_abs_err:.1e}",
            f"{res.err_over_tol:.2f}",
            "PASS" if res.passed else "FAIL",
        )
    )
    return line + (f"  ({res.note})" if res.note else "")


def header(world: int, backend: str, device: torch.device) -> str:
    from . import __version__
    from .ops import backend_name

    path = {
        str(dt).removeprefix("torch."): backend_name(torch.empty(0, dtype=dt, device=device))
        for dt in (torch.float64, torch.float32, torch.bfloat16)
    }
    paths = ", ".join(f"{k} -> {v}" for k, v in path.items())
    lines = [
        f"syncbn {__version__} verify: world size {world}, backend {backend}, {device.type} tensors "
        f"(torch {torch.__version__})",
        f"local passes: {paths}",
        "",
        _row(_COLUMNS),
        _row(["-" * w for w in _WIDTHS]),
    ]
    return "\n".join(lines)


def _print(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Running in a world: under torchrun, or as one of run_local's processes


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _verify_in_world(backend: str, local_rank: int) -> int:
    """Run the checks on the initialized default world; rank 0 prints. EXIT_PASS or EXIT_FAIL."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device_for(backend, local_rank)
    if rank == 0:
        _print(header(world, backend, device))
    results = run_checks(device=device, on_result=(lambda r: _print(_format(r))) if rank == 0 else None)
    failed = [r for r in results if not r.passed]
    if rank == 0:
        _print("")
        if failed:
            _print(f"FAIL: {len(failed)} of {len(results)} checks failed: " + ", ".join(r.name for r in failed))
        else:
            _print(f"PASS: all {len(results)} checks match the float64 single-process BatchNorm oracle")
    return EXIT_FAIL if failed else EXIT_PASS


def run_in_world(backend: str, timeout_s: float) -> int:
    """Join the world torchrun (or another launcher) set up through RANK, WORLD_SIZE, MASTER_*."""
    backend = _resolve_backend(backend)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        code = _verify_in_world(backend, int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    except BaseException:
        print(f"syncbn verify: rank {dist.get_rank()} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)  # no clean shutdown: the other ranks may be stuck in a collective
    dist.destroy_process_group()
    return 0 if code == EXIT_PASS else 1


def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float) -> None:
    """One of run_local's processes: join the rendezvous, verify, exit with the verdict."""
    torch.set_num_threads(1)  # nproc processes share this machine's cores
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        code = _verify_in_world(backend, rank)
        dist.destroy_process_group()
    except BaseException:
        print(f"syncbn verify: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)  # no clean shutdown: the other ranks may be stuck in a collective
    sys.stdout.flush()
    os._exit(code)


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise SystemExit("syncbn verify: --backend nccl needs CUDA and a torch build with NCCL")
    return backend


def run_local(
    nproc: int,
    backend: str = "auto",
    timeout_s: float = 180.0,
    grace_s: float = 10.0,
    worker: Callable[..., None] = _worker,
) -> int:
    """Start ``nproc`` processes on this machine and verify; 0 when every check passed, else 1.

    Every wait has a deadline: once a rank exits with an error the others get ``grace_s``
    seconds to finish, and ranks still running at ``timeout_s`` (a hung collective, a stuck
    rendezvous) are killed and reported. ``worker`` is what each process runs (the tests pass
    ones that crash or hang); it is called as ``worker(rank, nproc, port, backend, timeout_s)``.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise SystemExit("syncbn verify: --nproc must be at least 1")
    backend = _resolve_backend(backend)
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected").
        raise SystemExit(
            f"syncbn verify: --backend nccl needs a GPU per process: {nproc} processes, "
            f"{torch.cuda.device_count()} GPU(s) visible"
        )
    # The parent hosts the rendezvous; port 0 lets the OS pick a free port (no race).
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    ctx = mp.get_context("spawn")
    procs = []
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the spawned processes at start
    try:
        for rank in range(nproc):
            proc = ctx.Process(
                target=worker,
                args=(rank, nproc, store.port, backend, timeout_s),
                name=f"syncbn-verify-{rank}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp

    deadline = time.monotonic() + timeout_s
    while True:
        running = [p for p in procs if p.exitcode is None]
        if not running or time.monotonic() >= deadline:
            break
        if any(p.exitcode not in (None, EXIT_PASS, EXIT_FAIL) for p in procs):
            deadline = min(deadline, time.monotonic() + grace_s)  # someone broke: a short grace
        wait([p.sentinel for p in running], timeout=max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(5)
    codes = {rank: p.exitcode for rank, p in enumerate(procs) if rank not in hung}
    broken = {rank: code for rank, code in codes.items() if code not in (EXIT_PASS, EXIT_FAIL)}
    if broken:
        what = ", ".join(
            f"rank {r} " + ("raised (traceback above)" if c == EXIT_ERROR else f"died with exit code {c}")
            for r, c in sorted(broken.items())
        )
        stopped = f"; ranks {hung} were still running and were stopped" if hung else ""
        _print(f"FAIL: {what}{stopped}")
        return 1
    if hung:
        _print(
            f"FAIL: timed out after {timeout_s:g} s: ranks {hung} did not finish "
            "(a collective or the rendezvous hung) and were stopped"
        )
        return 1
    return 1 if any(code == EXIT_FAIL for code in codes.values()) else 0
