"""The Triton launch rules (syncbn.ops.launch_plan), as plain Python: no Triton, no kernels.

    python -m pytest -q tests/test_launch_plan.py

The kernels trust the plan to cover every value of every channel exactly once; these tests walk
each plan's tiles and blocks in Python, the way the kernels index them, over many shapes and
launch rules.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from syncbn.ops import launch_plan
from syncbn.ops.launch_plan import Tuning, c_block, cdiv, classify, elemt_config, match_layout, reduce_config, s_block

SHAPES = [
    (8, 64, 56, 56),  # a ResNet stem-sized layer
    (32, 2048, 7, 7),  # many channels, S = 49
    (4096, 2048),  # (N, C): the (M, C) path
    (3, 130, 3, 3),  # non-power-of-two C > 128
    (1, 1, 48, 40),  # one sample, one channel
    (2, 5, 1, 1),  # S = 1
    (4, 7, 3, 5, 6),  # 5-D
    (2, 3, 100_003),  # a prime S longer than any tile
]
TUNINGS = {
    "default": Tuning(sm_count=132),
    "few-sms": Tuning(sm_count=1),
    "many-tiles": Tuning(tile_bytes=256, reduce_programs_per_sm=4, workspace_fraction=100.0, max_tiles=64, sm_count=8),
    "long-tiles": Tuning(tile_bytes=64, reduce_programs_per_sm=3, workspace_fraction=100.0, max_tiles=64, sm_count=1),
}


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def test_the_planner_does_not_import_triton():
    code = "import sys, syncbn.ops.launch_plan; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "shape, memory_format, expected",
    [
        ((2, 3, 4, 5), None, ("ncs", 2, 3, 20)),
        ((2, 3, 4, 5), torch.channels_last, ("mc", 40, 3, 1)),
        ((2, 3, 4, 5, 6), torch.channels_last_3d, ("mc", 240, 3, 1)),
        ((6, 3), None, ("mc", 6, 3, 1)),
        ((6, 3, 1, 1), None, ("mc", 6, 3, 1)),  # contiguous with S = 1 is (M, C) too
        ((6, 3, 7), None, ("ncs", 6, 3, 7)),
    ],
)
def test_classify(shape, memory_format, expected):
    x = torch.empty(shape, device="meta")
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    view = classify(x)
    assert (view.kind, view.rows, view.channels, view.inner) == expected


def test_strides_that_fit_no_layout_read_a_contiguous_copy():
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)  # (N, C, W, H) view of an NCHW tensor (randn: NaN != NaN)
    assert classify(x) is None
    plan = launch_plan.plan(x)
    assert not plan.dense and plan.view.kind == "ncs"
    dense, same_plan = launch_plan.dense(x)
    assert same_plan is plan and dense.is_contiguous() and torch.equal(dense, x)


def test_block_rules():
    # S = 3136 (56 x 56): 128 pads it by 64/3136 < 1/32, 256 by 192 (too much)
    assert s_block(3136, 2048) == 128
    assert s_block(4096, 2048) == 2048  # divides: the widest
    assert s_block(49, 2048) == 64  # small S: one block covers the row
    # C = 130: 16 pads to 144 (the least), 32 to 160 (within 1/8 of it), 64 to 192 (not)
    assert c_block(130) == 32
    assert c_block(2048) == 256 and c_block(3) == 4
    for n in range(1, 5000, 37):
        assert _is_pow2(s_block(n, 2048)) and _is_pow2(c_block(n))


def _view_of(shape, memory_format):
    x = torch.empty(shape, device="meta")
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return classify(x)


def _layouts(shape):
    formats = [None]
    if len(shape) == 4:
        formats.append(torch.channels_last)
    return formats


CONFIGS = [
    pytest.param(shape, fmt, name, id=f"{'x'.join(map(str, shape))}-{'nhwc' if fmt else 'contig'}-{name}")
    for shape in SHAPES
    for fmt in _layouts(shape)
    for name in TUNINGS
]


@pytest.mark.parametrize("shape, memory_format, tuning", CONFIGS)
@pytest.mark.parametrize("itemsize", [4, 2])
def test_reduce_tiles_cover_every_value_once(shape, memory_format, tuning, itemsize):
    """Walk the reduce grid as the kernels do and count how often each (row, position) is read."""
    view = _view_of(shape, memory_format)
    tuning = TUNINGS[tuning]
    cfg = reduce_config(view, itemsize, tuning.sm_count, tuning)
    blocks = cfg.blocks
    assert all(_is_pow2(b) for b in blocks.values()), blocks
    assert cfg.grid == cfg.c_blocks * cfg.tiles
    assert cfg.c_blocks * blocks["BLOCK_C"] >= view.channels > (cfg.c_blocks - 1) * blocks["BLOCK_C"]
    assert cfg.tiles <= max(tuning.max_tiles, 1) or view.kind == "ncs"
    assert cfg.merge_block_t <= tuning.merge_step and _is_pow2(cfg.merge_block_t) and _is_pow2(cfg.merge_block_c)
    assert cfg.tiles <= cfg.merge_block_t * cdiv(cfg.tiles, cfg.merge_block_t)
    if view.kind == "ncs":
        assert set(blocks) == {"BLOCK_C", "BLOCK_S"}
        assert cfg.cols_per == view.inner or cfg.cols_per % blocks["BLOCK_S"] == 0
        covered = torch.zeros(view.rows, view.inner, dtype=torch.int32)
        for t in range(cfg.tiles):
            pn, ps = divmod(t, cfg.col_splits)
            rows = slice(pn * cfg.rows_per, min(pn * cfg.rows_per + cfg.rows_per, view.rows))
            cols = slice(ps * cfg.cols_per, min(ps * cfg.cols_per + cfg.cols_per, view.inner))
            assert rows.start < rows.stop and cols.start < cols.stop, f"empty tile {t}"
            covered[rows, cols] += 1
    else:
        assert set(blocks) == {"BLOCK_M", "BLOCK_C"} and cfg.col_splits == 1
        assert cfg.rows_per % blocks["BLOCK_M"] == 0
        covered = torch.zeros(view.rows, dtype=torch.int32)
        for t in range(cfg.tiles):
            rows = slice(t * cfg.rows_per, min(t * cfg.rows_per + cfg.rows_per, view.rows))
            assert rows.start < rows.stop, f"empty tile {t}"
            covered[rows] += 1
    assert bool((covered == 1).all()), "a value read twice or never"


@pytest.mark.parametrize("shape, memory_format, tuning", CONFIGS)
def test_elementwise_grid_covers_every_value_once(shape, memory_format, tuning):
    view = _view_of(shape, memory_format)
    cfg = elemt_config(view, 4, TUNINGS[tuning])
    if view.kind == "ncs":
        row_block, inner_block = cfg.blocks["BLOCK_R"], cfg.blocks["BLOCK_S"]
        rows, inner = view.rows * view.channels, view.inner
    else:
        row_block, inner_block = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_C"]
        rows, inner = view.rows, view.channels
    assert cfg.inner_blocks == cdiv(inner, inner_block)
    assert cfg.grid == cdiv(rows, row_block) * cfg.inner_blocks
    covered = torch.zeros(rows, inner, dtype=torch.int32)
    for pid in range(cfg.grid):
        rb, ib = divmod(pid, cfg.inner_blocks)
        covered[rb * row_block : (rb + 1) * row_block, ib * inner_block : (ib + 1) * inner_block] += 1
    assert bool((covered == 1).all())


def test_more_programs_when_channels_are_many_and_values_few():
    # (32, 2048, 7, 7): the channel block shrinks until every multiprocessor has work.
    view = _view_of((32, 2048, 7, 7), None)
    cfg = reduce_config(view, 2, 132, Tuning())
    assert 2 * cfg.grid >= 132 * Tuning().reduce_programs_per_sm


def test_plans_are_cached_per_shape_strides_dtype_and_device(monkeypatch):
    x = torch.empty(4, 6, 5, 5)
    first = launch_plan.plan(x)
    assert launch_plan.plan(torch.empty(4, 6, 5, 5)) is first
    assert launch_plan.plan(x.contiguous(memory_format=torch.channels_last)) is not first
    assert launch_plan.plan(x.half()) is not first
    assert any(p is first for p in launch_plan.cached_plans())
    # New rules: the plans made under the old ones are not used again.
    monkeypatch.setattr(launch_plan, "TUNING", Tuning(tile_bytes=256, sm_count=2))
    again = launch_plan.plan(x)
    assert again is not first and again.elemt != first.elemt
    assert all(p is not first for p in launch_plan.cached_plans())


def test_cpu_tensors_plan_for_few_programs_unless_told():
    cpu = torch.device("cpu")
    assert launch_plan.sm_count(cpu, Tuning()) == 4
    assert launch_plan.sm_count(cpu, Tuning(sm_count=64)) == 64


@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_match_layout_copies_only_a_gradient_in_another_layout(memory_format):
    x = torch.randn(2, 3, 4, 5)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    view = classify(x)
    same = torch.randn_like(x)
    assert match_layout(same, x, view) is same
    other = torch.randn(2, 3, 4, 5).contiguous(
        memory_format=torch.contiguous_format if memory_format else torch.channels_last
    )
    matched = match_layout(other, x, view)
    assert matched.stride() == x.stride() and torch.equal(matched, other)
    expanded = torch.ones(1, 1, 1, 1).expand(2, 3, 4, 5)  # as from y.sum().backward()
    assert match_layout(expanded, x, view).stride() == x.stride()


def test_every_rule_combination_keeps_blocks_within_the_tile():
    """A program's block is at most one tile, except that an (M, C) row is always one C block
    wide (up to 256 channels), however small the tile."""
    for shape, itemsize, name in itertools.product(SHAPES, (4, 2), TUNINGS):
        tuning = TUNINGS[name]
        view = _view_of(shape, None)
        tile = max(16, tuning.tile_bytes // itemsize)
        for cfg in (reduce_config(view, itemsize, tuning.sm_count, tuning), elemt_config(view, itemsize, tuning)):
            elems = 1
            for b in cfg.blocks.values():
                elems *= b
            assert elems <= max(tile, c_block(shape[1]) if view.kind == "mc" else 0), (
                shape,
                itemsize,
                name,
                cfg.blocks,
            )
