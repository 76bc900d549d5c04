"""Qwen3: Llama with RMSNorm on each query/key head (qk-norm) and an explicit `head_dim`."""

from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, register

QWEN3 = register(Family(
    "qwen3", "Qwen3ForCausalLM", {**FLAGS, "norm_qk": "head"}, WEIGHTS, presets="_qwen3",
    read_config=read_biases, write_config=write_biases,
))
