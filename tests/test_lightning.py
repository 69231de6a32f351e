"""Lightning's ``Trainer`` with ``syncbn.integrations.lightning.SyncBatchNormPlugin`` on 2 CPU processes.

    python -m pytest -q tests/test_lightning.py

``tests/lightning_train.py`` fits a small conv net with DDP over 2 CPU processes (gloo),
float64; every rank must end with the weights and running statistics of one process training
on the global batches, and with its original BatchNorm classes after fitting. With
unsynchronized BatchNorm the running statistics and weights would differ (from the reference
and between ranks). The same script runs on GPUs from tests/test_cuda.py.
"""

from __future__ import annotations

import torch

from tests import lightning_train, procs

# float64: summation order only
TOL = dict(rtol=1e-10, atol=1e-12)


def check_lightning_run(tmp_path, accelerator: str, devices: int, env: dict | None = None) -> None:
    prefix = tmp_path / "fit"
    proc = procs.python(
        "tests/lightning_train.py", str(prefix), "--accelerator", accelerator, "--devices", str(devices),
        timeout=180, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    expected = lightning_train.reference(devices)
    for rank in range(devices):
        result = torch.load(f"{prefix}.rank{rank}.pt")
        assert result["steps"] == lightning_train.STEPS
        assert result["classes_in_fit"] == ["SyncBatchNorm"] * 3
        assert result["classes_after"] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm1d"]  # reverted
        for key, value in expected.items():
            torch.testing.assert_close(result["state"][key], value, **TOL, msg=lambda m: f"rank {rank} {key}: {m}")


def test_lightning_ddp_on_two_cpu_processes_trains_like_one_big_batch(tmp_path):
    check_lightning_run(tmp_path, "cpu", 2)
