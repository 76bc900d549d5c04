"""OLMo 2: norms after attention and MLP (not before), qk-norm over the whole q/k projection."""

from litllm.hf.families.llama import FLAGS, WEIGHTS, read_biases, write_biases
from litllm.hf.family import Family, one, register

FLAGS = {**FLAGS, "norm_qk": "full", "pre_norm": False, "post_attention_norm": True, "post_mlp_norm": True}
WEIGHTS = {
    **{k: v for k, v in WEIGHTS.items() if k not in ("blocks.{i}.norm_1", "blocks.{i}.norm_2")},
    "blocks.{i}.post_attn_norm": one("model.layers.{i}.post_attention_layernorm"),
    "blocks.{i}.post_mlp_norm": one("model.layers.{i}.post_feedforward_layernorm"),
}

OLMO2 = register(Family(
    "olmo2", "Olmo2ForCausalLM", FLAGS, WEIGHTS, presets="_olmo2",
    read_config=read_biases, write_config=write_biases,
))
