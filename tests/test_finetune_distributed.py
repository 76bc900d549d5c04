"""LoRA and QLoRA under FSDP2 with two CPU processes (gloo): the same code path as multi-GPU nodes.

LoRA builds the model on the meta device and loads the base weights after sharding (the LoRA
wrappers rename `qkv.weight` to `qkv.base.weight`: `litllm.train.loop.wrapped_key`). QLoRA keeps the packed
bitsandbytes base whole on every rank (FSDP `ignored_params`) and shards the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_lora_on_two_fsdp_processes(base, tmp_path, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    from litllm.lora import is_lora_parameter, load_lora_model
    from litllm.model import GPT

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"It is {i}."} for i in range(24)]))
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "litllm", "finetune_lora", str(base), "--out_dir", str(out),
        "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp", "--precision", "32-true",
        "--data", "JSON", "--data.json_path", str(data), "--data.prompt_style", "default",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "3",
        "--train.save_interval", "2", "--train.max_seq_length", "48", "--eval.interval", "100",
        "--lora_mlp", "true", "--optimizer.lr", "0.01",
    ]
    if quantize:
        args += ["--quantize", quantize]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = load_file(str(out / "step-00000002" / "trainable.safetensors"))
    assert step and all(is_lora_parameter(k) for k in step)
    lora = load_file(str(out / "final" / "lit_lora.safetensors"))
    assert set(lora) == set(step) and any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)
    # the gathered LoRA tensors are whole (not one rank's shard) and the merged folder is their exact merge
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        merged = GPT.from_checkpoint(out / "final").eval()(x)
        unmerged = load_lora_model(out / "final").eval()(x)
    assert (merged - unmerged).abs().max() <= 1e-5
