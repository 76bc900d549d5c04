"""Hugging Face `config.json` <-> litllm `Config`.

The keys every family shares (sizes, RoPE, norm eps, tying, activation) are read and written here,
once; what makes a family what it is (its structural flags, its own keys and quirks) is its `Family`
entry in `litllm/hf/families/<model_type>.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litllm.config import Config, check_rope_scaling
from litllm.errors import LitLLMError
from litllm.hf import families as _builtin_families  # noqa: F401 (registers the built-in families)
from litllm.hf.family import FAMILIES
from litllm.utils import read_json_object

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
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
    wrapped = next((f for f in FAMILIES.values() if model_type in f.wrappers), None)
    if wrapped is not None and "text_config" in hf:  # a multimodal wrapper: its text model only
        text = dict(hf["text_config"])
        if hf.get("tie_word_embeddings") is not None:  # transformers ties a wrapper's head by the wrapper's key
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        # the text model's own type when litllm knows it (Mistral-Small-3.x: `mistral`), else the wrapper's family
        model_type = text.get("model_type") if text.get("model_type") in FAMILIES else wrapped.model_type
        hf = {**text, "model_type": model_type}
    if model_type not in FAMILIES:
        raise LitLLMError(
            f"{source}: unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if hf.get(key) is not None:
                return hf[key]
        return default

    try:
        n_embd = get("hidden_size", "n_embd")
        n_head = get("num_attention_heads", "n_head")
        values: dict[str, Any] = dict(family.flags)
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
            tie_embeddings=get("tie_word_embeddings", default=family.tied_by_default),
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
            if act not in ACTIVATIONS:
                raise LitLLMError(f"{source}: unsupported activation {act!r}")
            values["activation"] = ACTIVATIONS[act]
        family.read_config(hf, values)
        field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        check_rope_scaling(values.get("rope_scaling"), f"{source}: {field}")
    except KeyError as e:
        raise LitLLMError(f"{source}: missing key {e.args[0]!r}") from None
    values.update(overrides)
    return Config(**values)


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
    if model_type not in FAMILIES:
        raise LitLLMError(f"model {config.name!r}: no registered family for hf_model_type {model_type!r}")
    family = FAMILIES[model_type]
    c = config
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
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
        "hidden_act": _ACT_BACK[c.activation],
        "torch_dtype": "float32",
    }
    if c.norm_class_name == "RMSNorm":
        hf["rms_norm_eps"] = c.norm_eps
    else:
        hf["layer_norm_eps"] = c.norm_eps
    family.write_config(c, hf)
    return hf
