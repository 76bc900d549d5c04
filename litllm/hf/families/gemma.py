"""Gemma (1): GeGLU (tanh-approximated, whatever `hidden_act` says), RMSNorm scaling by (1 + weight),
embeddings scaled by sqrt(hidden_size), tied head."""

from litllm.hf.families.llama import WEIGHTS
from litllm.hf.family import Family, register

FLAGS = dict(
    norm_class_name="RMSNorm", mlp_class_name="GatedMLP", activation="gelu_tanh",
    norm_unit_offset=True, scale_embeddings=True,
)


def read_config(hf: dict, values: dict) -> None:
    values["activation"] = "gelu_tanh"  # Gemma-1 configs say "gelu" but the reference runs tanh-approximated GeLU


def write_activation(c, hf: dict) -> None:
    hf["hidden_activation"] = hf.pop("hidden_act")


GEMMA = register(Family(
    "gemma", "GemmaForCausalLM", FLAGS, WEIGHTS, presets="_gemma", tied_by_default=True,
    read_config=read_config, write_config=write_activation,
))
