"""MLA models (DeepSeek-V2/V3) and bias-corrected routers (DeepSeek-V3, GLM-4.5) beyond the parity tests of
test_model_parity.py: the KV cache holds the latent, the engine batches and prefills in chunks over it,
finetuning keeps the correction bias fixed, LoRA's PEFT export loads, `litllm estimate` counts the latent."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_peft_export_computes_the_same, finetune_lora_briefly, make_converted_checkpoint
from litllm.config import Config
from litllm.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> a converted tiny checkpoint (tests/hf_models.py), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_converted_checkpoint(tmp_path_factory.mktemp(family), family=family, seed=3)
        return cache[family]

    return get


def _cache_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for b in model.blocks for t in (b.attn.kv_cache.k, b.attn.kv_cache.v))


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_mla_cache_holds_the_latent_and_rotary_key_only(family, checkpoint):
    """(kv_lora_rank + qk_rope_head_dim) values per token per layer, as `serve` sizes its slots by and
    `litllm estimate` counts; DeepSeek-V3's is 70x smaller than full keys and values would be."""
    from litllm.serve.server import kv_cache_bytes

    model = GPT.from_checkpoint(checkpoint(family))
    c = model.config
    model.set_kv_cache(batch_size=3, max_seq_length=20)
    per_token = _cache_bytes(model) / (3 * 20)
    assert per_token == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) * 4  # fp32
    assert kv_cache_bytes(model, 1) == per_token
    assert per_token < c.n_layer * c.n_head * (c.head_size + c.v_head_dim) * 4 / 4

    v3 = Config.from_name("DeepSeek-V3")
    full_kv = v3.n_layer * v3.n_head * (v3.head_size + v3.v_head_dim)
    assert v3.kv_cache_values_per_token() == 61 * (512 + 64) and full_kv / v3.kv_cache_values_per_token() > 70


def test_absorbed_and_expanded_attention_agree(checkpoint, monkeypatch):
    """Decoding attends in the latent space (kv_b folded into query and output); long chunks up-project the
    cached latents. Both compute what the uncached model computes."""
    import litllm.model

    model = GPT.from_checkpoint(checkpoint("deepseek_v3")).eval()
    idx = torch.randint(2, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx)
        for limit in (0, 64):  # 0: every cached forward expands; 64: every one absorbs
            monkeypatch.setattr(litllm.model, "MLA_ABSORB_MAX_QUERIES", limit)
            model.set_kv_cache(batch_size=2, max_seq_length=32)
            try:
                got = model(idx, input_pos=torch.arange(20))
            finally:
                model.clear_kv_cache()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_absorbed_attention_reads_a_decoding_kernels_kv_b_weight_as_is(checkpoint, monkeypatch):
    """The CPU decode layouts swap kv_b for a Linear of another kernel on the same weight (`OneRowLinear`,
    `RowSplitLinear`): absorbed attention takes that weight as it is, rather than rebuilding it through a product with
    the identity (a (kv_lora_rank, ...) matmul per layer and token), and computes what the plain Linear does."""
    import litllm.model
    from litllm.cpu_layout import OneRowLinear
    from litllm.row_split import RowSplitLinear

    model = GPT.from_checkpoint(checkpoint("deepseek_v3")).eval()
    plain = [block.attn.kv_b for block in model.blocks]
    idx = torch.randint(2, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(litllm.model, "MLA_ABSORB_MAX_QUERIES", 64)  # every cached forward absorbs
    with torch.no_grad():
        expected = model(idx)
        for cls in (OneRowLinear, RowSplitLinear):
            calls = []
            for block, linear in zip(model.blocks, plain):
                block.attn.kv_b = cls(linear.in_features, linear.out_features, bias=False, device="meta")
                block.attn.kv_b.weight = linear.weight
                block.attn.kv_b.register_forward_hook(lambda *_: calls.append(1))
            model.set_kv_cache(batch_size=1, max_seq_length=16)
            try:
                got = model(idx, input_pos=torch.arange(12))
            finally:
                model.clear_kv_cache()
                for block, linear in zip(model.blocks, plain):
                    block.attn.kv_b = linear
            assert calls == [], f"{cls.__name__}'s kv_b was called {len(calls)} times"
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_engine_batches_and_chunks_prefill_like_one_row_at_a_time(family, checkpoint):
    """Continuous batching (2 slots, 3 requests), chunked prefill (3 tokens a step) and prefix caching over the
    latent cache give each request the tokens it gets alone."""
    from litllm.engine import Engine, Request, generate_ids

    model = GPT.from_checkpoint(checkpoint(family)).eval()
    g = torch.Generator().manual_seed(2)
    first = torch.randint(2, 300, (9,), generator=g).tolist()
    prompts = [first, torch.randint(2, 300, (5,), generator=g).tolist(), first + [7, 8]]
    alone = [generate_ids(model, p, 8) for p in prompts]
    tokens: dict[int, list[int]] = {}
    with Engine(model, None, max_batch_size=2, max_seq_length=32, prefill_chunk=3, prefix_caching=True) as engine:
        ids = [engine.add(Request(p, 8)) for p in prompts]
        while engine.has_unfinished:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert [tokens[i] for i in ids] == alone


def test_correction_bias_is_a_fixed_buffer_while_training(checkpoint):
    """The routers' e_score_correction_bias is no parameter: no gradient, no optimizer state, unchanged by
    training steps that do change the router weights."""
    model = GPT.from_checkpoint(checkpoint("glm4_moe"))
    router = model.blocks[1].mlp.router
    assert "blocks.1.mlp.router.e_score_correction_bias" in model.state_dict()  # saved and loaded with the model
    assert not any(n.endswith("e_score_correction_bias") for n, _ in model.named_parameters())
    bias, weight = router.e_score_correction_bias.clone(), router.weight.detach().clone()
    assert bias.abs().sum() > 0  # the checkpoint's, not zeros
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    idx = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model(idx, targets=idx).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(router.e_score_correction_bias, bias)
    assert not torch.equal(router.weight.detach(), weight)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_lora_finetune_runs_and_its_peft_export_loads(family, checkpoint, numbers_file, tmp_path):
    """LoRA on queries, keys/values (MLA: kv_b), the output projection and (`--lora_mlp`) the routed experts, the
    shared expert and the dense layer; the PEFT export loads in transformers + peft and computes what litllm
    computes: the experts' LoRA as `target_parameters` on transformers 5's stacked experts."""
    pytest.importorskip("peft")
    base = checkpoint(family)
    result = finetune_lora_briefly(base, tmp_path / "run", numbers_file, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                   lora_key=True, lora_projection=True, lora_mlp=True)
    assert result.losses[4] < result.losses[1]
    adapter = assert_peft_export_computes_the_same(result.final_dir, base, tmp_path / "peft")
    targets = {t.rsplit(".", 1)[1] for t in adapter["target_modules"]}
    assert family != "deepseek_v3" or targets == {"q_b_proj", "kv_b_proj", "o_proj"}
    parameters = adapter["target_parameters"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in parameters and "model.layers.1.mlp.experts.down_proj" in parameters


def test_lora_mlp_adapts_routed_and_shared_experts_and_dense_layers(checkpoint):
    from litllm.lora import LoRALinear, add_lora

    model = add_lora(GPT.from_checkpoint(checkpoint("deepseek_v3")), r=2, mlp=True)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert {"blocks.0.mlp.fc", "blocks.1.mlp.experts.7.proj", "blocks.1.mlp.shared_experts.fc",
            "blocks.1.attn.q", "blocks.1.attn.kv_b"} <= adapted
    assert not any(".router" in n for n in adapted)


def test_training_flops_are_the_formulas(checkpoint):
    """The FLOPs torch counts in a training forward + backward of the DeepSeek-V3 model (MLA with values
    narrower than query/key heads, a dense layer, shared and routed experts dispatched sparsely) are what
    `flops_per_token` says, which `litllm estimate` and the MFU meter use."""
    from litllm.train.flops import flops_per_token, measured_flops

    model = GPT.from_checkpoint(checkpoint("deepseek_v3"))
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    assert measured_flops(model, x, x) == pytest.approx(flops_per_token(model.config, 32) * 2 * 32, rel=1e-3)


def test_adapter_refuses_mla_models(checkpoint):
    from litllm.adapter import add_adapter
    from litllm.errors import LitLLMError

    with pytest.raises(LitLLMError, match="not supported on Multi-head Latent Attention"):
        add_adapter(GPT.from_checkpoint(checkpoint("deepseek_v2")), adapter_start_layer=0)


def test_estimate_counts_the_latent_cache(checkpoint):
    """`litllm estimate serve` on an MLA model: the KV cache is the latent's, and training estimates run."""
    from conftest import litllm_in_process

    def estimate(*args) -> dict:
        proc = litllm_in_process(["estimate", *args, "--json"])
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    folder = checkpoint("deepseek_v3")
    c = Config.from_checkpoint(folder)
    est = estimate("serve", str(folder), "--max_batch_size", "2", "--max_seq_length", "64", "--precision", "32-true")
    assert est["breakdown"]["kv_cache"] == 2 * 64 * c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    est = estimate("finetune_lora", str(folder), "--train.max_steps", "10")
    assert est["peak_memory_bytes"]["device0"] > est["breakdown"]["weights"] > 0


def test_block_fp8_checkpoint_is_dequantized_as_transformers_does(tmp_path):
    """The Hub's DeepSeek-V3/R1 and Kimi K2 store Linear weights as FP8 with a scale per 128 x 128 block
    (`weight_scale_inv`); conversion dequantizes them exactly as transformers' own FP8 dequantization does
    (here blocks of 16 x 16 over shapes that are no multiple of 16: partial last blocks)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from hf_models import save_hf_checkpoint
    from litllm.convert import convert_to_litllm

    save_hf_checkpoint("deepseek_v3", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    block = 16
    quantized = {}
    for name, w in weights.items():
        if name.endswith("proj.weight") and w.dim() == 2:  # the Linears, as the Hub quantizes them
            rows, cols = -(-w.size(0) // block), -(-w.size(1) // block)
            padded = torch.zeros(rows * block, cols * block).index_put_(
                (torch.arange(w.size(0))[:, None], torch.arange(w.size(1))), w.abs())
            scale = padded.view(rows, block, cols, block).amax(dim=(1, 3)) / 448 + 1e-12
            full_scale = scale.repeat_interleave(block, 0)[: w.size(0)].repeat_interleave(block, 1)[:, : w.size(1)]
            quantized[name] = (w / full_scale).to(torch.float8_e4m3fn)
            quantized[name + "_scale_inv"] = scale
        else:
            quantized[name] = w
    save_file(quantized, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    convert_to_litllm(tmp_path)

    lit = load_file(tmp_path / "lit_model.safetensors")
    expected = _dequantize_fp8_weight(quantized["model.layers.1.mlp.experts.3.down_proj.weight"],
                                      quantized["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"],
                                      [block, block], torch.float32)
    assert torch.equal(lit["blocks.1.mlp.experts.3.proj.weight"], expected)
    kv_b = _dequantize_fp8_weight(quantized["model.layers.0.self_attn.kv_b_proj.weight"],
                                  quantized["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"],
                                  [block, block], torch.float32)
    assert torch.equal(lit["blocks.0.attn.kv_b.weight"], kv_b)
    original = weights["model.layers.0.self_attn.kv_b_proj.weight"]
    assert (kv_b - original).abs().max() <= original.abs().max() / 8  # FP8's 3 mantissa bits, one scale per block


def test_multi_token_prediction_layers_are_skipped_only_where_config_declares_them(tmp_path):
    """DeepSeek-V3 and GLM-4.5 checkpoints ship `num_nextn_predict_layers` extra layers after the last one
    (transformers runs neither); any other extra layer still means config.json and weights disagree."""
    from safetensors.torch import load_file, save_file

    from hf_models import save_hf_checkpoint
    from litllm.convert import convert_to_litllm
    from litllm.errors import LitLLMError

    save_hf_checkpoint("glm4_moe", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.2.eh_proj.weight"] = torch.zeros(4, 4)  # a layer past num_hidden_layers (2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(LitLLMError, match=r"have no place .*model\.layers\.2\.eh_proj"):
        convert_to_litllm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    convert_to_litllm(tmp_path)
    assert GPT.from_checkpoint(tmp_path).config.n_layer == 2
