"""GPU tests: the Triton kernels at real sizes, the layer on a 1-process NCCL group, CUDA graphs.

    PYTHONPATH=. python benchmarks/gpu_check.py        # runs this file (and the rest) on a GPU
    python -m pytest -q tests/test_cuda.py             # the same, by hand

Everything here needs CUDA and is skipped without it; tests/test_triton_ops.py covers the
kernels on CPU under Triton's interpreter. What only a GPU can show:

- the compiled kernels (not the interpreter) agree with float64 statistics and with the torch
  path at the sizes the benchmarks use, where tiles, splits and the merge are all in play;
- ``syncbn.SyncBatchNorm`` on the synced path (a 1-process NCCL group, ``SYNCBN_ALWAYS_SYNC=1``)
  matches ``nn.BatchNorm`` on the same data, and makes no device-to-host synchronization;
- a whole training step with syncbn layers, captured once in a ``torch.cuda.CUDAGraph`` and
  replayed on new data, trains exactly like eager mode, step by step;
- the reliability features with the compiled kernels and NCCL: ``torch.compile(fullgraph=True)``
  with inductor (and its CUDA graphs), the traced layer and the custom ops, activation checkpointing,
  ``SYNCBN_DEBUG``'s all_gather over NCCL, NaN/inf, 65536 channels, strided and expanded
  inputs, zero channels, inference mode, the double-backward error;
- Lightning's Trainer with ``syncbn.integrations.lightning.SyncBatchNormPlugin`` on GPUs;
- launch/train.py's preemption path on NCCL: the stop flag and RNG states over a gloo group
  beside NCCL, each rank's CUDA RNG state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import syncbn
from syncbn import activations, settings
from syncbn import distributed as sb_distributed
from syncbn.ops import backend_name, launch_plan, reference
from tests.oracle import away_from_kinks, layer_pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA; benchmarks/gpu_check.py runs these tests on a GPU machine",
    ),
]

DEVICE = torch.device("cuda")

# Outputs in x's dtype: (rtol, atol). Both sides compute in float32 and round once.
OUT_TOL = {
    torch.float32: (1e-5, 1e-5),  # float32 math in another order
    torch.float16: (1e-3, 2e-3),  # one float16 rounding apart at most
    torch.bfloat16: (8e-3, 1.6e-2),  # one bfloat16 rounding apart at most
}


def _triton_ops():
    from syncbn.ops import triton as triton_ops

    return triton_ops


def make_input(shape, dtype, memory_format=None, seed=0, mean=0.5, std=2.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEVICE) * std + mean
    x = x + 0.01 * torch.arange(shape[1], device=DEVICE).view((1, -1) + (1,) * (len(shape) - 2))
    x = x.to(dtype)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


def channel_view(t, ndim):
    return t.view((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize(
    "shape, dtype, memory_format",
    [
        ((32, 64, 112, 112), torch.bfloat16, torch.channels_last),  # ResNet stem, AMP
        ((32, 64, 112, 112), torch.float32, None),
        ((32, 2048, 7, 7), torch.bfloat16, torch.channels_last),  # many channels, H*W = 49
        ((32, 2048, 7, 7), torch.float16, None),
        ((2, 64, 400, 608), torch.float32, None),  # detection stem: few channels, huge N*H*W
        ((2, 64, 400, 608), torch.bfloat16, torch.channels_last),
        ((4096, 2048), torch.bfloat16, None),  # BatchNorm1d in a projection head
        ((2, 32, 8, 28, 28), torch.float16, torch.channels_last_3d),
    ],
    ids=["stem-bf16-nhwc", "stem-f32-nchw", "c2048-bf16-nhwc", "c2048-f16-nchw",
         "det-f32-nchw", "det-bf16-nhwc", "2d-bf16", "3d-f16-ndhwc"],
)  # fmt: skip
def test_kernels_at_real_sizes(shape, dtype, memory_format):
    triton_ops = _triton_ops()
    x = make_input(shape, dtype, memory_format)
    assert backend_name(x) == "triton"
    channels, dims = shape[1], [0] + list(range(2, len(shape)))
    x64 = x.double()

    n, mean, var = _moments(triton_ops.local_stats(x))
    var64, mean64 = torch.var_mean(x64, dims, correction=0)
    assert n.item() == x.numel() // channels
    # float32 tile sums of shifted values merged in float64: ~1e-7 relative, 1e-5 leaves room.
    torch.testing.assert_close(var, var64, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, mean64, rtol=0, atol=1e-5 * var64.max().sqrt().item())

    stats = reference.local_stats(x)
    mean32, invstd = reference.finalize(stats, 1e-5, None, torch.float32)
    weight = torch.rand(channels, device=DEVICE) + 0.5
    bias = torch.randn(channels, device=DEVICE)
    rtol, atol = OUT_TOL[dtype]
    y = triton_ops.normalize(x, mean32, invstd, weight, bias)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, reference.normalize(x, mean32, invstd, weight, bias), rtol=rtol, atol=atol)
    del y

    dy = make_input(shape, dtype, memory_format, seed=1, mean=0.0, std=1.0)
    sums = triton_ops.backward_reduce(dy, x, mean32)
    xmu = x64 - channel_view(mean32.double(), x.dim())
    terms = (dy.double(), dy.double() * xmu)
    truth = torch.cat([t.sum(dims) for t in terms])
    scale = torch.cat([t.abs().sum(dims) for t in terms])
    del xmu, terms
    # float32 partial sums: error a small multiple of eps32 times the sum of |terms|.
    assert ((sums.double() - truth).abs() <= 1e-5 * scale + 1e-6).all()

    grad_in = triton_ops.backward_elemt(dy, x, mean32, invstd, weight, sums, stats[-1])
    assert grad_in.dtype == x.dtype and grad_in.stride() == x.stride()
    ref = reference.backward_elemt(dy, x, mean32, invstd, weight, sums, stats[-1])
    torch.testing.assert_close(grad_in, ref, rtol=rtol, atol=atol)


def _moments(packed):
    c = (packed.numel() - 1) // 2
    n = packed[-1]
    mean = packed[:c] / n
    return n, mean, packed[c : 2 * c] / n - mean * mean


# --- the fused activation at real sizes ---------------------------------------------------

FUSED = [("relu", None, False), ("silu", None, False), ("gelu", None, False), ("hardswish", None, False),
         ("leaky_relu", 0.1, True), ("elu", 1.0, True)]  # fmt: skip


@pytest.mark.parametrize(
    "shape, dtype, memory_format",
    [
        ((32, 64, 112, 112), torch.bfloat16, torch.channels_last),
        ((32, 256, 56, 56), torch.float32, None),
        ((32, 2048, 7, 7), torch.float16, None),
        ((4096, 2048), torch.bfloat16, None),
    ],
    ids=["stem-bf16-nhwc", "stage1-f32-nchw", "c2048-f16-nchw", "2d-bf16"],
)
def test_fused_kernels_at_real_sizes(shape, dtype, memory_format):
    """Every activation's forward and both backward passes (in place: from the output written
    over the input) against the torch-ops path on the same CUDA tensors and float64 sums."""
    triton_ops = _triton_ops()
    x = make_input(shape, dtype, memory_format)
    channels, dims = shape[1], [0] + list(range(2, len(shape)))
    stats = reference.local_stats(x)
    weight = torch.rand(channels, device=DEVICE) + 0.5
    bias = torch.randn(channels, device=DEVICE)
    dy = make_input(shape, dtype, memory_format, seed=1, mean=0.0, std=1.0)
    rtol, atol = OUT_TOL[dtype]
    view = (1, -1) + (1,) * (x.dim() - 2)
    for name, param, inplace in FUSED:
        spec = activations.spec(name, param, inplace)
        kwargs = dict(eps=1e-5, weight=weight, bias=bias, running=None, act=spec)
        y, mean, invstd = triton_ops.finalize_normalize(x, stats, **kwargs)
        ref_y = reference.finalize_normalize(x, stats, **kwargs)[0]
        torch.testing.assert_close(y, ref_y, rtol=rtol, atol=atol, msg=lambda m: f"{name} y: {m}")
        for ops in (triton_ops, reference):  # written over the input: the same values
            over = x.clone()
            assert ops.finalize_normalize(over, stats, **kwargs, overwrite=True)[0].data_ptr() == over.data_ptr()
            torch.testing.assert_close(over, y, rtol=rtol, atol=atol)
        del ref_y, over
        saved = y if inplace else x
        affine = dict(act=spec, weight=weight, bias=bias)
        sums, _, _ = triton_ops.backward_reduce_affine(
            dy, saved, mean, invstd, weight_dtype=None, bias_dtype=None, **affine
        )
        xmu = x.double() - mean.double().view(view)
        pre = xmu * (invstd * weight).double().view(view) + bias.double().view(view)
        g = dy.double() * spec.entry.derivative(pre, param)
        terms = (g, g * xmu)
        truth = torch.cat([t.sum(dims) for t in terms])
        scale = torch.cat([t.abs().sum(dims) for t in terms])
        keep = away_from_kinks(pre, spec.entry.kinks, dtype)
        assert keep.float().mean() > 0.98
        del xmu, pre, g, terms
        # float32 sums; in place, x - mean from the output, whose rounding (half precision: 2**-8
        # relative) divided by w >= 0.5 enters every term
        bound = 1e-5 if dtype == torch.float32 and not inplace else 2e-2
        assert ((sums.double() - truth).abs() <= bound * scale + 1e-4).all(), name
        grad_in = triton_ops.backward_elemt(dy, saved, mean, invstd, weight, sums, stats[-1], act=spec, bias=bias)
        ref = reference.backward_elemt(dy, saved, mean, invstd, weight, sums, stats[-1], act=spec, bias=bias)
        assert grad_in.dtype == x.dtype and grad_in.stride() == x.stride()
        torch.testing.assert_close(
            grad_in[keep], ref[keep], rtol=rtol, atol=max(atol, 1e-4), msg=lambda m: f"{name} dx: {m}"
        )
        del y, saved, grad_in, ref, keep


# --- the layer on a 1-process NCCL group -------------------------------------------------


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    """A 1-process NCCL world, initialized in this process, destroyed after the module."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def always_sync(monkeypatch, nccl_group):
    """The synced path at world size 1, with a count of the all-reduces it makes."""
    monkeypatch.setenv(settings.ALWAYS_SYNC.name, "1")
    calls = []
    real = sb_distributed.all_reduce_sum

    def counting(buffer, group):
        calls.append(buffer.numel())
        return real(buffer, group)

    monkeypatch.setattr(sb_distributed, "all_reduce_sum", counting)
    return calls


def _train(module, xs, dys):
    out = []
    for x, dy in zip(xs, dys):
        x = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(dy)
        out.append((y.detach(), x.grad, module.weight.grad, module.bias.grad))
    return out


@pytest.mark.parametrize(
    "shape, dtype, memory_format, momentum",
    [
        ((8, 32, 28, 28), torch.float32, None, 0.1),
        ((8, 32, 28, 28), torch.bfloat16, torch.channels_last, None),  # AMP, cumulative average
        ((4, 16, 6, 14, 14), torch.float16, torch.channels_last_3d, 0.1),
        ((64, 256), torch.float32, None, 0.3),
    ],
    ids=["f32-nchw", "bf16-nhwc-momentum-none", "f16-ndhwc", "2d-f32"],
)
def test_layer_synced_world_of_one_matches_batchnorm(always_sync, shape, dtype, memory_format, momentum):
    channels = shape[1]
    ours, theirs = layer_pair(shape, momentum, DEVICE)
    xs = [make_input(shape, dtype, memory_format, seed=s) for s in (10, 11, 12)]
    dys = [make_input(shape, dtype, memory_format, seed=s, mean=0.0, std=1.0) for s in (20, 21, 22)]
    # Warm-up on a spare layer: compiles the kernels and starts NCCL outside the checks below.
    _train(syncbn.SyncBatchNorm(channels, momentum=momentum).to(DEVICE), xs[:1], dys[:1])
    always_sync.clear()
    with sync_debug_error():
        got = _train(ours, xs, dys)
    # The reference: float32 BatchNorm on the same (rounded) values.
    want = _train(theirs, [x.float() for x in xs], [d.float() for d in dys])
    assert always_sync == [2 * channels + 1, 2 * channels] * 3  # one all-reduce per pass
    rtol, atol = OUT_TOL[dtype]
    for (y, gx, gw, gb), (ry, rgx, rgw, rgb) in zip(got, want):
        assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format or torch.contiguous_format)
        torch.testing.assert_close(y.float(), ry, rtol=rtol, atol=atol)
        torch.testing.assert_close(gx.float(), rgx, rtol=rtol, atol=atol)
        # weight/bias grads: float32 sums over up to 200k values in a different order.
        torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gb, rgb, rtol=1e-4, atol=1e-3)
    # float64-merged statistics against cuDNN/ATen float32 ones.
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


@pytest.mark.parametrize("name, param, inplace", FUSED, ids=[f"{n}{'-inplace' if i else ''}" for n, _, i in FUSED])
def test_fused_layer_synced_world_of_one_matches_batchnorm_then_activation(always_sync, name, param, inplace):
    """SyncBatchNormAct on the synced path (bfloat16, channels_last, float32 parameters) against
    nn.BatchNorm2d then torch's activation in float32 on the same values: two all-reduces per
    step, no host synchronization."""
    shape, channels = (8, 32, 28, 28), 32
    ours = syncbn.SyncBatchNormAct(channels, activation=name, activation_param=param, inplace=inplace).to(DEVICE)
    theirs = nn.BatchNorm2d(channels).to(DEVICE)
    module = {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU(), "hardswish": nn.Hardswish(),
              "leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param)}[name]  # fmt: skip
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, channels))
            m.bias.copy_(torch.linspace(-1, 1, channels))
    x = make_input(shape, torch.bfloat16, torch.channels_last, seed=10)
    dy = make_input(shape, torch.bfloat16, torch.channels_last, seed=20, mean=0.0, std=1.0)

    def run(layer, data, grad):
        leaf = data.clone().requires_grad_(True)
        y = layer(leaf * 1)  # a non-leaf: the in-place layer writes over it
        y.backward(grad)
        return y.detach().float(), leaf.grad.float()

    run(ours, x, dy)  # warm-up: compiles the kernels outside the checks
    always_sync.clear()
    with sync_debug_error():
        y, dx = run(ours, x, dy)
    ry, rdx = run(nn.Sequential(theirs, module), x.float(), dy.float())
    assert always_sync == [2 * channels + 1, 2 * channels]
    with torch.no_grad():
        keep = away_from_kinks(theirs(x.float()), module_kinks(name), torch.float32)
    # bfloat16 output and input gradient: a couple of roundings (8 significant bits); in place,
    # x_hat is recovered from the bfloat16 output
    torch.testing.assert_close(y, ry, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx[keep], rdx[keep], rtol=3e-2, atol=3e-2)


def module_kinks(name):
    return activations.ACTIVATIONS[name].kinks


@contextlib.contextmanager
def sync_debug_error():
    """Any device-to-host synchronization inside raises (where torch offers the check)."""
    if not hasattr(torch.cuda, "set_sync_debug_mode"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- CUDA graphs: a whole training step captured and replayed ------------------------------


def _small_model(fused: bool = False):
    """Three BatchNorm + activation layers; ``fused``: as SyncBatchNormAct (relu, leaky_relu in
    place, silu), the same indices (the activation modules become nn.Identity)."""
    torch.manual_seed(0)
    if fused:
        norms = (
            syncbn.SyncBatchNormAct(16, activation="relu"),
            syncbn.SyncBatchNormAct(32, momentum=None, activation="leaky_relu", activation_param=0.1, inplace=True),
            syncbn.SyncBatchNormAct(24, activation="silu"),
        )
        acts = (nn.Identity(), nn.Identity(), nn.Identity())
    else:
        norms = (syncbn.SyncBatchNorm(16), syncbn.SyncBatchNorm(32, momentum=None), syncbn.SyncBatchNorm(24))
        acts = (nn.ReLU(), nn.ReLU(), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        norms[0],
        acts[0],
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        norms[1],  # cumulative average: a device-side momentum
        acts[1],
        nn.Conv2d(32, 24, 1, bias=False),
        norms[2],
        acts[2],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    ).to(DEVICE)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("synced", [False, True], ids=["no-group", "nccl-world-1"])
@pytest.mark.parametrize("launch", ["ordinary-launch", "fast-launch"])
@pytest.mark.parametrize("fused", [False, True], ids=["SyncBatchNorm", "SyncBatchNormAct"])
def test_cuda_graph_training_step(request, monkeypatch, synced, channels_last, launch, fused):
    monkeypatch.setenv(settings.TRITON_FAST_LAUNCH.name, "1" if launch == "fast-launch" else "0")
    if synced:
        request.getfixturevalue("nccl_group")
        monkeypatch.setenv(settings.ALWAYS_SYNC.name, "1")
    else:  # with or without a default group of one: no collective without SYNCBN_ALWAYS_SYNC
        monkeypatch.delenv(settings.ALWAYS_SYNC.name, raising=False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = _small_model(fused).to(memory_format=memory_format)
    eager = copy.deepcopy(model)
    initial = _state(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)

    g = torch.Generator(device=DEVICE).manual_seed(1)
    batches = [
        (torch.randn(8, 3, 16, 16, device=DEVICE, generator=g).contiguous(memory_format=memory_format),
         torch.randint(0, 10, (8,), device=DEVICE, generator=g))
        for _ in range(6)
    ]  # fmt: skip
    static_x = batches[0][0].clone()
    static_t = batches[0][1].clone()

    # Warm up on a side stream (compiles the kernels, initializes NCCL), as PyTorch documents.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(static_x), static_t).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    # NCCL's watchdog thread queries events: "thread_local" keeps the capture strict for this
    # thread (any synchronizing call of ours still fails) without tripping over that thread.
    mode = "thread_local" if synced else "global"
    with torch.cuda.graph(graph, capture_error_mode=mode):
        static_loss = loss_fn(model(static_x), static_t)
        static_loss.backward()
        opt.step()

    # Undo the warm-up: the graph reads and writes these very tensors.
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(initial[k])

    for step, (x, t) in enumerate(batches):
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()

        opt_eager.zero_grad(set_to_none=True)
        loss = loss_fn(eager(x), t)
        loss.backward()
        opt_eager.step()

        # Same kernels on the same data; conv algorithms may differ in summation order.
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5, msg=f"loss, step {step}")
        got, want = model.state_dict(), eager.state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{k}, step {step}")
    assert model[4].num_batches_tracked.item() == len(batches)


def test_no_host_sync_in_a_training_step():
    if not hasattr(torch.cuda, "set_sync_debug_mode"):
        pytest.skip("torch.cuda.set_sync_debug_mode is not available")
    layer = syncbn.SyncBatchNorm(64, momentum=None).to(DEVICE)
    x = make_input((4, 64, 32, 32), torch.bfloat16, torch.channels_last).requires_grad_(True)
    layer(x).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    with sync_debug_error():
        layer(x).sum().backward()  # an expanded gradient: one copy, no synchronization
    torch.cuda.synchronize()


@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_fast_launch_is_bitwise_the_ordinary_launch(always_sync, monkeypatch, memory_format):
    """SYNCBN_TRITON_FAST_LAUNCH=1 reuses compiled kernels; results must not change at all, also
    when the same shape comes with a misaligned view (another specialization) or without
    weight and bias. (test_cuda_graph_training_step runs it under graph capture.)"""
    _triton_ops()  # the kernels must import on this machine
    shape = (4, 24, 9, 9)

    def inputs(offset):
        # offset 1 (one float): data_ptr not 16-byte aligned, the same shape and strides
        flat = torch.randn(
            math.prod(shape) + offset, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(offset)
        )
        if memory_format is None:
            return flat[offset:].view(shape)
        n, c, h, w = shape
        return flat[offset:].view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last strides

    def run(fast):
        monkeypatch.setenv(settings.TRITON_FAST_LAUNCH.name, "1" if fast else "0")
        out = []
        for affine in (True, False, True):
            for offset in (0, 1, 0, 1):
                torch.manual_seed(0)
                layer = syncbn.SyncBatchNorm(24, affine=affine).to(DEVICE)
                x = inputs(offset)
                assert (x.data_ptr() % 16 == 0) == (offset == 0)
                x.requires_grad_(True)
                y = layer(x)
                y.backward(torch.cos(y.detach()))
                out.append((y, x.grad, layer.running_mean, layer.running_var))
        return out

    ordinary, fast = run(False), run(True)
    for a, b in zip(ordinary, fast):
        for t, u in zip(a, b):
            assert torch.equal(t, u)
    cached = sum(len(p.launches) for p in launch_plan.cached_plans())
    assert cached >= 6, "the fast path kept no compiled kernels"


def test_eval_and_reference_backend_still_work(monkeypatch):
    layer = syncbn.SyncBatchNorm(8).to(DEVICE)
    x = make_input((4, 8, 5, 5), torch.float32)
    layer(x)
    layer.eval()
    torch.testing.assert_close(
        layer(x),
        F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps),
    )  # fmt: skip
    monkeypatch.setenv(settings.BACKEND.name, "torch")
    assert backend_name(x) == "torch"
    layer.train()
    layer(x).sum().backward()


# --- reliability: torch.compile, checkpointing, debug mode, edge inputs on the GPU ---
#
# The CPU suite checks all of this on gloo with the torch path and (interpreted) Triton kernels;
# here the compiled Triton kernels and NCCL take part: inductor's code around the custom ops,
# the debug all_gather of CUDA descriptors over NCCL, NaN through the compiled kernels, many
# channels and odd strides at GPU launch configurations.


def _compiled_vs_eager(model, steps, memory_format, autocast, compile_kwargs):
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    loss_fn = nn.CrossEntropyLoss()
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, device=DEVICE, generator=g).contiguous(memory_format=memory_format)
        t = torch.randint(0, 10, (8,), device=DEVICE, generator=g)
        losses = []
        for net, m, opt in ((compiled, model, opt_c), (eager, eager, opt_e)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type, torch.bfloat16, enabled=autocast):
                loss = loss_fn(net(x), t)
            loss.backward()
            # clones: under CUDA graphs the next replay overwrites the outputs
            losses.append((loss.detach().float().clone(), {k: p.grad.clone() for k, p in m.named_parameters()}))
            opt.step()
        out.append((losses, _state(model), _state(eager)))
    return out


@pytest.mark.parametrize("path", ["traced", "ops"])
@pytest.mark.parametrize(
    "channels_last, autocast, mode",
    [(False, False, None), (True, True, None), (False, False, "reduce-overhead")],
    ids=["f32-nchw", "bf16-autocast-nhwc", "f32-cudagraphs"],
)
def test_compile_inductor_fullgraph_matches_eager(always_sync, monkeypatch, channels_last, autocast, mode, path):
    """Inductor on an NCCL world of one, synced path: the traced layer (inductor's own kernels,
    a functional all-reduce; under CUDA graphs too), or the custom ops with syncbn's Triton
    kernels inside."""
    torch._dynamo.reset()  # SYNCBN_COMPILE is read when tracing
    monkeypatch.setenv(settings.COMPILE.name, path)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = _small_model().to(memory_format=memory_format)
    kwargs = {"backend": "inductor"} if mode is None else {"backend": "inductor", "mode": mode}
    results = _compiled_vs_eager(model, 4, memory_format, autocast, kwargs)
    # inductor fuses the code around the layers (loss, pooling, ReLU) in its own order; bf16
    # autocast rounds activations to 8 bits.
    rtol, atol = (2e-2, 2e-2) if autocast else (1e-3, 1e-4)
    for step, ((compiled, eager), state_c, state_e) in enumerate(results):
        torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol, msg=f"loss, step {step}")
        for k in eager[1]:
            torch.testing.assert_close(compiled[1][k], eager[1][k], rtol=rtol, atol=atol, msg=f"grad {k}, step {step}")
        for k in state_e:
            torch.testing.assert_close(state_c[k], state_e[k], rtol=rtol, atol=atol, msg=f"{k}, step {step}")
    if mode is None:  # (CUDA graph replays run no Python, so they cannot be counted)
        # every layer synchronized in both passes: 4 steps, 3 layers, 2 passes, eager and (as
        # custom ops, which call syncbn's all-reduce) compiled; traced, the functional
        # all-reduce runs inside the graph instead
        assert len(always_sync) == 4 * 3 * 2 * (2 if path == "ops" else 1)
    assert results[-1][1]["4.num_batches_tracked"].item() == 4


def test_compile_inductor_fullgraph_fused_layers(always_sync):
    """SyncBatchNormAct (fused, and in place: the op writes a new output) under inductor."""
    results = _compiled_vs_eager(_small_model(fused=True), 3, torch.contiguous_format, False, {"backend": "inductor"})
    for step, ((compiled, eager), state_c, state_e) in enumerate(results):
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-3, atol=1e-4, msg=f"loss, step {step}")
        for k in eager[1]:
            torch.testing.assert_close(compiled[1][k], eager[1][k], rtol=1e-3, atol=1e-4, msg=f"grad {k}, step {step}")
        for k in state_e:
            torch.testing.assert_close(state_c[k], state_e[k], rtol=1e-3, atol=1e-4, msg=f"{k}, step {step}")
    assert len(always_sync) == 3 * 3 * 2 * 2


def test_checkpoint_matches_no_checkpoint_on_gpu(always_sync):
    from torch.utils.checkpoint import checkpoint

    model = _small_model()
    twin = copy.deepcopy(model)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    for _ in range(3):
        x = torch.randn(8, 3, 16, 16, device=DEVICE, generator=g)
        always_sync.clear()
        h = model[:3](x)
        y = model[6:](checkpoint(model[3:6], h, use_reentrant=False))
        y.square().sum().backward()
        assert len(always_sync) == 3 * 2 + 1  # the checkpointed layer synchronizes again
        twin(x).square().sum().backward()
    for (k, a), b in zip(twin.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)  # stats updated once
    for (k, a), b in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_debug_mode_over_nccl(always_sync, monkeypatch):
    """The descriptor all_gather runs on CUDA tensors over NCCL; results do not change."""
    model = _small_model()
    twin = copy.deepcopy(model)
    x = make_input((8, 3, 16, 16), torch.float32)
    twin(x).sum().backward()
    monkeypatch.setenv(settings.DEBUG.name, "1")
    sb_distributed.reset_debug_state()
    model(x).sum().backward()
    assert sb_distributed._debug_calls  # the checks ran
    for (k, a), b in zip(twin.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def _bn_reference(x, channels, momentum=0.1):
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    return bn(channels, momentum=momentum).to(DEVICE)


def test_nan_and_inf_through_the_kernels(always_sync):
    x = make_input((4, 8, 12, 12), torch.float32)
    x[1, 0, 3, 3] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    ours, ref = syncbn.SyncBatchNorm(8).to(DEVICE), _bn_reference(x, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4, equal_nan=True)
    for a, b in ((ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (a, b)  # NaN where BN has inf
        torch.testing.assert_close(a[2:], b[2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, dtype, memory_format",
    [((4, 65536), torch.float32, None), ((2, 65536, 1, 2), torch.bfloat16, torch.channels_last)],
    ids=["2d-f32", "nhwc-bf16"],
)
def test_65536_channels_few_values(always_sync, shape, dtype, memory_format):
    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = (torch.randn(shape, device=DEVICE, generator=g) * 2 + 0.5).to(dtype)  # no channel ramp
    x = x.contiguous(memory_format=memory_format or torch.contiguous_format)
    ours, ref = syncbn.SyncBatchNorm(shape[1]).to(DEVICE), _bn_reference(x, shape[1])
    xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    dy = (
        torch.randn(shape, device=DEVICE, generator=g)
        .to(dtype)
        .contiguous(memory_format=memory_format or torch.contiguous_format)
    )
    ya.backward(dy)
    yb.backward(dy.float())
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(ya.float(), yb, rtol=rtol, atol=atol)
    torch.testing.assert_close(xa.grad.float(), xb.grad, rtol=rtol, atol=4 * atol)  # 4 values: cancellation
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sliced", "transposed", "expanded"])
def test_strided_and_expanded_inputs(always_sync, kind):
    base = make_input((6, 16, 10, 12), torch.float32)
    views = {
        "sliced": lambda t: t[..., ::2],
        "transposed": lambda t: t.transpose(2, 3),
        "expanded": lambda t: t[:1].expand(6, -1, -1, -1),
    }
    ours, ref = syncbn.SyncBatchNorm(16).to(DEVICE), _bn_reference(base, 16)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    ya, yb = ours(views[kind](a)), ref(views[kind](b))
    ya.sum().backward()  # an expanded gradient too
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)


def test_zero_channels_inference_mode_and_double_backward(always_sync):
    empty = syncbn.SyncBatchNorm(0).to(DEVICE)
    assert empty(torch.randn(4, 0, 3, 3, device=DEVICE)).shape == (4, 0, 3, 3)
    always_sync.clear()
    layer = syncbn.SyncBatchNorm(8).to(DEVICE)
    with torch.inference_mode():
        y = layer(make_input((4, 8, 5, 5), torch.float32))
    assert y.is_inference() and not layer.running_var.is_inference()
    assert always_sync == [2 * 8 + 1]
    x = make_input((4, 8, 5, 5), torch.float32).requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="syncbn: double backward"):
        gx.sum().backward()


def test_update_bn_stats_and_sync_buffers_on_cuda(always_sync):
    """Population statistics of a CUDA model from CPU batches (an empty one among them), every
    collective on CUDA tensors over NCCL: the layer's forwards, then the step count and the two
    merges; sync_batchnorm_buffers adds one. The first layer sees the raw float32 input: its
    statistics are the float64 ones of those values, rounded once."""
    model = nn.Sequential(syncbn.SyncBatchNorm(3), nn.BatchNorm2d(3)).to(DEVICE)
    batches = [(torch.randn(n, 3, 10, 10) * 2 + 3, torch.zeros(n)) for n in (4, 0, 6)]
    always_sync.clear()
    syncbn.update_bn_stats(model, batches)
    assert always_sync == [1, 7, 7, 7, 2 + 6, 6]  # counts; 3 forwards of 2C + 1; sums; deviations
    x = torch.cat([b[0] for b in batches]).double()
    var, mean = torch.var_mean(x, dim=(0, 2, 3))
    torch.testing.assert_close(model[0].running_mean.cpu(), mean.float(), rtol=2**-23, atol=0.0)
    torch.testing.assert_close(model[0].running_var.cpu(), var.float(), rtol=2**-23, atol=0.0)
    y = F.batch_norm(x, None, None, training=True)  # the second layer's input, in float64
    var, mean = torch.var_mean(y, dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean.cpu().double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.cpu().double(), var, rtol=1e-5, atol=1e-5)
    always_sync.clear()
    before = model[1].running_var.clone()
    syncbn.sync_batchnorm_buffers(model, mode="mean")
    assert always_sync == [2 + 2 * 6]  # one all-reduce for both layers
    assert torch.equal(model[1].running_var, before)  # the mean over one rank


def test_lightning_plugin_on_gpus(tmp_path):
    # tests/test_lightning.py's Trainer run over up to 2 GPUs (NCCL); on a machine with one
    # GPU, the synced path in a group of one.
    from tests.test_lightning import check_lightning_run

    devices = min(2, torch.cuda.device_count())
    check_lightning_run(tmp_path, "gpu", devices, env={} if devices > 1 else {settings.ALWAYS_SYNC.name: "1"})


def test_train_template_stops_and_resumes_on_nccl(tmp_path):
    """launch/train.py on NCCL (1 or 2 GPUs): a SIGTERM inside step 5 stops every rank after it,
    the stop flag and the RNG states going over the gloo group beside NCCL; the checkpoint holds
    each rank's CUDA RNG state (the random flips draw from it); --resume finishes the run."""
    from tests import procs

    nproc = min(2, torch.cuda.device_count())
    ckpt = tmp_path / "ckpt.pt"
    flags = ["--backend", "nccl", "--train-size", "256", "--width", "8", "--batch-size", "8", "--epochs", "2"]
    args = [str(procs.ROOT / "tests" / "faulty_train.py"), *flags, "--augment", "--ckpt", str(ckpt)]
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    first = procs.torchrun(*args, "--fault", "0:0:term:step:5", nproc=nproc, env=env, timeout=240)
    assert first.returncode == 0, first.stdout
    assert f"stopped by SIGTERM after step 5 of {2 * 256 // (8 * nproc)}" in first.stdout, first.stdout
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 5) and all("cuda" in r["rng"] for r in state["ranks"])
    second = procs.torchrun(*args, "--resume", nproc=nproc, env=env, timeout=240)
    assert second.returncode == 0, second.stdout
    assert "then epoch 1, step 5/" in second.stdout and "final: val acc" in second.stdout, second.stdout
