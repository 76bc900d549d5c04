"""`--train.state_dict_type sharded` (FSDP2 + torch.distributed.checkpoint) on two CPU processes (gloo).

Each rank writes only its own rows; the same device count resumes exactly; one process resumes the
same checkpoint (DCP reshards); `convert_pretrained_checkpoint` joins it into the model folder that
the gathered `final/` of the same weights is. LoRA (trainable-only) checkpoints likewise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_converted_checkpoint
from test_pretrain import env_with_tests, fixed_tokens_args, initial_model, read_losses  # noqa: F401 (a fixture)

from litllm.__main__ import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run_cli(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "litllm", *args], capture_output=True, text=True, timeout=400, env=env_with_tests(), cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def metadata(step: Path):
    from litllm.train.sharded_checkpoint import SHARDED_DIR, _reader

    return _reader(step / SHARDED_DIR).read_metadata().state_dict_metadata


def test_sharded_checkpoints_resume_exactly_and_convert(initial_model, tmp_path):  # noqa: F811
    def run_two(out: Path, *extra: str) -> None:
        args = fixed_tokens_args(initial_model, out, 2, "fsdp", micro_batch_size=2)
        run_cli([*args, "--train.state_dict_type", "sharded", *extra], tmp_path)

    straight = tmp_path / "straight"
    run_two(straight)
    step2 = straight / "step-00000002"
    names = {p.name for p in (step2 / "sharded").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= names
    assert not {"lit_model.safetensors", "optimizer.pt"} & {p.name for p in step2.iterdir()}
    # each rank wrote its own rows: two chunks of wte.weight that tile it, and no rank wrote everything
    wte = metadata(step2)["model.wte.weight"]
    chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in wte.chunks)
    assert len(chunks) == 2 and chunks[0][0] == (0, 0) and chunks[1][0] == (chunks[0][1][0], 0)
    assert chunks[0][1][0] + chunks[1][1][0] == wte.size[0]
    sizes = [(step2 / "sharded" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert max(sizes) < 0.75 * sum(sizes)

    # a truncated shard is found before anything loads (so `--resume auto` passes over it)
    from litllm.errors import LitLLMError
    from litllm.train.checkpoints import check_training_checkpoint

    check_training_checkpoint(step2)
    damaged = tmp_path / "damaged" / step2.name
    shutil.copytree(step2, damaged)
    shard = damaged / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LitLLMError, match="__1_0.distcp: truncated"):
        check_training_checkpoint(damaged)

    # 2 steps + resume (same world size, shard for shard) + 2 steps == 4 steps straight
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(step2, resumed / step2.name)
    run_two(resumed, "--resume", "auto")
    expected, got = read_losses(straight), read_losses(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)

    # a sharded step joins into the model folder the full (gathered) final/ of the same weights
    cli(["convert_pretrained_checkpoint", str(straight / "step-00000004"), str(tmp_path / "model")])
    joined = load_file(str(tmp_path / "model" / "lit_model.safetensors"))
    final = load_file(str(straight / "final" / "lit_model.safetensors"))
    assert joined.keys() == final.keys()
    for name in final:
        assert torch.equal(joined[name], final[name]), name
    assert not (straight / "final" / "sharded").exists()

    # another world size: one process (no process group) resumes the same checkpoint
    single = tmp_path / "single"
    cli(fixed_tokens_args(initial_model, single, 1, "auto", micro_batch_size=8) + ["--resume", str(step2)])
    assert sorted(read_losses(single)) == [3, 4]  # (its data order restarts: another rank layout)
    saved = metadata(step2)
    for name in final:  # every weight trains and has its full-shape optimizer state
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(saved[f"optimizer.{name}.{key}"].size) == tuple(final[name].shape), name


def test_sharded_lora_checkpoint_holds_only_lora_and_resumes(tmp_path):
    """Qwen2 ties its head to the embedding: the tied weight goes through DCP once."""
    from litllm.errors import LitLLMError
    from litllm.lora import is_lora_parameter

    base = make_converted_checkpoint(tmp_path / "base", family="qwen2")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(24)]))

    def args(out: Path, devices: int, *extra: str) -> list[str]:
        return [
            "finetune_lora", str(base), "--out_dir", str(out), "--accelerator", "cpu", "--devices", str(devices),
            "--strategy", "fsdp" if devices > 1 else "auto", "--precision", "32-true", "--data", "JSON",
            "--data.json_path", str(data), "--data.prompt_style", "default", "--data.val_split_fraction", "0.1",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "4",
            "--train.save_interval", "2", "--train.max_seq_length", "48", "--eval.interval", "100",
            "--eval.max_new_tokens", "0", "--train.log_interval", "1", "--lora_mlp", "true", "--optimizer.lr", "0.01",
            "--train.state_dict_type", "sharded", "--logger_name", "csv", *extra,
        ]

    straight = tmp_path / "straight"
    run_cli(args(straight, 2), tmp_path)
    step2 = straight / "step-00000002"
    saved = metadata(step2)
    weights = {n.removeprefix("trainable.") for n in saved if n.startswith("trainable.")}
    assert weights and all(is_lora_parameter(n) for n in weights)
    assert not any(n.startswith("model.") for n in saved)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(step2, resumed / step2.name)
    run_cli(args(resumed, 2, "--resume", "auto"), tmp_path)
    expected, got = read_losses(straight), read_losses(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    a = load_file(str(straight / "final" / "lit_lora.safetensors"))
    b = load_file(str(resumed / "final" / "lit_lora.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)

    cli(args(tmp_path / "single", 1, "--resume", str(step2)))  # one process reads the LoRA shards
    assert sorted(read_losses(tmp_path / "single")) == [3, 4]
    from litllm.train.checkpoints import convert_pretrained_checkpoint

    with pytest.raises(LitLLMError, match="only the trained parameters"):
        convert_pretrained_checkpoint(step2, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_stateless_optimizer_resumes_under_fsdp(tmp_path):
    """SGD without momentum keeps no per-parameter state: its full optimizer state dict loads into an FSDP2 model
    (torch's own loader fails on it) and restores the groups' hyper-parameters."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from litllm.train.checkpoints import _set_full_optimizer_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        saved = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        assert not saved["state"]
        saved["param_groups"][0]["lr"] = 0.05
        _set_full_optimizer_state(model, optimizer, saved, tmp_path / "optimizer.pt")
        assert optimizer.param_groups[0]["lr"] == 0.05
    finally:
        dist.destroy_process_group()
