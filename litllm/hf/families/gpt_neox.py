"""GPT-NeoX (Pythia): LayerNorm, GeLU MLP, parallel residual, partial rotary (`rotary_pct`), biases
everywhere, one fused `query_key_value` whose rows are interleaved per head."""

from litllm.hf.family import Family, interleaved, one, register

FLAGS = dict(
    norm_class_name="LayerNorm", mlp_class_name="GeluMLP", parallel_residual=True,
    attn_bias=True, attn_out_bias=True, mlp_bias=True,
)
LAYER = "gpt_neox.layers.{i}"
WEIGHTS = {
    "wte": one("gpt_neox.embed_in"),
    "blocks.{i}.norm_1": one(f"{LAYER}.input_layernorm"),
    "blocks.{i}.attn.qkv": interleaved("neox_qkv", f"{LAYER}.attention.query_key_value"),
    "blocks.{i}.attn.proj": one(f"{LAYER}.attention.dense"),
    "blocks.{i}.norm_2": one(f"{LAYER}.post_attention_layernorm"),
    "blocks.{i}.mlp.fc": one(f"{LAYER}.mlp.dense_h_to_4h"),
    "blocks.{i}.mlp.proj": one(f"{LAYER}.mlp.dense_4h_to_h"),
    "norm_f": one("gpt_neox.final_layer_norm"),
    "lm_head": one("embed_out"),
}


def read_config(hf: dict, values: dict) -> None:
    values["parallel_residual"] = bool(hf.get("use_parallel_residual", True))
    values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", True))


def write_config(c, hf: dict) -> None:
    hf.update(rotary_pct=c.rotary_percentage, rotary_emb_base=c.rope_base,
              use_parallel_residual=c.parallel_residual, attention_bias=c.attn_bias)


GPT_NEOX = register(Family(
    "gpt_neox", "GPTNeoXForCausalLM", FLAGS, WEIGHTS, presets="_pythia",
    read_config=read_config, write_config=write_config,
))
