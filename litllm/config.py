"""One `Config` dataclass describes every supported architecture.

Named presets live as data in `presets.yaml` (one entry per model, with an optional
`base:` key to inherit from another entry); this module only knows how to read them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from litllm.errors import LitLLMError

PRESETS_FILE = Path(__file__).with_name("presets.yaml")

# rope_scaling types the model implements (litllm.model.rope_inv_freq) and the keys each one reads
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings", "short_factor", "long_factor"),
}


def check_rope_scaling(scaling: Optional[dict[str, Any]], where: str = "rope_scaling") -> None:
    """Fail now, naming the field, on a rope_scaling the model can't run (rather than at the first forward)."""
    if not scaling:
        return
    if not isinstance(scaling, dict):
        raise LitLLMError(f"{where}: expected a mapping with a rope_type, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        raise LitLLMError(
            f"{where}.rope_type: unsupported {kind!r} (supported: {', '.join(ROPE_SCALING_KEYS)})"
        )
    missing = [k for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is None]
    if missing:
        raise LitLLMError(f"{where}: rope_type {kind!r} needs {', '.join(missing)}")


@dataclass
class Config:
    name: str = ""
    """Preset name (e.g. `Llama-3.2-1B`)."""
    hf_repo: str = ""
    """Hugging Face repo id the preset comes from (`org/name`)."""
    hf_model_type: str = ""
    """HF `model_type` whose weight layout and config.json this model maps to (e.g. `llama`, `gemma2`)."""
    block_size: int = 4096
    """Maximum context length (positions)."""
    vocab_size: int = 50254
    """Tokenizer vocabulary size."""
    padded_vocab_size: Optional[int] = None
    """Rows of the embedding/head; defaults to `vocab_size` rounded up to `padding_multiple`."""
    padding_multiple: int = 512
    n_layer: int = 16
    n_embd: int = 4096
    n_head: int = 32
    n_query_groups: Optional[int] = None
    """Number of key/value heads: `n_head` for MHA, 1 for MQA, in between for GQA."""
    head_size: Optional[int] = None
    """Defaults to `n_embd // n_head`."""
    intermediate_size: Optional[int] = None
    """Hidden size of the MLP; defaults to 4 * n_embd."""

    # --- positions ---
    rotary_percentage: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (Pythia 0.25, Phi-2 0.4)."""
    rope_base: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    """HF-style rope scaling: `{"rope_type": "linear"|"llama3"|"yarn"|"longrope", ...}`."""
    rope_local_base: Optional[float] = None
    """RoPE base of sliding-window layers when it differs (Gemma-3, OLMo-3)."""
    nope_layer_period: Optional[int] = None
    """k: layer i has no positional encoding (NoPE) when (i + 1) % k == 0 (SmolLM3: 4). None: RoPE everywhere."""
    rope_interleaved: bool = False
    """RoPE rotates adjacent pairs of dimensions (2j, 2j+1) (DeepSeek's MLA, Llama 4's complex rotation), not the
    two halves."""
    nope_attn_scale: Optional[float] = None
    """Attention temperature tuning on NoPE layers (Llama 4 `attn_scale`): queries scaled by
    1 + nope_attn_scale * log(1 + floor((position + 1) / nope_floor_scale)). None: off."""
    nope_floor_scale: Optional[int] = None

    # --- attention ---
    attn_bias: bool = False
    """Bias on the query/key/value projections."""
    attn_out_bias: bool = False
    """Bias on the attention output projection."""
    norm_qk: Literal[None, "head", "full", "l2"] = None
    """Normalize queries and keys per head (Qwen3, Gemma-3) or over the whole projection (OLMo-2); "l2": per head
    without a weight, on RoPE layers only (Llama 4 `use_qk_norm`)."""
    attention_scores_scalar: Optional[float] = None
    """Scale scores by 1/sqrt(this) instead of 1/sqrt(head_size) (Gemma-2 `query_pre_attn_scalar`)."""
    attention_multiplier: Optional[float] = None
    """Scale scores by this instead of 1/sqrt(head_size) (Granite `attention_multiplier`)."""
    query_scale_beta: Optional[float] = None
    """Scale queries by 1 + beta * log(1 + floor(position / query_scale_length)) after RoPE: attention sharpens
    with distance beyond the original context (Ministral 3 `llama_4_scaling_beta`)."""
    query_scale_length: Optional[int] = None
    attention_sinks: bool = False
    """A learned logit per query head that joins every softmax's denominator, so a head can attend to nothing
    (gpt-oss `sinks`)."""
    # --- Multi-head Latent Attention (DeepSeek-V2/V3): set kv_lora_rank to use it ---
    kv_lora_rank: Optional[int] = None
    """MLA: keys and values are up-projected from one latent of this size per token, which is all the KV
    cache holds (with the shared rotary key): (kv_lora_rank + qk_rope_head_dim) values per token per layer."""
    q_lora_rank: Optional[int] = None
    """MLA: queries go through a low-rank latent of this size (None: one full query projection, V2-Lite)."""
    qk_rope_head_dim: int = 0
    """MLA: the rotary part of each query/key head (head_size = qk_nope_head_dim + qk_rope_head_dim)."""
    v_head_dim: Optional[int] = None
    """MLA: each value head's size (defaults to head_size)."""
    attention_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window_size: Optional[int] = None
    sliding_window_period: Optional[int] = None
    """None: every layer uses the sliding window. k: layer i is global when (i + 1) % k == 0."""
    attention_chunk_size: Optional[int] = None
    """RoPE layers attend only within chunks of this many positions (Llama 4 chunked local attention)."""

    # --- block layout ---
    norm_class_name: Literal["RMSNorm", "LayerNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    """LayerNorm has a bias (ignored for RMSNorm)."""
    norm_unit_offset: bool = False
    """RMSNorm multiplies by (1 + weight) (Gemma)."""
    pre_norm: bool = True
    """Normalize the block input before attention/MLP (False for OLMo-2's post-norm blocks)."""
    post_attention_norm: bool = False
    post_mlp_norm: bool = False
    parallel_residual: bool = False
    """x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX, Falcon, Phi-2)."""
    shared_attention_norm: bool = False
    """Parallel residual with one norm feeding both branches (Falcon-7B, Phi-2)."""
    residual_multiplier: float = 1.0
    """Scale each branch's output before adding it to the residual stream (Granite)."""

    # --- MLP ---
    mlp_class_name: Literal["GatedMLP", "GeluMLP", "MoE", "Llama4MoE"] = "GeluMLP"
    """GatedMLP: act(gate) * up (SwiGLU/GeGLU); GeluMLP: act(fc); MoE: top-k of GatedMLP experts; Llama4MoE:
    sigmoid top-k that scales the experts' inputs, plus a shared expert."""
    activation: Literal["silu", "gelu", "gelu_tanh"] = "gelu"
    mlp_bias: bool = False
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_normalize_topk: bool = True
    """Renormalise each token's top-k router probabilities to sum to 1 (Mixtral, Qwen3-MoE; not OLMoE)."""
    moe_intermediate_size: Optional[int] = None
    """Hidden size of each expert (defaults to intermediate_size, the dense MLPs' size)."""
    dense_mlp_layers: Optional[list[int]] = None
    """Layers of an MoE model whose MLP is one dense GatedMLP of intermediate_size (Qwen3-MoE `mlp_only_layers`)."""
    router_bias: bool = False
    """Bias on the MoE router (gpt-oss)."""
    swiglu_limit: Optional[float] = None
    """gpt-oss's experts (set: stacked, with biases): gate clamped to <= limit, up to [-limit, limit], and
    (up + 1) * gate * sigmoid(swiglu_alpha * gate) in place of act(gate) * up."""
    swiglu_alpha: float = 1.702
    moe_scoring: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3, GLM-4.5)."""
    moe_correction_bias: bool = False
    """The router adds a per-expert bias to the scores when choosing (not weighting) experts (DeepSeek-V3's
    `e_score_correction_bias`). It is a buffer: finetuning never changes it."""
    n_expert_groups: int = 1
    """Group-limited routing: experts fall into this many groups and a token picks among the experts of its
    `n_topk_groups` best groups only (group score: the best expert's softmax score, or with sigmoid scoring
    the sum of the two best)."""
    n_topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    """Multiply the routed experts' weights by this (DeepSeek `routed_scaling_factor`)."""
    n_shared_expert: int = 0
    """Shared experts every token goes through: one GatedMLP of n_shared_expert * moe_intermediate_size."""
    router_aux_loss_coef: float = 0.0
    """Weight of the router load-balancing loss added to the LM loss while training (the checkpoint's
    `router_aux_loss_coef`; `--train.router_aux_loss_coef` overrides it)."""

    # --- embeddings / head ---
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(n_embd) (Gemma)."""
    embedding_multiplier: float = 1.0
    """Multiply token embeddings by this (Granite)."""
    logits_divisor: float = 1.0
    """Divide the logits by this (Granite `logits_scaling`)."""
    tie_embeddings: bool = False
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise LitLLMError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) when head_size is not set")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise LitLLMError(f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups})")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple
        if self.intermediate_size is None:
            if self.mlp_class_name != "GeluMLP":
                raise LitLLMError(f"{self.mlp_class_name} needs intermediate_size")
            self.intermediate_size = 4 * self.n_embd
        if self.is_moe_model and not (0 < self.n_expert_per_token <= self.n_expert):
            raise LitLLMError("MoE needs 0 < n_expert_per_token <= n_expert")
        if self.n_expert % self.n_expert_groups or not 0 < self.n_topk_groups <= self.n_expert_groups:
            raise LitLLMError(f"n_expert ({self.n_expert}) must split into n_expert_groups ({self.n_expert_groups}) "
                              f"of which n_topk_groups ({self.n_topk_groups}) are chosen")
        if self.kv_lora_rank and self.v_head_dim is None:
            self.v_head_dim = self.head_size
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)

    # ------------------------------------------------------------------ derived
    @property
    def rope_n_elem(self) -> int:
        """How many dimensions of each head RoPE rotates (always even)."""
        if self.kv_lora_rank:  # MLA: the rotary part of the head
            return self.qk_rope_head_dim
        return int(self.rotary_percentage * self.head_size) // 2 * 2

    def kv_cache_values_per_token(self) -> int:
        """Values one token keeps in the KV cache over all layers: keys and values of every kv head, or for
        MLA the latent and the shared rotary key, (kv_lora_rank + qk_rope_head_dim) per layer."""
        if self.kv_lora_rank:
            return self.n_layer * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.n_layer * self.n_query_groups * self.head_size

    @property
    def is_moe_model(self) -> bool:
        return self.mlp_class_name in ("MoE", "Llama4MoE")

    def is_moe(self, layer_idx: int) -> bool:
        return self.is_moe_model and layer_idx not in (self.dense_mlp_layers or ())

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def uses_rope(self, layer_idx: int) -> bool:
        return self.nope_layer_period is None or (layer_idx + 1) % self.nope_layer_period != 0

    def is_chunked(self, layer_idx: int) -> bool:
        return self.attention_chunk_size is not None and self.uses_rope(layer_idx)

    def is_sliding(self, layer_idx: int) -> bool:
        if self.sliding_window_size is None:
            return False
        if self.sliding_window_period is None:
            return True
        return (layer_idx + 1) % self.sliding_window_period != 0

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """Build a preset by name, e.g. `Config.from_name("Llama-3.2-1B", n_layer=2)`."""
        presets = _presets()
        if name not in presets:
            # allow "org/name" and case-insensitive names
            by_lower = {k.lower(): k for k in presets}
            key = by_lower.get(name.split("/")[-1].lower()) or _name_by_repo().get(name.lower())
            if key is None:
                close = difflib.get_close_matches(name.split("/")[-1], list(presets), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise LitLLMError(f"Unknown model name {name!r}.{hint} Run `litllm list_models` for all names.")
            name = key
        values = dict(presets[name])
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise LitLLMError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise LitLLMError(f"{path}: not a readable YAML file, damaged or truncated? ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise LitLLMError(f"{path}: expected a mapping of Config fields")
        values.update(overrides)
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LitLLMError(f"{source}: unknown Config field(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **overrides: Any) -> "Config":
        """Read `model_config.yaml` of a converted folder.

        A Hugging Face folder's `config.json` is read by `litllm.hf.config.config_from_hf` (the hf layer
        sits above this module: `Config` knows nothing of HF names).
        """
        checkpoint_dir = Path(checkpoint_dir)
        if (checkpoint_dir / "model_config.yaml").is_file():
            return cls.from_file(checkpoint_dir / "model_config.yaml", **overrides)
        hint = f"; run `litllm convert_to_litllm {checkpoint_dir}` first" if (checkpoint_dir / "config.json").is_file() else ""
        raise LitLLMError(f"{checkpoint_dir}: no model_config.yaml (not a converted litllm model folder){hint}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        from litllm.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict[str, Any]]:
    """Load `presets.yaml`, resolving `base:` inheritance."""
    with open(PRESETS_FILE, encoding="utf-8") as f:
        raw: dict[str, dict[str, Any]] = yaml.safe_load(f)
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        if name in seen:
            raise LitLLMError(f"{PRESETS_FILE}: cyclic base for {name!r}")
        entry = dict(raw[name])
        base = entry.pop("base", None)
        values = dict(resolve(base, seen + (name,))) if base else {}
        values.pop("name", None)
        values.pop("hf_repo", None)
        values.update(entry)
        values["name"] = name
        resolved[name] = values
        return values

    for name in raw:
        resolve(name)
    return {k: v for k, v in resolved.items() if not k.startswith("_")}  # "_family" entries are bases


@lru_cache(maxsize=1)
def _name_by_repo() -> dict[str, str]:
    return {v["hf_repo"].lower(): k for k, v in _presets().items() if v.get("hf_repo")}
