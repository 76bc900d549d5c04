"""Gemma 2: Gemma with norms before and after attention and MLP, attention and final logit softcapping,
`query_pre_attn_scalar`, sliding-window layers alternating with global ones (`layer_types`)."""

from litllm.hf.families.gemma import FLAGS, write_activation
from litllm.hf.families.llama import WEIGHTS
from litllm.hf.family import Family, layer_types, one, period_from_layer_types, register

FLAGS = {**FLAGS, "post_attention_norm": True, "post_mlp_norm": True, "sliding_window_period": 2}
WEIGHTS = {
    **WEIGHTS,
    "blocks.{i}.post_attn_norm": one("model.layers.{i}.post_attention_layernorm"),
    "blocks.{i}.norm_2": one("model.layers.{i}.pre_feedforward_layernorm"),
    "blocks.{i}.post_mlp_norm": one("model.layers.{i}.post_feedforward_layernorm"),
}


def read_config(hf: dict, values: dict) -> None:
    values.update(
        attention_scores_scalar=hf.get("query_pre_attn_scalar"),
        attention_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        sliding_window_size=hf.get("sliding_window"),
    )
    if hf.get("layer_types"):
        values["sliding_window_period"] = period_from_layer_types(hf["layer_types"])


def write_config(c, hf: dict) -> None:
    write_activation(c, hf)
    hf.update(
        query_pre_attn_scalar=c.attention_scores_scalar,
        attn_logit_softcapping=c.attention_logit_softcapping,
        final_logit_softcapping=c.final_logit_softcapping,
        sliding_window=c.sliding_window_size,
        layer_types=layer_types(c),
    )


GEMMA2 = register(Family(
    "gemma2", "Gemma2ForCausalLM", FLAGS, WEIGHTS, presets="_gemma2", tied_by_default=True,
    read_config=read_config, write_config=write_config,
))
