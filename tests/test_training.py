"""Training patterns around the layer: activation checkpointing and gradient accumulation.

- ``torch.utils.checkpoint`` (non-reentrant and reentrant) reruns the forward in backward; the
  rerun synchronizes again (every rank recomputes) but must not update the running statistics
  or ``num_batches_tracked`` a second time: gradients and statistics equal a run without it.
- Gradient accumulation over k micro-batches: every micro-batch is one BatchNorm batch (the
  union of the ranks' micro-batches), gradients add up as for any layer, and the running
  statistics take k updates, as ``nn.BatchNorm`` does; with DDP's ``no_sync()`` too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import syncbn
from tests.test_semantics import count_collectives


def _make_model(seed: int = 0) -> nn.Sequential:
    """A small float64 conv net with plain BatchNorm (converted on the workers)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(6, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6, momentum=None),  # cumulative average: counts batches
            nn.ReLU(),
            nn.Conv2d(6, 4, 1),
            nn.BatchNorm2d(4, momentum=0.3),
        ),
    ).double()
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _data(sizes: list[list[int]], seed: int = 1):
    """``data[step][rank] = (x, w)``: input and the weights of a weighted-sum loss."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1,
          torch.randn(n, 4, 5, 5, generator=gen, dtype=torch.float64)) for n in step]
        for step in sizes
    ]  # fmt: skip


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def _case_checkpoint(ctx, mode, steps):
    model = syncbn.convert_sync_batchnorm(_make_model(), process_group=ctx.group)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stem, block = model[:3], model[3]
    records = []
    for x, w in steps:
        x = x.clone().requires_grad_()
        opt.zero_grad(set_to_none=True)
        with count_collectives() as calls:
            h = stem(x)
            if mode == "none":
                y = block(h)
            else:
                y = checkpoint(block, h, use_reentrant=(mode == "reentrant"))
            (y * w).sum().backward()
        records.append(
            {"y": y.detach(), "dx": x.grad, "grads": _grads(model), "state": _state(model), "calls": len(calls)}
        )
        opt.step()
    return records


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpoint_matches_no_checkpoint(pool, mode):
    data = _data([[2, 3], [4, 1], [0, 3]])
    per_rank = [[step[r] for step in data] for r in range(2)]
    plain = pool.run(_case_checkpoint, group="w2", args=("none",), per_rank_args=per_rank)
    ckpt = pool.run(_case_checkpoint, group="w2", args=(mode,), per_rank_args=per_rank)
    for rank in range(2):
        for step, (want, got) in enumerate(zip(plain[rank], ckpt[rank])):
            where = f"rank {rank} step {step}"
            # three layers, forward + backward; the two checkpointed ones synchronize again
            assert want["calls"] == 6 and got["calls"] == 8, where
            # recomputation reruns the same kernels on the same data: identical results
            torch.testing.assert_close(got["y"], want["y"], rtol=0, atol=0, msg=where)
            torch.testing.assert_close(got["dx"], want["dx"], rtol=0, atol=0, msg=where)
            for k in want["grads"]:
                torch.testing.assert_close(got["grads"][k], want["grads"][k], rtol=0, atol=0, msg=f"{where} {k}")
            for k in want["state"]:  # running statistics and num_batches_tracked: updated once
                torch.testing.assert_close(got["state"][k], want["state"][k], rtol=0, atol=0, msg=f"{where} {k}")
        assert int(ckpt[rank][-1]["state"]["3.1.num_batches_tracked"]) == 3


def test_checkpoint_single_process_matches_batchnorm():
    # No process group: the recompute rule holds for the unsynced path too.
    ref = _make_model()
    ours = syncbn.convert_sync_batchnorm(copy.deepcopy(ref))
    for x, w in [pair for step in _data([[4], [3]]) for pair in step]:
        for model, use_ckpt in ((ref, False), (ours, True)):
            h = model[:3](x)
            y = checkpoint(model[3], h, use_reentrant=False) if use_ckpt else model[3](h)
            (y * w).sum().backward()
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=k)
    for (k, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=k)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


def _case_accumulate(ctx, use_ddp, micro_batches):
    model = syncbn.convert_sync_batchnorm(_make_model(), process_group=ctx.group)
    net = DDP(model, process_group=ctx.group) if use_ddp else model
    for i, (x, w) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if use_ddp and not last:
            with net.no_sync():  # accumulate locally, all-reduce gradients on the last one
                (net(x) * w).sum().backward()
        else:
            (net(x) * w).sum().backward()
    return _grads(model), _state(model)


@pytest.mark.parametrize("use_ddp", [False, True], ids=["plain", "ddp-no-sync"])
def test_gradient_accumulation_matches_batchnorm(pool, use_ddp):
    sizes = [[2, 3], [0, 4], [3, 1]]  # three micro-batches, one with an empty rank
    data = _data(sizes)
    per_rank = [[step[r] for step in data] for r in range(2)]
    results = pool.run(_case_accumulate, group="w2", args=(use_ddp,), per_rank_args=per_rank)

    # Oracle: one process, plain BatchNorm, each micro-batch the union of the ranks' ones,
    # loss = the sum of the ranks' losses, gradients accumulated over the micro-batches.
    ref = _make_model()
    for step in data:
        x = torch.cat([x for x, _ in step])
        w = torch.cat([w for _, w in step])
        (ref(x) * w).sum().backward()
    want_grads, want_state = _grads(ref), _state(ref)

    world = len(results)
    for k, want in want_grads.items():
        if use_ddp:  # DDP averages: every rank holds the global gradient / world size
            for grads, _ in results:
                torch.testing.assert_close(grads[k] * world, want, rtol=1e-10, atol=1e-10, msg=k)
        else:  # each rank holds its part; the parts add up to the global gradient
            got = sum(grads[k] for grads, _ in results)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=k)
    for _, state in results:
        for k, want in want_state.items():  # k updates, one per micro-batch, as nn.BatchNorm
            torch.testing.assert_close(state[k], want, rtol=1e-12, atol=1e-12, msg=k)
    assert int(results[0][1]["1.num_batches_tracked"]) == len(sizes)
