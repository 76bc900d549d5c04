"""GLM-4.5 / GLM-4.5-Air: grouped-query attention with biases on q/k/v (not on o_proj), optional per-head
qk-norm (`use_qk_norm`), RoPE on the first `partial_rotary_factor` of each head; DeepSeek-V3's mixture of
experts (sigmoid router with a fixed correction bias, grouped top-k, routed scaling factor, one shared
expert) after `first_k_dense_replace` dense layers. Layers past `num_hidden_layers` in the Hub's
checkpoints are the multi-token-prediction module, which litllm (like transformers) does not run."""

from litllm.hf.families.deepseek_v3 import MOE_WEIGHTS, STACKED, check_sigmoid_router, read_routed_moe, write_routed_moe
from litllm.hf.family import Family, llama_like_weights, register

FLAGS = dict(norm_class_name="RMSNorm", mlp_class_name="MoE", activation="silu", moe_scoring="sigmoid",
             moe_correction_bias=True)
WEIGHTS = {**llama_like_weights(), **MOE_WEIGHTS}


def read_config(hf: dict, values: dict) -> None:
    check_sigmoid_router(hf)
    values.update(attn_bias=bool(hf.get("attention_bias", False)), attn_out_bias=False,
                  norm_qk="head" if hf.get("use_qk_norm") else None)
    read_routed_moe(hf, values)


def write_config(c, hf: dict) -> None:
    write_routed_moe(c, hf)
    hf.update(attention_bias=c.attn_bias, use_qk_norm=c.norm_qk == "head", partial_rotary_factor=c.rotary_percentage)


GLM4_MOE = register(Family(
    "glm4_moe", "Glm4MoeForCausalLM", FLAGS, WEIGHTS, presets="_glm4_moe",
    read_config=read_config, write_config=write_config, stacked_experts=STACKED,
))
