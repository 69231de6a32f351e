"""Population statistics: ``syncbn.update_bn_stats`` and ``syncbn.sync_batchnorm_buffers``.

    python -m pytest -q tests/test_stats.py

The oracle is one process in float64 on the concatenated data: each step's batch is the
concatenation of the ranks' batches of that step; synchronized layers normalize over all of it,
plain layers over each rank's part (as under DDP), frozen layers with their running statistics.
A recomputed layer must hold the two-pass mean and unbiased variance of everything its oracle
twin saw, to 1e-12, bitwise the same on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn

EXACT = {"rtol": 1e-12, "atol": 1e-12}


class MixedNet(nn.Module):
    """Synced and plain BatchNorm, 4-D and 2-D input, a frozen layer and an untracked one."""

    def __init__(self, group=None, momentum: float | None = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = syncbn.SyncBatchNorm(4, momentum=momentum, process_group=group)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, momentum=momentum)  # plain: each rank normalizes its own batch
        self.bn3 = syncbn.SyncBatchNorm(4, process_group=group)  # frozen below
        self.bn4 = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 5)
        self.bn5 = syncbn.SyncBatchNorm(5, momentum=momentum, process_group=group)
        _randomize(self, seed)
        syncbn.freeze_batchnorm(self.bn3)
        self.fc.eval()  # a module out of step with the model: its flag must survive too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn4(self.bn3(self.bn2(self.conv2(x)))))
        return self.bn5(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class InputNet(nn.Module):
    """A synced and a plain layer both fed the raw input (for data with a large mean)."""

    def __init__(self, group=None, momentum: float | None = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.synced = syncbn.SyncBatchNorm(3, momentum=momentum, process_group=group)
        self.plain = nn.BatchNorm2d(3, momentum=momentum)
        _randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.synced(x) + self.plain(x)


class PlainNet(nn.Module):
    """Plain layers only: no collective in the forward, so the tool's own can be counted."""

    def __init__(self, group=None, momentum: float | None = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3, momentum=momentum)
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn2 = nn.BatchNorm2d(2, momentum=momentum)
        _randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn1(x)))


NETS = {"mixed": MixedNet, "input": InputNet, "plain": PlainNet}


def _randomize(model: nn.Module, seed: int) -> None:
    """Seeded float64 weights and non-default running statistics, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(7)


def _batches(sizes: list[int], seed: int, mean: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, label) batches of the given sample counts: 3 channels of 5x5, distinct channel means."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    return [
        (torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 1.5 + offsets + mean, torch.zeros(n))
        for n in sizes
    ]


def _state(model: nn.Module) -> dict:
    """Every BatchNorm layer's buffers and flags, and every module's training flag."""
    layers = {
        name: {
            "mean": None if m.running_mean is None else m.running_mean.clone(),
            "var": None if m.running_var is None else m.running_var.clone(),
            "tracked": None if m.num_batches_tracked is None else int(m.num_batches_tracked),
            "momentum": m.momentum,
            "track_running_stats": m.track_running_stats,
            "frozen": syncbn.is_frozen(m),
        }
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    }
    return {"layers": layers, "training": {name: m.training for name, m in model.named_modules()}}


# ---------------------------------------------------------------------------------------------
# The oracle


class _OracleBN(nn.Module):
    """nn.BatchNorm's training forward the way the distributed run normalizes: over the whole
    step (``per_rank=False``) or each rank's part of it, or eval mode for a frozen layer.
    Records its inputs."""

    def __init__(self, layer: _BatchNorm, per_rank: bool, sizes: list[int]) -> None:
        super().__init__()
        self.layer, self.per_rank, self.sizes = layer, per_rank, sizes
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        self.inputs.append(x)
        if syncbn.is_frozen(layer):
            return F.batch_norm(
                x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
            )
        parts = x.split(self.sizes) if self.per_rank else [x]
        return torch.cat([F.batch_norm(p, None, None, layer.weight, layer.bias, True, 0.0, layer.eps) for p in parts])


def _population(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two-pass mean (refined once) and unbiased variance per channel, or None under 2 values."""
    if not inputs:
        return None
    x = torch.cat(inputs).transpose(0, 1).reshape(inputs[0].shape[1], -1)
    if x.shape[1] < 2:
        return None
    mean = x.mean(1, keepdim=True)
    mean = mean + (x - mean).mean(1, keepdim=True)
    return mean.squeeze(1), (x - mean).square().sum(1) / (x.shape[1] - 1)


def _oracle(net: str, per_rank: list[list[tuple]], num_batches: int | None, momentum) -> dict:
    """The expected state: recomputed layers' population statistics, the rest as built."""
    model = NETS[net](momentum=momentum)
    expected = _state(model)
    sizes: list[int] = []
    twins = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, _BatchNorm):
            twins[name] = _OracleBN(m, per_rank=not isinstance(m, syncbn.SyncBatchNorm), sizes=sizes)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, twins[name])
    used = [batches[: num_batches or len(batches)] for batches in per_rank]
    with torch.no_grad():
        for step in range(max(map(len, used))):
            xs = [batches[step][0] for batches in used if step < len(batches)]
            sizes[:] = [len(x) for x in xs]
            model(torch.cat(xs))
    for name, twin in twins.items():
        layer = expected["layers"][name]
        stats = _population(twin.inputs)
        if stats is not None and layer["mean"] is not None and not layer["frozen"]:
            layer["mean"], layer["var"] = stats
    return expected


def _assert_matches(result: dict, expected: dict, tolerance: dict = EXACT) -> None:
    assert result["training"] == expected["training"]
    for name, want in expected["layers"].items():
        got = result["layers"][name]
        for key in ("tracked", "momentum", "track_running_stats", "frozen"):
            assert got[key] == want[key], (name, key)
        for key in ("mean", "var"):
            if want[key] is None:
                assert got[key] is None
            else:
                want_value = want[key].to(got[key].dtype)
                torch.testing.assert_close(got[key], want_value, **tolerance, msg=lambda m: f"{name}.{key}: {m}")


# ---------------------------------------------------------------------------------------------
# Multi-process cases


@contextlib.contextmanager
def _counting(names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Count the calls of these torch.distributed functions (in a worker) while inside."""
    calls = dict.fromkeys(names, 0)
    real = {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    for name in names:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _case_update(ctx, net: str, momentum, num_batches, batches, count_calls: bool = False, dtype=torch.float64):
    """Build the net on this rank, run update_bn_stats on this rank's batches, return the state."""
    model = NETS[net](group=ctx.group, momentum=momentum).to(dtype)
    batches = [(x.to(dtype), y) for x, y in batches]
    names = ("all_reduce", "broadcast_object_list") if count_calls else ()
    with _counting(names) as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        syncbn.update_bn_stats(model, batches, num_batches=num_batches, process_group=ctx.group)
    return {**_state(model), "calls": calls, "warnings": [str(w.message) for w in caught]}


def _run(pool, group: str, net: str, momentum, num_batches, sizes: list[list[int]], mean: float = 0.0, **kw):
    per_rank = [_batches(s, seed=10 + r, mean=mean) for r, s in enumerate(sizes)]
    results = pool.run(_case_update, group=group, args=(net, momentum, num_batches), per_rank_args=per_rank, kwargs=kw)
    dtype = kw.get("dtype", torch.float64)
    # float32: the float64 oracle on the same (float32) values, then one rounding each side
    per_rank = [[(x.to(dtype).double(), y) for x, y in batches] for batches in per_rank]
    expected = _oracle(net, per_rank, num_batches, momentum)
    tolerance = EXACT if dtype == torch.float64 else {"rtol": 2**-23, "atol": 0.0}
    for result in results:
        _assert_matches(result, expected, tolerance)
    for result in results[1:]:  # bitwise the same on every rank
        for name, layer in result["layers"].items():
            for key in ("mean", "var"):
                if layer[key] is not None:
                    assert torch.equal(layer[key], results[0]["layers"][name][key]), (name, key)
    return results


@pytest.mark.parametrize(
    "group, momentum, num_batches, sizes",
    [
        ("w2", 0.1, 200, [[3, 0, 2, 4], [1, 5]]),  # uneven lists, an empty batch, a rank that runs out
        ("w3", None, None, [[2, 3, 2], [], [4, 0]]),  # a rank with no batch at all
        ("w4", 0.1, 2, [[2, 2, 2], [1, 1, 1, 1], [0, 3], [3]]),  # num_batches cuts the longer lists
    ],
    ids=["w2-uneven", "w3-rank-without-batches-momentum-None", "w4-num-batches"],
)
def test_population_statistics_of_a_mixed_net_match_one_process(pool, group, momentum, num_batches, sizes):
    """Synced and plain layers get the exact population statistics; frozen and untracked
    layers, num_batches_tracked, momentum and every training flag are as they were."""
    _run(pool, group, "mixed", momentum, num_batches, sizes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_large_mean_is_exact(pool, dtype):
    """Data of mean 1e4 and spread 1.5: the merge across ranks cancels nothing. A float32 model
    gets the exact statistics of its float32 inputs, rounded once to float32."""
    _run(pool, "w2", "input", None, 200, [[4, 1, 3], [2, 0]], mean=1e4, dtype=dtype)


def test_three_collectives_and_a_broadcast_only_for_a_rank_without_batches(pool):
    """Whatever the number of layers and batches: the counts before, two merges after; a rank
    with no batch at all adds one broadcast of an empty batch."""
    even = _run(pool, "w3", "plain", 0.1, 200, [[2, 3], [4], [1, 1, 1]], count_calls=True)
    assert [r["calls"] for r in even] == [{"all_reduce": 3, "broadcast_object_list": 0}] * 3
    empty = _run(pool, "w3", "plain", 0.1, 200, [[2, 3], [], [1]], count_calls=True)
    assert [r["calls"] for r in empty] == [{"all_reduce": 3, "broadcast_object_list": 1}] * 3


def test_no_samples_anywhere_changes_nothing(pool):
    """No batch on any rank: one collective, no forward, a warning on rank 0. Only empty
    batches: every layer saw nothing and keeps its statistics, with a warning naming them."""
    none = _run(pool, "w2", "mixed", 0.1, 200, [[], []])
    assert "no rank has a batch" in " ".join(none[0]["warnings"]) and not none[1]["warnings"]
    empty = _run(pool, "w2", "mixed", None, 200, [[0], [0, 0]])
    assert "bn1, bn2, bn5" in " ".join(empty[0]["warnings"])


def _case_groups_outside(ctx):
    model = MixedNet(group=None)  # layers synchronize over the whole world
    with pytest.raises(ValueError, match="layer 'bn1' synchronizes over ranks \\[0, 1, 2, 3\\]"):
        syncbn.update_bn_stats(model, _batches([2], seed=0), process_group=ctx.group)
    return True


def test_layers_synchronizing_outside_the_group_are_refused(pool):
    """A layer waiting for ranks outside process_group could hang: ValueError before any collective."""
    assert pool.run(_case_groups_outside, group="pairs") == [True] * 4


# ---------------------------------------------------------------------------------------------
# sync_batchnorm_buffers


def _case_sync_buffers(ctx, mode: str):
    model = MixedNet(group=ctx.group)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    for m in model.modules():  # rank-dependent statistics, as local BatchNorm leaves them
        if isinstance(m, _BatchNorm) and m.running_mean is not None and not syncbn.is_frozen(m):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(10 + ctx.rank)
    before = _state(model)
    with _counting(("all_reduce", "broadcast")) as calls:
        syncbn.sync_batchnorm_buffers(model, mode=mode, process_group=ctx.group)
    return before, _state(model), calls


@pytest.mark.parametrize("mode", ["mean", "broadcast"])
def test_sync_batchnorm_buffers(pool, mode):
    """One collective for all layers; "mean": the float64 average over ranks, "broadcast": rank 0's;
    num_batches_tracked rank 0's; the frozen layer and the untracked one untouched."""
    results = pool.run(_case_sync_buffers, group="w3", args=(mode,))
    befores = [before for before, _, _ in results]
    for before, after, calls in results:
        assert calls == {"all_reduce": int(mode == "mean"), "broadcast": int(mode == "broadcast")}
        for name, layer in after["layers"].items():
            if layer["mean"] is None or layer["frozen"]:
                assert layer["mean"] is None or torch.equal(layer["mean"], before["layers"][name]["mean"])
                continue
            for key in ("mean", "var"):
                values = torch.stack([b["layers"][name][key] for b in befores])
                want = values.mean(0) if mode == "mean" else values[0]
                torch.testing.assert_close(layer[key], want, rtol=1e-15, atol=1e-15)
                assert torch.equal(layer[key], results[0][1]["layers"][name][key])
            assert layer["tracked"] == 10
            assert layer["momentum"] == before["layers"][name]["momentum"]


# ---------------------------------------------------------------------------------------------
# One process: the batch rules, progress, errors


def test_one_process_matches_the_oracle_with_a_generator_of_tensor_batches():
    """No process group: this process alone. A generator has no length: read up to num_batches."""
    per_rank = [_batches([3, 2, 4, 2, 5], seed=1)]
    model = MixedNet(momentum=None)
    gen = (x for x, _ in per_rank[0])
    syncbn.update_bn_stats(model, gen, num_batches=4)
    assert next(gen, None) is not None  # the fifth batch was not read
    _assert_matches(_state(model), _oracle("mixed", per_rank, 4, None))


def test_dict_batches_need_a_forward():
    batches = [{"image": x, "label": y} for x, y in _batches([3, 2], seed=2)]
    model = InputNet()
    with pytest.raises(TypeError, match="pass forward="):
        syncbn.update_bn_stats(model, batches)
    syncbn.update_bn_stats(model, batches, forward=lambda m, b: m(b["image"]))
    stats = _population([b["image"] for b in batches])
    torch.testing.assert_close(model.synced.running_var, stats[1], **EXACT)
    torch.testing.assert_close(model.plain.running_mean, stats[0], **EXACT)


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True])
def test_bad_num_batches(num_batches):
    with pytest.raises(ValueError, match="num_batches must be a positive int or None"):
        syncbn.update_bn_stats(InputNet(), _batches([2], seed=0), num_batches=num_batches)


def test_a_layer_never_called_is_left_alone_with_a_warning():
    model = nn.Sequential(InputNet())
    model.spare = nn.BatchNorm2d(3).double()  # registered, never called
    before = model.spare.running_mean.clone()
    with pytest.warns(UserWarning, match="fewer than 2 values per channel .*: spare"):
        syncbn.update_bn_stats(model, _batches([2, 2], seed=0), forward=lambda m, b: m[0](b[0]))
    assert torch.equal(model.spare.running_mean, before)


def test_a_model_without_batchnorm_reads_no_batch():
    gen = iter(_batches([2], seed=0))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), syncbn.freeze_batchnorm(nn.BatchNorm2d(3)))
    assert syncbn.update_bn_stats(model, gen) is model
    assert next(gen, None) is not None


def test_progress_on_a_terminal_and_in_a_log(capsys, monkeypatch):
    """A log gets one line at the end; a terminal a tqdm bar, or the redrawn line without tqdm."""
    syncbn.update_bn_stats(InputNet(), _batches([2, 2, 2], seed=0))
    log = capsys.readouterr().err
    assert "update_bn_stats: 3/3 batches in " in log and "\r" not in log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    if importlib.util.find_spec("tqdm") is not None:
        syncbn.update_bn_stats(InputNet(), _batches([2, 2, 2], seed=0))
        assert "update_bn_stats: 100%" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    syncbn.update_bn_stats(InputNet(), _batches([2, 2, 2], seed=0))
    line = capsys.readouterr().err  # redrawn in place (as often as every 0.1 s), then the total
    assert line.startswith("\rupdate_bn_stats: ") and "\rupdate_bn_stats: 3/3 batches in " in line


def test_sync_batchnorm_buffers_without_a_process_group_is_a_no_op():
    model = MixedNet()
    before = copy.deepcopy(_state(model))
    syncbn.sync_batchnorm_buffers(model, mode="broadcast")
    _assert_matches(_state(model), before)
    with pytest.raises(ValueError, match="mode must be 'mean' or 'broadcast'"):
        syncbn.sync_batchnorm_buffers(model, mode="max")


def test_batchnorm_subclass_with_its_own_forward():
    """timm's BatchNormAct2d (BatchNorm then an activation, its own forward): the statistics of
    its input, and its buffers are written only once, at the end."""
    timm_layers = pytest.importorskip("timm.layers")
    layer = timm_layers.BatchNormAct2d(3, momentum=None, act_layer=nn.ReLU).double()
    layer.num_batches_tracked.fill_(7)
    batches = _batches([3, 2, 4], seed=3)
    writes = []
    model = nn.Sequential(layer)
    model.register_forward_hook(lambda m, args, out: writes.append(layer.running_var.clone()))
    before = layer.running_var.clone()
    syncbn.update_bn_stats(model, batches)
    assert all(torch.equal(w, before) for w in writes) and len(writes) == 3  # untouched while it ran
    mean, var = _population([x for x, _ in batches])
    torch.testing.assert_close(layer.running_mean, mean, **EXACT)
    torch.testing.assert_close(layer.running_var, var, **EXACT)
    assert layer.momentum is None and int(layer.num_batches_tracked) == 7 and layer.training
