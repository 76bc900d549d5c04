"""Phi-3 / Phi-3.5 / Phi-4: Llama with fused `qkv_proj` and `gate_up_proj`, LongRoPE, a sliding window;
`attention_bias` covers q/k/v only."""

from litllm.hf.families.llama import FLAGS, WEIGHTS
from litllm.hf.families.mistral import read_sliding_window
from litllm.hf.family import Family, one, register

WEIGHTS = {
    **WEIGHTS,
    "blocks.{i}.attn.qkv": one("model.layers.{i}.self_attn.qkv_proj"),
    "blocks.{i}.mlp.fc": one("model.layers.{i}.mlp.gate_up_proj"),
}


def read_config(hf: dict, values: dict) -> None:
    read_sliding_window(hf, values)
    values["attn_bias"] = bool(hf.get("attention_bias", False))
    values["mlp_bias"] = bool(hf.get("mlp_bias", False))


def write_config(c, hf: dict) -> None:
    hf["sliding_window"] = c.sliding_window_size
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "longrope":
        hf["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    if c.rotary_percentage != 1.0:
        hf["partial_rotary_factor"] = c.rotary_percentage


PHI3 = register(Family(
    "phi3", "Phi3ForCausalLM", FLAGS, WEIGHTS, presets="_phi3_mini",
    read_config=read_config, write_config=write_config,
))
