"""Phi-1.5 / Phi-2: parallel residual with one shared LayerNorm, GeLU (tanh) MLP, partial rotary,
biases everywhere including the head."""

from litllm.errors import LitLLMError
from litllm.hf.family import Family, cat, one, register

FLAGS = dict(
    norm_class_name="LayerNorm", mlp_class_name="GeluMLP", activation="gelu_tanh",
    parallel_residual=True, shared_attention_norm=True,
    attn_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True,
)
LAYER = "model.layers.{i}"
WEIGHTS = {
    "wte": one("model.embed_tokens"),
    "blocks.{i}.norm_1": one(f"{LAYER}.input_layernorm"),
    "blocks.{i}.attn.qkv": cat(f"{LAYER}.self_attn.q_proj", f"{LAYER}.self_attn.k_proj", f"{LAYER}.self_attn.v_proj"),
    "blocks.{i}.attn.proj": one(f"{LAYER}.self_attn.dense"),
    "blocks.{i}.mlp.fc": one(f"{LAYER}.mlp.fc1"),
    "blocks.{i}.mlp.proj": one(f"{LAYER}.mlp.fc2"),
    "norm_f": one("model.final_layernorm"),
    "lm_head": one("lm_head"),
}


def read_config(hf: dict, values: dict) -> None:
    if hf.get("qk_layernorm"):
        raise LitLLMError("config.json: Phi with qk_layernorm is not supported")
    values["intermediate_size"] = hf.get("intermediate_size") or 4 * values["n_embd"]


def write_config(c, hf: dict) -> None:
    hf.update(hidden_act="gelu_new", partial_rotary_factor=c.rotary_percentage, qk_layernorm=False)


PHI = register(Family(
    "phi", "PhiForCausalLM", FLAGS, WEIGHTS, presets="phi-2",
    read_config=read_config, write_config=write_config,
))
