"""OLMo 3: OLMo 2 with three sliding-window layers for every full-attention one (`layer_types`); the
sliding layers run plain RoPE, the full ones the configured scaling (`rope_parameters` per layer type)."""

from litllm.hf.families.llama import read_biases, write_biases
from litllm.hf.families.olmo2 import FLAGS, WEIGHTS
from litllm.hf.family import (
    Family, layer_types, period_from_layer_types, read_rope_per_layer_type, register, write_rope_per_layer_type,
)


def read_config(hf: dict, values: dict) -> None:
    read_biases(hf, values)
    values["sliding_window_size"] = hf.get("sliding_window")
    if hf.get("layer_types"):
        values["sliding_window_period"] = period_from_layer_types(hf["layer_types"])
    read_rope_per_layer_type(hf, values, local_default=values["rope_base"])


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    hf.update(sliding_window=c.sliding_window_size, layer_types=layer_types(c))
    write_rope_per_layer_type(c, hf)


OLMO3 = register(Family(
    "olmo3", "Olmo3ForCausalLM", {**FLAGS, "sliding_window_period": 4}, WEIGHTS, presets="_olmo3",
    read_config=read_config, write_config=write_config,
))
