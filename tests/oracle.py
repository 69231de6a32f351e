"""The oracle every synced result is checked against, and the data it runs on.

The contract: in training mode, rank r's output and input gradient are
rows of single-process ``nn.BatchNorm{1,2,3}d`` applied to the concatenation of all ranks'
inputs, for a loss that is the sum of the ranks' losses; weight and bias gradients summed over
ranks and the running statistics are those of that same global layer. The oracle runs in
float64 on the (possibly half-precision) inputs upcast exactly, so a test's tolerance only has
to cover the layer's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from syncbn.dtypes import stat_dtype
from syncbn.verify import Oracle, random_params, random_steps

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
        return stat_dtype(self.torch_dtype)  # float32 with half-precision input, as under autocast

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)


def make_params(cfg: LayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-trivial affine parameters (float64), the same on every rank."""
    return random_params(cfg.channels, torch.Generator().manual_seed(cfg.seed + 1000))


def make_data(cfg: LayerConfig) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``data[step][rank] = (x, grad_y)`` in the config's dtype, channels with distinct means."""
    return random_steps(cfg.sizes, cfg.channels, cfg.spatial, cfg.torch_dtype, torch.Generator().manual_seed(cfg.seed))


def make_eval_data(cfg: LayerConfig, world: int) -> list[torch.Tensor]:
    """One eval-mode probe per rank (3 samples each, so batch statistics always exist)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2000)
    shape = (3, cfg.channels, *cfg.spatial)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(cfg.torch_dtype) for _ in range(world)]


def run_oracle(cfg: LayerConfig, data, eval_data, dtype: torch.dtype = torch.float64) -> dict:
    """Single-process float64 nn.BatchNorm on the concatenated batches, step by step.

    Returns ``steps[i]`` with per-rank lists ``y`` and ``dx`` and the global ``dw``, ``db``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``; and ``eval_y`` per rank. The
    oracle itself is the package's (``syncbn.verify.Oracle``, which ``syncbn verify`` runs).
    ``dtype=torch.float32`` gives instead what nn.BatchNorm achieves in single precision on the
    same values: the measure of how well conditioned a case is (tests/test_soak.py).
    """
    weight, bias = make_params(cfg) if cfg.affine else (None, None)
    oracle = Oracle(
        cfg.ndim, cfg.channels, cfg.eps, cfg.momentum, cfg.affine, cfg.track_running_stats, weight, bias, dtype
    )
    steps = [oracle.step([x for x, _ in step], [g for _, g in step]) for step in data]
    return {"steps": steps, "eval_y": [oracle.eval(x) for x in eval_data]}


def layer_pair(shape: tuple[int, ...], momentum: float | None, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A ``syncbn.SyncBatchNorm`` and the ``nn.BatchNorm{1,2,3}d`` for ``shape``, same parameters."""
    import syncbn
    from syncbn.convert import BATCHNORM_BY_INPUT_DIM

    channels = shape[1]
    ours = syncbn.SyncBatchNorm(channels, momentum=momentum).to(device)
    theirs = BATCHNORM_BY_INPUT_DIM[len(shape)](channels, momentum=momentum).to(device)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, channels))
            m.bias.copy_(torch.linspace(-1, 1, channels))
    return ours, theirs


def away_from_kinks(pre: torch.Tensor, kinks: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """Where no rounding of the pre-activation ``pre`` can cross one of ``kinks``.

    An activation's derivative jumps at a kink, so two correct computations that round the
    pre-activation differently (the torch-ops path rounds it to the input's dtype, as
    nn.BatchNorm then the activation does; the kernels keep it in float32) may take different
    sides of it: elementwise gradients are compared away from them.
    """
    margin = 2.0**-7 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    keep = torch.ones_like(pre, dtype=torch.bool)
    for kink in kinks:
        keep &= (pre - kink).abs() > margin * (abs(kink) + 1)
    return keep
