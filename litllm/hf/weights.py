"""HF weight names <-> litllm weight names: fills a family's weight map (`litllm/hf/families/`) for one
parameter, and reorders the fused layouts some families use.

Each map sends a litllm module path to an `HFSource`: the HF module path(s) it is made of; the
parameter suffix (`.weight` / `.bias`) is appended on both sides. The model itself never sees HF names
(see `litllm/model.py`).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from litllm.config import Config
from litllm.hf import families as _builtin_families  # noqa: F401 (registers the built-in families)
from litllm.hf.family import FAMILIES, HFSource, WeightMap

# HF buffers that are not weights (recomputed by every implementation) and parts litllm doesn't run
IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|attention\.bias$|attention\.masked_bias$|^vision_tower\.|^vision_model\.|"
                        r"^multi_modal_projector\.|^model\.vision_tower\.|^model\.multi_modal_projector\.)")


def weight_map(config: Config, model_type: str) -> WeightMap:
    return FAMILIES[model_type].weight_map(config)


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


def expert_index(lit_param: str) -> Optional[int]:
    """`blocks.3.mlp.experts.5.fc.weight` -> 5; None for a tensor of no single expert (`experts.gate_up.weight`)."""
    e = _template(lit_param.rpartition(".")[0])[1].get("e")
    return None if e is None else int(e)


def hf_sources(lit_param: str, mapping: WeightMap) -> HFSource:
    """HF parameter name(s) that make up one litllm parameter (e.g. `blocks.0.attn.qkv.weight`)."""
    module, _, suffix = lit_param.rpartition(".")
    template, values = _template(module)
    if template not in mapping:
        raise KeyError(lit_param)
    return mapping[template].fill(suffix, **values)


# ---------------------------------------------------------------------- fused layouts
def qkv_from_interleaved(fused: torch.Tensor, layout: str, config: Config) -> torch.Tensor:
    """Reorder a GPT-NeoX / Falcon fused qkv tensor into litllm's [q heads | k heads | v heads]."""
    hs, nh, nkv = config.head_size, config.n_head, config.n_query_groups
    rest = fused.shape[1:]
    if layout == "neox_qkv":  # per head: [q_h, k_h, v_h]
        t = fused.reshape(nh, 3, hs, *rest)
        q, k, v = t[:, 0], t[:, 1], t[:, 2]
    else:  # Falcon: per kv group [q heads of the group..., k, v] (see litllm/hf/families/falcon.py)
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
        size = config.expert_intermediate_size if ".experts." in lit_param else config.intermediate_size
        if ".shared_experts." in lit_param:  # n_shared_expert experts' worth
            size = config.expert_intermediate_size * config.n_shared_expert
        return [size] * 2
    raise ValueError(f"don't know how to split {lit_param} into {n_parts} parts")
