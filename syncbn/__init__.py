"""syncbn: synchronized batch normalization for PyTorch.

Exactly the statistics of one big batch over all ranks, one small collective per pass, Triton
kernels on GPU and a torch-ops path on CPU (gloo).
"""

from __future__ import annotations

from . import functional
from .nn import SyncBatchNorm

__version__ = "0.1.0"

__all__ = ["SyncBatchNorm", "functional", "__version__"]
