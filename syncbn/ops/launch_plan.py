"""Launch planning for the Triton kernels: layouts, block sizes and grids, in plain Python.

Nothing here imports Triton, so the rules are unit-tested on any machine
(``tests/test_launch_plan.py``). ``syncbn.ops.triton`` asks ``plan(x)`` once per pass; a plan
depends only on the input's shape, strides, dtype and device, and is cached.

Layouts. An input is classified once and viewed without copying as

- ``ncs``: contiguous ``(N, C, *)`` as ``(N, C, S)``, element ``(n, c, s)`` at ``(n*C + c)*S + s``;
- ``mc``: channels_last / channels_last_3d (any input whose ``movedim(1, -1)`` is contiguous),
  2-D ``(N, C)``, and contiguous input with ``S == 1``, as ``(M, C)`` row-major, ``M = N*S``.

Any other strides (a transposed or sliced view) are read from a contiguous copy.

Block names keep one meaning in every kernel: ``BLOCK_C`` channels, ``BLOCK_S`` positions of S,
``BLOCK_M`` rows of an ``(M, C)`` view, ``BLOCK_R`` rows of the ``(N*C, S)`` view the ``ncs``
elementwise kernel walks. A config carries the ones its kernel takes, by those names.

The rules are plain (powers of two bounded by C and S; enough programs for every
multiprocessor), with no autotuning: nothing to run during a CUDA-graph capture.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tuning:
    """Knobs of the launch rules (tests shrink them to get many tiles from tiny tensors)."""

    tile_bytes: int = 8192
    """Bytes of one input per program per step: 2048 float32 or 4096 half values."""
    reduce_programs_per_sm: int = 8
    """Reduction programs wanted per multiprocessor (a few waves: a short tail)."""
    workspace_fraction: float = 0.05
    """Tile partials (12 bytes per channel per tile) stay under this fraction of the input."""
    max_tiles: int = 2048
    """Upper bound on tiles per channel, which bounds the merge's work."""
    merge_step: int = 1024
    """Tiles the merge kernel reads per channel per step (at most 1024)."""
    sm_count: int | None = None
    """Override of the multiprocessor count (None: read off the device; 4 for CPU tensors)."""


#: The rules in use; replace the module attribute to change them (the plan cache follows).
TUNING = Tuning()


def cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: a Triton constexpr function, microseconds per call from Python.
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _pow2s(lo: int, hi: int) -> list[int]:
    """Powers of two from ``hi`` down to ``lo`` (both powers of two)."""
    out = []
    while hi >= lo:
        out.append(hi)
        hi //= 2
    return out


def _padded(n: int, block: int) -> int:
    return cdiv(n, block) * block


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, tuning: Tuning) -> int:
    if tuning.sm_count is not None:
        return tuning.sm_count
    if device.type != "cuda":
        return 4  # CPU tensors run under the interpreter: few programs is fastest.
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_sm_count(index)


def s_block(s: int, tile: int) -> int:
    """``BLOCK_S`` for the ``ncs`` kernels (S is the contiguous axis).

    The largest power of two (at least 128, at most the tile) that pads S by at most 1/32, so
    that rows split into few, nearly full blocks; failing that, one block covering the whole row
    (small S such as 49 or 196: masked lanes cost issue slots, not memory traffic).
    """
    full = min(next_pow2(s), tile)
    for p in _pow2s(min(128, full), full):
        if _padded(s, p) * 32 <= s * 33:
            return p
    return full


def c_block(c: int) -> int:
    """``BLOCK_C`` for the ``mc`` kernels (C is contiguous): up to 256 with padding <= 1/8."""
    cands = _pow2s(16, 256)
    best = min(_padded(c, p) for p in cands)
    widest = max(p for p in cands if _padded(c, p) * 8 <= best * 9)
    return min(widest, next_pow2(c))


@dataclass(frozen=True)
class View:
    """How a tensor's memory is walked: ``ncs`` (N, C, S) or ``mc`` (M, C) row-major."""

    kind: str
    rows: int  # N (ncs) or M (mc)
    channels: int
    inner: int  # S (ncs) or 1 (mc)


def contiguous_view(shape: torch.Size) -> View:
    """The view of a contiguous tensor of ``shape``: ``ncs``, or ``mc`` when ``S == 1``."""
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    return View("mc", n, c, 1) if s == 1 else View("ncs", n, c, s)


def classify(x: torch.Tensor) -> View | None:
    """How ``x``'s memory is walked, or None when its strides fit neither layout."""
    if x.is_contiguous():
        return contiguous_view(x.shape)
    if x.movedim(1, -1).is_contiguous():
        return View("mc", x.shape[0] * math.prod(x.shape[2:]), x.shape[1], 1)
    return None


def match_layout(t: torch.Tensor, x: torch.Tensor, view: View) -> torch.Tensor:
    """``t`` (same shape as the dense ``x``) laid out as ``view`` says, copied only if it is not.

    A gradient that arrives in another memory format than the input (an expanded one, as from
    ``y.sum().backward()``) is brought to the input's layout with one copy.
    """
    if t.stride() == x.stride():
        return t
    if view.kind == "ncs":
        return t if t.is_contiguous() else t.contiguous()
    if t.movedim(1, -1).is_contiguous():
        return t
    # channels_last(_3d) for 4-D/5-D, and the same idea for any rank.
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _tile_elems(itemsize: int, tuning: Tuning) -> int:
    return max(16, tuning.tile_bytes // itemsize)


@dataclass(frozen=True)
class ReduceConfig:
    """Launch of a reduce kernel and of the merge that follows it.

    Every channel's values split into ``tiles`` tiles; a program reduces one tile of a block of
    channels, and ``grid = c_blocks * tiles``. A tile is ``rows_per`` rows (samples for ``ncs``,
    rows of M for ``mc``) by ``cols_per`` positions of S (``ncs``; ``col_splits`` tiles across S).
    """

    blocks: dict[str, int]  # the kernel's block constexprs: BLOCK_C and BLOCK_S, or BLOCK_M and BLOCK_C
    c_blocks: int
    rows_per: int
    cols_per: int
    col_splits: int
    tiles: int
    grid: int
    num_warps: int
    merge_block_c: int
    merge_block_t: int
    merge_warps: int


def reduce_config(view: View, itemsize: int, sms: int, tuning: Tuning) -> ReduceConfig:
    """Split every channel's values into T tiles over about ``sms * programs_per_sm`` programs.

    Programs = channel blocks x T. T is capped so that the partials stay a small fraction of
    the input; when that leaves too few programs (many channels, few values each), the channel
    block shrinks to make more of them.
    """
    tile = _tile_elems(itemsize, tuning)
    want = max(1, sms * tuning.reduce_programs_per_sm)
    values = view.rows * view.inner  # per channel
    t_cap = int(values * itemsize * tuning.workspace_fraction / 12)
    t_cap = max(1, min(tuning.max_tiles, t_cap))
    if view.kind == "ncs":
        if view.inner % 16:  # rows not 16-aligned: scalar loads, a register each (half the tile)
            tile = max(16, tile // 2)
        block_s = s_block(view.inner, tile)
        chunks = cdiv(view.inner, block_s)  # steps per sample
        block_c = max(1, min(tile // block_s, next_pow2(view.channels)))
        while True:
            c_blocks = cdiv(view.channels, block_c)
            steps = max(1, (c_blocks * view.rows * chunks) // want)
            steps = max(steps, cdiv(view.rows * chunks, t_cap))
            if steps >= chunks:  # whole samples per tile
                rows_per, cols_per = steps // chunks, view.inner
            else:
                rows_per, cols_per = 1, steps * block_s
            col_splits = cdiv(view.inner, cols_per)
            tiles = cdiv(view.rows, rows_per) * col_splits
            if 2 * c_blocks * tiles >= want or block_c == 1:
                break
            block_c //= 2
        blocks = {"BLOCK_C": block_c, "BLOCK_S": block_s}
    else:
        block_c = c_block(view.channels)
        while True:
            block_m = max(1, min(tile // block_c, next_pow2(view.rows)))
            c_blocks = cdiv(view.channels, block_c)
            m_blocks = cdiv(view.rows, block_m)
            steps = max(1, (c_blocks * m_blocks) // want, cdiv(m_blocks, t_cap))
            rows_per, cols_per, col_splits = steps * block_m, 1, 1
            tiles = cdiv(view.rows, rows_per)
            # Narrower than 32 channels, rows become short scattered segments.
            if 2 * c_blocks * tiles >= want or block_c <= 32:
                break
            block_c //= 2
        blocks = {"BLOCK_M": block_m, "BLOCK_C": block_c}
    merge_block_t = min(next_pow2(tiles), tuning.merge_step)
    # 1024 float64 values per array per step (8 per thread: no spills), at most 64 channels per
    # program (C / 64 programs at least).
    merge_block_c = max(1, min(1024 // merge_block_t, 64, next_pow2(view.channels)))
    return ReduceConfig(
        blocks, c_blocks, rows_per, cols_per, col_splits, tiles,
        grid=c_blocks * tiles, num_warps=8 if math.prod(blocks.values()) >= 2048 else 4,
        merge_block_c=merge_block_c, merge_block_t=merge_block_t,
        merge_warps=8 if merge_block_c * merge_block_t >= 512 else 4,
    )  # fmt: skip


@dataclass(frozen=True)
class ElemtConfig:
    """Launch of an elementwise kernel: one tile of ``tile_bytes`` per program."""

    blocks: dict[str, int]  # BLOCK_R and BLOCK_S (ncs), or BLOCK_M and BLOCK_C (mc)
    inner_blocks: int  # blocks along the contiguous axis: S (ncs) or C (mc)
    grid: int
    num_warps: int


def elemt_config(view: View, itemsize: int, tuning: Tuning) -> ElemtConfig:
    """Rows of S (``ncs``) or of C (``mc``) as the inner, contiguous axis of every tile."""
    tile = _tile_elems(itemsize, tuning)
    if view.kind == "ncs":
        inner_block = s_block(view.inner, tile)
        rows = view.rows * view.channels
        inner_blocks = cdiv(view.inner, inner_block)
    else:
        inner_block = c_block(view.channels)
        rows = view.rows
        inner_blocks = cdiv(view.channels, inner_block)
    row_block = max(1, min(tile // inner_block, next_pow2(rows)))
    grid = cdiv(rows, row_block) * inner_blocks
    if view.kind == "ncs":
        blocks = {"BLOCK_R": row_block, "BLOCK_S": inner_block}
    else:
        blocks = {"BLOCK_M": row_block, "BLOCK_C": inner_block}
    # Rows of S not a multiple of 16 (49, 196) cannot be loaded as vectors, and every thread then
    # holds values and coefficients of many rows: 8 warps halve the registers per thread (with
    # 4 warps the compiler reports 190-255 registers and spills).
    num_warps = 8 if view.kind == "ncs" and view.inner % 16 and row_block >= 16 else 4
    return ElemtConfig(blocks, inner_blocks, grid, num_warps)


@dataclass(frozen=True)
class Plan:
    """What an input's shape, strides, dtype and device decide: worked out once, then cached."""

    view: View
    dense: bool  # False: the strides fit neither layout, the passes read ``x.contiguous()``
    reduce: ReduceConfig
    elemt: ElemtConfig
    cuda: bool  # compiled kernels (not the interpreter): launches may take the fast path
    # Compiled kernels of this plan's launches (syncbn.ops.fast_launch); dies with the plan.
    launches: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


_MAX_PLANS = 4096
_plans: tuple[Tuning, dict] = (TUNING, {})


def plan(x: torch.Tensor) -> Plan:
    """``x``'s plan: one dictionary lookup per pass once a shape has been seen."""
    global _plans
    tuning, cache = _plans
    if tuning is not TUNING:  # the rules were replaced: plans made under the old ones go
        tuning, cache = _plans = TUNING, {}
    key = (x.shape, x.stride(), x.dtype, x.device)
    found = cache.get(key)
    if found is None:
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        view = classify(x)
        dense = view is not None
        if not dense:  # read as a contiguous copy: the contiguous rules apply
            view = contiguous_view(x.shape)
        itemsize = x.element_size()
        reduce = reduce_config(view, itemsize, sm_count(x.device, tuning), tuning)
        elemt = elemt_config(view, itemsize, tuning)
        found = cache[key] = Plan(view, dense, reduce, elemt, x.is_cuda)
    return found


def cached_plans() -> list[Plan]:
    """The plans made so far under the current rules."""
    return list(_plans[1].values())


def dense(x: torch.Tensor) -> tuple[torch.Tensor, Plan]:
    """The tensor the kernels read (``x`` unless its strides fit no layout) and its plan."""
    found = plan(x)
    return (x, found) if found.dense else (x.contiguous(), found)
