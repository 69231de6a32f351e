"""Soak: random layers on 2 to 4 gloo ranks, every step checked against the oracle.

    python -m pytest -m soak -s tests/test_soak.py                      # 200 steps
    SYNCBN_SOAK_STEPS=5000 SYNCBN_SOAK_SEED=7 python -m pytest -m soak -s tests/test_soak.py

Not part of the default run (``-m "not soak"`` in pyproject.toml). Every episode draws a layer
(2-D to 5-D input, 1 to 96 channels, float64/float32/float16/bfloat16, contiguous or
channels_last, affine or not, running statistics or not, momentum 0.1/None/random, eps, the
torch or the Triton backend) and a group (2, 3 or 4 ranks, or the group {1, 3}), then trains
it for 1 to 4 steps with per-rank batch sizes drawn afresh every step, zeros included. Each
step's outputs, input gradients, summed weight/bias gradients, running statistics and
num_batches_tracked are compared with single-process float64 ``nn.BatchNorm`` on the
concatenated batch (tests/oracle.py, tests/test_layer.py's tolerances). Edge episodes draw a
global batch of 0 or 1 value per channel and check the contract's rule (empty output and
untouched statistics; ValueError on every rank).

The run prints one summary line (steps, episodes, mismatches, seconds, seed) and, with
``SYNCBN_SOAK_REPORT=path.json``, writes it with the first mismatches; it fails if any step
mismatched. Every pool call has its timeout, so a hang fails the run instead of stalling it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import time
from unittest import mock

import pytest
import torch

import syncbn
from syncbn import settings
from syncbn.verify import PARAM_TOLERANCES, TOLERANCES
from tests.oracle import LayerConfig, make_data, make_eval_data, make_params, run_oracle
from tests.test_layer import _case_train

pytestmark = pytest.mark.soak

STEPS = settings.SOAK_STEPS.get()
SEED = settings.SOAK_SEED.get()
REPORT = settings.SOAK_REPORT.get() or None
GROUPS = {"w2": 2, "w3": 3, "w4": 4, "odd": 2}
# The Triton interpreter runs each program in Python: only small layers take that backend.
TRITON_MAX_NUMEL = 4096


def _draw_episode(rng: random.Random, index: int) -> tuple[str, LayerConfig, str, str]:
    """(group, config, backend, kind) for one episode; kind is "train" or "edge"."""
    group = rng.choice(list(GROUPS))
    world = GROUPS[group]
    ndim = rng.choice([2, 3, 4, 4, 5])
    spatial = tuple(rng.randint(1, 5) for _ in range(ndim - 2))
    channels = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(41, 96)])
    dtype = rng.choice(["float64", "float32", "float32", "float16", "bfloat16"])
    memory_format = None
    if ndim == 4 and rng.random() < 0.4:
        memory_format = "channels_last"
    elif ndim == 5 and rng.random() < 0.4:
        memory_format = "channels_last_3d"
    momentum = rng.choice([0.1, None, round(rng.uniform(0.01, 0.9), 3)])
    per_channel = 1
    for s in spatial:
        per_channel *= s
    kind = "edge" if rng.random() < 0.08 else "train"
    if kind == "edge":
        # a global batch of 0 or 1 value per channel (1 only possible with one value per sample)
        total = rng.choice([0, 1]) if per_channel == 1 else 0
        sizes = [[0] * world]
        if total:
            sizes[0][rng.randrange(world)] = 1
    else:
        sizes = []
        for _ in range(rng.randint(1, 4)):
            while True:
                step = [rng.choice([0, 0, 1, 2, 3, 5]) for _ in range(world)]
                if sum(step) * per_channel >= 2:
                    break
            sizes.append(step)
    cfg = LayerConfig(
        channels=channels,
        spatial=spatial,
        sizes=sizes,
        dtype=dtype,
        memory_format=memory_format,
        eps=rng.choice([1e-5, 1e-3, 0.1]),
        momentum=momentum,
        affine=rng.random() < 0.8,
        track_running_stats=rng.random() < 0.85,
        seed=SEED * 1_000_003 + index,
    )
    largest = max(max(step) for step in sizes) * channels * per_channel
    triton_ok = dtype != "float64" and largest <= TRITON_MAX_NUMEL
    backend = "triton" if triton_ok and rng.random() < 0.25 else "torch"
    return group, cfg, backend, kind


def _case_soak(ctx, cfg, env, kind, rank_data):
    with mock.patch.dict(os.environ, env):
        if kind == "train":
            return _case_train(ctx, cfg, None, rank_data)
        # edge: one step with a global count of 0 or 1
        ((x, _),) = rank_data[0]
        layer = syncbn.SyncBatchNorm(
            cfg.channels, cfg.eps, cfg.momentum, cfg.affine, cfg.track_running_stats, process_group=ctx.group
        )
        layer = layer.to(cfg.param_dtype)
        try:
            y = layer(x.requires_grad_())
            y.sum().backward()
        except ValueError as err:
            return {"error": str(err)}
        stats = [] if layer.running_mean is None else [layer.running_mean.clone(), layer.running_var.clone()]
        return {"shape": tuple(y.shape), "stats": stats}


# Float32 arithmetic (every dtype but float64 computes in it) and the safety factor of the
# conditioning allowance below.
EPS = {"float64": 2.0**-52}
EPS32 = 2.0**-23
K = 8


def _conditioning(cfg: LayerConfig, step: list, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-channel allowances for rounding that no implementation in the dtype can avoid.

    A channel whose few values sit close together far from zero is ill-conditioned: rounding
    the mean to the compute precision moves every ``x - mean`` by ``eps * |mean|``, that is by
    ``kappa = eps * (|mean| + spread) * invstd`` standard deviations, and the input gradient
    carries another ``invstd``. With two or three values per channel a random batch hits this
    often (float32 ``nn.BatchNorm`` is off by as much there), so the fixed tolerances of
    tests/test_layer.py, made for well-spread data, get these per-channel terms added:
    output ``K eps |w| kappa``, input gradient ``K eps |w| invstd kappa max|dy|``, weight
    gradient ``K eps kappa sum|dy|``.
    """
    eps = EPS.get(cfg.dtype, EPS32)
    x = torch.cat([x for x, _ in step]).double()
    g = torch.cat([g for _, g in step]).double()
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0)
    invstd = (var + cfg.eps).rsqrt()
    spread = (x - mean.view((1, -1) + (1,) * (x.dim() - 2))).abs().amax(dims)
    kappa = eps * (mean.abs() + spread) * invstd
    w = weight.double().abs() if weight is not None else torch.ones_like(mean)
    return {
        "y": K * w * kappa,
        "dx": K * w * invstd * kappa * g.abs().amax(dims),
        "dw": K * kappa * g.abs().sum(dims),
    }


def _compare(cfg: LayerConfig, data: list, expected: dict, results: list) -> list[str]:
    """Mismatches between the ranks' results and the oracle, as short messages."""
    problems = []
    atol, rtol = TOLERANCES[cfg.torch_dtype]
    patol, prtol = PARAM_TOLERANCES[cfg.torch_dtype]
    weight = make_params(cfg)[0] if cfg.affine else None

    def close(got, want, a, r, what, extra=None):
        """|got - want| <= a + r |want| + extra (extra: per channel, along dim 1 or 0)."""
        got = got.double()
        bound = a + r * want.abs()
        if extra is not None:
            bound = bound + (extra.view((1, -1) + (1,) * (want.dim() - 2)) if want.dim() > 1 else extra)
        bad = (got - want).abs() > bound
        bad |= torch.isnan(got) != torch.isnan(want)
        if bad.any():
            err = (got - want).abs().max().item()
            problems.append(f"{what}: {int(bad.sum())} of {bad.numel()} values off, max error {err:.3g}")

    for i, exp in enumerate(expected["steps"]):
        extra = _conditioning(cfg, data[i], weight)
        for r, res in enumerate(results):
            got = res["steps"][i]
            where = f"step {i} rank {r}"
            if got["dtype"] != (cfg.torch_dtype, cfg.torch_dtype):
                problems.append(f"{where}: dtype {got['dtype']}")
            if not (got["y_format_kept"] and got["dx_format_kept"]):
                problems.append(f"{where}: memory format lost")
            close(got["y"], exp["y"][r], atol, rtol, f"{where} output", extra["y"])
            close(got["dx"], exp["dx"][r], atol, rtol, f"{where} grad_input", extra["dx"])
            if cfg.track_running_stats:
                close(got["running_mean"], exp["running_mean"], patol, prtol, f"{where} running_mean")
                close(got["running_var"], exp["running_var"], patol, prtol, f"{where} running_var")
                if got["num_batches_tracked"] != exp["num_batches_tracked"]:
                    problems.append(f"{where}: num_batches_tracked {got['num_batches_tracked']}")
                if not torch.equal(got["running_var"], results[0]["steps"][i]["running_var"]):
                    problems.append(f"{where}: running_var differs between ranks")
        if cfg.affine:
            dw = sum(res["steps"][i]["dw"].double() for res in results)
            db = sum(res["steps"][i]["db"].double() for res in results)
            close(dw, exp["dw"], patol, prtol, f"step {i} grad_weight", extra["dw"])
            close(db, exp["db"], patol, prtol, f"step {i} grad_bias")
    for r, res in enumerate(results):
        close(res["eval_y"], expected["eval_y"][r], atol, rtol, f"rank {r} eval output")
    if problems:  # for triage: how far single-precision nn.BatchNorm is on the same values
        bn32 = run_oracle(cfg, data, [x for x in make_eval_data(cfg, len(results))], torch.float32)
        worst = max(
            (bn32["steps"][i]["dx"][r].double() - exp["dx"][r]).abs().max().item()
            for i, exp in enumerate(expected["steps"]) for r in range(len(results)) if exp["dx"][r].numel()
        )  # fmt: skip
        problems.append(f"(float32 nn.BatchNorm's largest grad_input error on these values: {worst:.3g})")
    return problems


def _run_episode(pool, group, cfg, backend, kind) -> tuple[int, list[str]]:
    """Run one episode; returns (steps run, mismatch messages)."""
    world = GROUPS[group]
    env = {settings.BACKEND.name: backend}
    data = make_data(cfg)
    if kind == "edge":
        per_rank = [[[step[r] for step in data]] for r in range(world)]
        results = pool.run(_case_soak, group=group, args=(cfg, env, kind), per_rank_args=per_rank, timeout=120)
        total = sum(cfg.sizes[0])
        problems = []
        for r, res in enumerate(results):
            if total == 1:
                if not res.get("error", "").startswith("Expected more than 1 value per channel when training"):
                    problems.append(f"rank {r}: expected the ValueError on every rank, got {res}")
            elif "error" in res or res["shape"][0] != 0:
                problems.append(f"rank {r}: expected an empty output, got {res}")
            elif res["stats"] and not (
                torch.equal(res["stats"][0], torch.zeros(cfg.channels, dtype=cfg.param_dtype))
                and torch.equal(res["stats"][1], torch.ones(cfg.channels, dtype=cfg.param_dtype))
            ):
                problems.append(f"rank {r}: running statistics changed by an empty batch")
        return 1, problems
    eval_data = make_eval_data(cfg, world)
    expected = run_oracle(cfg, data, eval_data)
    per_rank = [([step[r] for step in data], eval_data[r]) for r in range(world)]
    results = pool.run(_case_soak, group=group, args=(cfg, env, kind), per_rank_args=per_rank, timeout=120)
    return len(cfg.sizes), _compare(cfg, data, expected, results)


@pytest.mark.timeout(max(600, STEPS * 3))
def test_soak(pool):
    rng = random.Random(SEED)
    start = time.monotonic()
    steps = episodes = mismatched_steps = 0
    failures: list[dict] = []
    by_backend = {"torch": 0, "triton": 0}
    mix: dict[str, dict[str, int]] = {"group": {}, "dtype": {}, "ndim": {}, "kind": {}}
    while steps < STEPS:
        group, cfg, backend, kind = _draw_episode(rng, episodes)
        ran, problems = _run_episode(pool, group, cfg, backend, kind)
        steps += ran
        episodes += 1
        by_backend[backend] += ran
        for key, value in (("group", group), ("dtype", cfg.dtype), ("ndim", f"{cfg.ndim}-D"), ("kind", kind)):
            mix[key][value] = mix[key].get(value, 0) + ran
        if problems:
            mismatched_steps += ran
            if len(failures) < 20:
                failures.append(
                    {
                        "group": group,
                        "backend": backend,
                        "kind": kind,
                        "config": dataclasses.asdict(cfg),
                        "problems": problems[:5],
                    }
                )
    elapsed = time.monotonic() - start
    summary = {
        "steps": steps, "episodes": episodes, "mismatched_steps": mismatched_steps, "seconds": round(elapsed, 1),
        "seed": SEED, "steps_by_backend": by_backend, "steps_by": mix, "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "failures": failures,
    }  # fmt: skip
    print(
        f"\nsoak: {steps} steps in {episodes} episodes ({by_backend['triton']} on the Triton backend), "
        f"{mismatched_steps} mismatched, {elapsed:.0f} s, seed {SEED}"
    )
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    assert not failures, json.dumps(failures[:3], indent=2, default=str)
