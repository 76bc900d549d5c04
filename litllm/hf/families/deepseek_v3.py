"""DeepSeek-V3 / R1 (and Kimi K2, which is the same model): Multi-head Latent Attention (see
`litllm.model.MLAttention`: low-rank queries, keys and values from one cached latent, a rope/nope head split,
interleaved RoPE, YaRN whose mscale_all_dim also scales the softmax) and a mixture of experts routed by
sigmoid scores plus a fixed correction bias, within the best `topk_group` of `n_group` expert groups, the
weights renormalised and multiplied by `routed_scaling_factor`; one shared expert; the first
`first_k_dense_replace` layers run a dense MLP. Layers past `num_hidden_layers` in the Hub's checkpoints are
the multi-token-prediction module, which litllm (like transformers) does not run."""

from litllm.errors import LitLLMError
from litllm.hf.family import Family, cat, one, register

FLAGS = dict(norm_class_name="RMSNorm", mlp_class_name="MoE", activation="silu", rope_interleaved=True,
             moe_scoring="sigmoid", moe_correction_bias=True)
LAYER = "model.layers.{i}"
MLP = LAYER + ".mlp"
ATTN = LAYER + ".self_attn"
MOE_WEIGHTS = {
    "blocks.{i}.mlp.fc": cat(f"{MLP}.gate_proj", f"{MLP}.up_proj"),  # the first, dense, layers
    "blocks.{i}.mlp.proj": one(f"{MLP}.down_proj"),
    "blocks.{i}.mlp.router": one(f"{MLP}.gate"),  # .weight and .e_score_correction_bias
    "blocks.{i}.mlp.experts.{e}.fc": cat(f"{MLP}.experts.{{e}}.gate_proj", f"{MLP}.experts.{{e}}.up_proj"),
    "blocks.{i}.mlp.experts.{e}.proj": one(f"{MLP}.experts.{{e}}.down_proj"),
    "blocks.{i}.mlp.shared_experts.fc": cat(f"{MLP}.shared_experts.gate_proj", f"{MLP}.shared_experts.up_proj"),
    "blocks.{i}.mlp.shared_experts.proj": one(f"{MLP}.shared_experts.down_proj"),
}
STACKED = MLP + ".experts"  # transformers 5 stacks the checkpoint's experts: where a PEFT export puts their LoRA
WEIGHTS = {
    "wte": one("model.embed_tokens"),
    "blocks.{i}.norm_1": one(f"{LAYER}.input_layernorm"),
    "blocks.{i}.attn.q_a": one(f"{ATTN}.q_a_proj"),
    "blocks.{i}.attn.q_norm": one(f"{ATTN}.q_a_layernorm"),
    "blocks.{i}.attn.q": one(f"{ATTN}.q_b_proj"),
    "blocks.{i}.attn.kv_a": one(f"{ATTN}.kv_a_proj_with_mqa"),
    "blocks.{i}.attn.kv_norm": one(f"{ATTN}.kv_a_layernorm"),
    "blocks.{i}.attn.kv_b": one(f"{ATTN}.kv_b_proj"),
    "blocks.{i}.attn.proj": one(f"{ATTN}.o_proj"),
    "blocks.{i}.norm_2": one(f"{LAYER}.post_attention_layernorm"),
    **MOE_WEIGHTS,
    "norm_f": one("model.norm"),
    "lm_head": one("lm_head"),
}
# without q_lora_rank (DeepSeek-V2-Lite) one full query projection
WEIGHTS_FULL_Q = {**WEIGHTS, "blocks.{i}.attn.q": one(f"{ATTN}.q_proj")}


def pick_weights(config) -> dict:
    return WEIGHTS if config.q_lora_rank else WEIGHTS_FULL_Q


def read_mla(hf: dict, values: dict) -> None:
    """The MLA keys DeepSeek-V2 and V3 share; `attention_bias` covers q_a, kv_a and o_proj."""
    nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    values.update(
        kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank") or None, qk_rope_head_dim=rope,
        v_head_dim=hf["v_head_dim"], head_size=nope + rope, n_query_groups=values["n_head"],
        rotary_percentage=1.0,
    )
    values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", False))


def write_mla(c, hf: dict) -> None:
    hf.update(
        kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
        qk_nope_head_dim=c.head_size - c.qk_rope_head_dim, v_head_dim=c.v_head_dim, head_dim=c.qk_rope_head_dim,
        num_key_value_heads=c.n_head, attention_bias=c.attn_bias,
    )


def read_routed_moe(hf: dict, values: dict) -> None:
    """The expert keys DeepSeek-V2/V3 and GLM-4.5 share: routed and shared experts, first dense layers, groups."""
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise LitLLMError(f"config.json: moe_layer_freq {hf['moe_layer_freq']} is not supported (only 1)")
    first_dense = min(hf.get("first_k_dense_replace") or 0, values["n_layer"])
    values.update(
        n_expert=hf["n_routed_experts"], n_expert_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_shared_expert=hf.get("n_shared_experts") or 0,
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        moe_normalize_topk=bool(hf.get("norm_topk_prob", False)),
        n_expert_groups=hf.get("n_group") or 1, n_topk_groups=hf.get("topk_group") or 1,
        dense_mlp_layers=list(range(first_dense)) or None,
    )


def write_routed_moe(c, hf: dict) -> None:
    first_dense = len(c.dense_mlp_layers or [])
    if list(c.dense_mlp_layers or []) != list(range(first_dense)):
        raise LitLLMError(f"model {c.name!r}: {c.hf_model_type} runs dense MLPs in its first layers only, "
                          f"not in dense_mlp_layers {c.dense_mlp_layers}")
    hf.update(
        n_routed_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
        moe_intermediate_size=c.moe_intermediate_size, n_shared_experts=c.n_shared_expert,
        routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.moe_normalize_topk,
        n_group=c.n_expert_groups, topk_group=c.n_topk_groups, first_k_dense_replace=first_dense,
        moe_layer_freq=1, num_nextn_predict_layers=0,
    )


def check_sigmoid_router(hf: dict) -> None:
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise LitLLMError(f"config.json: scoring_func {scoring!r} is not supported for {hf.get('model_type')} "
                          "(transformers runs sigmoid)")


def read_config(hf: dict, values: dict) -> None:
    check_sigmoid_router(hf)
    if hf.get("rope_interleave") is False:
        values["rope_interleaved"] = False
    read_mla(hf, values)
    read_routed_moe(hf, values)


def write_config(c, hf: dict) -> None:
    write_mla(c, hf)
    write_routed_moe(c, hf)
    hf.update(rope_interleave=c.rope_interleaved, scoring_func="sigmoid", topk_method="noaux_tc")
    hf["model_type"] = "deepseek_v3"  # Kimi K2 too: transformers knows the architecture by this name


DEEPSEEK_V3 = register(Family(
    "deepseek_v3", "DeepseekV3ForCausalLM", FLAGS, WEIGHTS, presets="_deepseek_v3",
    read_config=read_config, write_config=write_config, pick_weights=pick_weights, stacked_experts=STACKED,
))
# Kimi K2's config.json names its model_type `kimi_k2`; the model is DeepSeek-V3's and exports as it
KIMI_K2 = register(Family(
    "kimi_k2", "DeepseekV3ForCausalLM", FLAGS, WEIGHTS, presets="Kimi-K2-Instruct",
    read_config=read_config, write_config=write_config, pick_weights=pick_weights, stacked_experts=STACKED,
))
