"""StableLM 2: LayerNorm blocks, SwiGLU, partial rotary, optional q/k/v bias and parallel residual."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import WEIGHTS
from litllm.hf.family import Family, register

FLAGS = dict(norm_class_name="LayerNorm", mlp_class_name="GatedMLP", activation="silu")


def read_config(hf: dict, values: dict) -> None:
    values["attn_bias"] = bool(hf.get("use_qkv_bias", False))
    values["parallel_residual"] = bool(hf.get("use_parallel_residual", False))
    if hf.get("qk_layernorm"):
        raise LitLLMError("config.json: StableLM with qk_layernorm is not supported")


def write_config(c, hf: dict) -> None:
    hf.update(use_qkv_bias=c.attn_bias, use_parallel_residual=c.parallel_residual, qk_layernorm=False,
              partial_rotary_factor=c.rotary_percentage, layer_norm_eps=c.norm_eps)


STABLELM = register(Family(
    "stablelm", "StableLmForCausalLM", FLAGS, WEIGHTS, presets="_stablelm",
    read_config=read_config, write_config=write_config,
))
