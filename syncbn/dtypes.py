"""The dtypes the layer takes, and the one rule for the dtype its statistics live in."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator and statistics dtype for an input dtype: float64 stays, the rest is float32.

    Also the dtype of the parameters that go with a half-precision input (as under autocast).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
