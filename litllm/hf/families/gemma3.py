"""Gemma 3 (text): Gemma 2 with per-head qk-norm instead of attention softcapping, 5:1 sliding/global
layers, and its own RoPE base on sliding layers. A multimodal `gemma3` folder's `text_config` is read,
its vision tower left out."""

from litllm.hf.families import gemma2
from litllm.hf.families.gemma import FLAGS
from litllm.hf.family import Family, period_from_layer_types, read_rope_per_layer_type, register

FLAGS = {**FLAGS, "post_attention_norm": True, "post_mlp_norm": True, "norm_qk": "head"}


def read_config(hf: dict, values: dict) -> None:
    gemma2.read_config(hf, values)
    values["sliding_window_period"] = hf.get("sliding_window_pattern", 6)
    if hf.get("layer_types"):
        values["sliding_window_period"] = period_from_layer_types(hf["layer_types"])
    read_rope_per_layer_type(hf, values, local_default=hf.get("rope_local_base_freq", 10000.0))


def write_config(c, hf: dict) -> None:
    gemma2.write_config(c, hf)
    hf.update(rope_local_base_freq=c.rope_local_base, sliding_window_pattern=c.sliding_window_period)


GEMMA3 = register(Family(
    "gemma3_text", "Gemma3ForCausalLM", FLAGS, gemma2.WEIGHTS, presets="_gemma3", tied_by_default=True,
    read_config=read_config, write_config=write_config, wrappers=("gemma3",),
))
