"""End to end: DDP training of a converted model on 2 ranks = single-process training, batch 2b.

The claim users rely on when they convert a model: with ``syncbn.convert_sync_batchnorm`` and
``DistributedDataParallel``, W ranks holding b samples each train exactly as one process holding
all W*b samples would: same parameters, same running statistics, step after step. Plain
BatchNorm under DDP does not (each rank normalizes with its own b samples); the negative control
below checks that this test would notice.
"""

from __future__ import annotations

import gc

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import syncbn

B = 4  # samples per rank
WORLD = 2
STEPS = 5
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3


def _model() -> nn.Module:
    """Conv layers with BatchNorm2d, a BatchNorm1d in the head; float64, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),  # cumulative average: num_batches_tracked matters too
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 5),
    ).double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of 2b samples per step (rank r holds rows r*b to (r+1)*b)."""
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(WORLD * B, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1,
            torch.randint(5, (WORLD * B,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _case_ddp(ctx, convert: bool):
    """Worker side: DDP over the pool's 2-rank group, each rank on its b rows of every batch."""
    model = _model()
    if convert:
        model = syncbn.convert_sync_batchnorm(model, process_group=ctx.group)
    ddp = DDP(model, process_group=ctx.group)
    optimizer = _optimizer(ddp)
    for x, y in _data():
        rows = slice(ctx.rank * B, (ctx.rank + 1) * B)
        loss = F.cross_entropy(ddp(x[rows]), y[rows])  # mean over this rank's b samples
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces and averages the gradients over the 2 ranks
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Drop DDP before the worker's process group outlives it (see launch/train.py).
    del ddp, optimizer, loss
    gc.collect()
    return state


def _single_process() -> dict[str, torch.Tensor]:
    """The reference: one process, plain BatchNorm, the whole batch of 2b, mean loss over it."""
    model = _model()
    optimizer = _optimizer(model)
    for x, y in _data():
        loss = F.cross_entropy(model(x), y)  # mean over all 2b samples
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def test_ddp_with_syncbn_equals_single_process_large_batch(pool):
    """Parameters and buffers after 5 SGD steps (momentum, weight decay) agree within 1e-8.

    Why the scales match: rank r's loss is the mean over its b samples, L_r = (1/b) sum_{i in r} l_i.
    SyncBatchNorm's backward gives each rank the gradient of the *sum* of the ranks' losses
    (the cross-rank terms through the shared batch statistics included), so the parameter
    gradients summed over ranks are grad(L_0 + L_1). DDP averages over the W = 2 ranks:
    grad((L_0 + L_1) / 2) = grad((1/2b) sum_i l_i), the gradient of the mean loss over all
    2b samples, which is exactly what the single-process reference differentiates. The
    BatchNorm weight and bias gradients follow the same rule (each rank's local part, summed by
    DDP's all-reduce, divided by 2). Running statistics are those of the 2b-sample batch.

    Tolerance 1e-8: float64 throughout; the two computations sum the same values in a
    different order (per rank, then across ranks), a few ulps per step, far below 1e-8.
    """
    expected = _single_process()
    results = pool.run(_case_ddp, group="w2", args=(True,), timeout=120)
    for rank, got in enumerate(results):
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            have = got[name]
            if name.endswith("num_batches_tracked"):
                assert int(have) == int(want) == STEPS, f"rank {rank} {name}"
                continue
            torch.testing.assert_close(have, want, atol=1e-8, rtol=0, msg=lambda m: f"rank {rank} {name}: {m}")


def test_plain_batchnorm_under_ddp_does_not_match(pool):
    """Negative control: without conversion each rank normalizes with its own b samples, and the
    result is measurably different, so the test above can fail."""
    expected = _single_process()
    got = pool.run(_case_ddp, group="w2", args=(False,), timeout=120)[0]
    worst = max((got[k].double() - v.double()).abs().max().item() for k, v in expected.items())
    assert worst > 1e-3
