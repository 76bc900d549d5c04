"""Multi-node and preemption without Slurm: torchrun "nodes" on this host, SIGTERM (Kubernetes, torchrun).

(The Slurm path, with the shipped sbatch template on a real cluster, is tests/test_slurm.py.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litllm.errors import LitLLMError
from litllm.train.preemption import REQUEUE_EXIT_CODE, StopOnSignal
from conftest import assert_same_tensors, slow_save_cli
from test_pretrain import env_with_tests, fixed_tokens_args, initial_model, read_losses  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(initial: Path, out: Path, devices: int, micro_batch_size: int, steps: int = STEPS) -> list[str]:
    args = fixed_tokens_args(initial, out, devices, "auto", micro_batch_size=micro_batch_size)
    return args + ["--train.max_steps", str(steps), "--train.save_interval", "100"]


@pytest.fixture(scope="module")
def one_process_run(initial_model, tmp_path_factory) -> Path:
    from litllm.__main__ import main as cli

    out = tmp_path_factory.mktemp("one") / "out"
    cli(run_args(initial_model, out, 1, micro_batch_size=8))
    return out


# ---------------------------------------------------------------------- torchrun: two nodes on one host
@pytest.mark.slow
def test_two_torchrun_nodes_match_one_process(initial_model, one_process_run, tmp_path):
    out = tmp_path / "out"
    port = str(free_port())
    litllm_args = run_args(initial_model, out, 1, micro_batch_size=4) + ["--num_nodes", "2"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
             "-m", "litllm", *litllm_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_with_tests(), cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "x 2 devices" in logs[0] and logs[0].count("Saved the final model") == 1
    assert "Saved the final model" not in logs[1]  # status lines come from global rank 0 only
    expected, got = read_losses(one_process_run), read_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------- SIGTERM without Slurm
SLOW_CHECKPOINT = slow_save_cli(".step-", "WRITING CHECKPOINT", 3)  # a second signal arrives mid-save


@pytest.mark.slow
def test_sigterm_to_rank_zero_checkpoints_every_rank_and_resumes_bit_identical(initial_model, tmp_path):
    """Kubernetes signals PID 1 only: rank 0 gets SIGTERM, the all-reduce stops rank 1 at the same step.
    A second SIGTERM (and a SIGUSR1) while the checkpoint is written don't interrupt it."""
    from litllm.train.checkpoints import latest_checkpoint

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    steps = 60  # ~20 steps/s here: long enough to be stopped mid-run
    args = run_args(initial_model, straight, 2, micro_batch_size=2, steps=steps) + ["--strategy", "ddp"]
    proc = subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True, timeout=300,
                          env=env_with_tests(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    args = run_args(initial_model, stopped, 2, micro_batch_size=2, steps=steps) + ["--strategy", "ddp"]
    script = tmp_path / "slow_checkpoint.py"  # a file: Fabric starts rank 1 by re-running sys.argv
    script.write_text(SLOW_CHECKPOINT)
    run = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env=env_with_tests(), cwd=tmp_path)
    try:
        metrics = stopped / "logs" / "csv" / "metrics.csv"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and run.poll() is None, "the run never reached step 2"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        for line in run.stdout:
            if "WRITING CHECKPOINT" in line:
                run.send_signal(signal.SIGTERM)
                run.send_signal(signal.SIGUSR1)
            if "Stopped by SIGTERM" in line:
                message = line
        assert run.wait(timeout=120) == REQUEUE_EXIT_CODE
    finally:
        run.kill()
    checkpoint = latest_checkpoint(stopped)
    assert checkpoint is not None and f"after step {int(checkpoint.name[5:])}:" in message
    assert int(checkpoint.name[5:]) < steps and not (stopped / "final").exists()
    assert not any(p.name.startswith(".step-") for p in stopped.iterdir())  # nothing half-written

    proc = subprocess.run([sys.executable, "-m", "litllm", *args, "--resume", "auto"], capture_output=True,
                          text=True, timeout=300, env=env_with_tests(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(straight / "final" / "lit_model.safetensors", stopped / "final" / "lit_model.safetensors")
    assert read_losses(stopped) == read_losses(straight)


def test_stop_on_signal_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: still alive, still the first
        assert stop.received == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------- Slurm's layout, checked in Python
def _slurm_env(monkeypatch, **values):
    names = ("NTASKS", "NNODES", "JOB_NUM_NODES", "NTASKS_PER_NODE", "JOB_NAME", "NODEID", "PROCID", "LOCALID")
    for name in (f"SLURM_{n}" for n in names):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_slurm_layout_from_the_environment(monkeypatch):
    from litllm.train.fabric import slurm_layout

    _slurm_env(monkeypatch)
    assert slurm_layout() is None
    _slurm_env(monkeypatch, SLURM_NTASKS="4", SLURM_NNODES="2", SLURM_JOB_NAME="interactive")
    assert slurm_layout() is None  # Fabric doesn't use Slurm in interactive jobs
    _slurm_env(monkeypatch, SLURM_NTASKS="4", SLURM_NNODES="2")  # `srun -n4 -N2`: no SLURM_NTASKS_PER_NODE
    assert slurm_layout() == (2, 2) and os.environ["SLURM_NTASKS_PER_NODE"] == "2"  # so Lightning doesn't raise
    _slurm_env(monkeypatch, SLURM_NTASKS="3", SLURM_NNODES="2")
    with pytest.raises(LitLLMError, match="3 tasks on 2 nodes, not the same number on each"):
        slurm_layout()


def test_devices_that_disagree_with_srun_fail_clearly(monkeypatch):
    from litllm.train.fabric import make_fabric

    _slurm_env(monkeypatch, SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0")
    with pytest.raises(LitLLMError, match=r"^--devices 1 --num_nodes 1 disagree with the Slurm allocation \(2 tasks"):
        make_fabric(devices=1, accelerator="cpu")
    assert make_fabric(devices="auto", accelerator="cpu", strategy="ddp").world_size == 2  # auto: the allocation
