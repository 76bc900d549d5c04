"""Damaged files (issue 14): a truncated or unreadable weights, optimizer, training-state, tokenizer or
YAML file gives one clear line naming it, a non-zero exit, no traceback and no output; `--resume auto`
passes over a damaged newest checkpoint to the newest intact one, with a warning, and stays exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import litllm_in_process
from test_pretrain import fixed_tokens_args, initial_model, read_losses  # noqa: F401 (a fixture)

from litllm.__main__ import main as cli


def truncate(path: Path) -> None:
    """Keep the first half of a file, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def fails_clearly(args: list[str], cwd: Path, names: str) -> str:
    """Run the CLI (in this process: `conftest.litllm_in_process`); it must exit 1 with one `error:` line that
    names `names`, and no traceback."""
    proc = litllm_in_process(args, cwd)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, last
    return last


@pytest.fixture
def model(tiny_checkpoint, tmp_path) -> Path:
    shutil.copytree(tiny_checkpoint, tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights(model, tmp_path, damage):
    weights = model / "lit_model.safetensors"
    if damage == "truncated":
        truncate(weights)
    else:
        weights.write_bytes(b"\x00" * 8 + b"not a header")
    line = fails_clearly(["generate", model, "--prompt", "hi", "--max_new_tokens", "2"], tmp_path, str(weights))
    assert "safetensors" in line
    fails_clearly(["convert_from_litllm", model, tmp_path / "hf"], tmp_path, str(weights))
    assert not (tmp_path / "hf").exists()
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}] * 4))
    for command in ("finetune_lora", "finetune_full"):
        args = [command, model, "--out_dir", tmp_path / "out", "--data", "JSON", "--data.json_path", data,
                "--accelerator", "cpu", "--train.max_steps", "1"]
        fails_clearly(args, tmp_path, str(weights))
        assert not (tmp_path / "out").exists()


def test_damaged_model_config(model, tmp_path):
    (model / "model_config.yaml").write_bytes(b"n_layer: [1, 2\n\xff\xfe")
    fails_clearly(["generate", model, "--prompt", "hi"], tmp_path, "model_config.yaml")
    fails_clearly(["convert_from_litllm", model, tmp_path / "hf"], tmp_path, "model_config.yaml")
    assert not (tmp_path / "hf").exists()


def test_damaged_tokenizer(model, tmp_path):
    truncate(model / "tokenizer.json")
    fails_clearly(["generate", model, "--prompt", "hi"], tmp_path, "tokenizer.json")


def test_merge_lora_with_damaged_files(model, tmp_path):
    from conftest import write_lora_folder
    from litllm.lora import add_lora
    from litllm.model import GPT

    lora = tmp_path / "lora"
    write_lora_folder(add_lora(GPT.from_checkpoint(model), r=2), lora, {"checkpoint_dir": str(model), "lora_r": 2})
    truncate(lora / "lit_lora.safetensors")
    fails_clearly(["merge_lora", lora, "--out_dir", tmp_path / "merged"], tmp_path, "lit_lora.safetensors")
    assert not (tmp_path / "merged").exists()
    write_lora_folder(add_lora(GPT.from_checkpoint(model), r=2), lora, {"checkpoint_dir": str(model), "lora_r": 2})
    truncate(model / "lit_model.safetensors")  # the base model
    fails_clearly(["merge_lora", lora, "--out_dir", tmp_path / "merged"], tmp_path, "lit_model.safetensors")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_from_damaged_checkpoints(initial_model, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    cli(fixed_tokens_args(initial_model, straight, 1, "auto", micro_batch_size=8))
    run = tmp_path / "run"
    run.mkdir()
    for step in ("step-00000002", "step-00000004"):
        shutil.copytree(straight / step, run / step)
    args = fixed_tokens_args(initial_model, run, 1, "auto", micro_batch_size=8)

    # a named damaged checkpoint: its file is named, nothing is written
    for name in ("optimizer.pt", "training_state.pt", "lit_model.safetensors"):
        damaged = run / "step-00000004" / name
        backup = damaged.read_bytes()
        truncate(damaged)
        before = tree(run)
        fails_clearly([*args, "--resume", run / "step-00000004"], tmp_path, str(damaged))
        assert tree(run) == before
        damaged.write_bytes(backup)

    # auto: the damaged newest is passed over (with a warning) and the run resumes exactly from step 2
    truncate(run / "step-00000004" / "optimizer.pt")
    proc = litllm_in_process([*args, "--resume", "auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: --resume auto skips a damaged checkpoint" in proc.stderr
    assert str(run / "step-00000004" / "optimizer.pt") in proc.stderr
    expected, got = read_losses(straight), read_losses(run)
    assert sorted(got) == [3, 4]
    assert all(got[s] == expected[s] for s in (3, 4))  # bit for bit
    from litllm.train.checkpoints import check_training_checkpoint

    check_training_checkpoint(run / "step-00000004")  # rewritten whole
