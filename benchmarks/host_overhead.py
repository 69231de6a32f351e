"""Host (CPU) time per call of the layer and of each of its pieces: where eager time goes.

    python -m benchmarks.host_overhead [--shape 8,64,8,8]   # results in benchmarks/results/scratch/
    python -m benchmarks.host_overhead --save               # into benchmarks/results/

On a layer small enough that the device is never the bottleneck, each figure is the host time
per call (median over samples of 20 calls, the clock read before the device finishes), which
is what bounds eager speed on small and mid-sized layers. Also a cProfile of the layer's
forward+backward, top functions by own time, and torch.profiler's ops of every thread. On a
GPU the synced path uses a 1-process NCCL group with SYNCBN_ALWAYS_SYNC=1; on CPU a 1-process
gloo group. Writes ``host-overhead-<device>.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import syncbn
from benchmarks.common import add_output_args, output_dir, slug, time_calls, today
from syncbn import passes, settings
from syncbn.ops import backend_for
from syncbn.passes import RunningStats


def host_us(fn, device: torch.device | None = None) -> float:
    """Median host time per call in us (samples of 20 calls: the device queue never fills)."""
    return time_calls(fn, warmup=20, reps=10, iters=20, device=device, clock="host").median * 1e3


def report(shape: tuple[int, ...]) -> tuple[str, str]:
    """(the device's name, the report) for a layer of ``shape``."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tmp = tempfile.mkdtemp()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    dtype = torch.bfloat16 if cuda else torch.float32
    channels = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    grad = torch.randn_like(x)
    weight = torch.ones(channels, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)
    ops = backend_for(x)

    def syncbn_fwd():
        return syncbn.functional.sync_batch_norm(x, running_mean, running_var, weight, bias, True)

    def syncbn_fwd_bwd():
        torch.autograd.grad(syncbn_fwd(), (x, weight, bias), grad)

    def bn_fwd_bwd():
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True)
        torch.autograd.grad(y, (x, weight, bias), grad)

    torch_sync = torch.nn.modules._functions.SyncBatchNorm

    def torch_sync_fwd_bwd():
        y = torch_sync.apply(x, weight, bias, running_mean, running_var, 1e-5, 0.1, dist.group.WORLD, 1)
        torch.autograd.grad(y, (x, weight, bias), grad)

    xd = x.detach()
    stats, scratch = ops.forward_stats(xd)
    running = RunningStats(running_mean, running_var, 0.1)
    _, mean, invstd = ops.finalize_normalize(
        xd, stats, eps=1e-5, weight=weight, bias=bias, running=running
    )  # for the backward rows
    sums = ops.backward_reduce(grad, xd, mean)
    count = stats[-1]
    call = passes.Call(1e-5, None, True)
    small = torch.ones(2 * channels + 1, device=device, dtype=torch.float64)
    wd = weight.detach()

    class Identity(torch.autograd.Function):
        """The cheapest autograd Function: what the engine costs per layer."""

        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    class ReduceInBackward(Identity):
        """An all-reduce made in backward, on the autograd engine's thread, as syncbn's is."""

        @staticmethod
        def backward(ctx, g):
            dist.all_reduce(small)
            return g

    def through(fn):
        return lambda: torch.autograd.grad(fn.apply(x), (x,), grad)

    def fused_forward():
        return ops.finalize_normalize(xd, stats, eps=1e-5, weight=weight, bias=bias, running=running)

    def fused_backward():
        return ops.backward_reduce_affine(grad, xd, mean, invstd, weight_dtype=torch.float32, bias_dtype=torch.float32)

    rows = [
        ("F.batch_norm fwd+bwd (autograd.grad)", host_us(bn_fwd_bwd, device=device)),
        # torch's SyncBN Function has no CPU kernels
        ("torch SyncBN path fwd+bwd", host_us(torch_sync_fwd_bwd, device=device) if cuda else float("nan")),
        ("syncbn fwd", host_us(syncbn_fwd, device=device)),
        ("syncbn fwd+bwd", host_us(syncbn_fwd_bwd, device=device)),
        ("  ops.forward_stats (Triton: 2 launches)", host_us(lambda: ops.forward_stats(xd), device=device)),
        ("  ops.finalize_normalize (Triton: 1)", host_us(fused_forward, device=device)),
        ("  ops.backward_reduce_affine (Triton: 2)", host_us(fused_backward, device=device)),
        (
            "  ops.backward_elemt (Triton: 1)",
            host_us(lambda: ops.backward_elemt(grad, xd, mean, invstd, wd, sums, count), device=device),
        ),
        (
            "  forward_pass (no autograd)",
            host_us(
                lambda: passes.forward_pass(xd, wd, bias.detach(), running, call),
                device=device,
            ),
        ),
        (
            "  backward_pass (no autograd)",
            host_us(
                lambda: passes.backward_pass(
                    grad, xd, wd, bias.detach(), mean, invstd, count, call, (True, True, True), torch.float32
                ),
                device=device,
            ),
        ),
        ("  dist.all_reduce (2C+1 float64)", host_us(lambda: dist.all_reduce(small), device=device)),
        ("  identity autograd.Function fwd+bwd", host_us(through(Identity), device=device)),
        ("  same, all_reduce in its backward", host_us(through(ReduceInBackward), device=device)),
        ("  one small torch op (mul)", host_us(lambda: small.mul(2.0), device=device)),
        ("  torch.empty (C floats)", host_us(lambda: torch.empty(channels, device=device), device=device)),
        ("  syncbn.distributed.sync_world_size", host_us(lambda: syncbn.distributed.sync_world_size(None))),
        ("  check_input", host_us(lambda: syncbn.functional.check_input(x, channels))),
    ]
    # The same with the fast launch path (compiled kernels relaunched directly; CUDA only).
    with settings.TRITON_FAST_LAUNCH.set(True):
        rows += [
            ("fast launch: syncbn fwd", host_us(syncbn_fwd, device=device)),
            ("fast launch: syncbn fwd+bwd", host_us(syncbn_fwd_bwd, device=device)),
            ("fast launch:   ops.finalize_normalize (Triton: 1)", host_us(fused_forward, device=device)),
            ("fast launch:   ops.backward_reduce_affine (Triton: 2)", host_us(fused_backward, device=device)),
        ]
    # Every thread's ops (cProfile below sees only this thread, not the autograd engine's).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            syncbn_fwd_bwd()
    op_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        syncbn_fwd_bwd()
    profiler.disable()
    if cuda:
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)

    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    header = (
        f"# host time per call, {device_name}, torch {torch.__version__}, syncbn {syncbn.__version__}, {today()}, "
        f"shape {shape} {dtype}, backend {ops.__name__}"
    )
    table = "\n".join([header] + [f"{name:<55} {us:9.1f} us" for name, us in rows])
    dist.destroy_process_group()
    print(text.getvalue())
    print(op_table)
    print(table, flush=True)
    return device_name, table + "\n\n" + op_table + "\n\n" + text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,64,8,8", help="the layer's input shape (default 8,64,8,8)")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    # the synced path at world size 1: both collectives run
    with settings.ALWAYS_SYNC.set(True):
        device_name, text = report(tuple(int(v) for v in args.shape.split(",")))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"host-overhead-{slug(device_name)}.txt"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
