"""Backend selection: which implementation of the local passes a tensor takes.

Two backends share one interface (``local_stats``, ``forward_stats``, ``finalize``,
``normalize``, ``finalize_normalize``, ``backward_reduce``, ``backward_reduce_affine``,
``backward_elemt``, ``local_batch_norm``; ``forward_stats`` is ``local_stats`` plus an opaque
scratch that ``normalize`` may write its output over; the compound functions are what the layer
calls, one launch each on the Triton side; ``local_batch_norm`` is a one-call forward without a
group, or None where the backend has none, and then ``local_batch_norm_backward`` is its
backward): ``reference`` (torch ops; every CPU tensor) and
``triton`` (GPU kernels; CUDA tensors of half and single precision, when Triton is importable).
``SYNCBN_BACKEND=torch`` forces the torch-ops path everywhere, which is how the GPU tests get a
second opinion on the same device. ``SYNCBN_BACKEND=triton`` forces the Triton kernels for every
tensor of those dtypes, CPU tensors included: with ``TRITON_INTERPRET=1`` that runs the kernels
on the CPU, which is how CI tests the layer and the kernels together without a GPU.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .. import settings
from . import reference

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def triton_backend() -> ModuleType | None:
    """The Triton backend module, or None when Triton (or the kernels) cannot be imported.

    Imported lazily: importing Triton costs hundreds of milliseconds and CPU-only users never
    need it.
    """
    try:
        from . import triton as triton_ops
    except ImportError:
        return None
    return triton_ops


def backend_name(x: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path a tensor like ``x`` takes through the layer."""
    forced = settings.BACKEND.get()
    if forced == "torch" or x.dtype not in TRITON_DTYPES:
        return "torch"
    if forced == "triton":
        if triton_backend() is None:
            raise RuntimeError(f"syncbn: {settings.BACKEND.name}=triton, but triton cannot be imported")
        return "triton"
    if x.is_cuda and triton_backend() is not None:
        return "triton"
    return "torch"


def backend_for(x: torch.Tensor) -> ModuleType:
    """The backend module that runs the local passes for ``x``."""
    if backend_name(x) == "triton":
        return triton_backend()
    return reference
