"""launch/train.py under what a cluster does to a job: SIGTERM (to the torchrun agent, or to one
worker only), SIGKILL of one worker under ``torchrun --max-restarts`` at chosen moments (a step,
a checkpoint save, an evaluation, the restart itself), two torchrun agents on this machine, and a
network partition between two network namespaces.

An interrupted and resumed run must end with the uninterrupted run's final weights, running
statistics, optimizer state and metrics, bit for bit (CPU, gloo, 2 processes). The faults come
from tests/faulty_train.py, which runs launch/train.py unchanged and only picks the moment.
``pytest -m soak tests/test_preemption.py`` adds the sweep: each kill moment on each rank alone,
and kills and signals from outside at random moments.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests import procs

sys.path.insert(0, str(procs.ROOT / "launch"))
import checkpoint  # noqa: E402  (launch/checkpoint.py)
import train  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, /proc and network namespaces: Linux")

# 16 steps per epoch, 48 in all; bf16 autocast, channels_last and the random flips (which draw from
# each rank's RNG, so a resume that restored the wrong RNG state would not retrace) ride along.
FLAGS = [
    *("--backend", "gloo", "--train-size", "256", "--width", "8", "--batch-size", "8", "--epochs", "3"),
    *("--amp", "bf16", "--channels-last", "--augment"),
]
# What launch/run_cpu.sh sets: a fresh rendezvous store for every torchrun attempt.
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
FINAL = re.compile(r"^final: .*$", re.M)


def _faulty(*faults: str, ckpt: Path, extra: tuple[str, ...] = ()) -> list[str]:
    fault_args = [arg for fault in faults for arg in ("--fault", fault)]
    return [str(procs.ROOT / "tests" / "faulty_train.py"), *fault_args, *FLAGS, "--ckpt", str(ckpt), *extra]


def _torchrun(args: list[str], restarts: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    options = ("--standalone", f"--max-restarts={restarts}")
    return procs.torchrun(*args, options=options, env=FRESH_STORE, timeout=timeout)


def _final_line(out: str) -> str:
    match = FINAL.search(out)
    assert match, f"no final line in:\n{out}"
    return re.sub(r", [\d,]+ train images/s|; checkpoint .*", "", match[0])  # (speed and file differ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_run(state: dict, reference: dict) -> None:
    """Weights, running statistics, optimizer, schedule and every rank's final RNG states equal."""
    assert state["model"].keys() == reference["model"].keys()
    differ = [k for k in reference["model"] if not torch.equal(state["model"][k], reference["model"][k])]
    assert not differ, f"model tensors differ from the uninterrupted run's: {differ}"
    momentum, reference_momentum = state["optimizer"]["state"], reference["optimizer"]["state"]
    assert momentum.keys() == reference_momentum.keys()
    assert all(torch.equal(momentum[k]["momentum_buffer"], reference_momentum[k]["momentum_buffer"]) for k in momentum)
    assert state["scheduler"] == reference["scheduler"]
    for mine, theirs in zip(state["ranks"], reference["ranks"]):
        assert (
            torch.equal(mine["rng"]["torch"], theirs["rng"]["torch"])
            and mine["rng"]["python"] == theirs["rng"]["python"]
        )


def _uninterrupted(flags: list[str], directory: Path) -> tuple[str, dict]:
    """The uninterrupted run (through launch/run_cpu.sh): its final line and final checkpoint."""
    ckpt = directory / "ckpt.pt"
    result = procs.run(["bash", str(procs.ROOT / "launch" / "run_cpu.sh"), *flags, "--ckpt", str(ckpt)], timeout=240)
    assert result.returncode == 0, result.stdout
    assert "2 process(es), backend gloo" in result.stdout and "9 x syncbn.SyncBatchNorm" in result.stdout
    return _final_line(result.stdout), torch.load(ckpt, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, dict]:
    return _uninterrupted(FLAGS, tmp_path_factory.mktemp("reference"))


def test_sigterm_stops_every_rank_after_one_step_and_resumes_exactly(reference, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    # A preemption: the torchrun agent gets SIGTERM (during step 7) and forwards it to its workers,
    # which notice it at slightly different moments. torchrun itself then exits 1, whatever its
    # workers do.
    first = _torchrun(_faulty("0:0:term-agent:step:7", ckpt=ckpt))
    assert first.returncode == 1, first.stdout
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of 48; checkpoint {ckpt} written", first.stdout)
    assert stopped, first.stdout
    at = int(stopped[1])
    assert 7 <= at < 16, first.stdout  # within epoch 1, no later than a few steps after the signal
    assert first.stdout.count("returned from main") == 2, first.stdout  # both ranks ended cleanly
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, at)
    assert not Path(f"{ckpt}.tmp").exists()

    # A signal that reaches one worker only (rank 1, during its 10th step after the restart): all
    # ranks still stop after that same step, and every worker exits 0, so torchrun does too.
    second = _torchrun(_faulty("0:1:term:step:10", ckpt=ckpt, extra=("--resume",)))
    assert second.returncode == 0, second.stdout
    assert f"resumed from {ckpt}: 0 epoch(s) done, then epoch 1, step {at}/16" in second.stdout
    assert f"stopped by SIGTERM after step {at + 10} of 48" in second.stdout, second.stdout

    third = _torchrun(_faulty(ckpt=ckpt, extra=("--resume",)))
    assert third.returncode == 0, third.stdout
    final_line, reference_state = reference
    assert _final_line(third.stdout) == final_line
    state = torch.load(ckpt, weights_only=True)
    _assert_same_run(state, reference_state)
    # The checkpoint is the plain model's state_dict: it loads into the unconverted ResNet.
    train.ResNet(3, 10, width=8).load_state_dict(state["model"])  # strict: the same keys


def test_sigkill_under_max_restarts_at_several_moments_resumes_exactly(reference, tmp_path):
    """One run, four deaths: rank 1 during step 5; rank 0 in the middle of writing its second
    checkpoint (at step 12: the partial temporary file must not count); rank 1 during the first
    evaluation; rank 0 just before init_process_group of the next restart. A checkpoint every 4
    steps: the attempts resume from steps 4, 8, 16 and 16."""
    ckpt = tmp_path / "ckpt.pt"
    faults = ("0:1:kill:step:5", "1:0:kill:save:2", "2:1:kill:eval:1", "3:0:kill:start:1")
    result = _torchrun(_faulty(*faults, ckpt=ckpt, extra=("--ckpt-every", "4", "--resume")), restarts=4)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("fault: ") == 4, result.stdout
    resumed = re.findall(r"resumed from .*: (\d+) epoch\(s\) done, then epoch 1, step (\d+)/16", result.stdout)
    assert resumed == [("0", "4"), ("0", "8"), ("0", "16")], result.stdout  # (attempt 3 died before printing)
    assert "connectFullMesh" not in result.stdout  # no restart lost to a stale address
    final_line, reference_state = reference
    assert _final_line(result.stdout) == final_line
    _assert_same_run(torch.load(ckpt, weights_only=True), reference_state)


# --- options, start-up, bad checkpoints --------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ckpt-every", "-1"], "argument --ckpt-every: must be >= 0, got -1"),
        (["--ckpt-every", "10"], "argument --ckpt-every: needs --ckpt, the file to write"),
        (["--timeout", "0"], "argument --timeout: must be a finite number >= 1, got 0.0"),
        (["--timeout", "nan"], "argument --timeout: must be a finite number >= 1, got nan"),
        (["--ckpt", "/no/such/dir/ckpt.pt"], "argument --ckpt: the directory of /no/such/dir/ckpt.pt does not exist"),
    ],
)
def test_new_options_are_validated(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_config(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{Path(sys.argv[0]).name}: error: {message}"


def test_warns_when_restarts_share_torchruns_store(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert checkpoint.shared_store_warning() is None  # no restart: nothing to go stale
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in checkpoint.shared_store_warning()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun say
    assert checkpoint.shared_store_warning() is None


def test_a_group_that_cannot_form_fails_within_the_timeout():
    """Rank 1 of 2 alone, as after a restart whose rank 0 died: an error after --timeout, not
    gloo's default wait of 30 minutes."""
    env = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())  # nobody listens there
    start = time.monotonic()
    result = procs.run([sys.executable, str(procs.ROOT / "launch" / "train.py"), "--timeout", "2"], timeout=60, env=env)
    assert result.returncode == 1, result.stdout
    assert "timed out after 2000ms" in result.stdout, result.stdout
    assert time.monotonic() - start < 45  # start-up, then the 2 s (torch's default would be 1800 s)


def test_truncated_checkpoint_is_a_clear_error(reference, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _, state = reference
    torch.save(state, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    result = procs.python(str(procs.ROOT / "launch" / "train.py"), *FLAGS, "--ckpt", str(ckpt), "--resume", timeout=60)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith(f"train.py: checkpoint {ckpt} cannot be read ("), (
        result.stdout
    )
    assert "it is truncated or corrupt" in result.stdout


def _resume_error(path: Path, argv: list[str]) -> str:
    """The CheckpointError that resuming from ``path`` with train.py options ``argv`` raises."""
    cfg = train.parse_config(argv + ["--ckpt", str(path)])
    model = train.ResNet(3, 10, cfg.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.Checkpoint(str(path), cfg, model, optimizer, scheduler, torch.device("cpu")).resume()
    return str(error.value)


def test_incompatible_checkpoints_are_clear_errors(reference, tmp_path):
    _, state = reference
    ckpt = tmp_path / "ckpt.pt"
    torch.save(state, ckpt)
    message = _resume_error(ckpt, [*FLAGS[:5], "16", *FLAGS[6:]])  # --width 16 instead of 8
    assert message.startswith(f"checkpoint {ckpt} was written with other options: --width 8 (this run: 16)")
    message = _resume_error(ckpt, FLAGS)  # a single process resuming a 2-process checkpoint
    assert message.startswith(f"checkpoint {ckpt} was written by 2 process(es), this run has 1:")
    # What launch/train.py wrote before this format: no "format" entry.
    torch.save({k: state[k] for k in ("model", "optimizer", "scheduler", "config")} | {"epoch": 1}, ckpt)
    assert "was not written by this version of launch/train.py (no format entry" in _resume_error(ckpt, FLAGS)
    ckpt.write_text("not a checkpoint\n")
    assert "cannot be read (UnpicklingError: " in _resume_error(ckpt, FLAGS)


def _case_start_positions(ctx, path):
    position = checkpoint.Position(2, 5) if ctx.rank == 0 else checkpoint.Position()
    try:
        checkpoint.check_same_position(position, path, ctx.group)
    except checkpoint.CheckpointError as error:
        return str(error)
    return None


def test_ranks_starting_from_different_points_all_raise(pool):
    """A checkpoint on a disk only rank 0 sees: rank 0 resumes, rank 1 starts from scratch."""
    messages = pool.run(_case_start_positions, group="w2", args=("/node0/ckpt.pt",), timeout=60)
    assert messages[0] == messages[1] and messages[0] is not None
    assert "rank 0: epoch 2 step 5, rank 1: epoch 0 step 0" in messages[0]
    assert "on several nodes, put it on a shared filesystem" in messages[0]


# --- two nodes ------------------------------------------------------------------------------


def _two_agents(args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """``args`` under two torchrun agents of 2 processes each, meeting on 127.0.0.1 (c10d)."""
    options = (
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        f"--rdzv-id={uuid.uuid4()}",
    )
    agents = [procs.Started(procs.torchrun_command(*args, nproc=2, options=options), env=FRESH_STORE) for _ in "ab"]
    try:
        return [agent.finish(timeout) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()


def test_two_agents_run_train_and_verify():
    results = _two_agents([str(procs.ROOT / "launch" / "train.py"), *FLAGS[:8], "--epochs", "1"])
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.stdout for r in results)
    out = "".join(r.stdout for r in results)
    assert out.count("4 process(es), backend gloo") == 1, out  # global rank 0 alone prints
    assert "batch 8 per rank (32 global), 8 steps per epoch" in out and FINAL.search(out), out

    results = _two_agents(["-m", "syncbn", "verify"])
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.stdout for r in results)
    out = "".join(r.stdout for r in results)
    assert "world size 4, backend gloo" in out and re.search(r"PASS: all \d+ checks match", out), out


@pytest.fixture
def two_namespaces():
    """Two network namespaces, "nodes" joined by a veth pair: (name, interface, address) each.

    Everything (the pair, the addresses) lives inside the namespaces, and deleting them removes
    it all; names carry this process's id, so parallel runs do not collide.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's ip command, which is not on PATH")
    names = [f"syncbn{os.getpid()}{side}" for side in "ab"]
    created = []

    def ip(*args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode:
            pytest.skip(f"this machine cannot set up network namespaces: ip {' '.join(args)}: {result.stderr.strip()}")

    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
        ip("link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1", "netns", names[1])
        nodes = []
        for side, name in enumerate(names):
            address = f"10.123.0.{side + 1}"
            ip("-n", name, "addr", "add", f"{address}/24", "dev", f"veth{side}")
            ip("-n", name, "link", "set", f"veth{side}", "up")
            ip("-n", name, "link", "set", "lo", "up")
            nodes.append((name, f"veth{side}", address))
        yield nodes
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_network_partition_ends_both_nodes_with_an_error(two_namespaces):
    """One process per "node", started as a cluster launcher would (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT). Once they train, the link goes down: each side waits in a collective for
    --timeout, then fails with the timeout named. No hang, no exit 0."""
    timeout = 5
    (_, _, master), _ = two_namespaces
    ranks = []
    try:
        for rank, (name, interface, _) in enumerate(two_namespaces):
            env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": master}
            env |= {"MASTER_PORT": "29500", "GLOO_SOCKET_IFNAME": interface}  # (a port of the namespace's own)
            args = [str(procs.ROOT / "launch" / "train.py"), *FLAGS[:8], "--epochs", "1000", "--timeout", str(timeout)]
            command = ["ip", "netns", "exec", name, "env", *(f"{k}={v}" for k, v in env.items()), sys.executable]
            ranks.append(procs.Started([*command, *args]))
        ranks[0].wait_for("steps per epoch", timeout=120)  # printed once DDP has formed: training starts
        time.sleep(0.5)
        cut = time.monotonic()
        subprocess.run(["ip", "-n", two_namespaces[0][0], "link", "set", "veth0", "down"], check=True, timeout=30)
        for rank, started in enumerate(ranks):
            result = started.finish(timeout=timeout + 60)
            took = time.monotonic() - cut
            assert result.returncode == 1, result.stdout
            assert f"Timed out waiting {timeout * 1000}ms" in result.stdout, result.stdout
            assert took < timeout + 45, f"rank {rank} ended {took:.0f} s after the cut"  # (the bound is --timeout)
    finally:
        for started in ranks:
            started.kill()


# --- the sweep (opt-in: pytest -m soak) ------------------------------------------------------

MOMENTS = ["step:1", "step:7", "save:1", "save:3", "eval:1", "start:1"]


@pytest.mark.soak
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("moment", MOMENTS)
def test_sweep_sigkill_one_moment(reference, tmp_path, moment, rank):
    """One SIGKILL of one rank at one moment, then a restart that finishes the run."""
    ckpt = tmp_path / "ckpt.pt"
    result = _torchrun(_faulty(f"0:{rank}:kill:{moment}", ckpt=ckpt, extra=("--ckpt-every", "3", "--resume")), 1)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("fault: ") == 1 and "connectFullMesh" not in result.stdout, result.stdout
    final_line, reference_state = reference
    assert _final_line(result.stdout) == final_line
    _assert_same_run(torch.load(ckpt, weights_only=True), reference_state)


def _worker_pids(agent_pid: int) -> list[int]:
    return [pid for pid in procs.process_tree(agent_pid) if pid != agent_pid]


LONG_FLAGS = [*FLAGS[: FLAGS.index("--epochs")], "--epochs", "6", *FLAGS[FLAGS.index("--epochs") + 2 :]]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> tuple[str, dict]:
    return _uninterrupted(LONG_FLAGS, tmp_path_factory.mktemp("long-reference"))


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(6))
def test_sweep_interrupted_from_outside_at_random_moments(long_reference, tmp_path, seed):
    """Kills and signals from outside at random moments (start-up and restarts included): SIGKILL
    of a random worker, up to 3 per torchrun run (which restarts the group each time), and SIGTERM
    to the agent or to a random worker (the run stops and is resumed by the next one); after six
    interrupted runs, one without interruption finishes. The end must be the uninterrupted run's."""
    rng = random.Random(seed)
    ckpt = tmp_path / "ckpt.pt"
    args = [str(procs.ROOT / "launch" / "train.py"), *LONG_FLAGS, "--ckpt", str(ckpt), "--ckpt-every", "5"]
    events = []
    for launch in range(8):
        command = procs.torchrun_command(*args, "--resume", options=("--standalone", "--max-restarts=3"))
        started = procs.Started(command, FRESH_STORE)
        try:
            for _ in range(rng.randint(1, 3) if launch < 6 else 0):
                if rng.random() < 0.7:  # while training, else during start-up or a restart
                    with contextlib.suppress(AssertionError):  # (it may have finished)
                        started.wait_for("steps per epoch", timeout=120)
                deadline = time.monotonic() + 60
                while (
                    not _worker_pids(started.proc.pid) and started.proc.poll() is None and time.monotonic() < deadline
                ):
                    time.sleep(0.05)  # torchrun starts its workers
                time.sleep(rng.uniform(0, 1.5))
                workers = _worker_pids(started.proc.pid)
                if started.proc.poll() is not None or not workers:
                    events.append("(finished first)")
                    break
                kind = rng.choice(["kill-worker", "kill-worker", "term-agent", "term-worker"])
                target = started.proc.pid if kind == "term-agent" else rng.choice(workers)
                os.kill(target, signal.SIGKILL if kind == "kill-worker" else signal.SIGTERM)
                events.append(kind)
                if kind != "kill-worker":
                    break  # the run stops
            result = started.finish(timeout=240)
        finally:
            started.kill()
        assert "connectFullMesh" not in result.stdout, result.stdout
        if FINAL.search(result.stdout):
            break
        events.append("| resume:")
    print(f"\nsweep seed {seed}: {' '.join(events)}")
    final_line, reference_state = long_reference
    assert _final_line(result.stdout) == final_line, events
    _assert_same_run(torch.load(ckpt, weights_only=True), reference_state)
