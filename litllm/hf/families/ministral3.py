"""Ministral 3 (the text model of Mistral 3): Mistral with YaRN and queries scaled by
1 + beta * log(1 + floor(position / original_max_position_embeddings)) after RoPE
(`rope_parameters.llama_4_scaling_beta`).

The published checkpoints are multimodal `mistral3` folders (a Pixtral vision tower + this text model, or
Mistral-Small-3.x's plain `mistral` text model): their `text_config` is read (the text model's own `model_type`),
the `language_model.` weight prefix stripped and the vision tower left out; the export is the text model alone."""

from litllm.errors import LitLLMError
from litllm.hf.families.llama import FLAGS, WEIGHTS
from litllm.hf.families.mistral import read_sliding_window
from litllm.hf.family import Family, register

QUERY_SCALE_KEYS = ("llama_4_scaling_beta", "max_position_embeddings")  # in rope_parameters, not RoPE itself


def read_config(hf: dict, values: dict) -> None:
    read_sliding_window(hf, values)
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    beta, length = params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings")
    if beta is not None and length is None:
        raise LitLLMError("config.json: rope_parameters.llama_4_scaling_beta needs original_max_position_embeddings")
    values.update(query_scale_beta=beta, query_scale_length=length if beta is not None else None)
    if values.get("rope_scaling"):
        values["rope_scaling"] = {k: v for k, v in values["rope_scaling"].items() if k not in QUERY_SCALE_KEYS}


def write_config(c, hf: dict) -> None:
    hf["sliding_window"] = c.sliding_window_size
    params = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_base}
    if c.query_scale_beta is not None:
        params.update(llama_4_scaling_beta=c.query_scale_beta, original_max_position_embeddings=c.query_scale_length)
    del hf["rope_scaling"], hf["rope_theta"]
    hf["rope_parameters"] = params


MINISTRAL3 = register(Family(
    "ministral3", "Ministral3ForCausalLM", FLAGS, WEIGHTS, presets="Ministral-3-8B-Base-2512",
    read_config=read_config, write_config=write_config, wrappers=("mistral3",),
))
