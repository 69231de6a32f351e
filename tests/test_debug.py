"""SYNCBN_DEBUG=1 and failure behaviour: ranks that call the layers differently, die, or never come.

With ``SYNCBN_DEBUG=1`` the ranks compare a descriptor of each synchronized call (pass, call
number, channels, dtype, group size, layer name) before its collective, and every rank raises
the same RuntimeError on a mismatch, so nothing hangs and no statistics of different layers are
mixed. Without it, a rank that dies or never reaches a layer makes the collective fail within
the process group's timeout, and syncbn re-raises with the layer and the likely causes.

The failure cases run on a fresh gloo group with a 3 s timeout, created inside the case on all
four workers (``dist.new_group`` is collective over the world) and used by two of them.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import syncbn
from syncbn import distributed as sb_distributed
from syncbn import settings
from tests.test_semantics import count_collectives

DEBUG = {settings.DEBUG.name: "1"}
SHORT_TIMEOUT_S = 3.0


def _outcome(fn):
    """("ok", value) or (exception type name, message): cases report errors instead of raising."""
    try:
        return ("ok", fn())
    except (RuntimeError, ValueError) as err:
        return (type(err).__name__, str(err))


# ---------------------------------------------------------------------------------------------
# Mismatches caught on every rank


def _case_debug_mismatch(ctx, kind):
    sb_distributed.reset_debug_state()
    torch.manual_seed(ctx.rank)
    g = ctx.group
    x = torch.randn(3, 4, 2, 2)
    with mock.patch.dict(os.environ, DEBUG):
        if kind == "channels":
            layer = syncbn.SyncBatchNorm(4 if ctx.rank == 0 else 6, process_group=g)
            result = _outcome(lambda: layer(torch.randn(3, layer.num_features, 2, 2)))
        elif kind == "dtype":
            layer = syncbn.SyncBatchNorm(4, process_group=g)
            dtype = torch.float32 if ctx.rank == 0 else torch.float64
            result = _outcome(lambda: layer.to(dtype)(x.to(dtype)))
        elif kind == "skipped-layer":
            model = nn.Sequential(
                syncbn.SyncBatchNorm(4, process_group=g), nn.ReLU(), syncbn.SyncBatchNorm(4, process_group=g)
            )
            # rank 1 skips the first BatchNorm: its first call is the other layer's
            result = _outcome(lambda: model(x) if ctx.rank == 0 else model[2](model[1](x)))
        elif kind == "same-shape-layers":
            first, second = syncbn.SyncBatchNorm(4, process_group=g), syncbn.SyncBatchNorm(4, process_group=g)
            result = _outcome(lambda: (first if ctx.rank == 0 else second)(x))
        elif kind == "call-number":
            layer = syncbn.SyncBatchNorm(4, process_group=g)
            layer(x)
            if ctx.rank == 1:
                sb_distributed.reset_debug_state()  # as if this rank had not made that call
            result = _outcome(lambda: layer(x))
        elif kind == "backward-input-grad":
            layer = syncbn.SyncBatchNorm(4, process_group=g)
            xr = x.clone().requires_grad_(ctx.rank == 0)  # rank 1: only weight and bias gradients
            y = layer(xr)
            result = _outcome(lambda: y.sum().backward())
        elif kind == "forward-vs-backward":
            layer = syncbn.SyncBatchNorm(4, process_group=g)
            y = layer(x.clone().requires_grad_())
            # rank 1 skips the backward and goes on to the next forward
            result = _outcome(lambda: y.sum().backward() if ctx.rank == 0 else layer(x))
        else:
            raise AssertionError(kind)
    # The group still works: nobody was left inside a collective.
    t = torch.ones(1)
    dist.all_reduce(t, group=g)
    return result, t.item()


MISMATCHES = {
    # kind: (what the message must say differs, text each rank's line must show)
    "channels": ("channels", ["4 channels", "6 channels"]),
    "dtype": ("dtype", ["torch.float32", "torch.float64"]),
    "skipped-layer": ("layer", ["layer '0'", "layer '2'"]),
    "same-shape-layers": ("layer", ["layer 'first'", "layer 'second'"]),
    "call-number": ("call number", ["forward call #1", "forward call #0"]),
    "backward-input-grad": ("input gradient", ["with input gradient", "without input gradient"]),
    "forward-vs-backward": ("pass", ["backward call #1", "forward call #1"]),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_debug_mismatch_raises_on_every_rank(pool, kind):
    field, lines = MISMATCHES[kind]
    results = pool.run(_case_debug_mismatch, group="w2", args=(kind,), timeout=60)
    messages = []
    for rank, ((kind_of_error, message), total) in enumerate(results):
        assert total == 2.0
        assert kind_of_error == "RuntimeError", f"rank {rank}: {message}"
        assert message.startswith("syncbn (SYNCBN_DEBUG=1)"), message
        assert f"differing: {field}" in message, message
        assert "rank(s) [1] differ from rank(s) [0]" in message, message
        for r, text in enumerate(lines):
            assert any(line.startswith(f"  rank {r}:") and text in line for line in message.splitlines()), (
                text,
                message,
            )
        messages.append(message.replace(f"This is rank {rank}.", ""))
    assert messages[0] == messages[1]  # the same diagnosis everywhere


def test_debug_mismatch_three_ranks_names_the_odd_one(pool):
    results = pool.run(_case_debug_mismatch_w3, group="w3", timeout=60)
    for (kind, message), _ in results:
        assert kind == "RuntimeError"
        assert "rank(s) [2] differ from rank(s) [0, 1]" in message, message


def _case_debug_mismatch_w3(ctx):
    sb_distributed.reset_debug_state()
    layer = syncbn.SyncBatchNorm(5 if ctx.rank == 2 else 3, process_group=ctx.group)
    with mock.patch.dict(os.environ, DEBUG):
        result = _outcome(lambda: layer(torch.randn(2, layer.num_features)))
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.group)
    return result, t.item()


# ---------------------------------------------------------------------------------------------
# Consistent calls: same results, extra all_gathers only in debug mode


def _case_debug_consistent(ctx, debug, n):
    sb_distributed.reset_debug_state()
    torch.manual_seed(ctx.rank)
    model = syncbn.convert_sync_batchnorm(
        nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3, momentum=None)
        ),
        process_group=ctx.group,
    ).double()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.uniform_(-1, 1)
    x = torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.rank)).requires_grad_()
    env = DEBUG if debug else {settings.DEBUG.name: "0"}
    with mock.patch.dict(os.environ, env), count_collectives() as calls:
        for _ in range(2):
            model(x).square().sum().backward()
    names = [m._syncbn_name for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    return calls, x.grad, model.state_dict(), names


def test_debug_mode_changes_nothing_but_adds_checks(pool):
    off = pool.run(_case_debug_consistent, group="w2", args=(False,), per_rank_args=[1, 4])
    on = pool.run(_case_debug_consistent, group="w2", args=(True,), per_rank_args=[1, 4])
    for (calls_off, grad_off, state_off, names), (calls_on, grad_on, state_on, _) in zip(off, on):
        assert names == ["1", "4"]  # paths from convert_sync_batchnorm
        # off: exactly the two all-reduces per layer per step
        assert [c[0] for c in calls_off] == ["all_reduce"] * 8
        # on: one all_gather of the 7-value descriptor before each of them
        assert [c[0] for c in calls_on] == ["all_gather", "all_reduce"] * 8
        assert torch.equal(grad_off, grad_on)
        for k in state_off:
            assert torch.equal(state_off[k], state_on[k]), k


def _case_name_from_stack(ctx):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = syncbn.SyncBatchNorm(3, process_group=ctx.group)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = nn.Sequential(Block(), nn.ReLU(), Block())
    bn = syncbn.SyncBatchNorm(3, process_group=ctx.group)
    with mock.patch.dict(os.environ, DEBUG):
        model(torch.randn(2, 3, 2, 2))
        bn(torch.randn(2, 3))
    return [model[0].bn._syncbn_name, model[2].bn._syncbn_name, bn._syncbn_name]


def test_layers_are_named_from_the_model_on_the_stack(pool):
    for names in pool.run(_case_name_from_stack, group="w2"):
        assert names == ["0.bn", "2.bn", "bn"]


# ---------------------------------------------------------------------------------------------
# Failure behaviour: a clear error within the process group's timeout, never a hang


def _short_group(ctx):
    """A fresh [0, 1] group with a short timeout (every world rank must create it)."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    return group if ctx.global_rank in (0, 1) else None


def _case_absent_rank(ctx, where, debug):
    group = _short_group(ctx)
    if group is None or ctx.global_rank == 1 and where == "forward":
        return None  # rank 1 never reaches the layer
    sb_distributed.reset_debug_state()
    layer = syncbn.SyncBatchNorm(4, process_group=group)
    x = torch.randn(3, 4, 2, requires_grad=True)
    env = DEBUG if debug else {}
    with mock.patch.dict(os.environ, env):
        if where == "backward":
            y = layer(x)
            if ctx.global_rank == 1:
                return None  # rank 1 never runs the backward
            start = time.monotonic()
            return _outcome(lambda: y.sum().backward()), time.monotonic() - start
        start = time.monotonic()
        return _outcome(lambda: layer(x)), time.monotonic() - start


@pytest.mark.parametrize("where,debug", [("forward", False), ("backward", False), ("forward", True)])
def test_absent_rank_gives_a_clear_error_within_the_timeout(pool, where, debug):
    results = pool.run(_case_absent_rank, group="w4", args=(where, debug), timeout=60)
    (kind, message), elapsed = results[0]
    assert kind == "RuntimeError", message
    what = f"{where} consistency check (the all_gather of SYNCBN_DEBUG=1)" if debug else f"{where} all-reduce"
    assert message.startswith(f"syncbn: the {what} of layer 'layer'"), message
    assert "over a process group of 2 ranks failed" in message and "Troubleshooting" in message
    assert SHORT_TIMEOUT_S * 0.8 <= elapsed <= SHORT_TIMEOUT_S + 10, elapsed
    assert results[1:] == [None, None, None]


def _case_dead_rank(ctx):
    group = _short_group(ctx)
    if group is None:
        return None
    if ctx.global_rank == 1:
        os._exit(7)  # dies before reaching the layer
    layer = syncbn.SyncBatchNorm(4, process_group=group)
    start = time.monotonic()
    try:
        layer(torch.randn(3, 4))
    except RuntimeError as err:
        elapsed = time.monotonic() - start
        # Reported through the pool as this rank's error, with the time it took.
        raise RuntimeError(f"[after {elapsed:.2f} s] {err}") from None
    return "no error"


def test_dead_rank_gives_a_clear_error_not_a_hang(pool):
    with pytest.raises(AssertionError) as info:
        pool.run(_case_dead_rank, group="w4", timeout=60)
    err = info.value
    assert err.exitcodes == {1: 7}
    message = err.errors[0]
    assert "syncbn: the forward all-reduce of layer 'layer'" in message, message
    elapsed = float(re.search(r"RuntimeError: \[after ([0-9.]+) s\]", message).group(1))
    assert elapsed <= SHORT_TIMEOUT_S + 10
