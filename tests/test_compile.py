"""``torch.compile(fullgraph=True)`` of models with syncbn layers, on 2 gloo ranks, against eager.

Under compile the layer runs as the custom ops ``torch.ops.syncbn.forward`` / ``backward``
(``syncbn/custom_ops.py``): one opaque node per pass, collective, host read-back and
running-statistics update inside, the same code as eager. So compiled training must match eager
training step by step (outputs, every gradient, running statistics, num_batches_tracked) with
any backend: ``aot_eager`` (fast to compile, what CI runs everywhere), ``inductor`` (one
network), the Triton kernels (under the interpreter on CPU), a rank with a single value per
channel (the host read-back of the global count), and SYNCBN_DEBUG's checks inside the op.
"""

from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn

import syncbn

# aot_eager runs the very aten kernels eager mode runs; the rounding differences left are
# those of autograd's accumulation order in the convolutions' backward (a few float32 ulps).
TOL = dict(rtol=1e-5, atol=1e-6)
# inductor generates its own convolution-adjacent and elementwise code.
INDUCTOR_TOL = dict(rtol=1e-4, atol=1e-5)


def _conv_net(group) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),  # cumulative average: a device-side momentum
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
    )
    return syncbn.convert_sync_batchnorm(model, process_group=group)


def _act_net(group) -> nn.Module:
    """SyncBatchNormAct layers: fused (silu, gelu) and in place (leaky_relu, elu)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        syncbn.SyncBatchNormAct(8, activation="silu", process_group=group),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        syncbn.SyncBatchNormAct(8, activation="leaky_relu", activation_param=0.1, inplace=True, process_group=group),
        nn.Conv2d(8, 8, 1),
        syncbn.SyncBatchNormAct(8, activation="elu", inplace=True, momentum=None, process_group=group),
        nn.Conv2d(8, 4, 1),
        syncbn.SyncBatchNormAct(4, activation="gelu", process_group=group),
        nn.Flatten(),
    )


NETS = {"conv": _conv_net, "act": _act_net}


def _mlp(group) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    return syncbn.convert_sync_batchnorm(model, process_group=group)


def _case_compiled_vs_eager(ctx, net, backend, env, batches):
    with mock.patch.dict(os.environ, env):
        eager = NETS.get(net, _mlp)(ctx.group)
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
        opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
        records = []
        for x, w in batches:
            step = {}
            for name, model, fn, opt in (("eager", eager, eager, opt_e), ("compiled", compiled_model, compiled, opt_c)):
                xr = x.clone().requires_grad_()
                opt.zero_grad(set_to_none=True)
                y = fn(xr)
                (y * w).sum().backward()
                step[name] = {
                    "y": y.detach(),
                    "dx": xr.grad,
                    "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                }
                opt.step()
            records.append(step)
    return records


def _batches(net: str, sizes: list[int], steps: int, rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    n = sizes[rank]
    if net in NETS:
        return [
            (torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1, torch.randn(n, 4 * 36, generator=gen))
            for _ in range(steps)
        ]
    return [(torch.randn(n, 5, generator=gen) + 0.5, torch.randn(n, 3, generator=gen)) for _ in range(steps)]


def _run_and_compare(pool, net, backend, sizes, steps=3, env=None, tol=TOL):
    per_rank = [_batches(net, sizes, steps, r) for r in range(len(sizes))]
    results = pool.run(
        _case_compiled_vs_eager, group="w2", args=(net, backend, env or {}), per_rank_args=per_rank, timeout=240
    )
    for rank, records in enumerate(results):
        for i, step in enumerate(records):
            e, c = step["eager"], step["compiled"]
            where = f"rank {rank} step {i}"
            torch.testing.assert_close(c["y"], e["y"], **tol, msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(c["dx"], e["dx"], **tol, msg=lambda m: f"{where} input grad: {m}")
            for k in e["grads"]:
                torch.testing.assert_close(c["grads"][k], e["grads"][k], **tol, msg=lambda m: f"{where} grad {k}: {m}")
            for k in e["state"]:
                torch.testing.assert_close(c["state"][k], e["state"][k], **tol, msg=lambda m: f"{where} {k}: {m}")
    # every rank ends with the same running statistics (parameters differ: no DDP here)
    for k, v in results[0][-1]["compiled"]["state"].items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, results[1][-1]["compiled"]["state"][k]), k


def test_compile_fullgraph_aot_eager_matches_eager(pool):
    _run_and_compare(pool, "conv", "aot_eager", sizes=[3, 5])


def test_compile_fullgraph_fused_and_inplace_activations(pool):
    """SyncBatchNormAct under compile: the activation inside the custom ops; in place, the op
    writes a new output (custom ops are functional) and its backward reads that output."""
    _run_and_compare(pool, "act", "aot_eager", sizes=[2, 3], steps=2)


@pytest.mark.parametrize("sizes", [[1, 4], [0, 3]], ids=["one-value", "empty-rank"])
def test_compile_fullgraph_single_value_or_empty_rank(pool, sizes):
    # Rank 0 holds one sample of a 2-D input (one value per channel) or none, so it reads the
    # global count back inside the op (a graph break if it were traced).
    _run_and_compare(pool, "mlp", "aot_eager", sizes=sizes)


def test_compile_fullgraph_triton_backend(pool):
    # The Triton kernels inside the custom ops (Triton's interpreter on a CPU machine).
    _run_and_compare(pool, "mlp", "aot_eager", sizes=[2, 3], steps=2, env={"SYNCBN_BACKEND": "triton"})


def test_compile_fullgraph_inductor_matches_eager(pool):
    _run_and_compare(pool, "conv", "inductor", sizes=[2, 3], steps=2, tol=INDUCTOR_TOL)


def _case_compiled_debug_mismatch(ctx):
    syncbn.distributed.reset_debug_state()
    channels = 4 if ctx.rank == 0 else 6
    layer = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(channels)), process_group=ctx.group)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with mock.patch.dict(os.environ, {"SYNCBN_DEBUG": "1"}):
        try:
            compiled(torch.randn(3, channels))
        except RuntimeError as err:
            return str(err)
    return "no error"


def test_compiled_debug_check_raises_on_every_rank(pool):
    for message in pool.run(_case_compiled_debug_mismatch, group="w2", timeout=240):
        assert "syncbn (SYNCBN_DEBUG=1)" in message and "differing: channels" in message, message
        assert "layer '0'" in message  # the name recorded by convert_sync_batchnorm


def _case_compiled_checkpoint(ctx, where, batches):
    from torch.utils.checkpoint import checkpoint

    eager = _conv_net(ctx.group)
    model = copy.deepcopy(eager)
    stem, block = model[:3], model[3:]
    if where == "inside":  # checkpoint traced by the compiler: it decides what to recompute
        compiled = torch.compile(
            lambda x: block(checkpoint(stem, x, use_reentrant=False)), backend="aot_eager", fullgraph=True
        )
    else:  # eager checkpoint around a compiled block: the compiled op reruns in backward
        compiled_stem = torch.compile(stem, backend="aot_eager", fullgraph=True)
        compiled = lambda x: block(checkpoint(compiled_stem, x, use_reentrant=False))  # noqa: E731
    out = []
    for x, w in batches:
        for fn in (compiled, eager):
            (fn(x) * w).sum().backward()
        out.append((
            {k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in eager.state_dict().items()},
            {k: p.grad.clone() for k, p in model.named_parameters()},
            {k: p.grad.clone() for k, p in eager.named_parameters()},
        ))  # fmt: skip
    return out


@pytest.mark.parametrize("where", ["inside", "around"])
def test_compile_with_checkpointing_updates_statistics_once(pool, where):
    per_rank = [_batches("conv", [3, 2], 2, r) for r in range(2)]
    for records in pool.run(_case_compiled_checkpoint, group="w2", args=(where,), per_rank_args=per_rank, timeout=240):
        for state_c, state_e, grads_c, grads_e in records:
            for k in state_e:  # running statistics and num_batches_tracked (a momentum=None layer)
                torch.testing.assert_close(state_c[k], state_e[k], **TOL, msg=k)
            for k in grads_e:  # accumulated over the steps (no optimizer)
                torch.testing.assert_close(grads_c[k], grads_e[k], **TOL, msg=k)
