"""Llama (1, 2, 3.x, CodeLlama, TinyLlama, SmolLM2): pre-norm RMSNorm blocks, SwiGLU, RoPE (with
linear / llama3 / yarn scaling), optional `attention_bias` / `mlp_bias`."""

from litllm.hf.family import Family, llama_like_weights, register

FLAGS = dict(norm_class_name="RMSNorm", mlp_class_name="GatedMLP", activation="silu")
WEIGHTS = llama_like_weights()


def read_biases(hf: dict, values: dict) -> None:
    """`attention_bias` covers q/k/v and o_proj; `mlp_bias` the MLP (Llama-style configs)."""
    values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", values.get("attn_bias", False)))
    values["mlp_bias"] = bool(hf.get("mlp_bias", False))


def write_biases(c, hf: dict) -> None:
    hf.update(attention_bias=c.attn_bias, mlp_bias=c.mlp_bias)


LLAMA = register(Family(
    "llama", "LlamaForCausalLM", FLAGS, WEIGHTS, presets="_llama",
    read_config=read_biases, write_config=write_biases,
))
