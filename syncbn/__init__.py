"""syncbn: synchronized batch normalization for PyTorch.

Exactly the statistics of one big batch over all ranks, one small collective per pass, Triton
kernels on GPU and a torch-ops path on CPU (gloo).
"""

from __future__ import annotations

from . import functional

# Model tools (issue 4): conversion, freezing, sub-groups.
from .convert import (
    convert_sync_batchnorm,
    freeze_batchnorm,
    revert_sync_batchnorm,
    unfreeze_batchnorm,
)
from .distributed import create_syncbn_process_group
from .nn import SyncBatchNorm

__version__ = "0.1.0"

__all__ = ["SyncBatchNorm", "functional", "__version__"]
__all__ += [
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "create_syncbn_process_group",
]
