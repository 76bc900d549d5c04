"""Hugging Face `config.json` <-> litllm `Config`, per `model_type`.

Field-by-field mapping: what each family's config.json calls a hyper-parameter, the defaults
transformers assumes when a key is absent, and the structural flags that follow from the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litllm.config import Config, check_rope_scaling
from litllm.errors import LitLLMError
from litllm.utils import read_json_object

# Structural flags per HF model_type (everything that is not a size).
_LLAMA = dict(norm_class_name="RMSNorm", mlp_class_name="GatedMLP", activation="silu")
_GEMMA = dict(
    norm_class_name="RMSNorm", mlp_class_name="GatedMLP", activation="gelu_tanh",
    norm_unit_offset=True, scale_embeddings=True,
)
FAMILY_FLAGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": {**_LLAMA, "mlp_class_name": "MoE"},
    "qwen2": {**_LLAMA, "attn_bias": True},
    "qwen3": {**_LLAMA, "norm_qk": "head"},
    "olmo2": {**_LLAMA, "norm_qk": "full", "pre_norm": False, "post_attention_norm": True, "post_mlp_norm": True},
    "phi3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": {**_GEMMA, "post_attention_norm": True, "post_mlp_norm": True, "sliding_window_period": 2},
    "gemma3_text": {
        **_GEMMA, "post_attention_norm": True, "post_mlp_norm": True, "norm_qk": "head",
    },
    "stablelm": dict(norm_class_name="LayerNorm", mlp_class_name="GatedMLP", activation="silu"),
    "gpt_neox": dict(
        norm_class_name="LayerNorm", mlp_class_name="GeluMLP", parallel_residual=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True,
    ),
    "falcon": dict(norm_class_name="LayerNorm", mlp_class_name="GeluMLP", activation="gelu", parallel_residual=True),
    "phi": dict(
        norm_class_name="LayerNorm", mlp_class_name="GeluMLP", activation="gelu_tanh",
        parallel_residual=True, shared_attention_norm=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True,
    ),
}
# transformers' defaults for keys a config.json may omit
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3_text", "falcon"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "stablelm": "StableLmForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM", "phi": "PhiForCausalLM",
}
_ACT = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh"}
_ACT_BACK = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """A config.json (the file, or the folder holding it) as a dict; a clear error if absent or invalid."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise LitLLMError(f"{path}: config.json not found")
    return read_json_object(path)


def config_from_hf(path_or_dict: str | Path | dict[str, Any], **overrides: Any) -> Config:
    """Build a `Config` from a HF config.json (path, folder or parsed dict)."""
    source = "config.json" if isinstance(path_or_dict, dict) else str(path_or_dict)
    hf = path_or_dict if isinstance(path_or_dict, dict) else load_hf_config(path_or_dict)
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in FAMILY_FLAGS:
        raise LitLLMError(
            f"{source}: unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
            f"supported: {', '.join(sorted(FAMILY_FLAGS))}"
        )

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if hf.get(key) is not None:
                return hf[key]
        return default

    try:
        n_embd = get("hidden_size", "n_embd")
        n_head = get("num_attention_heads", "n_head")
        values: dict[str, Any] = dict(FAMILY_FLAGS[model_type])
        values.update(
            hf_model_type=model_type,
            name=hf.get("_name_or_path", "").split("/")[-1],
            vocab_size=hf["vocab_size"],
            padded_vocab_size=hf["vocab_size"],
            n_layer=get("num_hidden_layers", "n_layer"),
            n_embd=n_embd,
            n_head=n_head,
            n_query_groups=get("num_key_value_heads", "num_kv_heads", default=n_head),
            head_size=get("head_dim", default=n_embd // n_head),
            intermediate_size=get("intermediate_size", "ffn_hidden_size"),
            block_size=get("max_position_embeddings", default=2048),
            norm_eps=get("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", default=1e-5),
            tie_embeddings=get("tie_word_embeddings", default=model_type in TIED_BY_DEFAULT),
        )
        rope_params = dict(hf.get("rope_parameters") or {})
        values["rope_base"] = get("rope_theta", "rotary_emb_base", default=rope_params.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
            scaling.setdefault("rope_type", scaling.pop("type", None))
            if scaling["rope_type"] == "longrope":
                scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
                if "factor" not in scaling:
                    scaling["factor"] = values["block_size"] / scaling["original_max_position_embeddings"]
            values["rope_scaling"] = scaling
        values["rotary_percentage"] = get(
            "partial_rotary_factor", "rotary_pct", default=rope_params.get("partial_rotary_factor", 1.0)
        )
        act = get("hidden_act", "hidden_activation")
        if act is not None:
            if act not in _ACT:
                raise LitLLMError(f"{source}: unsupported activation {act!r}")
            values["activation"] = _ACT[act]
        if model_type == "gemma":  # Gemma-1 configs say "gelu" but the reference runs tanh-approximated GeLU
            values["activation"] = "gelu_tanh"
        _family_specifics(model_type, hf, values, get)
        field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        check_rope_scaling(values.get("rope_scaling"), f"{source}: {field}")
    except KeyError as e:
        raise LitLLMError(f"{source}: missing key {e.args[0]!r}") from None
    values.update(overrides)
    return Config(**values)


def _family_specifics(model_type: str, hf: dict, values: dict, get) -> None:
    if model_type in ("mistral", "mixtral", "qwen2", "phi3") and hf.get("sliding_window"):
        if model_type != "qwen2" or hf.get("use_sliding_window"):
            values["sliding_window_size"] = hf["sliding_window"]
    if model_type == "mixtral":
        values.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"])
    if model_type in ("llama", "mistral", "mixtral", "olmo2", "qwen3", "phi3"):
        values["attn_bias"] = bool(hf.get("attention_bias", values.get("attn_bias", False)))
        values["attn_out_bias"] = values["attn_bias"] if model_type != "phi3" else False
        values["mlp_bias"] = bool(hf.get("mlp_bias", False))
    if model_type in ("gemma2", "gemma3_text"):
        values.update(
            attention_scores_scalar=hf.get("query_pre_attn_scalar"),
            attention_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            sliding_window_size=hf.get("sliding_window"),
        )
        if model_type == "gemma3_text":
            values["sliding_window_period"] = hf.get("sliding_window_pattern", 6)
            layer_types = hf.get("layer_types")
            if layer_types:
                values["sliding_window_period"] = _period_from_layer_types(layer_types)
            rope_params = hf.get("rope_parameters") or {}
            local = rope_params.get("sliding_attention", {}) if isinstance(rope_params, dict) else {}
            full = rope_params.get("full_attention") if isinstance(rope_params, dict) else None
            if full:  # transformers>=5 per-layer-type rope parameters
                values["rope_base"] = full.get("rope_theta", values["rope_base"])
                scaling = {k: v for k, v in full.items() if k != "rope_theta"}
                values["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
            values["rope_local_base"] = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        elif hf.get("layer_types"):
            values["sliding_window_period"] = _period_from_layer_types(hf["layer_types"])
    if model_type == "stablelm":
        values["attn_bias"] = bool(hf.get("use_qkv_bias", False))
        values["parallel_residual"] = bool(hf.get("use_parallel_residual", False))
        if hf.get("qk_layernorm"):
            raise LitLLMError("config.json: StableLM with qk_layernorm is not supported")
    if model_type == "gpt_neox":
        values["parallel_residual"] = bool(hf.get("use_parallel_residual", True))
        values["activation"] = _ACT.get(hf.get("hidden_act", "gelu"), "gelu")
        values["attn_bias"] = values["attn_out_bias"] = bool(hf.get("attention_bias", True))
    if model_type == "falcon":
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
    if model_type == "phi":
        if hf.get("qk_layernorm"):
            raise LitLLMError("config.json: Phi with qk_layernorm is not supported")
        values["intermediate_size"] = hf.get("intermediate_size") or 4 * values["n_embd"]


def _period_from_layer_types(layer_types: list[str]) -> int | None:
    """Turn HF's `layer_types` list into litllm's period (layer i global when (i+1) % period == 0)."""
    if all(t == "sliding_attention" for t in layer_types):
        return None
    period = layer_types.index("full_attention") + 1
    expected = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(layer_types))]
    if expected != list(layer_types):
        raise LitLLMError(f"config.json: unsupported layer_types pattern {layer_types}")
    return period


def infer_model_type(config: Config) -> str:
    """The HF model_type a litllm Config exports as (from `hf_model_type`, or Llama when it fits)."""
    if config.hf_model_type:
        return config.hf_model_type
    llama_like = (
        config.norm_class_name == "RMSNorm" and config.mlp_class_name == "GatedMLP" and config.pre_norm
        and not (config.parallel_residual or config.post_attention_norm or config.post_mlp_norm or config.norm_qk
                 or config.scale_embeddings or config.norm_unit_offset or config.attention_logit_softcapping
                 or config.final_logit_softcapping or config.rotary_percentage != 1.0 or config.lm_head_bias)
    )
    if llama_like and config.activation == "silu":
        return "mistral" if config.sliding_window_size else "llama"
    raise LitLLMError(
        f"model {config.name!r} has no hf_model_type and no standard HF architecture matches its structure"
    )


def config_to_hf(config: Config) -> dict[str, Any]:
    """A config.json dict that transformers builds the same model from."""
    model_type = infer_model_type(config)
    c = config
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.padded_vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_query_groups,
        "head_dim": c.head_size,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.block_size,
        "rope_theta": c.rope_base,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": _ACT_BACK[c.activation] if model_type != "phi" else "gelu_new",
        "torch_dtype": "float32",
    }
    if c.norm_class_name == "RMSNorm":
        hf["rms_norm_eps"] = c.norm_eps
    else:
        hf["layer_norm_eps"] = c.norm_eps
    if model_type in ("llama", "mistral", "mixtral", "olmo2", "qwen3"):
        hf["attention_bias"] = c.attn_bias
        hf["mlp_bias"] = c.mlp_bias
    if model_type in ("mistral", "mixtral", "phi3"):
        hf["sliding_window"] = c.sliding_window_size
    if model_type == "qwen2":
        hf["use_sliding_window"] = c.sliding_window_size is not None
        hf["sliding_window"] = c.sliding_window_size
    if model_type == "mixtral":
        hf.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token)
    if model_type in ("gemma", "gemma2", "gemma3_text"):
        hf["hidden_activation"] = hf.pop("hidden_act")
    if model_type in ("gemma2", "gemma3_text"):
        hf.update(
            query_pre_attn_scalar=c.attention_scores_scalar,
            attn_logit_softcapping=c.attention_logit_softcapping,
            final_logit_softcapping=c.final_logit_softcapping,
            sliding_window=c.sliding_window_size,
            layer_types=[
                "sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)
            ],
        )
    if model_type == "gemma3_text":
        hf["rope_local_base_freq"] = c.rope_local_base
        hf["sliding_window_pattern"] = c.sliding_window_period
    if model_type == "stablelm":
        hf.update(use_qkv_bias=c.attn_bias, use_parallel_residual=c.parallel_residual, qk_layernorm=False,
                  partial_rotary_factor=c.rotary_percentage, layer_norm_eps=c.norm_eps)
    if model_type == "phi":
        hf.update(partial_rotary_factor=c.rotary_percentage, qk_layernorm=False)
    if model_type == "phi3":
        if c.rope_scaling and c.rope_scaling.get("rope_type") == "longrope":
            hf["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
        if c.rotary_percentage != 1.0:
            hf["partial_rotary_factor"] = c.rotary_percentage
    if model_type == "gpt_neox":
        hf.update(rotary_pct=c.rotary_percentage, rotary_emb_base=c.rope_base,
                  use_parallel_residual=c.parallel_residual, attention_bias=c.attn_bias)
    if model_type == "falcon":
        del hf["head_dim"]  # FalconConfig derives it and refuses the key
        new_arch = c.n_query_groups not in (1, c.n_head) or not c.shared_attention_norm
        hf.update(
            new_decoder_architecture=new_arch, multi_query=c.n_query_groups == 1, num_kv_heads=c.n_query_groups,
            parallel_attn=c.parallel_residual, bias=c.attn_bias, alibi=False, ffn_hidden_size=c.intermediate_size,
        )
        if new_arch:
            hf["num_ln_in_parallel_attn"] = 1 if c.shared_attention_norm else 2
    return hf
