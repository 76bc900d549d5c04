"""gpt-oss beyond the shared parity tests (tests/test_model_parity.py, tests/test_convert.py run it too): MXFP4
dequantization against transformers' own, an MXFP4 checkpoint converted, attention sinks on every attention path,
LoRA finetuning with a PEFT export that loads, `estimate`, and the presets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import VOCAB, save_hf_checkpoint
from litllm.convert import convert_to_litllm
from litllm.hf import mxfp4
from litllm.model import GPT, attention, document_block_mask


def _random_mxfp4(*shape: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks (*shape, 16) uint8 and scales (*shape) uint8 around 2^-7 (weights of ~0.05 at most)."""
    blocks = torch.randint(0, 256, (*shape, 16), generator=generator, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(117, 122, shape, generator=generator, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantization_equals_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(100, 150, (3, 10, 4), generator=g, dtype=torch.int32).to(torch.uint8)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    actual = mxfp4.dequantize(blocks, scales, dtype)
    assert actual.shape == expected.shape == (3, 4 * 32, 10) and actual.dtype == dtype
    assert torch.equal(actual, expected)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(blocks, scales[:, :5])


def test_an_mxfp4_checkpoint_converts_to_its_dequantized_model(tmp_path):
    """The Hub's layout: experts as `*_blocks` / `*_scales` (and a quantization_config); convert_to_litllm
    dequantizes them, and the model computes what transformers computes with transformers' dequantization."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = save_hf_checkpoint("gpt_oss", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    c = hf.config
    for i, layer in enumerate(hf.model.layers):
        for name, rows, cols in (("gate_up_proj", 2 * c.intermediate_size, c.hidden_size),
                                 ("down_proj", c.hidden_size, c.intermediate_size)):
            blocks, scales = _random_mxfp4(c.num_local_experts, rows, cols // 32, generator=g)
            key = f"model.layers.{i}.mlp.experts.{name}"
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    convert_to_litllm(tmp_path, dtype="float32")
    model = GPT.from_checkpoint(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf(idx).logits, atol=1e-4, rtol=0)


def test_sinks_hold_on_every_attention_path():
    """Sinks in the explicit softmax (masked and causal prefill), the one-query decode path and FlexAttention
    (packed rows on CUDA; its eager CPU reference here) give the same attention, which differs from none."""
    g = torch.Generator().manual_seed(2)
    B, nh, nkv, T, hs = 2, 4, 2, 9, 8
    q, k, v = (torch.randn(B, n, T, hs, generator=g) for n in (nh, nkv, nkv))
    sinks = torch.randn(nh, generator=g) * 2
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    scale = hs**-0.5

    # the definition: softmax over [scores, sink], the sink's share dropped
    scores = (q @ k.repeat_interleave(nh // nkv, 1).transpose(-2, -1)) * scale
    scores = scores.masked_fill(~causal, float("-inf"))
    logits = torch.cat([scores, sinks[None, :, None, None].expand(B, nh, T, 1)], dim=-1)
    expected = torch.softmax(logits, dim=-1)[..., :-1] @ v.repeat_interleave(nh // nkv, 1)

    torch.testing.assert_close(attention(q, k, v, causal, scale, None, sinks), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention(q, k, v, None, scale, None, sinks), expected, atol=1e-6, rtol=0)
    last = attention(q[:, :, -1:], k, v, None, scale, None, sinks)  # the newest token on the whole cache
    torch.testing.assert_close(last, expected[:, :, -1:], atol=1e-6, rtol=0)
    block_mask = document_block_mask(torch.zeros(B, T, dtype=torch.long))  # one document per row: causal
    torch.testing.assert_close(attention(q, k, v, block_mask, scale, None, sinks), expected, atol=1e-5, rtol=0)
    assert (attention(q, k, v, causal, scale, None, None) - expected).abs().max() > 1e-2


@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory):
    from conftest import make_converted_checkpoint

    return make_converted_checkpoint(tmp_path_factory.mktemp("gpt_oss"), family="gpt_oss")


def test_without_its_sinks_the_model_leaves_transformers(gpt_oss_checkpoint):
    import transformers

    model = GPT.from_checkpoint(gpt_oss_checkpoint).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss_checkpoint, dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)
        for block in model.blocks:
            block.attn.sinks.fill_(-1e4)  # exp(sink) = 0: no sink
        assert (model(idx) - hf(idx).logits).abs().max() > 5e-4


def test_lora_finetunes_and_its_peft_export_computes_what_litllm_computes(gpt_oss_checkpoint, numbers_file,
                                                                          tmp_path):
    """finetune_lora runs on gpt-oss (its stacked experts take no LoRA: --lora_mlp adapts nothing there) and the
    PEFT export of the run loads in transformers + peft with equal logits."""
    pytest.importorskip("peft")
    from conftest import assert_peft_export_computes_the_same, finetune_lora_briefly
    from litllm.errors import LitLLMError
    from litllm.lora import add_lora

    result = finetune_lora_briefly(gpt_oss_checkpoint, tmp_path / "run", numbers_file,
                                   dict(global_batch_size=2, max_steps=3), lora_projection=True, lora_mlp=True)
    assert_peft_export_computes_the_same(result.final_dir, gpt_oss_checkpoint, tmp_path / "peft")

    with pytest.raises(LitLLMError, match="LoRA adapts no layer"):
        add_lora(GPT.from_checkpoint(gpt_oss_checkpoint), query=False, value=False, mlp=True)


def test_estimate_runs(gpt_oss_checkpoint):
    from conftest import litllm_in_process

    proc = litllm_in_process(["estimate", "finetune_lora", gpt_oss_checkpoint, "--train.max_steps", "5",
                              "--train.max_seq_length", "32", "--precision", "32-true", "--json"])
    assert proc.returncode == 0, proc.stderr
    estimate = json.loads(proc.stdout)
    assert estimate["method"] == "lora" and sum(estimate["breakdown"].values()) > 0


def test_training_flops_are_the_formulas(gpt_oss_checkpoint):
    """The FLOPs torch counts in a training forward + backward (stacked experts dispatched sparsely, sinks'
    explicit softmax) are what `flops_per_token` says: its stacked experts' weights are counted, k of n."""
    from litllm.train.flops import flops_per_token, measured_flops

    model = GPT.from_checkpoint(gpt_oss_checkpoint)
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    assert measured_flops(model, x, x) == pytest.approx(flops_per_token(model.config, 32) * 2 * 32, rel=1e-3)


# openai/gpt-oss-120b's config.json (the Hub's, MXFP4 quantization_config and token ids aside)
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}
GPT_OSS_20B = {**GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32,
               "layer_types": ["sliding_attention", "full_attention"] * 12}


@pytest.mark.parametrize("preset,hub_config", [("gpt-oss-120b", GPT_OSS_120B), ("gpt-oss-20b", GPT_OSS_20B)])
def test_presets_are_the_published_configs(preset, hub_config):
    from litllm.config import Config
    from litllm.hf.config import config_from_hf

    expected = config_from_hf(hub_config).to_dict()
    actual = Config.from_name(preset).to_dict()
    assert {k: v for k, v in actual.items() if k not in ("name", "hf_repo")} == {
        k: v for k, v in expected.items() if k not in ("name", "hf_repo")}
