"""Shared test setup: Triton's interpreter on CPU-only machines, the multi-process pool, and
the skip of the ``test_device`` tests when SYNCBN_TEST_DEVICE asks for a CUDA device that is
not there.

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

from syncbn import settings  # noqa: E402
from tests.dist_pool import WorkerPool  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"test_device: puts its tensors on the device {settings.TEST_DEVICE.name} names (default cpu)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Skipped at collection, before the pool starts: its workers would fail on every case.
    if settings.TEST_DEVICE.get() != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"{settings.TEST_DEVICE.name}=cuda but no CUDA device; "
        "benchmarks/gpu_check.py runs these on a GPU machine"
    )
    for item in items:
        if item.get_closest_marker("test_device"):
            item.add_marker(skip)


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
