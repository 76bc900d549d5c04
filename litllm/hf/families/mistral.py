"""Mistral: Llama with a sliding window on every layer (`sliding_window`, null for none)."""

from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, register


def read_sliding_window(hf: dict, values: dict) -> None:
    if hf.get("sliding_window"):
        values["sliding_window_size"] = hf["sliding_window"]


def read_config(hf: dict, values: dict) -> None:
    read_biases(hf, values)
    read_sliding_window(hf, values)


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    hf["sliding_window"] = c.sliding_window_size


MISTRAL = register(Family(
    "mistral", "MistralForCausalLM", FLAGS, WEIGHTS, presets="_mistral",
    read_config=read_config, write_config=write_config,
))
