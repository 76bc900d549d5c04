"""HF weight names <-> litllm weight names, per family, as data.

Each map sends a litllm module path to the HF module path(s) it is made of; the parameter
suffix (`.weight` / `.bias`) is appended on both sides. A list means the HF tensors are
concatenated along dim 0 (q/k/v into `qkv`, gate/up into `fc`). A `(layout, name)` tuple names
a fused HF tensor whose rows are interleaved and must be reordered (GPT-NeoX, Falcon).
The model itself never sees HF names (see `litllm/model.py`).
"""

from __future__ import annotations

import re
from typing import Union

import torch

from litllm.config import Config

Source = Union[str, list[str], tuple[str, str]]

_LLAMA_LAYER = {
    "blocks.{i}.norm_1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": [
        "model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj",
    ],
    "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "blocks.{i}.norm_2": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.fc": ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"],
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.down_proj",
}
_LLAMA = {
    "wte": "model.embed_tokens",
    **_LLAMA_LAYER,
    "norm_f": "model.norm",
    "lm_head": "lm_head",
}
_GEMMA2 = {
    **_LLAMA,
    "blocks.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.norm_2": "model.layers.{i}.pre_feedforward_layernorm",
    "blocks.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm",
}
_OLMO2 = {
    **{k: v for k, v in _LLAMA.items() if k not in ("blocks.{i}.norm_1", "blocks.{i}.norm_2")},
    "blocks.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm",
}
_MIXTRAL = {
    **{k: v for k, v in _LLAMA.items() if ".mlp." not in k},
    "blocks.{i}.mlp.router": "model.layers.{i}.block_sparse_moe.gate",
    "blocks.{i}.mlp.experts.{e}.fc": [
        "model.layers.{i}.block_sparse_moe.experts.{e}.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
    ],
    "blocks.{i}.mlp.experts.{e}.proj": "model.layers.{i}.block_sparse_moe.experts.{e}.w2",
}
_PHI3 = {
    **_LLAMA,
    "blocks.{i}.attn.qkv": "model.layers.{i}.self_attn.qkv_proj",
    "blocks.{i}.mlp.fc": "model.layers.{i}.mlp.gate_up_proj",
}
_PHI = {
    "wte": "model.embed_tokens",
    "blocks.{i}.norm_1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": _LLAMA["blocks.{i}.attn.qkv"],
    "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.dense",
    "blocks.{i}.mlp.fc": "model.layers.{i}.mlp.fc1",
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.fc2",
    "norm_f": "model.final_layernorm",
    "lm_head": "lm_head",
}
_GPT_NEOX = {
    "wte": "gpt_neox.embed_in",
    "blocks.{i}.norm_1": "gpt_neox.layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": ("neox_qkv", "gpt_neox.layers.{i}.attention.query_key_value"),
    "blocks.{i}.attn.proj": "gpt_neox.layers.{i}.attention.dense",
    "blocks.{i}.norm_2": "gpt_neox.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.fc": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
    "blocks.{i}.mlp.proj": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "norm_f": "gpt_neox.final_layer_norm",
    "lm_head": "embed_out",
}
_FALCON = {
    "wte": "transformer.word_embeddings",
    "blocks.{i}.norm_1": "transformer.h.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": ("falcon_qkv", "transformer.h.{i}.self_attention.query_key_value"),  # _FALCON_QKV
    "blocks.{i}.attn.proj": "transformer.h.{i}.self_attention.dense",
    "blocks.{i}.norm_2": "transformer.h.{i}.post_attention_layernorm",  # sequential blocks (parallel_attn: false)
    "blocks.{i}.mlp.fc": "transformer.h.{i}.mlp.dense_h_to_4h",
    "blocks.{i}.mlp.proj": "transformer.h.{i}.mlp.dense_4h_to_h",
    "norm_f": "transformer.ln_f",
    "lm_head": "lm_head",
}
_FALCON_NEW = {
    **_FALCON,
    "blocks.{i}.norm_1": "transformer.h.{i}.ln_attn",
    "blocks.{i}.norm_2": "transformer.h.{i}.ln_mlp",
}

WEIGHT_MAPS: dict[str, dict[str, Source]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "stablelm": _LLAMA,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2, "olmo2": _OLMO2, "mixtral": _MIXTRAL, "phi3": _PHI3,
    "phi": _PHI, "gpt_neox": _GPT_NEOX, "falcon": _FALCON,
}

# HF buffers that are not weights (recomputed by every implementation) and parts litllm doesn't run
IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|attention\.bias$|attention\.masked_bias$|^vision_tower\.|"
                        r"^multi_modal_projector\.|^model\.vision_tower\.|^model\.multi_modal_projector\.)")


# _FALCON_QKV: Falcon's fused query_key_value has one layout in every variant transformers runs: per kv group,
# the group's query heads then its key and value head. The new decoder architecture (40B, 180B,
# Falcon2-11B) has n_query_groups groups; the old one is that layout with 1 group (multi_query:
# [q heads, k, v]) or n_head groups (multi-head: [q_h, k_h, v_h] per head). So the regrouping depends
# on the head counts only, never on the number of layer norms (Falcon2-11B: new architecture, one norm).
# The norms decide the names: two norms are ln_attn/ln_mlp, one is input_layernorm.


def weight_map(config: Config, model_type: str) -> dict[str, Source]:
    if model_type == "falcon" and not config.shared_attention_norm:
        return _FALCON_NEW
    return WEIGHT_MAPS[model_type]


def _template(lit_name: str) -> tuple[str, dict[str, str]]:
    """`blocks.3.mlp.experts.5.fc` -> (`blocks.{i}.mlp.experts.{e}.fc`, {"i": "3", "e": "5"})."""
    values: dict[str, str] = {}
    m = re.match(r"blocks\.(\d+)\.", lit_name)
    if m:
        values["i"] = m.group(1)
        lit_name = "blocks.{i}." + lit_name[m.end():]
    m = re.search(r"\.experts\.(\d+)\.", lit_name)
    if m:
        values["e"] = m.group(1)
        lit_name = lit_name[: m.start()] + ".experts.{e}." + lit_name[m.end():]
    return lit_name, values


def hf_sources(lit_param: str, mapping: dict[str, Source]) -> Source:
    """HF parameter name(s) that make up one litllm parameter (e.g. `blocks.0.attn.qkv.weight`)."""
    module, _, suffix = lit_param.rpartition(".")
    template, values = _template(module)
    if template not in mapping:
        raise KeyError(lit_param)
    source = mapping[template]

    def fill(name: str) -> str:
        return name.format(**values) + "." + suffix

    if isinstance(source, str):
        return fill(source)
    if isinstance(source, tuple):
        return (source[0], fill(source[1]))
    return [fill(s) for s in source]


# ---------------------------------------------------------------------- fused layouts
def qkv_from_interleaved(fused: torch.Tensor, layout: str, config: Config) -> torch.Tensor:
    """Reorder a GPT-NeoX / Falcon fused qkv tensor into litllm's [q heads | k heads | v heads]."""
    hs, nh, nkv = config.head_size, config.n_head, config.n_query_groups
    rest = fused.shape[1:]
    if layout == "neox_qkv":  # per head: [q_h, k_h, v_h]
        t = fused.reshape(nh, 3, hs, *rest)
        q, k, v = t[:, 0], t[:, 1], t[:, 2]
    else:  # Falcon: per kv group [q heads of the group..., k, v] (see _FALCON_QKV)
        t = fused.reshape(nkv, nh // nkv + 2, hs, *rest)
        q, k, v = t[:, :-2], t[:, -2], t[:, -1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def qkv_to_interleaved(qkv: torch.Tensor, layout: str, config: Config) -> torch.Tensor:
    hs, nh, nkv = config.head_size, config.n_head, config.n_query_groups
    rest = qkv.shape[1:]
    q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs])
    if layout == "neox_qkv":
        t = torch.stack([q.reshape(nh, hs, *rest), k.reshape(nh, hs, *rest), v.reshape(nh, hs, *rest)], dim=1)
        return t.reshape(-1, *rest)
    q = q.reshape(nkv, nh // nkv, hs, *rest)
    t = torch.cat([q, k.reshape(nkv, 1, hs, *rest), v.reshape(nkv, 1, hs, *rest)], dim=1)
    return t.reshape(-1, *rest)


def split_sizes(lit_param: str, config: Config, n_parts: int) -> list[int]:
    """Row counts of the HF tensors concatenated into one litllm tensor."""
    if ".attn.qkv." in lit_param:
        return [config.n_head * config.head_size] + [config.n_query_groups * config.head_size] * 2
    if n_parts == 2:  # gate | up
        return [config.intermediate_size] * 2
    raise ValueError(f"don't know how to split {lit_param} into {n_parts} parts")
