"""``torch.compile(fullgraph=True)`` of syncbn layers and models on 2 to 4 gloo ranks.

Under compile the layer is traced (``syncbn/traced.py``): a functional all-reduce per pass, the
running statistics as buffer mutations. Checked here, mostly with ``aot_eager``
(fast to compile; the same graphs inductor gets) and in a few places with inductor:

- the layer against the float64 oracle (tests/test_layer.py's cases: uneven, empty and
  single-value ranks, momentum None, a sub-group, dtypes and layouts), and every rank's
  compiled graphs making the same collectives: one all-reduce of 2C + 1 float64 values in
  forward and one of 2C in backward, whatever the rank's batch (the graphs differ per rank);
- the global-count rules (ValueError on every rank for one value, an empty global batch),
  dynamic shapes, numerics at a large mean, one compile per shape;
- models against eager mode: plain, DDP (compiled inside and around), activation
  checkpointing inside and around compiled code, inductor's fusion of an activation;
- ``SYNCBN_COMPILE=ops`` (the custom ops, the Triton kernels under the interpreter) and
  SYNCBN_DEBUG, which runs its checks inside those ops.

Each worker case starts with ``torch._dynamo.reset()``: the workers live for the session, and
dynamo reuses a compiled graph for a new module of the same structure (settings such as
SYNCBN_COMPILE are read when tracing, not guarded).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import syncbn
from syncbn import settings
from syncbn.verify import Oracle
from tests.oracle import LayerConfig
from tests.test_layer import CASES, run_and_check

# Compiled against eager mode, same data: the traced formulas round differently from the eager
# kernels (a few float32 ulps), and convolution gradients sum many such terms.
TOL = dict(rtol=1e-4, atol=1e-5)


def _ops_in(gm: torch.fx.GraphModule) -> list[tuple]:
    """The collectives (name, input shape, dtype) and syncbn custom ops (name,) a graph calls."""
    found = []
    for node in gm.graph.nodes:
        namespace = getattr(node.target, "namespace", None)
        if node.op != "call_function" or namespace not in ("_c10d_functional", "syncbn"):
            continue
        name = node.target.name()
        if name.endswith("wait_tensor"):
            continue
        if namespace == "syncbn":
            found.append((name,))
        else:
            val = node.args[0].meta["val"]
            found.append((name, tuple(val.shape), val.dtype))
    return found


def _recording_aot_eager(log: list):
    """``aot_eager`` that appends ``(forward|backward, _ops_in(graph))`` for every graph it compiles."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def recorder(kind):
        def compile_graph(gm, example_inputs):
            log.append((kind, _ops_in(gm)))
            return boxed_nop(gm, example_inputs)

        return compile_graph

    def backend(gm, example_inputs):
        return aot_eager(gm, example_inputs, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))

    return backend


@dataclasses.dataclass(frozen=True)
class Compiled:
    """tests/test_layer.py's ``wrap``: the layer compiled with ``fullgraph=True``; ``info`` holds
    the number of compiles and, with aot_eager, each graph's collectives and syncbn ops."""

    backend: str = "aot_eager"
    dynamic: bool | None = None

    def __call__(self, layer: nn.Module):
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        info: dict = {"graphs": []}
        inner = _recording_aot_eager(info["graphs"]) if self.backend == "aot_eager" else self.backend
        counter = CompileCounterWithBackend(inner)
        compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=self.dynamic)

        def forward(x):
            y = compiled(x)
            info["compiles"] = counter.frame_count
            return y

        return forward, info


def _check_collectives(results: list[dict], channels: int, backward: bool = True) -> None:
    """Every rank: each forward graph one all-reduce of 2C + 1 float64 values, each backward
    graph one of 2C, no other collective and never the opaque custom op."""
    expected = {
        "forward": [("_c10d_functional::all_reduce", (2 * channels + 1,), torch.float64)],
        "backward": [("_c10d_functional::all_reduce", (2 * channels,), torch.float64)],
    }
    for rank, res in enumerate(results):
        graphs = res["info"]["graphs"]
        assert graphs, f"rank {rank}: nothing was compiled"
        kinds = {kind for kind, _ in graphs}
        assert kinds == ({"forward", "backward"} if backward else {"forward"}), (rank, kinds)
        for kind, ops in graphs:
            collectives = [op for op in ops if len(op) == 3]
            assert collectives == expected[kind], f"rank {rank} {kind} graph: {ops}"
            assert ("syncbn::forward",) not in ops, f"rank {rank}: the custom op, not the traced path"


# Under compile a rank's own count (0, 1, more) changes its graph, never its collectives:
# tests/test_layer.py's cases with uneven, empty and single-value ranks, momentum None, a
# sub-group without rank 0; and the variants of the layer's arguments.
ORACLE_CASES = {
    **{
        name: CASES[name]
        for name in ("w2-uneven", "w3-empty-rank", "w4-2d-empty", "w3-momentum-none-empty", "odd-group")
    },
    "w2-no-affine-no-stats-5d": (
        "w2",
        LayerConfig(channels=3, spatial=(2, 3, 4), affine=False, track_running_stats=False, sizes=[[2, 1], [0, 3]]),
    ),
    "w2-bfloat16-channels-last": (
        "w2",
        LayerConfig(
            channels=6, spatial=(5, 6), dtype="bfloat16", memory_format="channels_last", sizes=[[3, 1], [0, 5]]
        ),
    ),
    "w2-float16-channels-last-3d": (
        "w2",
        LayerConfig(
            channels=6, spatial=(2, 3, 4), dtype="float16", memory_format="channels_last_3d", sizes=[[3, 1], [0, 5]]
        ),
    ),
}


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_compiled_layer_matches_oracle(pool, name):
    group, cfg = ORACLE_CASES[name]
    results = run_and_check(pool, group, cfg, wrap=Compiled())
    _check_collectives(results, cfg.channels)


def test_compiled_layer_dynamic_shapes_match_oracle(pool):
    # dynamic=True traces symbolic batch sizes; 0 and 1 are specialized (a recompile on that
    # rank only), which must not change what the ranks all-reduce.
    # (No batch size equals the channel count: dynamo would give both one symbol, and the
    # channel check would then specialize the batch size.)
    cfg = LayerConfig(channels=4, spatial=(), sizes=[[3, 5], [6, 2], [0, 6], [1, 3], [5, 0], [2, 9]])
    results = run_and_check(pool, "w2", cfg, wrap=Compiled(dynamic=True))
    _check_collectives(results, cfg.channels)
    for res in results:
        assert res["info"]["compiles"] <= 4, res["info"]["compiles"]


# --- the global-count rules -------------------------------------------------------------------


def _case_global_count(ctx, sizes, channels):
    torch._dynamo.reset()
    layer = syncbn.SyncBatchNorm(channels, momentum=None, process_group=ctx.group)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = {}
    for label, n in (("one", sizes["one"][ctx.rank]), ("empty", 0), ("after", 2)):
        x = torch.randn(n, channels, generator=torch.Generator().manual_seed(ctx.rank)).requires_grad_()
        try:
            y = compiled(x)
            y.sum().backward()
        except ValueError as err:
            out[label] = str(err)
            continue
        out[label] = {
            "y": y.detach(),
            "dw": layer.weight.grad.clone(),
            "running_mean": layer.running_mean.clone(),
            "running_var": layer.running_var.clone(),
            "num_batches_tracked": int(layer.num_batches_tracked),
        }
        layer.zero_grad()
    return out


def test_compiled_global_count_rules_on_every_rank(pool):
    """A global batch of one value: nn.BatchNorm's ValueError on every rank (the ranks with a
    count of 0 or 1 read the global count back; nobody is left in a collective). An empty
    global batch: empty output, zero gradients, running statistics kept, the batch counted.
    Then training goes on."""
    channels = 4
    results = pool.run(_case_global_count, group="w3", args=({"one": [0, 1, 0]}, channels), timeout=120)
    for rank, res in enumerate(results):
        assert res["one"].startswith("Expected more than 1 value per channel when training, got 1 value"), res
        assert "across the process group" in res["one"]
        empty = res["empty"]
        assert empty["y"].shape == (0, channels)
        assert torch.equal(empty["dw"], torch.zeros(channels))
        assert torch.equal(empty["running_mean"], torch.zeros(channels))
        assert torch.equal(empty["running_var"], torch.ones(channels))
        # eager counts the failed batch too (before its ValueError); compiled code applies its
        # buffer updates at the end of the graph, so the failed batch is not counted
        assert empty["num_batches_tracked"] == 1, empty
        after = res["after"]
        assert after["num_batches_tracked"] == 2
        xs = [torch.randn(2, channels, generator=torch.Generator().manual_seed(r)) for r in range(3)]
        expected = Oracle(2, channels, momentum=None).step(xs, [torch.ones(2, channels)] * 3)
        # momentum None: the cumulative average over the two counted batches, one of them empty
        torch.testing.assert_close(after["running_mean"].double(), expected["running_mean"] / 2, **TOL)
        torch.testing.assert_close(after["y"].double(), expected["y"][rank], **TOL)


# --- numerics -----------------------------------------------------------------------------------


def _case_large_mean(ctx, backend, data):
    x, g = data
    torch._dynamo.reset()
    out = {}
    for name in ("compiled", "eager"):
        layer = syncbn.SyncBatchNorm(x.shape[1], process_group=ctx.group)
        forward = torch.compile(layer, backend=backend, fullgraph=True) if name == "compiled" else layer
        xr = x.clone().requires_grad_()
        forward(xr).backward(g)
        y = forward(xr)  # a second step: the running statistics of two batches
        out[name] = {
            "y": y.detach(),
            "dx": xr.grad,
            "dw": layer.weight.grad.clone(),
            "running_mean": layer.running_mean.clone(),
            "running_var": layer.running_var.clone(),
        }
    return out


def test_compiled_numerics_at_a_large_mean(pool):
    """Float32 input of mean 1e4 and standard deviation 1, inductor: forward, backward and
    running statistics as close to the float64 oracle as eager syncbn's, where statistics from
    plain float32 sums of squares would be off by whole units of the variance (and their
    gradients with them)."""
    channels, sizes = 4, (8, 5)
    xs = [
        torch.randn(n, channels, 16, 16, generator=torch.Generator().manual_seed(r)) + 1e4 for r, n in enumerate(sizes)
    ]
    gs = [torch.randn(n, channels, 16, 16, generator=torch.Generator().manual_seed(9 + r)) for r, n in enumerate(sizes)]
    oracle = Oracle(
        4, channels, weight=torch.ones(channels, dtype=torch.float64), bias=torch.zeros(channels, dtype=torch.float64)
    )
    first = oracle.step(xs, gs)
    second = oracle.step(xs, [torch.zeros_like(g) for g in gs])
    results = pool.run(_case_large_mean, group="w2", args=("inductor",), per_rank_args=list(zip(xs, gs)), timeout=240)

    def errors(res, rank):
        return {
            "y": (res["y"].double() - second["y"][rank]).abs().max().item(),
            "dx": ((res["dx"].double() - first["dx"][rank]).abs().max() / first["dx"][rank].abs().max()).item(),
            "running_mean": (res["running_mean"].double() - second["running_mean"]).abs().max().item(),
            "running_var": (res["running_var"].double() - second["running_var"]).abs().max().item(),
        }

    dw_c = sum(res["compiled"]["dw"].double() for res in results)
    assert ((dw_c - first["dw"]).abs().max() / first["dw"].abs().max()).item() < 1e-3
    for rank, res in enumerate(results):
        compiled, eager = errors(res["compiled"], rank), errors(res["eager"], rank)
        # x itself is quantized to 1e-3 at 1e4; the rest is a few float32 ulps
        limits = {"y": 2e-3, "dx": 2e-5, "running_mean": 5e-4, "running_var": 1e-6}
        for key, limit in limits.items():
            assert compiled[key] < limit, (rank, key, compiled, eager)
            assert compiled[key] < 4 * eager[key] + 1e-7, (rank, key, compiled, eager)


# --- models: compiled against eager -----------------------------------------------------------


def _conv_net(group) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),  # cumulative average: a device-side momentum
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),  # (a bias before BatchNorm has a zero gradient: rounding noise)
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
    )
    return syncbn.convert_sync_batchnorm(model, process_group=group)


def _act_net(group) -> nn.Module:
    """SyncBatchNormAct layers: fused (silu, gelu) and in place (leaky_relu, and elu last, its
    weight initialised to zero: it normalizes with +eps and trains)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        syncbn.SyncBatchNormAct(8, activation="silu", process_group=group),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        syncbn.SyncBatchNormAct(8, activation="leaky_relu", activation_param=0.1, inplace=True, process_group=group),
        nn.Conv2d(8, 8, 1),
        syncbn.SyncBatchNormAct(8, activation="gelu", momentum=None, process_group=group),
        nn.Conv2d(8, 4, 1),
        syncbn.SyncBatchNormAct(4, activation="elu", inplace=True, process_group=group),
        nn.Flatten(),
    )
    nn.init.zeros_(model[7].weight)
    return model


NETS = {"conv": _conv_net, "act": _act_net}


def _mlp(group) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(),  # two layers of one size: see the empty-rank tests
        nn.Linear(6, 3), nn.BatchNorm1d(3),
    )  # fmt: skip
    return syncbn.convert_sync_batchnorm(model, process_group=group)


def _batches(net: str, sizes: list[int], steps: int, rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    n = sizes[rank]
    if net in NETS:
        return [
            (torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1, torch.randn(n, 4 * 36, generator=gen))
            for _ in range(steps)
        ]
    return [(torch.randn(n, 5, generator=gen) + 0.5, torch.randn(n, 3, generator=gen)) for _ in range(steps)]


def _average_grads(model: nn.Module, group) -> None:
    """DDP's gradient averaging: every rank keeps the same parameters, as in real training."""
    size = dist.get_world_size(group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)


def _record(model, x, y):
    return {
        "y": y.detach(),
        "dx": x.grad,
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _case_compiled_vs_eager(ctx, net, backend, env, batches):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    with mock.patch.dict(os.environ, env):
        eager = NETS.get(net, _mlp)(ctx.group)
        compiled_model = copy.deepcopy(eager)
        graphs: list = []
        counter = CompileCounterWithBackend(_recording_aot_eager(graphs) if backend == "aot_eager" else backend)
        compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
        opts = {"eager": torch.optim.SGD(eager.parameters(), lr=0.05),
                "compiled": torch.optim.SGD(compiled_model.parameters(), lr=0.05)}  # fmt: skip
        records = []
        for x, w in batches:
            step = {}
            for name, model, fn in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
                xr = x.clone().requires_grad_()
                opts[name].zero_grad(set_to_none=True)
                y = fn(xr)
                (y * w).sum().backward()
                _average_grads(model, ctx.group)
                step[name] = _record(model, xr, y)
                opts[name].step()
            records.append(step)
    return {"records": records, "compiles": counter.frame_count, "graphs": graphs}


def _compare_steps(records, where, tol=TOL):
    for i, step in enumerate(records):
        e, c = step["eager"], step["compiled"]
        at = f"{where} step {i}"
        torch.testing.assert_close(c["y"], e["y"], **tol, msg=lambda m: f"{at} output: {m}")
        torch.testing.assert_close(c["dx"], e["dx"], **tol, msg=lambda m: f"{at} input grad: {m}")
        for k in e["grads"]:
            torch.testing.assert_close(c["grads"][k], e["grads"][k], **tol, msg=lambda m: f"{at} grad {k}: {m}")
        for k in e["state"]:
            torch.testing.assert_close(c["state"][k], e["state"][k], **tol, msg=lambda m: f"{at} {k}: {m}")


def _run_and_compare(pool, net, backend, sizes, steps=3, env=None, group="w2"):
    per_rank = [_batches(net, sizes, steps, r) for r in range(len(sizes))]
    results = pool.run(
        _case_compiled_vs_eager, group=group, args=(net, backend, env or {}), per_rank_args=per_rank, timeout=240
    )
    for rank, res in enumerate(results):
        _compare_steps(res["records"], f"rank {rank}")
    # every rank ends with the same running statistics and parameters
    for k, v in results[0]["records"][-1]["compiled"]["state"].items():
        for res in results[1:]:
            assert torch.equal(v, res["records"][-1]["compiled"]["state"][k]), k
    return results


@pytest.mark.parametrize("sizes", [[3, 5], [0, 4]], ids=["uneven", "empty-rank"])
def test_compiled_model_matches_eager_and_compiles_once(pool, sizes):
    """Three SGD steps of a conv net, every rank a different batch size: one compile per rank
    (steps of one shape never recompile, a SYNCBN_* variable set or not), every rank's graphs
    making the same collectives in the same order, and eager mode's results. On an empty rank
    the two 8-channel layers' moments are both zeros: were they constants, the compiler would
    merge the two all-reduces into one on that rank only. (Inductor against eager: the
    checkpointing test below.)"""
    results = _run_and_compare(pool, "conv", "aot_eager", sizes=sizes, env={settings.COMPILE.name: "traced"})
    assert [res["compiles"] for res in results] == [1, 1]
    sequences = [[(kind, [op for op in ops if len(op) == 3]) for kind, ops in res["graphs"]] for res in results]
    assert sequences[0] == sequences[1], sequences
    assert [len(collectives) for _, collectives in sequences[0]] == [3, 3]  # forward, backward


@pytest.mark.parametrize("path", ["traced", "ops"])
def test_compiled_fused_and_inplace_activations_match_eager(pool, path):
    """SyncBatchNormAct under ``fullgraph=True``, fused (silu, gelu) and in place (leaky_relu,
    elu), uneven batches, against eager mode (where the in-place layers write over their inputs
    and save only their outputs). Traced: torch's activation after the traced normalization,
    one all-reduce per layer and pass as for SyncBatchNorm; as custom ops: the activation inside
    them (in place: a new output, which the backward op reads)."""
    results = _run_and_compare(pool, "act", "aot_eager", sizes=[2, 3], steps=2, env={settings.COMPILE.name: path})
    for res in results:
        collectives = [[op for op in ops if len(op) == 3] for _, ops in res["graphs"]]
        assert [len(c) for c in collectives] == ([4, 4] if path == "traced" else [0, 0]), collectives
        zero_init = res["records"][-1]["compiled"]["state"]["7.weight"]
        assert zero_init.abs().min() > 0  # the zero weight got gradients and moved


# --- DDP -------------------------------------------------------------------------------------------


def _case_ddp(ctx, how, batches):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    eager = DDP(_conv_net(ctx.group), process_group=ctx.group)
    inner = _conv_net(ctx.group)
    if how == "inside":  # DDP around the compiled model: DDP's hooks run outside the graph
        compiled = model = DDP(torch.compile(inner, backend="aot_eager", fullgraph=True), process_group=ctx.group)
        patch = contextlib.nullcontext()
    else:  # the compiled DDP module: DDP's forward is traced with its Python reducer
        patch = torch._dynamo.config.patch(optimize_ddp="python_reducer")  # read by DDP() too
        with patch:
            model = DDP(inner, process_group=ctx.group)
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opts = {
        "eager": torch.optim.SGD(eager.parameters(), lr=0.05),
        "compiled": torch.optim.SGD(model.parameters(), lr=0.05),
    }
    records = []
    with patch:
        for x, w in batches:
            step = {}
            for name, m, fn in (("eager", eager.module, eager), ("compiled", inner, compiled)):
                xr = x.clone().requires_grad_()
                opts[name].zero_grad(set_to_none=True)
                y = fn(xr)
                (y * w).sum().backward()
                step[name] = _record(m, xr, y)
                opts[name].step()
            records.append(step)
    return records


@pytest.mark.parametrize("how", ["inside", "around"])
def test_compiled_ddp_matches_eager_ddp(pool, how):
    """``DDP(torch.compile(model, fullgraph=True))`` and ``torch.compile(DDP(model),
    fullgraph=True)`` (with ``torch._dynamo.config.optimize_ddp = "python_reducer"``; the default
    DDP optimizer splits the graph at gradient buckets) against eager DDP, uneven batches."""
    per_rank = [_batches("conv", [2, 5], 3, r) for r in range(2)]
    results = pool.run(_case_ddp, group="w2", args=(how,), per_rank_args=per_rank, timeout=240)
    for rank, records in enumerate(results):
        _compare_steps(records, f"rank {rank}")


# --- activation checkpointing ----------------------------------------------------------------------


def _case_compiled_checkpoint(ctx, where, backend, net, batches):
    from torch.utils.checkpoint import checkpoint

    torch._dynamo.reset()
    eager = _conv_net(ctx.group) if net == "conv" else _mlp(ctx.group)
    model = copy.deepcopy(eager)
    stem, block = model[:3], model[3:]
    if where == "inside":  # checkpoint traced by the compiler: it decides what to recompute
        compiled = torch.compile(
            lambda x: block(checkpoint(stem, x, use_reentrant=False)), backend=backend, fullgraph=True
        )
    else:  # eager checkpoint around compiled code: the whole compiled graph reruns in backward
        compiled_stem = torch.compile(stem, backend=backend, fullgraph=True)
        reentrant = where == "around-reentrant"
        compiled = lambda x: block(checkpoint(compiled_stem, x, use_reentrant=reentrant))  # noqa: E731
    out = []
    for x, w in batches:
        x = x.requires_grad_()  # reentrant checkpoint needs an input that requires grad
        for fn in (compiled, eager):
            (fn(x) * w).sum().backward()
        out.append((
            {k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in eager.state_dict().items()},
            {k: p.grad.clone() for k, p in model.named_parameters()},
            {k: p.grad.clone() for k, p in eager.named_parameters()},
        ))  # fmt: skip
    return out


@pytest.mark.parametrize(
    "where, backend, net, sizes",
    [
        ("inside", "aot_eager", "conv", [3, 2]),
        # inductor's partitioner decides from the shapes what to save and what to recompute;
        # the checkpointed region's collectives must be recomputed on every rank, an empty one
        # too (the MLP: inductor's CPU convolution backward fails on an empty batch by itself)
        ("inside", "inductor", "mlp", [0, 4]),
        ("around", "aot_eager", "conv", [3, 2]),
        ("around-reentrant", "aot_eager", "conv", [3, 2]),
    ],
)
def test_compile_with_checkpointing_updates_statistics_once(pool, where, backend, net, sizes):
    """The recomputed forward all-reduces again on every rank but counts the batch once: the
    running statistics and num_batches_tracked of a checkpointed compiled model are those of
    the eager one without checkpointing, over several steps."""
    per_rank = [_batches(net, sizes, 2, r) for r in range(2)]
    results = pool.run(
        _case_compiled_checkpoint, group="w2", args=(where, backend, net), per_rank_args=per_rank, timeout=240
    )
    for records in results:
        for state_c, state_e, grads_c, grads_e in records:
            for k in state_e:  # running statistics and num_batches_tracked (a momentum=None layer)
                torch.testing.assert_close(state_c[k], state_e[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
            # Accumulated over the steps (no optimizer). A bias right before a BatchNorm has a zero
            # gradient in theory: what is left is the rounding of terms as large as the other
            # gradients, so the absolute tolerance scales with the largest of them.
            scale = max(1.0, max(g.abs().max().item() for g in grads_e.values()))
            for k in grads_e:
                tol = dict(rtol=TOL["rtol"], atol=TOL["atol"] * scale)
                torch.testing.assert_close(grads_c[k], grads_e[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# --- inductor fuses what follows the layer --------------------------------------------------------


def _case_fusion(ctx):
    from torch._inductor import metrics

    torch._dynamo.reset()
    kernels = {}
    with syncbn.settings.ALWAYS_SYNC.set(True):  # the synced path in a group of one
        for name, act in (("layer", lambda y: y), ("layer+relu", F.relu), ("layer+relu+add", lambda y: F.relu(y) + 1)):
            layer = syncbn.SyncBatchNorm(8, process_group=ctx.group)
            fn = torch.compile(lambda x, layer=layer, act=act: act(layer(x)), backend="inductor", fullgraph=True)
            metrics.reset()
            fn(torch.randn(4, 8, 5, 5))
            kernels[name] = metrics.generated_kernel_count
        fused = syncbn.SyncBatchNormAct(8, activation="relu", process_group=ctx.group)
        metrics.reset()
        torch.compile(fused, backend="inductor", fullgraph=True)(torch.randn(4, 8, 5, 5))
        kernels["SyncBatchNormAct"] = metrics.generated_kernel_count
    return kernels


def test_inductor_fuses_an_activation_into_the_normalize_step(pool):
    """``relu(layer(x))`` (what SyncBatchNorm followed by ReLU, or an activation applied to the
    layer's output, compiles to) and a residual-style add after it cost no extra kernel: the
    normalize step is pointwise in the graph and inductor fuses what follows into it."""
    (kernels,) = pool.run(_case_fusion, group="w1", timeout=240)
    assert kernels["layer"] >= 1
    assert kernels["layer+relu"] == kernels["layer"] == kernels["layer+relu+add"], kernels
    assert kernels["SyncBatchNormAct"] == kernels["layer"], kernels  # its activation: fused the same way


# --- SYNCBN_COMPILE=ops and SYNCBN_DEBUG: the opaque custom ops ------------------------------------


def test_compile_ops_path_with_triton_kernels(pool):
    # The custom ops, with the Triton kernels inside (Triton's interpreter on a CPU machine).
    _run_and_compare(
        pool,
        "mlp",
        "aot_eager",
        sizes=[1, 3],
        steps=2,
        env={settings.COMPILE.name: "ops", settings.BACKEND.name: "triton"},
    )


def _case_compiled_debug_mismatch(ctx):
    torch._dynamo.reset()
    syncbn.distributed.reset_debug_state()
    channels = 4 if ctx.rank == 0 else 6
    layer = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(channels)), process_group=ctx.group)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with mock.patch.dict(os.environ, {settings.DEBUG.name: "1"}):
        try:
            compiled(torch.randn(3, channels))
        except RuntimeError as err:
            return str(err)
    return "no error"


def test_compiled_debug_check_raises_on_every_rank(pool):
    # SYNCBN_DEBUG=1 (set on every rank) compiles the layer as the custom ops, which run the checks.
    for message in pool.run(_case_compiled_debug_mismatch, group="w2", timeout=240):
        assert "syncbn (SYNCBN_DEBUG=1)" in message and "differing: channels" in message, message
        assert "layer '0'" in message  # the name recorded by convert_sync_batchnorm
