"""Falcon (7B, 40B, 180B, Falcon2-11B): LayerNorm, GeLU MLP, parallel attention, multi-query or grouped
attention in one fused `query_key_value`.

Its fused query_key_value has one layout in every variant transformers runs: per kv group, the group's
query heads then its key and value head. The new decoder architecture (40B, 180B, Falcon2-11B) has
n_query_groups groups; the old one is that layout with 1 group (multi_query: [q heads, k, v]) or n_head
groups (multi-head: [q_h, k_h, v_h] per head). So the regrouping depends on the head counts only, never
on the number of layer norms (Falcon2-11B: new architecture, one norm). The norms decide the names: two
norms are ln_attn/ln_mlp, one is input_layernorm.
"""

from litllm.errors import LitLLMError
from litllm.hf.family import Family, interleaved, one, register

FLAGS = dict(norm_class_name="LayerNorm", mlp_class_name="GeluMLP", activation="gelu", parallel_residual=True)
LAYER = "transformer.h.{i}"
WEIGHTS = {
    "wte": one("transformer.word_embeddings"),
    "blocks.{i}.norm_1": one(f"{LAYER}.input_layernorm"),
    "blocks.{i}.attn.qkv": interleaved("falcon_qkv", f"{LAYER}.self_attention.query_key_value"),
    "blocks.{i}.attn.proj": one(f"{LAYER}.self_attention.dense"),
    "blocks.{i}.norm_2": one(f"{LAYER}.post_attention_layernorm"),  # sequential blocks (parallel_attn: false)
    "blocks.{i}.mlp.fc": one(f"{LAYER}.mlp.dense_h_to_4h"),
    "blocks.{i}.mlp.proj": one(f"{LAYER}.mlp.dense_4h_to_h"),
    "norm_f": one("transformer.ln_f"),
    "lm_head": one("lm_head"),
}
TWO_NORM_WEIGHTS = {
    **WEIGHTS,
    "blocks.{i}.norm_1": one(f"{LAYER}.ln_attn"),
    "blocks.{i}.norm_2": one(f"{LAYER}.ln_mlp"),
}


def read_config(hf: dict, values: dict) -> None:
    if hf.get("alibi"):
        raise LitLLMError("config.json: Falcon with ALiBi positions is not supported")
    bias = bool(hf.get("bias", False))
    values.update(attn_bias=bias, attn_out_bias=bias, mlp_bias=bias)
    new_arch = bool(hf.get("new_decoder_architecture", False))
    values["parallel_residual"] = bool(hf.get("parallel_attn", True)) or new_arch
    if new_arch:
        values["n_query_groups"] = hf.get("num_kv_heads", values["n_head"])
        values["shared_attention_norm"] = hf.get("num_ln_in_parallel_attn", 2) == 1
    else:
        values["n_query_groups"] = 1 if hf.get("multi_query", True) else values["n_head"]
        values["shared_attention_norm"] = True
    values["intermediate_size"] = hf.get("ffn_hidden_size") or 4 * values["n_embd"]
    values["activation"] = "gelu"


def write_config(c, hf: dict) -> None:
    del hf["head_dim"]  # FalconConfig derives it and refuses the key
    new_arch = c.n_query_groups not in (1, c.n_head) or not c.shared_attention_norm
    hf.update(
        new_decoder_architecture=new_arch, multi_query=c.n_query_groups == 1, num_kv_heads=c.n_query_groups,
        parallel_attn=c.parallel_residual, bias=c.attn_bias, alibi=False, ffn_hidden_size=c.intermediate_size,
    )
    if new_arch:
        hf["num_ln_in_parallel_attn"] = 1 if c.shared_attention_norm else 2


FALCON = register(Family(
    "falcon", "FalconForCausalLM", FLAGS, WEIGHTS, presets="_falcon", tied_by_default=True,
    read_config=read_config, write_config=write_config,
    pick_weights=lambda c: WEIGHTS if c.shared_attention_norm else TWO_NORM_WEIGHTS,
))
