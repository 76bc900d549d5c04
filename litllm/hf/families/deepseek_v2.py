"""DeepSeek-V2 and V2-Lite: DeepSeek-V3's Multi-head Latent Attention (V2-Lite without a query latent,
`q_lora_rank` null) and experts routed by softmax scores: the top-k over all experts (`topk_method`
greedy) or within the best `topk_group` of `n_group` groups scored by their best expert
(group_limited_greedy), times `routed_scaling_factor`, not renormalised (transformers ignores
`norm_topk_prob` for V2); shared experts; the first `first_k_dense_replace` layers dense."""

from litllm.errors import LitLLMError
from litllm.hf.families.deepseek_v3 import (
    STACKED, WEIGHTS, pick_weights, read_mla, read_routed_moe, write_mla, write_routed_moe,
)
from litllm.hf.family import Family, register

FLAGS = dict(norm_class_name="RMSNorm", mlp_class_name="MoE", activation="silu", rope_interleaved=True,
             moe_scoring="softmax")


def read_config(hf: dict, values: dict) -> None:
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise LitLLMError(f"config.json: topk_method {method!r} is not supported for deepseek_v2 "
                          "(expected greedy or group_limited_greedy)")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise LitLLMError(f"config.json: scoring_func {hf['scoring_func']!r} is not supported for deepseek_v2")
    read_mla(hf, values)
    read_routed_moe(hf, values)
    values["moe_normalize_topk"] = False
    if method == "greedy":
        values.update(n_expert_groups=1, n_topk_groups=1)


def write_config(c, hf: dict) -> None:
    if c.moe_normalize_topk or c.moe_correction_bias or c.moe_scoring != "softmax":
        raise LitLLMError(f"model {c.name!r}: deepseek_v2 routes by softmax, without renormalisation or "
                          "correction bias")
    write_mla(c, hf)
    write_routed_moe(c, hf)
    grouped = c.n_expert_groups > 1
    hf.update(topk_method="group_limited_greedy" if grouped else "greedy", scoring_func="softmax",
              n_group=c.n_expert_groups if grouped else None, topk_group=c.n_topk_groups if grouped else None)


DEEPSEEK_V2 = register(Family(
    "deepseek_v2", "DeepseekV2ForCausalLM", FLAGS, WEIGHTS, presets="_deepseek_v2",
    read_config=read_config, write_config=write_config, pick_weights=pick_weights, stacked_experts=STACKED,
))
