"""Tiny random-weight `transformers` models of every supported family: the numerical oracle.

Each entry has the family's real structure (GQA ratio, biases, tying, rope scaling, sliding
window, softcapping, MoE) at toy sizes, so CPU tests run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)

# family id -> (transformers config class name, model class name, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, num_key_value_heads=2, intermediate_size=112)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=4, intermediate_size=112,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
    "llama-linear-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=1, intermediate_size=112, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, head_dim=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        COMMON, num_key_value_heads=1, intermediate_size=112, head_dim=24)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, head_dim=16, sliding_window=6,
        query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        COMMON, num_hidden_layers=3, num_key_value_heads=2, intermediate_size=112, head_dim=16, sliding_window=6,
        query_pre_attn_scalar=16, sliding_window_pattern=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(COMMON, num_key_value_heads=4, intermediate_size=112)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, pad_token_id=0, sliding_window=10)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        COMMON, num_key_value_heads=4, intermediate_size=112, original_max_position_embeddings=32, pad_token_id=0,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                          long_factor=[2.0 + 0.2 * i for i in range(8)]))),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        COMMON, intermediate_size=112, partial_rotary_factor=0.5, hidden_act="gelu_new")),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        COMMON, intermediate_size=112, rotary_pct=0.25, use_parallel_residual=True)),
    "falcon-7b": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False)),
    "falcon-40b": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, bias=False, alibi=False)),
    # Falcon2-11B: the new decoder architecture (grouped qkv) with ONE layer norm feeding both branches
    "falcon2-11b": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, num_ln_in_parallel_attn=1, parallel_attn=True, bias=False, alibi=False)),
    # the old architecture without multi-query: per-head [q, k, v] rows, a sequential (non-parallel) block
    "falcon-mha-sequential": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
        parallel_attn=False, new_decoder_architecture=False, bias=True, alibi=False)),
    # SmolLM3: NoPE in layer 3 (every 4th); tied embeddings
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        COMMON, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=112, pad_token_id=0, bos_token_id=0,
        eos_token_id=1)),
    # OLMo 3: 3 sliding (window 6) : 1 full layers, yarn on the full layers only
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        COMMON, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=112, sliding_window=6,
        rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                            "rope_theta": 500000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}})),
    # Granite: embedding, residual and logits multipliers at granite-3.3-8b's values; the attention scale large
    # enough (random weights give near-uniform attention) that 1/sqrt(head_dim) in its place shows
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=112, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=4.0, logits_scaling=16.0, tie_word_embeddings=True)),
    # Qwen3-MoE: 8 experts top-2 renormalised, layer 1 dense (mlp_only_layers), experts smaller than the dense MLP
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, intermediate_size=112,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        router_aux_loss_coef=0.02)),
    # OLMoE: qk-norm over the whole projection, 8 experts top-3 NOT renormalised
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        COMMON, num_key_value_heads=2, intermediate_size=48, num_experts=8, num_experts_per_tok=3,
        pad_token_id=0, bos_token_id=0, eos_token_id=1)),
    # Ministral 3: YaRN (mscale 1/1) and the position-dependent query scale, whose step (16) the test sequences cross
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=112, pad_token_id=0, bos_token_id=0,
        eos_token_id=1, rope_parameters=dict(
            rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5))),
    # gpt-oss: sinks, sliding (window 6) / full layers, YaRN without truncation, biased router and experts; the
    # SwiGLU clamp (limit) lowered so random weights reach it
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=6, swiglu_limit=0.1, router_aux_loss_coef=0.02, layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=16,
                             beta_fast=32.0, beta_slow=1.0, truncate=False))),
    # DeepSeek-V3: MLA with a query latent, interleaved RoPE, YaRN whose mscale_all_dim scales the softmax;
    # 8 experts in 4 groups, top-2 of the best 2 groups by sigmoid + correction bias, renormalised, x 2.5;
    # a shared expert; layer 0 dense
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        num_mtp_layers=0, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    # DeepSeek-V2-Lite's shape: no query latent; softmax router, group-limited greedy (2 of 4 groups), x 1.5,
    # not renormalised; 2 shared experts; YaRN with mscale 0.707. Top-3: with a group scored by its best expert,
    # a group limit changes the choice only when k exceeds the groups kept
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=1.5,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
            beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))),
    # GLM-4.5: q/k/v biases, per-head qk-norm, RoPE on half of each head; DeepSeek-V3's router (2 of 4 groups)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
        num_nextn_predict_layers=0, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # Llama 4: 4 experts top-1 (sigmoid, input-scaled) + shared expert in layers 1 and 3 (step 2), dense MLPs in 0
    # and 2; NoPE in layer 3 with temperature tuning (floor 4, so it changes within the test sequences); chunked
    # attention (16) and L2 qk-norm on the RoPE layers; llama3 rope scaling
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        COMMON, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=112, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=16, floor_scale=4, attn_scale=0.5, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        COMMON, num_key_value_heads=4, intermediate_size=112, partial_rotary_factor=0.25, use_qkv_bias=True)),
}


def make_hf_model(family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    perturb(model)
    return model


def perturb(model) -> None:
    """Random init leaves norms at 1/0 and routers' correction biases at 0: perturb every parameter and the
    correction biases (buffers) so the tests see each one."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.05)


def save_hf_checkpoint(family: str, folder: Path, seed: int = 0, **save_kwargs):
    model = make_hf_model(family, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model
