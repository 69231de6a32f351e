"""The oracle every synced result is checked against, and the data it runs on.

The contract (DESIGN.md section 3): in training mode, rank r's output and input gradient are
rows of single-process ``nn.BatchNorm{1,2,3}d`` applied to the concatenation of all ranks'
inputs, for a loss that is the sum of the ranks' losses; weight and bias gradients summed over
ranks and the running statistics are those of that same global layer. The oracle runs in
float64 on the (possibly half-precision) inputs upcast exactly, so a test's tolerance only has
to cover the layer's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
MEMORY_FORMATS = {
    None: torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LayerConfig:
    """One layer under test and the data fed to it (sent to every worker)."""

    channels: int = 3
    spatial: tuple[int, ...] = (4, 5)
    # per step, the number of samples each rank holds
    sizes: list[list[int]] = field(default_factory=lambda: [[3, 3]])
    dtype: str = "float64"
    memory_format: str | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    seed: int = 0
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def param_dtype(self) -> torch.dtype:
        # half-precision input runs with float32 parameters, as under autocast
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)


def make_params(cfg: LayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-trivial affine parameters (float64), the same on every rank."""
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    weight = torch.rand(cfg.channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(cfg.channels, generator=gen, dtype=torch.float64)
    return weight, bias


def make_data(cfg: LayerConfig) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``data[step][rank] = (x, grad_y)`` in the config's dtype, channels with distinct means."""
    gen = torch.Generator().manual_seed(cfg.seed)
    c = cfg.channels
    view = (1, c) + (1,) * len(cfg.spatial)
    data = []
    for step_sizes in cfg.sizes:
        shift = torch.randn(c, generator=gen, dtype=torch.float64).mul_(3).view(view)
        scale = torch.rand(c, generator=gen, dtype=torch.float64).add_(0.5).view(view)
        step = []
        for n in step_sizes:
            shape = (n, c, *cfg.spatial)
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            step.append((x.to(cfg.torch_dtype), g.to(cfg.torch_dtype)))
        data.append(step)
    return data


def make_eval_data(cfg: LayerConfig, world: int) -> list[torch.Tensor]:
    """One eval-mode probe per rank (3 samples each, so batch statistics always exist)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2000)
    shape = (3, cfg.channels, *cfg.spatial)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(cfg.torch_dtype) for _ in range(world)]


def run_oracle(cfg: LayerConfig, data, eval_data, dtype: torch.dtype = torch.float64) -> dict:
    """Single-process float64 nn.BatchNorm on the concatenated batches, step by step.

    Returns ``steps[i]`` with per-rank lists ``y`` and ``dx`` and the global ``dw``, ``db``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``; and ``eval_y`` per rank.
    ``dtype=torch.float32`` gives instead what nn.BatchNorm achieves in single precision on the
    same values: the measure of how well conditioned a case is (tests/test_soak.py).
    """
    ref = BN_CLASSES[cfg.ndim](
        cfg.channels, cfg.eps, cfg.momentum, cfg.affine, cfg.track_running_stats, dtype=dtype
    )
    if cfg.affine:
        weight, bias = make_params(cfg)
        with torch.no_grad():
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
    steps = []
    for step in data:
        sizes = [x.shape[0] for x, _ in step]
        x = torch.cat([x for x, _ in step]).to(dtype).requires_grad_()
        g = torch.cat([g for _, g in step]).to(dtype)
        y = ref(x)
        y.backward(g)
        rec = {
            "y": list(y.detach().split(sizes)),
            "dx": list(x.grad.split(sizes)),
            "dw": ref.weight.grad.clone() if cfg.affine else None,
            "db": ref.bias.grad.clone() if cfg.affine else None,
        }
        if cfg.track_running_stats:
            rec.update(
                running_mean=ref.running_mean.clone(),
                running_var=ref.running_var.clone(),
                num_batches_tracked=int(ref.num_batches_tracked),
            )
        ref.zero_grad()
        steps.append(rec)
    ref.eval()
    with torch.no_grad():
        eval_y = [ref(x.to(dtype)) for x in eval_data]
    return {"steps": steps, "eval_y": eval_y}
