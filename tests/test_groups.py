"""Model tools across processes: sub-groups, frozen layers' silence, copies of synced models.

    python -m pytest -q tests/test_groups.py

Cases run on the session's gloo pool (``tests/dist_pool.py``). The ``create_syncbn_process_group``
cases run on ``"w4"``, the whole world: ``new_group`` is a collective over the world, so all four
ranks must take part in creating every group.
"""

from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from syncbn import is_frozen

# float32, inputs of unit scale, a few hundred values per channel: the synced result differs
# from the single-process reference only by summation order.
TOL = dict(rtol=1e-5, atol=1e-5)
CHANNELS = 3


def _batch(global_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's input and upstream gradient: uneven batch sizes, and ranks 2-3 shifted by +10
    so that statistics mixed across the two halves of the world cannot go unnoticed."""
    gen = torch.Generator().manual_seed(100 + global_rank)
    n = 2 + global_rank
    x = torch.randn(n, CHANNELS, 3, 3, generator=gen) * (1 + global_rank)
    x += 10.0 * (global_rank >= 2)
    grad = torch.randn(n, CHANNELS, 3, 3, generator=gen)
    return x, grad


def _reference_layer() -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(7)
    bn = nn.BatchNorm2d(CHANNELS, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(CHANNELS, generator=gen))
    return bn


def _check_against_group_reference(ctx, model: nn.Module, members: list[int], group) -> dict:
    """Train one step on this rank's batch; compare with one BatchNorm2d over the members'
    batches concatenated. Returns this rank's running statistics."""
    x, grad = _batch(ctx.global_rank)
    x.requires_grad_(True)
    out = model(x)
    out.backward(grad)

    ref = _reference_layer()
    batches = [_batch(r) for r in members]
    big_x = torch.cat([b[0] for b in batches]).requires_grad_(True)
    big_out = ref(big_x)
    big_out.backward(torch.cat([b[1] for b in batches]))
    start = sum(_batch(r)[0].shape[0] for r in members[: members.index(ctx.global_rank)])
    rows = slice(start, start + x.shape[0])

    bn = model[0]
    torch.testing.assert_close(out, big_out[rows], **TOL)
    torch.testing.assert_close(x.grad, big_x.grad[rows], **TOL)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(bn.running_var, ref.running_var, **TOL)
    assert bn.num_batches_tracked.item() == 1
    # weight/bias gradients are local parts: summed over the group they are the global ones
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads, group=group)
    torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), **TOL)
    return dict(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())


# ---------------------------------------------------------------------------------------------
# create_syncbn_process_group


def _case_subgroups(ctx, group_size: int) -> dict:
    group = syncbn.create_syncbn_process_group(group_size)
    members = dist.get_process_group_ranks(group)
    assert dist.get_world_size(group) == group_size
    assert dist.get_rank(group) == ctx.global_rank % group_size
    model = syncbn.convert_sync_batchnorm(nn.Sequential(_reference_layer()), process_group=group)
    assert model[0].process_group is group
    stats = _check_against_group_reference(ctx, model, members, group)
    return dict(members=members, **stats)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_create_syncbn_process_group_gives_each_group_its_own_statistics(pool, group_size):
    results = pool.run(_case_subgroups, group="w4", args=(group_size,))
    expected = [list(range(r - r % group_size, r - r % group_size + group_size)) for r in range(4)]
    assert [r["members"] for r in results] == expected
    for a, b in zip(results, results[1:]):
        same_group = a["members"] == b["members"]
        for key in ("running_mean", "running_var"):
            # identical within a group, different across groups (nothing mixes)
            assert torch.equal(a[key], b[key]) == same_group, (key, a["members"], b["members"])


def _case_bad_group_sizes(ctx) -> bool:
    for bad in (3, 0, -2, 8, True, 2.0):
        # Raised on every rank before any group is created, so the world stays in step.
        with pytest.raises(ValueError, match="group_size"):
            syncbn.create_syncbn_process_group(bad)
    group = syncbn.create_syncbn_process_group(2)
    total = torch.ones(1)
    dist.all_reduce(total, group=group)
    return total.item() == 2.0


def test_create_syncbn_process_group_rejects_sizes_that_do_not_divide_the_world(pool):
    assert pool.run(_case_bad_group_sizes, group="w4") == [True] * 4


# ---------------------------------------------------------------------------------------------
# Frozen layers never communicate

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)


@contextmanager
def _count_collectives():
    """Count calls to torch.distributed's collectives, under both names code may use."""
    counts: Counter[str] = Counter()
    saved = []
    for name in _COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        def counting(*args, __name=name, __original=original, **kwargs):
            counts[__name] += 1
            return __original(*args, **kwargs)

        for namespace in (dist, c10d):
            if getattr(namespace, name, None) is original:
                saved.append((namespace, name, original))
                setattr(namespace, name, counting)
    try:
        yield counts
    finally:
        for namespace, name, original in saved:
            setattr(namespace, name, original)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 1)
        self.before = nn.BatchNorm2d(CHANNELS)  # frozen before conversion
        self.after = nn.BatchNorm2d(CHANNELS)  # frozen after conversion
        self.torch_sync = nn.SyncBatchNorm(CHANNELS)  # converted, frozen with the rest
        self.no_stats = nn.BatchNorm2d(CHANNELS, track_running_stats=False)  # local batch stats
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 9, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.no_stats(self.torch_sync(self.after(self.before(self.conv(x))))))


def _train_step(model: nn.Module, ctx) -> None:
    x, _ = _batch(ctx.global_rank)
    model(x).square().sum().backward()


def _case_frozen_layers_make_no_collective(ctx) -> dict:
    torch.manual_seed(0)
    model = _Net()
    syncbn.freeze_batchnorm(model.before)
    syncbn.convert_sync_batchnorm(model, process_group=ctx.group)
    syncbn.freeze_batchnorm(model)
    model.train()
    assert all(is_frozen(m) and not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with _count_collectives() as counts:
        for _ in range(2):
            _train_step(model, ctx)
    frozen_counts = dict(counts)
    assert model.conv.weight.grad is not None  # the backward pass did run
    for key, value in model.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, state[key]), key

    # Control: the counter does see syncbn's collectives. Unfrozen, each of the 5 layers makes one
    # all_reduce forward and one backward (every BN input comes from a layer with weights).
    syncbn.unfreeze_batchnorm(model)
    model.train()
    with _count_collectives() as counts:
        _train_step(model, ctx)
    return dict(frozen=frozen_counts, unfrozen=dict(counts))


@pytest.mark.parametrize("group", ["w4", "pairs"])
def test_frozen_layers_make_no_collective_call(pool, group):
    results = pool.run(_case_frozen_layers_make_no_collective, group=group)
    for result in results:
        assert result["frozen"] == {}
        assert result["unfrozen"] == {"all_reduce": 5 + 5}


def _case_frozen_unconverted_torch_layers(ctx) -> dict:
    # Plain nn.BatchNorm2d and torch.nn.SyncBatchNorm, frozen and never converted: torch's
    # SyncBatchNorm would all_gather (and refuse CPU tensors) in training mode; frozen, it is eval.
    model = nn.Sequential(nn.BatchNorm2d(CHANNELS), nn.SyncBatchNorm(CHANNELS, process_group=ctx.group))
    syncbn.freeze_batchnorm(model)
    model.train()
    with _count_collectives() as counts:
        x, _ = _batch(ctx.global_rank)
        model(x.requires_grad_(True)).sum().backward()
    return dict(counts)


def test_frozen_torch_layers_make_no_collective_call(pool):
    assert pool.run(_case_frozen_unconverted_torch_layers, group="w2") == [{}, {}]


# ---------------------------------------------------------------------------------------------
# Copies of a model synchronized over a sub-group


def _case_deepcopy_keeps_the_group(ctx) -> bool:
    model = syncbn.convert_sync_batchnorm(nn.Sequential(_reference_layer()), process_group=ctx.group)
    # an EMA / teacher copy, as training code makes: torch.nn.SyncBatchNorm with a group cannot
    ema = copy.deepcopy(model)
    assert ema[0].process_group is ctx.group
    assert ema[0].weight is not model[0].weight
    members = dist.get_process_group_ranks(ctx.group)
    _check_against_group_reference(ctx, ema, members, ctx.group)
    # and a frozen copy stays frozen and bound to itself
    syncbn.freeze_batchnorm(model)
    frozen_copy = copy.deepcopy(model)
    assert is_frozen(frozen_copy[0]) and frozen_copy[0].__dict__["train"].module is frozen_copy[0]
    frozen_copy.train()
    return frozen_copy[0].training


def test_deepcopy_of_a_model_synced_over_a_subgroup(pool):
    assert pool.run(_case_deepcopy_keeps_the_group, group="pairs") == [False] * 4
