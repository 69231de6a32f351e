"""SyncBatchNorm against the oracle (tests/oracle.py) on a gloo world of 1 to 4 processes.

    pytest tests/test_layer.py                                  # CPU tensors
    SYNCBN_TEST_DEVICE=cuda pytest tests/test_layer.py          # CUDA tensors (benchmarks/gpu_check.py)

Every case trains a layer for several steps on each rank's slice of the data and compares,
step by step: outputs, input gradients, weight and bias gradients summed over ranks, running
mean and variance, num_batches_tracked; then eval-mode outputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import syncbn
from syncbn import settings
from syncbn.verify import PARAM_TOLERANCES, TOLERANCES
from tests.oracle import MEMORY_FORMATS, LayerConfig, make_data, make_eval_data, make_params, run_oracle

DEVICE = settings.TEST_DEVICE.get()
# Without CUDA, SYNCBN_TEST_DEVICE=cuda skips this file (tests/conftest.py).
pytestmark = pytest.mark.test_device


def _setup_device(cfg: LayerConfig) -> torch.device:
    if cfg.device == "cuda":
        torch.cuda.set_device(0)
    return torch.device(cfg.device)


def _build_layer(cfg: LayerConfig, group, device) -> syncbn.SyncBatchNorm:
    layer = syncbn.SyncBatchNorm(
        cfg.channels, cfg.eps, cfg.momentum, cfg.affine, cfg.track_running_stats, process_group=group
    ).to(device=device, dtype=cfg.param_dtype)
    if cfg.affine:
        weight, bias = make_params(cfg)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layer


def _case_train(ctx, cfg: LayerConfig, wrap, rank_data):
    """Worker side: train ``steps`` [(x, grad)] on this rank, record everything, then eval.

    ``wrap``: None, or a module-level callable ``wrap(layer) -> (forward, info)`` whose
    ``forward`` replaces the layer's in training (a compiled one: tests/test_compile.py);
    ``info`` comes back with the results.
    """
    steps, eval_x = rank_data
    device = _setup_device(cfg)
    layer = _build_layer(cfg, ctx.group, device)
    forward, info = (layer, None) if wrap is None else wrap(layer)
    fmt = MEMORY_FORMATS[cfg.memory_format]
    records = []
    for x, g in steps:
        x = x.to(device).contiguous(memory_format=fmt).requires_grad_()
        y = forward(x)
        y.backward(g.to(device).contiguous(memory_format=fmt))
        rec = {
            "y": y.detach().cpu(),
            "dx": x.grad.cpu(),
            "y_format_kept": y.is_contiguous(memory_format=fmt),
            "dx_format_kept": x.grad.is_contiguous(memory_format=fmt),
            "dtype": (y.dtype, x.grad.dtype),
        }
        if cfg.affine:
            rec.update(dw=layer.weight.grad.cpu().clone(), db=layer.bias.grad.cpu().clone())
        if cfg.track_running_stats:
            rec.update(
                running_mean=layer.running_mean.cpu().clone(),
                running_var=layer.running_var.cpu().clone(),
                num_batches_tracked=int(layer.num_batches_tracked),
            )
        layer.zero_grad()
        records.append(rec)
    layer.eval()
    with torch.no_grad():
        eval_y = layer(eval_x.to(device).contiguous(memory_format=fmt)).cpu()
    return {"steps": records, "eval_y": eval_y, "info": info}


def run_and_check(pool, group: str, cfg: LayerConfig, wrap=None) -> list[dict]:
    """Run ``cfg`` on the pool's ``group`` and compare every result with the oracle; returns
    every rank's results (``wrap``: see ``_case_train``)."""
    cfg = dataclasses.replace(cfg, device=DEVICE)
    world = len(cfg.sizes[0])
    data = make_data(cfg)
    eval_data = make_eval_data(cfg, world)
    expected = run_oracle(cfg, data, eval_data)
    per_rank = [([step[r] for step in data], eval_data[r]) for r in range(world)]
    results = pool.run(_case_train, group=group, args=(cfg, wrap), per_rank_args=per_rank)
    assert len(results) == world

    atol, rtol = TOLERANCES[cfg.torch_dtype]
    patol, prtol = PARAM_TOLERANCES[cfg.torch_dtype]
    for i, exp in enumerate(expected["steps"]):
        for r, res in enumerate(results):
            got = res["steps"][i]
            where = f"step {i}, rank {r}"
            assert got["dtype"] == (cfg.torch_dtype, cfg.torch_dtype), where
            assert got["y_format_kept"] and got["dx_format_kept"], f"{where}: memory format lost"
            torch.testing.assert_close(
                got["y"].double(), exp["y"][r], atol=atol, rtol=rtol, msg=lambda m: f"{where} output: {m}"
            )
            torch.testing.assert_close(
                got["dx"].double(), exp["dx"][r], atol=atol, rtol=rtol, msg=lambda m: f"{where} grad_input: {m}"
            )
            if cfg.track_running_stats:
                # identical on every rank, equal to the global layer's
                torch.testing.assert_close(
                    got["running_mean"].double(),
                    exp["running_mean"],
                    atol=patol,
                    rtol=prtol,
                    msg=lambda m: f"{where} running_mean: {m}",
                )
                torch.testing.assert_close(
                    got["running_var"].double(),
                    exp["running_var"],
                    atol=patol,
                    rtol=prtol,
                    msg=lambda m: f"{where} running_var: {m}",
                )
                assert got["num_batches_tracked"] == exp["num_batches_tracked"], where
                assert torch.equal(got["running_mean"], results[0]["steps"][i]["running_mean"]), (
                    f"{where}: ranks differ"
                )
                assert torch.equal(got["running_var"], results[0]["steps"][i]["running_var"]), f"{where}: ranks differ"
        if cfg.affine:
            dw = sum(res["steps"][i]["dw"].double() for res in results)
            db = sum(res["steps"][i]["db"].double() for res in results)
            torch.testing.assert_close(
                dw, exp["dw"], atol=patol, rtol=prtol, msg=lambda m: f"step {i} grad_weight summed over ranks: {m}"
            )
            torch.testing.assert_close(
                db, exp["db"], atol=patol, rtol=prtol, msg=lambda m: f"step {i} grad_bias summed over ranks: {m}"
            )
    for r, res in enumerate(results):
        torch.testing.assert_close(
            res["eval_y"].double(),
            expected["eval_y"][r],
            atol=atol,
            rtol=rtol,
            msg=lambda m: f"rank {r} eval output: {m}",
        )
    return results


# Each case: (group, config). Sizes are per step, per rank; three steps each so that running
# statistics accumulate.
THREE = 3
CASES = {
    # world sizes 1 to 4, equal batches, 4-D
    "w1-4d": ("w1", LayerConfig(sizes=[[4]] * THREE)),
    "w2-4d-equal": ("w2", LayerConfig(sizes=[[3, 3]] * THREE)),
    "w3-4d-equal": ("w3", LayerConfig(sizes=[[2, 2, 2]] * THREE)),
    "w4-4d-equal": ("w4", LayerConfig(sizes=[[2, 2, 2, 2]] * THREE)),
    # uneven and empty per-rank batches, changing from step to step
    "w2-uneven": ("w2", LayerConfig(sizes=[[1, 5], [4, 2], [7, 1]])),
    "w3-empty-rank": ("w3", LayerConfig(sizes=[[0, 3, 2], [2, 0, 4], [3, 3, 0]])),
    "w4-mostly-empty": ("w4", LayerConfig(sizes=[[0, 0, 2, 0], [0, 1, 0, 1], [5, 0, 0, 0]])),
    # 2-D (N, C): one value per sample, so a rank may hold a single value
    "w2-2d": ("w2", LayerConfig(channels=7, spatial=(), sizes=[[1, 4], [3, 3], [2, 6]])),
    "w4-2d-empty": ("w4", LayerConfig(channels=5, spatial=(), sizes=[[2, 0, 1, 3], [0, 4, 0, 1], [1, 1, 1, 1]])),
    # 3-D (N, C, L) and 5-D (N, C, D, H, W)
    "w3-3d": ("w3", LayerConfig(channels=4, spatial=(6,), sizes=[[2, 1, 3]] * THREE)),
    "w2-5d": ("w2", LayerConfig(channels=3, spatial=(2, 3, 4), sizes=[[2, 1], [1, 3], [2, 2]])),
    "w4-5d-empty": ("w4", LayerConfig(channels=2, spatial=(3, 2, 2), sizes=[[1, 0, 2, 1]] * THREE)),
    # momentum None (cumulative average), affine off, no running statistics
    "w2-momentum-none": ("w2", LayerConfig(momentum=None, sizes=[[2, 3], [4, 1], [3, 3], [1, 2]])),
    "w3-momentum-none-empty": ("w3", LayerConfig(momentum=None, spatial=(3,), sizes=[[0, 2, 2], [3, 0, 1], [1, 1, 1]])),
    "w2-no-affine": ("w2", LayerConfig(affine=False, sizes=[[2, 3]] * THREE)),
    "w3-no-running-stats": ("w3", LayerConfig(track_running_stats=False, sizes=[[2, 0, 3], [1, 2, 2], [3, 1, 1]])),
    "w2-no-affine-no-stats-2d": (
        "w2",
        LayerConfig(channels=6, spatial=(), affine=False, track_running_stats=False, sizes=[[3, 2]] * THREE),
    ),
    "w2-momentum-0.5-eps-1e-3": ("w2", LayerConfig(momentum=0.5, eps=1e-3, sizes=[[2, 3]] * THREE)),
    # a group that is a subset of the world and does not contain rank 0; the default group
    "odd-group": ("odd", LayerConfig(sizes=[[2, 4], [0, 3], [5, 1]])),
    # non-power-of-two and larger channel counts
    "w2-c33": ("w2", LayerConfig(channels=33, spatial=(3, 3), sizes=[[2, 3]] * THREE)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle_float64(pool, name):
    group, cfg = CASES[name]
    run_and_check(pool, group, cfg)


DTYPE_CASES = {
    f"{dtype}-{fmt or 'contiguous'}-{ndim}d": (dtype, fmt, spatial)
    for dtype in ("float32", "bfloat16", "float16")
    for fmt, spatial, ndim in (
        (None, (5, 6), 4),
        ("channels_last", (5, 6), 4),
        ("channels_last_3d", (2, 3, 4), 5),
        (None, (), 2),
    )
}


@pytest.mark.parametrize("name", list(DTYPE_CASES))
def test_matches_oracle_dtypes_and_layouts(pool, name):
    dtype, fmt, spatial = DTYPE_CASES[name]
    cfg = LayerConfig(channels=6, spatial=spatial, dtype=dtype, memory_format=fmt, sizes=[[3, 1], [2, 4], [0, 5]])
    run_and_check(pool, "w2", cfg)


def test_channels_last_float64_uneven_world4(pool):
    cfg = LayerConfig(channels=5, spatial=(3, 4), memory_format="channels_last", sizes=[[1, 0, 3, 2], [2, 2, 0, 1]])
    run_and_check(pool, "w4", cfg)
