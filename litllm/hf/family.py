"""What one model family is, as one object: its `Family` entry holds everything that ties a HF
`model_type` to litllm, in both directions.

- `flags`: the structural `Config` fields every model of the family has (everything that is not a size);
- `read_config` / `write_config`: its own `config.json` keys -> `Config` values and back (the keys every
  family shares, sizes, RoPE, norms' eps, are read and written once, in `litllm/hf/config.py`);
- `weights`: litllm module path -> the HF tensors it is made of (`HFSource`);
- `presets`: the `presets.yaml` base entry its published sizes inherit from.

Each family lives in its own small module in `litllm/hf/families/`, which `register`s it. The model
(`litllm/model.py`) never sees a HF name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from litllm.config import Config


@dataclass(frozen=True)
class HFSource:
    """The HF tensor(s) one litllm tensor is made of.

    names: one name, or several concatenated along dim 0 into one fused litllm tensor (q/k/v -> `qkv`,
        gate/up -> `fc`).
    layout: set when one fused HF tensor has its q/k/v rows interleaved and they must be reordered into
        litllm's [q heads | k heads | v heads] (`"neox_qkv"`: per head; `"falcon_qkv"`: per kv group);
        `STACKED_EXPERTS`: the checkpoint stores an MoE layer's experts as one bare HF parameter (no `.weight`
        suffix; a bias, if any, is `<name>_bias`), (n_expert, in, out): gpt-oss's and Llama 4's
        `experts.gate_up_proj` / `experts.down_proj`. A litllm template with `{e}` (one Linear per expert,
        Llama 4) is the stack's `[e].T`; one without (gpt-oss's `StackedLinear`) is the stack itself.
    In a family's weight map the names are templates with `{i}` (layer) and `{e}` (expert).
    """

    names: tuple[str, ...]
    layout: Optional[str] = None

    @property
    def concatenated(self) -> bool:
        return len(self.names) > 1

    def fill(self, suffix: str, **values: str) -> "HFSource":
        """The template with its `{i}`/`{e}` filled and the parameter suffix (`weight`/`bias`) appended."""
        if self.layout == STACKED_EXPERTS:  # a bare nn.Parameter: no `.weight`, and no expert in its name
            end = "" if suffix == "weight" else "_" + suffix
            return HFSource(tuple(n.format(i=values.get("i", "")) + end for n in self.names), self.layout)
        return HFSource(tuple(n.format(**values) + "." + suffix for n in self.names), self.layout)


STACKED_EXPERTS = "stacked_experts"
QKV_LAYOUTS = ("neox_qkv", "falcon_qkv")


def one(name: str) -> HFSource:
    return HFSource((name,))


def cat(*names: str) -> HFSource:
    return HFSource(tuple(names))


def interleaved(layout: str, name: str) -> HFSource:
    return HFSource((name,), layout)


def stacked(name: str) -> HFSource:
    """Every expert of a layer in one HF parameter `name` (see `HFSource`)."""
    return HFSource((name,), STACKED_EXPERTS)


WeightMap = dict[str, HFSource]


def _nothing(*args: Any) -> None:
    return None


@dataclass
class Family:
    model_type: str
    """HF `model_type` of the text model (`config.json`)."""
    architecture: str
    """transformers class written to `architectures` on export."""
    flags: dict[str, Any]
    weights: WeightMap
    presets: str = ""
    """The entry in `litllm/presets.yaml` (a `_family` base or a first size) its published sizes start from."""
    tied_by_default: bool = False
    """transformers' default for `tie_word_embeddings` when config.json omits it."""
    read_config: Callable[[dict, dict], None] = _nothing
    """(hf config.json dict, Config values so far): read the family's own keys, quirks and refusals."""
    write_config: Callable[[Config, dict], None] = _nothing
    """(Config, config.json dict so far): write the family's own keys."""
    pick_weights: Optional[Callable[[Config], WeightMap]] = None
    """When the weight names depend on the config (Falcon's norms), the map for this config."""
    stacked_experts: Optional[str] = None
    """transformers' (>= 5) module holding an MoE layer's experts as stacked tensors `gate_up_proj` (E, 2I, C) and
    `down_proj` (E, C, I) *at runtime* (Mixtral, Qwen3-MoE, OLMoE, DeepSeek, GLM-4.5, whose checkpoints store one
    tensor per expert), or (E, in, out) where the checkpoint stores them stacked already (`STACKED_EXPERTS`,
    Llama 4), as a template with `{i}`: where a PEFT export puts the experts' LoRA. None: the experts' LoRA has no
    PEFT form here."""
    wrappers: tuple[str, ...] = field(default=())
    """`model_type`s of multimodal wrappers whose `text_config` is this family (`gemma3` -> `gemma3_text`)."""

    def weight_map(self, config: Config) -> WeightMap:
        return self.pick_weights(config) if self.pick_weights else self.weights


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; returns it, so a module can keep a name for it."""
    FAMILIES[family.model_type] = family
    return family


def llama_like_weights(prefix: str = "model") -> WeightMap:
    """The Llama layout (`model.layers.{i}.self_attn.q_proj`, ...) that most families reuse."""
    layer = prefix + ".layers.{i}"
    return {
        "wte": one(f"{prefix}.embed_tokens"),
        "blocks.{i}.norm_1": one(f"{layer}.input_layernorm"),
        "blocks.{i}.attn.qkv": cat(
            f"{layer}.self_attn.q_proj", f"{layer}.self_attn.k_proj", f"{layer}.self_attn.v_proj"
        ),
        "blocks.{i}.attn.proj": one(f"{layer}.self_attn.o_proj"),
        "blocks.{i}.attn.q_norm": one(f"{layer}.self_attn.q_norm"),
        "blocks.{i}.attn.k_norm": one(f"{layer}.self_attn.k_norm"),
        "blocks.{i}.norm_2": one(f"{layer}.post_attention_layernorm"),
        "blocks.{i}.mlp.fc": cat(f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"),
        "blocks.{i}.mlp.proj": one(f"{layer}.mlp.down_proj"),
        "norm_f": one(f"{prefix}.norm"),
        "lm_head": one("lm_head"),
    }


def period_from_layer_types(layer_types: list[str]) -> Optional[int]:
    """Turn HF's `layer_types` list into litllm's period (layer i global when (i+1) % period == 0)."""
    from litllm.errors import LitLLMError

    if all(t == "sliding_attention" for t in layer_types):
        return None
    period = layer_types.index("full_attention") + 1
    expected = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(layer_types))]
    if expected != list(layer_types):
        raise LitLLMError(f"config.json: unsupported layer_types pattern {layer_types}")
    return period


def layer_types(config: Config) -> list[str]:
    return ["sliding_attention" if config.is_sliding(i) else "full_attention" for i in range(config.n_layer)]


def read_rope_per_layer_type(hf: dict, values: dict, local_default: float) -> None:
    """transformers>=5 `rope_parameters` keyed by layer type: full-attention layers' theta and scaling are
    the model's, sliding layers' theta is `rope_local_base` (they run without scaling)."""
    from litllm.errors import LitLLMError

    rope_params = hf.get("rope_parameters") or {}
    local = rope_params.get("sliding_attention", {}) if isinstance(rope_params, dict) else {}
    full = rope_params.get("full_attention") if isinstance(rope_params, dict) else None
    if full:
        values["rope_base"] = full.get("rope_theta", values["rope_base"])
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        values["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if (local or {}).get("rope_type", "default") != "default":
        raise LitLLMError("config.json: rope_parameters.sliding_attention: only the default rope_type is supported")
    values["rope_local_base"] = (local or {}).get("rope_theta", local_default)


def write_rope_per_layer_type(c: Config, hf: dict) -> None:
    full = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_base}
    local = {"rope_type": "default", "rope_theta": c.rope_local_base or c.rope_base}
    hf.pop("rope_scaling", None)
    hf.pop("rope_theta", None)
    hf["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
