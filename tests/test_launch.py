"""The launch scripts as users run them: launch/run_cpu.sh (torchrun, gloo), plain BatchNorm on
the bundled digits, and launch/train_accelerate.py through ``accelerate launch``. Tiny runs (a few
hundred images, 2 processes), each under a deadline. Checkpoints, preemption and restarts:
tests/test_preemption.py.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from tests import procs

# Small enough for a few seconds per run on 2 cores; large enough for several steps per epoch.
TINY = ["--train-size", "256", "--width", "8", "--batch-size", "8"]
FINAL = re.compile(r"^final: val acc (?P<acc>[\d.]+)% \((?P<correct>\d+)/(?P<n>\d+)\), val loss (?P<loss>[\d.]+)", re.M)


def _run_cpu(*args: str, timeout: float = 120) -> str:
    result = procs.run(["bash", str(procs.ROOT / "launch" / "run_cpu.sh"), *args], timeout=timeout)
    assert result.returncode == 0, result.stdout
    return result.stdout


def _final(out: str) -> dict[str, str]:
    match = FINAL.search(out)
    assert match, f"no final metrics line in:\n{out}"
    return match.groupdict()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_local_batchnorm_on_digits():
    """--bn local keeps nn.BatchNorm2d; --data digits reads scikit-learn's bundled images;
    --precise-bn recomputes the plain layers' statistics across the ranks before the final scores."""
    pytest.importorskip("sklearn")
    flags = ["--data", "digits", "--bn", "local", "--epochs", "1", "--width", "8", "--batch-size", "16"]
    out = _run_cpu(*flags, "--precise-bn", "10")
    assert "9 x nn.BatchNorm2d (not synchronized)" in out
    assert "1438 train / 359 val images of 1x8x8" in out
    before = re.search(r"^precise BN: before  val acc [\d.]+% \(\d+/359\)", out, re.M)
    after = re.search(r"^precise BN: after   val acc ([\d.]+)% \(\d+/359\).*over 10 batches per rank", out, re.M)
    assert before and after, out
    final = _final(out)
    assert int(final["n"]) == 359  # every validation image scored once, none twice
    assert final["acc"] == after.group(1)  # the final scores are those after precise BN
    assert float(final["acc"]) > 50  # 1 epoch on digits: far above chance (10%); measured 95%


def test_accelerate_launch_two_cpu_processes():
    """accelerate launch with launch/accelerate_cpu.yaml: 2 processes on gloo, converted model."""
    pytest.importorskip("accelerate")
    result = procs.python(
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(procs.ROOT / "launch" / "accelerate_cpu.yaml"),
        str(procs.ROOT / "launch" / "train_accelerate.py"),
        "--max-steps",
        "4",
        "--train-size",
        "256",
        timeout=180,
    )
    assert result.returncode == 0, result.stdout
    assert "2 process(es) on cpu (MULTI_CPU), bn sync" in result.stdout
    assert re.search(r"epoch 1: step 4, train loss [\d.]+, val acc [\d.]+% \(\d+/64\)", result.stdout), result.stdout


def _assert_usage_error(result, option: str) -> None:
    """argparse's rejection: exit code 2, its usage, then one error line naming ``option``."""
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(f"train.py: error: argument {option}: "), result.stdout
    assert all(line.startswith(("usage: ", " ")) for line in lines[:-1]), result.stdout


@pytest.mark.parametrize(
    "option,value",
    [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--lr", "-0.1"),
        ("--weight-decay", "-0.001"),  # not -1e-4: argparse reads that as an option
        ("--width", "0"),
        ("--train-size", "0"),
    ],
)
def test_train_rejects_bad_values(option, value):
    result = procs.python(str(procs.ROOT / "launch" / "train.py"), option, value, timeout=60)
    _assert_usage_error(result, option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: --backend nccl is valid here")
def test_train_rejects_nccl_without_cuda():
    result = procs.python(str(procs.ROOT / "launch" / "train.py"), "--backend", "nccl", timeout=60)
    _assert_usage_error(result, "--backend")
    assert "no CUDA device" in result.stdout


def test_run_cpu_rejects_bad_value_before_torchrun():
    """One error line from one process: no line per rank, no report of failed torchrun workers."""
    result = procs.run(["bash", str(procs.ROOT / "launch" / "run_cpu.sh"), "--epochs", "0"], timeout=60)
    _assert_usage_error(result, "--epochs")
    assert result.stdout.count("error:") == 1, result.stdout


@pytest.mark.parametrize("script", ["run_cpu.sh", "run_gpu.sh"])
def test_run_scripts_reject_a_bad_max_restarts(script):
    result = procs.run(["bash", str(procs.ROOT / "launch" / script)], env={"MAX_RESTARTS": "two"}, timeout=60)
    assert result.returncode == 1, result.stdout
    assert result.stdout.strip() == f"{script}: MAX_RESTARTS=two is not a number of restarts (0, 1, ...)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: run_gpu.sh would start training")
def test_run_gpu_without_cuda_points_to_run_cpu():
    """NGPU=2 on a machine without CUDA: the script's own message, not a traceback from every rank."""
    result = procs.run(["bash", str(procs.ROOT / "launch" / "run_gpu.sh")], env={"NGPU": "2"}, timeout=60)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert result.stdout.strip().splitlines() == [
        "run_gpu.sh: torch sees no CUDA device on this machine; on CPU, run bash launch/run_cpu.sh "
        "(it takes the same options)"
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: without it run_gpu.sh stops before NGPU")
def test_run_gpu_rejects_more_gpus_than_visible():
    visible = torch.cuda.device_count()
    result = procs.run(["bash", str(procs.ROOT / "launch" / "run_gpu.sh")], env={"NGPU": str(visible + 1)}, timeout=60)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert f"NGPU={visible + 1}, but this node has {visible} visible GPU(s)" in result.stdout
