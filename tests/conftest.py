"""Shared test setup: Triton's interpreter on CPU-only machines, and the multi-process pool.

Without CUDA, the Triton kernels run on CPU tensors under Triton's interpreter. The variable must
be set before anything imports triton, so it is set here, when pytest loads this file, first.
The workers of the pool are spawned and inherit it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.dist_pool import WorkerPool  # noqa: E402


@pytest.fixture(scope="session")
def pool() -> Iterator[WorkerPool]:
    """The session's multi-process gloo pool (see ``tests/dist_pool.py``).

    Only tests that request it pay for it: the fixture is created on first
    use and the workers themselves start on the first ``pool.run``.
    """
    worker_pool = WorkerPool()
    try:
        yield worker_pool
    finally:
        worker_pool.close()
