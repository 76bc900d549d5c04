"""OLMoE: a Llama-style pre-norm block with RMSNorm over the whole q and k projections (not per head),
and 64 SwiGLU experts, top-8, the top-k weights not renormalised (`norm_topk_prob` false)."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import FLAGS, read_biases, write_biases
from litllm.hf.families.qwen3_moe import WEIGHTS, read_moe, write_moe
from litllm.hf.family import Family, register

WEIGHTS = {k: v for k, v in WEIGHTS.items() if k not in ("blocks.{i}.mlp.fc", "blocks.{i}.mlp.proj")}


def read_config(hf: dict, values: dict) -> None:
    if hf.get("clip_qkv") is not None:
        raise LitLLMError("config.json: OLMoE with clip_qkv is not supported")
    read_biases(hf, values)
    read_moe(hf, values)


def write_config(c, hf: dict) -> None:
    write_biases(c, hf)
    write_moe(c, hf)
    hf["clip_qkv"] = None


OLMOE = register(Family(
    "olmoe", "OlmoeForCausalLM", {**FLAGS, "norm_qk": "full", "mlp_class_name": "MoE"}, WEIGHTS,
    presets="OLMoE-1B-7B-0924", stacked_experts="model.layers.{i}.mlp.experts",
    read_config=read_config, write_config=write_config,
))
