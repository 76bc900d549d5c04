"""Qwen2 / Qwen2.5: Llama with biases on q/k/v (not on o_proj); a sliding window only when
`use_sliding_window` is set."""

from litllm.hf.families.llama import FLAGS, WEIGHTS
from litllm.hf.family import Family, register


def read_config(hf: dict, values: dict) -> None:
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        values["sliding_window_size"] = hf["sliding_window"]


def write_config(c, hf: dict) -> None:
    hf.update(use_sliding_window=c.sliding_window_size is not None, sliding_window=c.sliding_window_size)


QWEN2 = register(Family(
    "qwen2", "Qwen2ForCausalLM", {**FLAGS, "attn_bias": True}, WEIGHTS, presets="_qwen2",
    read_config=read_config, write_config=write_config,
))
