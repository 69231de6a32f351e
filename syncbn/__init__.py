"""syncbn: synchronized batch normalization for PyTorch.

Exactly the statistics of one big batch over all ranks, one small collective per pass, Triton
kernels on GPU and a torch-ops path on CPU (gloo). Public names only; see docs/api.md.
"""

from __future__ import annotations

from . import functional, settings
from .convert import (
    convert_sync_batchnorm,
    freeze_batchnorm,
    is_frozen,
    register_batchnorm_class,
    revert_sync_batchnorm,
    unfreeze_batchnorm,
)
from .distributed import create_syncbn_process_group
from .nn import SyncBatchNorm, SyncBatchNormAct
from .stats import sync_batchnorm_buffers, update_bn_stats

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_sync_batchnorm",
    "create_syncbn_process_group",
    "freeze_batchnorm",
    "functional",
    "is_frozen",
    "register_batchnorm_class",
    "revert_sync_batchnorm",
    "settings",
    "sync_batchnorm_buffers",
    "unfreeze_batchnorm",
    "update_bn_stats",
    "__version__",
]
