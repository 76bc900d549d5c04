"""The shipped sbatch template on a real Slurm: two nodes on this host (.ci/slurm_cluster.sh).

Every test submits `config_hub/slurm/litllm.sbatch` with `sbatch --wait`, as a user would; the
only overrides are the resources (CPU tasks instead of GPUs). Skipped where Slurm isn't installed
(`.ci/run` installs Debian's packages, so CI runs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_same_tensors, make_converted_checkpoint
from litllm.__main__ import main as cli
from litllm.train.preemption import REQUEUE_EXIT_CODE
from test_pretrain import env_with_tests, fixed_tokens_args, initial_model, read_losses  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "config_hub" / "slurm" / "litllm.sbatch"
CLUSTER = REPO / ".ci" / "slurm_cluster.sh"
# CPU nodes: one task per "device", one thread each, no GPUs (the template's defaults are for 8-GPU nodes)
CPU_TASKS = ["--cpus-per-task", "1", "--gpus-per-node", "0", "--time", "10"]
STEPS = 40

pytestmark = [
    pytest.mark.slow,  # a real two-node cluster: end to end, a few minutes
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")),
        reason="Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node cluster; yields the environment that reaches it. Daemons are stopped by PID."""
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=60)
        pytest.fail(f"could not start the Slurm cluster: {proc.stderr[-2000:]}")
    env = env_with_tests()
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    env["LITLLM"] = f"{sys.executable} -m litllm"
    env.pop("OMP_NUM_THREADS")  # the template sets it from --cpus-per-task
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=60)


def sbatch(env, log: Path, resources: list[str], litllm_args: list[str], wait: bool = True):
    """Submit the template; returns the finished process (wait=True) or the running `sbatch --wait`."""
    args = ["sbatch", "--wait", "--parsable", "--output", str(log), *resources, *CPU_TASKS, str(TEMPLATE), *litllm_args]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=log.parent, timeout=300)
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=log.parent)


def pretrain_args(initial: Path, out_dir: Path) -> list[str]:
    """The tiny pretraining run of test_pretrain: global batch 8 = 2 nodes x micro-batch 4."""
    args = fixed_tokens_args(initial, out_dir, 1, "auto", micro_batch_size=4)
    return args + ["--train.max_steps", str(STEPS), "--train.save_interval", "10", "--train.log_interval", "1"]


@pytest.fixture(scope="module")
def two_node_run(slurm, initial_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_nodes")
    proc = sbatch(slurm, folder / "job.log", ["--nodes", "2", "--ntasks-per-node", "1"],
                  pretrain_args(initial_model, folder / "out"))
    log = (folder / "job.log").read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    return folder / "out", log


def test_two_nodes_match_one_process(two_node_run, initial_model, tmp_path):
    out, log = two_node_run
    assert "2 nodes x 1 tasks, MASTER_ADDR=127.0.0.1" in log
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # world size 2
    for status in (f"Training {STEPS} steps", "Saved the final model", f"Done: {STEPS} steps"):
        assert log.count(status) == 1, status  # once per job, not once per node
    reference = tmp_path / "one"
    single = fixed_tokens_args(initial_model, reference, 1, "auto", micro_batch_size=8)
    cli(single + ["--train.max_steps", str(STEPS), "--train.save_interval", "10"])
    expected, got = read_losses(reference), read_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5)


def test_preempted_job_is_requeued_and_ends_bit_identical(two_node_run, slurm, initial_model, tmp_path):
    out = tmp_path / "out"
    job = sbatch(slurm, tmp_path / "job.log", ["--nodes", "2", "--ntasks-per-node", "1"],
                 pretrain_args(initial_model, out), wait=False)
    try:
        job_id = job.stdout.readline().strip().split(";")[0]
        assert job_id.isdigit()
        metrics = out / "logs" / "csv" / "metrics.csv"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # header + 2 steps
            assert time.monotonic() < deadline and job.poll() is None, "the job never reached step 2"
            time.sleep(0.05)
        subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True, timeout=30)
        # The job's own state is the judge: `sbatch --wait` can return when the first run ends, racing
        # with the requeue. Slurm holds a requeued job for cred_expire (10 s on this cluster) before it
        # may start again; starting it sooner can meet the first run's revoked credential on a node.
        deadline = time.monotonic() + 360
        while "JobState=COMPLETED" not in (info := _job_info(slurm, job_id)):
            log = (tmp_path / "job.log").read_text(errors="replace")  # still being written: may end mid-character
            assert time.monotonic() < deadline, info + log[-3000:]
            # no early exit on JobState=FAILED: the first run's end is recorded so for a moment
            # between `scontrol requeue` and the job turning PENDING again
            time.sleep(0.5)
        assert "Restarts=1" in info and "ExitCode=0:0" in info, info
    finally:
        job.kill()
    log = (tmp_path / "job.log").read_text(errors="replace")
    stopped = re.findall(rf"Stopped by SIGUSR1 after step (\d+): checkpoint written; exiting with status {REQUEUE_EXIT_CODE}", log)
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS, log[-3000:]
    assert f"requeueing job {job_id}" in log and "(restart 1)" in log
    assert f"Resuming from {out / f'step-{int(stopped[0]):08d}'}" in log
    assert log.count("Saved the final model") == 1
    uninterrupted, _ = two_node_run
    assert_same_tensors(uninterrupted / "final" / "lit_model.safetensors", out / "final" / "lit_model.safetensors")
    assert read_losses(out) == read_losses(uninterrupted)


def _job_info(env, job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=30).stdout


def test_finetune_lora_two_tasks_on_one_node(slurm, tmp_path):
    base = make_converted_checkpoint(tmp_path / "base")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(16)]))
    out = tmp_path / "out"
    args = [
        "finetune_lora", str(base), "--out_dir", str(out), "--accelerator", "cpu", "--precision", "32-true",
        "--data", "JSON", "--data.json_path", str(data), "--data.prompt_style", "default",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "3",
        "--train.max_seq_length", "48", "--eval.interval", "100", "--eval.max_iters", "1",
    ]
    proc = sbatch(slurm, tmp_path / "job.log", ["--nodes", "1", "--ntasks-per-node", "2"], args)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    assert "1 nodes x 2 tasks" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "x 2 devices" in log and log.count("Saved the final model") == 1
    lora = load_file(str(out / "final" / "lit_lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # it trained


def test_mismatched_devices_fail_before_training(slurm, initial_model, tmp_path):
    out = tmp_path / "out"
    args = fixed_tokens_args(initial_model, out, 2, "auto", micro_batch_size=4)  # --devices 2
    proc = sbatch(slurm, tmp_path / "job.log", ["--nodes", "1", "--ntasks-per-node", "1"], args)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert proc.returncode != 0
    assert log.strip().splitlines() == [
        "error: --devices 2 disagrees with the Slurm allocation (1 tasks per node x 1 nodes): drop --devices (this "
        "script fills it) or change sbatch's --ntasks-per-node/--nodes"
    ]
    assert not out.exists()
