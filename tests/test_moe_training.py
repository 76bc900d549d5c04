"""An MoE model (Qwen3-MoE) finetunes with LoRA: the router load-balancing loss is added and logged apart
from the LM loss, `--train.router_aux_loss_coef` overrides the checkpoint's weight, and the PEFT export
of the run loads in transformers + peft and computes what litllm computes."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import assert_peft_export_computes_the_same, finetune_lora_briefly, json_file, make_converted_checkpoint
from litllm.model import GPT


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
    return make_converted_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), family="qwen3_moe")


def _run(base, out, data_file, **train):
    return finetune_lora_briefly(base, out, data_file, dict(max_steps=6, max_seq_length=48, **train))


def _metrics(out) -> list[dict]:
    with open(next(out.rglob("metrics.csv")), newline="") as f:  # logs/csv/ (litllm/train/loggers.py)
        return [row for row in csv.DictReader(f) if row.get("loss")]


def test_moe_lora_logs_the_router_loss_apart_and_its_peft_export_loads(moe_base, tmp_path_factory, tmp_path):
    pytest.importorskip("peft")
    records = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(24)]
    data_file = json_file(tmp_path_factory, records)
    coef = GPT.from_checkpoint(moe_base).config.router_aux_loss_coef
    assert coef == 0.02  # the checkpoint's router_aux_loss_coef (tests/hf_models.py)
    out = tmp_path / "run"
    result = _run(moe_base, out, data_file)
    rows = _metrics(out)
    aux = [float(r["router_aux_loss"]) for r in rows]
    # top-2 of 8 experts: the loss is n_expert * sum(share x prob) >= k for any routing, == k when balanced
    assert all(a >= 2.0 - 1e-4 for a in aux) and len(aux) == 6
    assert result.losses[6] < result.losses[1]

    # the flag overrides the checkpoint: 0 turns the term off (nothing logged)
    off = tmp_path / "off"
    _run(moe_base, off, data_file, router_aux_loss_coef=0.0)
    assert all(not r.get("router_aux_loss") for r in _metrics(off))

    # PEFT export of the run (LoRA on the attention) loads in transformers + peft and computes the same
    assert_peft_export_computes_the_same(result.final_dir, moe_base, tmp_path / "peft")


def test_training_forward_backward_runs_only_the_routed_experts(moe_base):
    """The FLOPs torch counts in a training forward + backward of Qwen3-MoE (sparse dispatch: each token
    through its k experts only, a dense layer, qk-norm) are the formula's, which counts k of n_expert
    experts per token: no dense all-experts compute."""
    from litllm.train.flops import flops_per_token, measured_flops

    model = GPT.from_checkpoint(moe_base)
    config = model.config
    B, T = 2, 32
    x = torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(1))
    counted = measured_flops(model, x, x)
    assert counted == pytest.approx(flops_per_token(config, T) * B * T, rel=1e-3)
    all_experts = flops_per_token(config.__class__(**{**config.to_dict(), "n_expert_per_token": config.n_expert}), T)
    assert counted < 0.8 * all_experts * B * T


def test_estimate_on_fake_tensors_holds_sparse_not_dense_expert_activations(moe_base):
    """Under FakeTensorMode (`litllm estimate`) a training-sized MoE input runs each expert on N * k / n_expert
    tokens, as balanced sparse dispatch does, not every expert on every token."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = GPT.from_checkpoint(moe_base)
    moe = model.blocks[0].mlp
    k, n_expert = moe.config.n_expert_per_token, moe.config.n_expert
    seen = []
    hooks = [e.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0])) for e in moe.experts]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = moe(torch.randn(2, 40, moe.config.n_embd))
        assert out.shape == (2, 40, moe.config.n_embd)
        assert seen == [2 * 40 * k // n_expert] * n_expert
    finally:
        for h in hooks:
            h.remove()
