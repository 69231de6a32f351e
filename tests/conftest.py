"""Shared fixtures for the syncbn test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dist_pool import WorkerPool


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
