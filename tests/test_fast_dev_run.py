"""`--fast_dev_run` on pretrain, finetune_* and prepare_*, run as a user runs them (the CLI's entry point).

A dev run exits 0 after printing its checks, never writes the user's out_dir and leaves no temporary
folder behind; a broken recipe fails in it with the very line the real run prints; a checkpoint that
doesn't restore the trained state fails the round trip.

The passing runs of pretrain and of the two-process finetune are `python -m litllm` subprocesses (the exit status a
shell sees, the launcher starting a rank); the other commands run `litllm.__main__.main` in this process
(`conftest.litllm_in_process`, with TMPDIR pointed at the test's folder), which saves each an interpreter with
torch and Lightning Fabric (~4 s of CPU a command).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import json_file, litllm_in_process

pytestmark = pytest.mark.slow  # every command run end to end (training steps, a checkpoint round trip)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHECKS = ("fast_dev_run passed", "batch: ", "training: ", "checkpoint: saved step-", "resumed from it",
          "validation: 1 batch per device, loss", "final model folder: written", "throughput: ",
          "peak memory per device (CPU: peak RSS of each process): rank 0 ")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return json_file(tmp_path_factory, [{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(24)])


def litllm(tmp_path: Path, *args: str, own_process: bool = False) -> subprocess.CompletedProcess:
    """`litllm ...` with its temporary files in tmp_path/tmp (so leftovers can be seen): in this process, or
    `python -m litllm` with `own_process`."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("LITLLM_FAST_DEV_RUN_DIR", None)
    if own_process:
        return subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
    cached = tempfile.tempdir  # tempfile reads TMPDIR once: forget it for the call
    tempfile.tempdir = None
    try:
        return litllm_in_process(args, cwd=tmp_path, env=env)
    finally:
        tempfile.tempdir = cached


def assert_dev_run_passed(proc: subprocess.CompletedProcess, tmp_path: Path, out_dir: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    for check in CHECKS:
        assert check in proc.stdout, (check, proc.stdout[-3000:])
    assert not out_dir.exists()
    assert not list((tmp_path / "tmp").glob("litllm-fast-dev-run-*"))  # the temporary folder is gone
    assert "Traceback" not in proc.stderr


def finetune_args(command: str, base: Path, data_file: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        command, str(base), "--out_dir", str(out_dir), "--accelerator", "cpu", "--precision", "32-true",
        "--data", "JSON", "--data.json_path", str(data_file), "--data.val_split_fraction", "0.2",
        "--data.prompt_style", "default", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_seq_length", "32", "--eval.max_new_tokens", "2", *extra,
    ]


def pretrain_args(tmp_path: Path, out_dir: Path, *extra: str) -> list[str]:
    """The debug recipe made tiny: 6 stdlib files, its own 300-token tokenizer, a 2-layer model."""
    return [
        "pretrain", "--config", str(REPO / "config_hub" / "pretrain" / "debug.yaml"), "--out_dir", str(out_dir),
        "--data.max_files", "6", "--data.optimized_dir", str(tmp_path / "optimized"), "--data.num_workers", "0",
        "--data.optimize_workers", "1", "--tokenizer_vocab_size", "300", "--model_config.vocab_size", "320",
        "--model_config.n_layer", "2", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_seq_length", "32", *extra,
    ]


# ---------------------------------------------------------------------- passing runs
def test_pretrain_fast_dev_run(tmp_path):
    out = tmp_path / "out" / "debug"
    # --resume auto (the sbatch template adds it) starts fresh: the dev run's out_dir has no checkpoints
    proc = litllm(tmp_path, *pretrain_args(tmp_path, out, "--fast_dev_run", "true", "--resume", "auto"),
                  own_process=True)
    assert_dev_run_passed(proc, tmp_path, out)
    assert "training: 4 optimizer steps" in proc.stdout and "checkpoint: saved step-00000002" in proc.stdout
    assert "Resuming from " in proc.stdout and "step-00000002 at step 2" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune_lora", "finetune_full"])
def test_finetune_fast_dev_run(command, base, data_file, tmp_path):
    out = tmp_path / "out"
    proc = litllm(tmp_path, *finetune_args(command, base, data_file, out, "--fast_dev_run", "6"))
    assert_dev_run_passed(proc, tmp_path, out)
    assert "training: 6 optimizer steps" in proc.stdout and "step-00000003" in proc.stdout
    assert "Step 6 sample: " in proc.stdout  # the recipe's after-validation hook ran too


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_dpo_fast_dev_run(method, base, tmp_path_factory, tmp_path):
    """DPO's own state takes the round trip too: the frozen reference (full) or the disabled adapters (LoRA)."""
    pairs = json_file(tmp_path_factory, [{"prompt": f"Say {i}", "chosen": f"It is {i}.", "rejected": f"No, {i + 1}!"}
                                         for i in range(24)], "pairs.json")
    out = tmp_path / "out"
    args = finetune_args("finetune_dpo", base, pairs, out, "--method", method, "--fast_dev_run", "4")
    args[args.index("JSON")] = "Preference"
    at = args.index("--eval.max_new_tokens")
    del args[at: at + 2]  # preference tuning prints no sample replies
    proc = litllm(tmp_path, *args)
    assert_dev_run_passed(proc, tmp_path, out)
    assert "training: 4 optimizer steps" in proc.stdout and "step-00000002" in proc.stdout


def test_two_process_fast_dev_run(base, data_file, tmp_path):
    out = tmp_path / "out"
    proc = litllm(tmp_path, *finetune_args("finetune_lora", base, data_file, out, "--devices", "2",
                                           "--fast_dev_run", "true"), own_process=True)
    assert_dev_run_passed(proc, tmp_path, out)
    assert "x 2 device(s) (ModelParallelStrategy" in proc.stdout
    assert ", rank 1 " in proc.stdout
    assert proc.stdout.count("fast_dev_run passed") == 1  # one report per job, from global rank 0


def test_a_checkpoint_that_does_not_restore_fails_the_round_trip(base, data_file, tmp_path, monkeypatch):
    """The round trip compares what was saved with what was loaded: a loader that drops the weights is caught."""
    from litllm.data import JSON
    from litllm.errors import LitLLMError
    from litllm.finetune import finetune_lora
    from litllm.train import checkpoints
    from litllm.train.args import TrainArgs

    real_load = checkpoints.load_training_checkpoint

    def load_without_weights(fabric, path, model, optimizer, method):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        restored = real_load(fabric, path, model, optimizer, method)
        model.load_state_dict(state)  # as if the weights were never read
        return restored

    monkeypatch.setattr(checkpoints, "load_training_checkpoint", load_without_weights)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("LITLLM_FAST_DEV_RUN_DIR", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with pytest.raises(LitLLMError, match=r"^--fast_dev_run: resuming from .*step-00000002 did not restore "):
        finetune_lora(base, out_dir=tmp_path / "out", accelerator="cpu", precision="32-true",
                      data=JSON(json_path=data_file, val_split_fraction=0.2, prompt_style="default"),
                      train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=32), fast_dev_run=True)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("litllm-fast-dev-run-*"))


# ---------------------------------------------------------------------- broken recipes
BROKEN = {
    "bad data path": ["--data.json_path", "missing.json"],
    "batch arithmetic": ["--train.global_batch_size", "6", "--train.micro_batch_size", "4"],
    "sequence longer than the model": ["--train.max_seq_length", "100000"],
}


@pytest.mark.parametrize("broken", list(BROKEN), ids=list(BROKEN))
def test_a_broken_recipe_fails_in_the_dev_run_as_in_the_real_run(broken, base, data_file, tmp_path):
    def last_line(*extra: str) -> str:
        out = tmp_path / ("dev" if extra else "real")
        proc = litllm(tmp_path, *finetune_args("finetune_lora", base, data_file, out, *BROKEN[broken], *extra))
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if extra:
            assert not out.exists()
        return proc.stderr.strip().splitlines()[-1]

    real = last_line()
    assert real.startswith("error: ")
    assert last_line("--fast_dev_run", "true") == real
    assert not list((tmp_path / "tmp").glob("litllm-fast-dev-run-*"))


def test_a_model_that_does_not_fit_fails_in_the_dev_run_as_in_the_real_run(tmp_path):
    """CPU form of "doesn't fit": the embedding alone needs ~400 TB, beyond any address space, so the
    allocation fails at once (nothing is touched); both runs print the same out-of-memory line."""
    huge = ["--model_config.n_embd", str(2**38), "--model_config.intermediate_size", "64"]

    def last_line(out: Path, *extra: str) -> str:
        proc = litllm(tmp_path, *pretrain_args(tmp_path, out, *huge, *extra))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]

    dev = last_line(tmp_path / "dev", "--fast_dev_run", "true")
    assert dev.startswith("error: out of memory while setting up the run: lower --train.micro_batch_size")
    assert not (tmp_path / "dev").exists()
    assert not list((tmp_path / "tmp").glob("litllm-fast-dev-run-*"))
    assert last_line(tmp_path / "real") == dev


def test_out_of_memory_in_a_step_is_one_line_naming_it(base, data_file, tmp_path, monkeypatch):
    """A device OOM inside a training step (raised here by a stand-in train_step) reads the same in both runs."""
    import torch

    from litllm.data import JSON
    from litllm.errors import LitLLMError
    from litllm.finetune import finetune_lora
    from litllm.train import loop
    from litllm.train.args import TrainArgs

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    messages = []
    for dev in (False, True):
        with pytest.raises(LitLLMError) as e:
            finetune_lora(base, out_dir=tmp_path / "out", accelerator="cpu", precision="32-true",
                          data=JSON(json_path=data_file, val_split_fraction=0.2, prompt_style="default"),
                          train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=32), fast_dev_run=dev)
        messages.append(str(e.value))
    assert messages[0] == messages[1] == (
        "out of memory on cpu while training step 1 (1 device(s), precision 32-true, micro-batch 2 x 32 tokens): "
        "lower --train.micro_batch_size or --train.max_seq_length, or use --activation_checkpointing, --strategy "
        "fsdp on more devices, or --quantize (finetuning)"
    )


def test_out_of_memory_while_saving_names_the_save(base, data_file, tmp_path, monkeypatch):
    """Saving gathers the whole state: running out of memory there says so, not "while setting up the run"."""
    import torch

    from litllm.data import JSON
    from litllm.errors import LitLLMError
    from litllm.finetune import finetune_lora
    from litllm.train import checkpoints
    from litllm.train.args import TrainArgs

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(checkpoints.CheckpointWriter, "save_step", out_of_memory)
    with pytest.raises(LitLLMError, match=r"^out of memory on cpu while saving the checkpoint of step 2 \(1 device"):
        finetune_lora(base, out_dir=tmp_path / "out", accelerator="cpu", precision="32-true",
                      data=JSON(json_path=data_file, val_split_fraction=0.2, prompt_style="default"),
                      train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=32, max_steps=4,
                                      save_interval=2))


def test_fast_dev_run_value_is_checked(base, data_file, tmp_path):
    proc = litllm(tmp_path, *finetune_args("finetune_lora", base, data_file, tmp_path / "out", "--fast_dev_run", "1"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --fast_dev_run: expected true, false or a number of optimizer steps >= 2 (a checkpoint is saved "
        "halfway and resumed from), got 1"
    )
    assert not (tmp_path / "out").exists()


def test_the_flag_reaches_every_training_command():
    """`RunArgs` is the one root: every training command's job holds it (flat), so every one has --fast_dev_run."""
    import inspect

    from litllm.__main__ import COMMANDS, _load

    training = [name for name in COMMANDS if name == "pretrain" or name.startswith("finetune")]
    assert len(training) >= 5
    for name in training:
        assert "fast_dev_run" in inspect.signature(_load(COMMANDS[name])).parameters, name
