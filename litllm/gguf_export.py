"""`litllm convert_to_gguf`: a litllm model folder (or a LoRA run's adapter) as a GGUF file for llama.cpp.

The file is written with the `gguf` package (the reader/writer llama.cpp maintains), tensor by tensor:
the header (metadata and every tensor's name, shape and type) is planned from the safetensors header
alone, then each tensor is read, transformed, quantized and appended, so peak memory stays near one
tensor. The output appears atomically (temporary name + rename).

Names go litllm -> HF (`litllm.hf.weights`, split where litllm fuses what HF keeps apart) -> GGUF (the
`gguf` package's own `TensorNameMap`), so no GGUF tensor name is spelled here. What llama.cpp expects
beyond the names, per family (the same transforms as llama.cpp's `convert_hf_to_gguf.py`):
  llama-like     Q and K rows reordered from HF's rotate-half layout to llama.cpp's interleaved pairs
                 (llama, mistral, mixtral, granite, smollm3, ministral3)
  gemma*         RMSNorm weights stored as `1 + w` (HF stores `w` and adds 1 in the forward)
  llama3 rope    a `rope_freqs` tensor of per-frequency factors
  MoE            each layer's experts stacked into one (n_expert, rows, columns) tensor per projection
                 (gpt-oss's stacked `gate_up` split into gate and up and transposed); DeepSeek-style routing
                 (glm4_moe, deepseek*) as keys: gating function, top-k norm and scale, groups, shared experts
  MLA            DeepSeek's kv_b split per head into k_b (transposed) and v_b, one latent KV head

The tokenizer travels as `tokenizer.ggml.*`: a byte-level BPE (`gpt2` in llama.cpp) with the pre-tokenizer
type read from the split regex in tokenizer.json, or a SentencePiece-style BPE with byte fallback (`llama`)
with scores from the merge ranks, so llama.cpp's merge order is the BPE's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from litllm.errors import LitLLMError
from litllm.model_folder import (
    CONFIG_FILE, LORA_WEIGHTS, WEIGHTS_FILE, check_exportable, check_model_folder, lora_weights_file, open_safetensors,
    read_config, read_safetensors, read_tensor,
)
from litllm.utils import atomic_path, check_output_dir, meta_device, read_json_object

# --outtype -> (GGML type of 2-D weights, llama.cpp file type); 1-D tensors (norms, biases) stay F32
OUTTYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# with a 4/5-bit outtype the embedding and output head stay 8-bit (as llama-quantize keeps them higher)
_KEEP_Q8 = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class _Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama graph rotates interleaved pairs, HF rotates halves
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    renormalizes_topk: bool = True  # llama.cpp's MoE graph rescales the top-k expert weights to sum to 1
    output_head: bool = False  # llama.cpp's graph loads `output.weight` only, never the tied embedding
    yarn: bool = False  # plain YaRN (HF's default attention factor, betas, truncation) on full-attention layers
    untruncated_yarn: bool = False  # YaRN's truncate false runs truncated, as llama.cpp's own converter writes it
    yarn_keys: bool = False  # the graph reads YaRN's betas and mscale_all_dim (as the log multiplier, with mscale 1)
    mla_yarn: bool = False  # DeepSeek's YaRN, whose mscale_all_dim also scales the softmax (the log multiplier x 0.1)
    routed_moe: bool = False  # DeepSeek-V3's routing as keys: gating, top-k norm and scale, groups, shared experts


# HF model_type -> how llama.cpp runs it
FAMILIES = {
    "llama": _Family("LLAMA", permute_qk=True),
    "mistral": _Family("LLAMA", permute_qk=True),
    "mixtral": _Family("LLAMA", permute_qk=True),
    "qwen2": _Family("QWEN2"),
    "qwen3": _Family("QWEN3"),
    "gemma": _Family("GEMMA", norm_offset=1.0),
    "gemma2": _Family("GEMMA2", norm_offset=1.0),
    "gemma3_text": _Family("GEMMA3", norm_offset=1.0),
    "phi3": _Family("PHI3"),
    "qwen3_moe": _Family("QWEN3MOE"),
    "olmoe": _Family("OLMOE", renormalizes_topk=False, output_head=True),
    "granite": _Family("GRANITE", permute_qk=True),
    "smollm3": _Family("SMOLLM3", permute_qk=True),
    "olmo2": _Family("OLMO2", output_head=True),
    # llama.cpp runs OLMo 3 as olmo2 with sliding layers, which rope without YaRN as HF's OLMo 3 does
    "olmo3": _Family("OLMO2", output_head=True, yarn=True),
    "glm4_moe": _Family("GLM4_MOE", routed_moe=True),
    "gpt_oss": _Family("GPT_OSS", output_head=True, yarn=True, untruncated_yarn=True),
    "llama4_text": _Family("LLAMA4"),
    "ministral3": _Family("MISTRAL3", permute_qk=True, yarn=True, yarn_keys=True),
    # MLA: llama.cpp's converter splits kv_b into k_b and v_b (its absorbed, latent-cache attention)
    "deepseek_v3": _Family("DEEPSEEK2", yarn=True, mla_yarn=True, routed_moe=True),
    "deepseek_v2": _Family("DEEPSEEK2", yarn=True, mla_yarn=True, routed_moe=True),
    "kimi_k2": _Family("DEEPSEEK2", yarn=True, mla_yarn=True, routed_moe=True),
}
# YaRN keys llama.cpp has no GGUF form for here: it derives the attention factor and uses betas 32 and 1
_YARN_DEFAULTS = {"attention_factor": None, "mscale": None, "mscale_all_dim": None, "beta_fast": 32, "beta_slow": 1,
                  "truncate": True}
# llama.cpp's smollm3 graph skips rope in every 4th layer, a constant no GGUF key changes
_SMOLLM3_NOPE_PERIOD = 4


_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def convert_to_gguf(
    checkpoint_dir: Path,
    out_file: Path,
    outtype: str = "f16",
    adapter_only: bool = False,
    pretrained_checkpoint_dir: Optional[Path] = None,
) -> None:
    """Export a litllm model folder as one GGUF file for llama.cpp, Ollama and LM Studio.

    The file carries the weights, the hyper-parameters, the tokenizer (`tokenizer.ggml.*`) and the
    chat template. For k-quants (Q4_K_M, ...) export `f16` and run llama.cpp's `llama-quantize`.

    Args:
        checkpoint_dir: A litllm model folder (`lit_model.safetensors` + `model_config.yaml` + tokenizer
            files), e.g. a converted download or the `final/` folder of a full finetune or a merged LoRA;
            with `--adapter_only`, a LoRA run's folder (`lit_lora.safetensors` + `hyperparameters.yaml`).
        out_file: The `.gguf` file to write (replaced atomically if it exists).
        outtype: Weight type: `f32`, `f16`, `bf16`, `q8_0`, `q5_1`, `q5_0`, `q4_1` or `q4_0`
            (1-D tensors stay f32; a matrix whose rows don't fill whole blocks is written f16).
        adapter_only: Write only the LoRA adapter, as a GGUF LoRA that llama.cpp applies over the base
            model's GGUF (`llama-cli -m base.gguf --lora adapter.gguf`).
        pretrained_checkpoint_dir: With `--adapter_only`: the base model folder, if it moved since training
            (default: the `checkpoint_dir` recorded in `hyperparameters.yaml`).
    """
    try:
        import gguf
    except ImportError:
        raise LitLLMError("convert_to_gguf needs the gguf package: pip install 'litllm[gguf]'") from None
    if outtype not in OUTTYPES:
        raise LitLLMError(f"--outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise LitLLMError(f"{out_file}: is a folder; expected the path of the .gguf file to write")
    check_output_dir(out_file.parent, "out_file")
    if adapter_only:
        writer, plan = _plan_adapter(Path(checkpoint_dir), pretrained_checkpoint_dir, outtype)
    else:
        folder = check_model_folder(checkpoint_dir)
        check_exportable(folder, "GGUF")
        writer, plan = _plan_model(folder, outtype)
    _write(writer, plan, out_file)
    size = out_file.stat().st_size
    print(f"Wrote {out_file} ({gguf.GGUFWriter.format_n_bytes_to_str(size)}, {len(plan)} tensors, {outtype})")


# ---------------------------------------------------------------------- the plan: one entry per GGUF tensor
@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]  # reads and transforms the data (float32 or any float dtype)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        import gguf

        self.nbytes = math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    def data(self):
        """The tensor as the bytes the file stores (a numpy array)."""
        import gguf
        import numpy as np

        array = self.make().to(torch.float32).numpy()
        q = gguf.GGMLQuantizationType
        if self.qtype == q.F32:
            return np.ascontiguousarray(array, dtype=np.float32)
        if self.qtype == q.F16:
            return np.ascontiguousarray(array, dtype=np.float16)
        return gguf.quants.quantize(array, self.qtype)


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is written in: 1-D stays F32; a block type needs whole blocks per row."""
    import gguf

    q = gguf.GGMLQuantizationType
    # the MoE router and every bias (gpt-oss's experts' are 2-D) stay f32, as llama.cpp's converter keeps them
    if len(shape) == 1 or name == "rope_freqs.weight" or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return q.F32
    qtype = q[OUTTYPES[outtype][0]]
    if qtype not in (q.F32, q.F16, q.BF16):
        if name in _KEEP_Q8:
            qtype = q.Q8_0
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = q.F16
    return qtype


def _family(config, model_type: str) -> _Family:
    if model_type not in FAMILIES:
        raise LitLLMError(
            f"model {config.name!r} ({model_type}): no GGUF export for this family yet "
            f"(exported: {', '.join(sorted(FAMILIES))})"
        )
    family = FAMILIES[model_type]
    if model_type == "smollm3" and config.nope_layer_period != _SMOLLM3_NOPE_PERIOD:
        raise LitLLMError(f"{CONFIG_FILE}: nope_layer_period {config.nope_layer_period}; llama.cpp's smollm3 graph "
                          f"skips rope in every {_SMOLLM3_NOPE_PERIOD}th layer")
    if family.output_head and config.tie_embeddings:
        raise LitLLMError(f"{CONFIG_FILE}: tie_embeddings true; llama.cpp's {family.arch.lower()} graph needs its own "
                          "output head")
    if config.mlp_class_name == "MoE":
        _check_moe(config, model_type, family)
    scaling = (config.rope_scaling or {}).get("rope_type", "default")
    allowed = {"default", "linear"} | ({"llama3"} if family.arch in ("LLAMA", "LLAMA4") else set()) | (
        {"yarn"} if family.yarn else set())
    if scaling not in allowed:
        raise LitLLMError(
            f"{CONFIG_FILE}: rope_scaling {scaling!r} has no GGUF export yet for {model_type} "
            f"(exported: {', '.join(sorted(allowed))})"
        )
    if scaling == "yarn":
        _check_yarn(config.rope_scaling, family)
    if model_type in _FAMILY_CHECKS:
        _FAMILY_CHECKS[model_type](config)
    if family.arch == "OLMO2" and config.sliding_window_size:
        _check_olmo2_sliding(config)
    scalar = config.attention_scores_scalar
    # llama.cpp scales Gemma's scores by 1/sqrt(head_size), or by 1/sqrt(n_embd/n_head) in the 27B models,
    # which it recognizes by their layer count
    layout_27b = scalar == config.n_embd / config.n_head and config.n_layer == _GEMMA_27B_LAYERS.get(model_type)
    if model_type in _GEMMA_27B_LAYERS and scalar not in (None, config.head_size) and not layout_27b:
        raise LitLLMError(
            f"{CONFIG_FILE}: attention_scores_scalar {config.attention_scores_scalar} differs from head_size "
            f"{config.head_size}; llama.cpp's {model_type} graph can't scale attention scores by it"
        )
    return family


def _check_yarn(scaling: dict, family: _Family) -> None:
    written = set()
    if family.mla_yarn:
        written = {"mscale", "mscale_all_dim"}
        if not scaling.get("mscale_all_dim") or scaling.get("mscale") != scaling["mscale_all_dim"]:
            raise LitLLMError(f"{CONFIG_FILE}: rope_scaling mscale {scaling.get('mscale')} and mscale_all_dim "
                              f"{scaling.get('mscale_all_dim')}; llama.cpp's deepseek2 graph needs them set and equal")
    if family.yarn_keys:
        written = {"beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
        if scaling.get("mscale") and scaling.get("mscale_all_dim") and scaling["mscale"] != 1:
            raise LitLLMError(f"{CONFIG_FILE}: rope_scaling mscale {scaling['mscale']}; llama.cpp's "
                              f"{family.arch.lower()} graph takes mscale 1 beside mscale_all_dim")
    for key, default in _YARN_DEFAULTS.items():
        if key in written:
            continue
        if key == "truncate" and family.untruncated_yarn and scaling.get(key) is False:
            print(f"note: rope_scaling truncate false: llama.cpp ropes YaRN with its correction range truncated (as "
                  f"in the files its own converter writes), so its {family.arch.lower()} logits drift from litllm's "
                  "(and transformers') with the position")
        elif scaling.get(key) is not None and scaling[key] != default:
            raise LitLLMError(f"{CONFIG_FILE}: rope_scaling {key} {scaling[key]}; the GGUF export writes YaRN with "
                              f"{key} {default} only")


def _check_gpt_oss(config) -> None:
    """llama.cpp's gpt-oss graph hard-codes gpt-oss's clamped SwiGLU constants."""
    for key, value in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
        if getattr(config, key) != value:
            raise LitLLMError(f"{CONFIG_FILE}: {key} {getattr(config, key)}; llama.cpp's gpt-oss graph uses {value}")


def _check_olmo2_sliding(config) -> None:
    """llama.cpp's olmo2 graph slides in the first n - 1 layers of every n and ropes them with the base theta."""
    period = config.sliding_window_period
    if not period or any(config.is_sliding(i) != (i % period < period - 1) for i in range(config.n_layer)):
        raise LitLLMError(f"{CONFIG_FILE}: sliding_window_period {period}; llama.cpp's olmo2 graph needs n - 1 "
                          "sliding layers then one full layer, repeated")


def _check_moe(config, model_type: str, family: _Family) -> None:
    """What llama.cpp's MoE graphs can't run: dense layers among MoE ones, another top-k weighting, and
    (OLMoE) a K-norm over fewer rows than Q's."""
    arch = family.arch.lower()
    if family.routed_moe:
        _check_routed_moe(config, arch)
        return
    if config.moe_normalize_topk != family.renormalizes_topk:
        does = "renormalizes" if family.renormalizes_topk else "does not renormalize"
        raise LitLLMError(f"{CONFIG_FILE}: moe_normalize_topk {str(config.moe_normalize_topk).lower()}; "
                          f"llama.cpp's {arch} graph {does} the top-k expert weights")
    if config.dense_mlp_layers:
        raise LitLLMError(f"{CONFIG_FILE}: dense_mlp_layers {config.dense_mlp_layers}; llama.cpp's {arch} graph "
                          "runs every layer as MoE")
    if model_type == "olmoe" and config.n_query_groups != config.n_head:
        raise LitLLMError(f"{CONFIG_FILE}: n_query_groups {config.n_query_groups} differs from n_head {config.n_head}; "
                          "llama.cpp's olmoe graph norms K over n_embd rows")


def _check_ministral3(config) -> None:
    """llama.cpp's mistral3 graph scales queries by position in steps of YaRN's original context."""
    if config.query_scale_beta is None:
        return
    original = (config.rope_scaling or {}).get("original_max_position_embeddings")
    if config.query_scale_length != original:
        raise LitLLMError(f"{CONFIG_FILE}: query_scale_length {config.query_scale_length}; llama.cpp's mistral3 graph "
                          f"steps the query scale every rope_scaling original_max_position_embeddings ({original})")


def _check_mla(config) -> None:
    if not config.rope_interleaved:
        raise LitLLMError(f"{CONFIG_FILE}: rope_interleaved false; llama.cpp's deepseek2 graph ropes interleaved pairs")


def _check_llama4(config) -> None:
    """llama.cpp's llama4 graph hard-codes the released models' NoPE period, chunk, temperature tuning and qk-norm
    (on unless 128 experts), and runs MoE in every `step`-th layer."""
    fixed = {"nope_layer_period": 4, "attention_chunk_size": 8192, "nope_floor_scale": 8192, "nope_attn_scale": 0.1,
             "norm_qk": None if config.n_expert == 128 else "l2"}
    for key, value in fixed.items():
        if getattr(config, key) != value:
            raise LitLLMError(f"{CONFIG_FILE}: {key} {getattr(config, key)}; llama.cpp's llama4 graph uses {value} "
                              f"(with {config.n_expert} experts)")
    step = _llama4_moe_step(config)
    if [config.is_moe(i) for i in range(config.n_layer)] != [(i + 1) % step == 0 for i in range(config.n_layer)]:
        raise LitLLMError(f"{CONFIG_FILE}: dense_mlp_layers {config.dense_mlp_layers}; llama.cpp's llama4 graph runs "
                          "MoE in every k-th layer")


def _llama4_moe_step(config) -> int:
    return next((i + 1 for i in range(config.n_layer) if config.is_moe(i)), 1)


# per-family refusals beyond the shared ones (HF model_type -> check(config))
_FAMILY_CHECKS = {"gpt_oss": _check_gpt_oss, "llama4_text": _check_llama4, "ministral3": _check_ministral3,
                  "deepseek_v3": _check_mla, "deepseek_v2": _check_mla, "kimi_k2": _check_mla}


def _check_routed_moe(config, arch: str) -> None:
    """llama.cpp's DeepSeek-style routing: dense layers first only; a group scored by its two best experts."""
    leading = len(config.dense_mlp_layers or [])
    if list(config.dense_mlp_layers or []) != list(range(leading)):
        raise LitLLMError(f"{CONFIG_FILE}: dense_mlp_layers {config.dense_mlp_layers}; llama.cpp's {arch} graph runs "
                          "dense MLPs in the first layers only")
    if _limits_groups(config) and config.moe_scoring != "sigmoid":
        raise LitLLMError(f"{CONFIG_FILE}: moe_scoring {config.moe_scoring!r} with n_expert_groups "
                          f"{config.n_expert_groups}; llama.cpp's {arch} graph scores a group by its two best experts")


def _limits_groups(config) -> bool:
    """Whether group-limited routing changes anything (some groups left out)."""
    return config.n_topk_groups < config.n_expert_groups


# what one GGUF tensor takes of a litllm tensor (the whole of it, some rows, a transposed half...)
Select = Callable[[torch.Tensor], torch.Tensor]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _rows(start: int, rows: int) -> Select:
    return lambda tensor: tensor[start: start + rows]


def _first_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[: tensor.shape[0] // 2]


def _second_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[tensor.shape[0] // 2:]


def _stacked_parts(hf_name: str, one_expert: bool) -> list[tuple[str, Select]]:
    """Experts the HF checkpoint stacks (`gate_up_proj` (E, C, 2I), `down_proj` (E, I, C)) as llama.cpp names them:
    gate_proj, up_proj and down_proj per projection. Llama 4 (`one_expert`): litllm's tensor is one expert's, (2I, C)
    rows [gate | up] or (C, I), stacked again by the caller; gpt-oss: litllm keeps HF's stack, whose gate and up
    columns interleave (llama.cpp's `GptOssModel.modify_tensors`), -> (E, I, C) and (E, C, I)."""
    is_bias = hf_name.endswith("_bias")
    base = hf_name.removesuffix("_bias")
    if not base.endswith("gate_up_proj"):
        if is_bias:
            return [(base + ".bias", _whole)]
        return [(base + ".weight", _whole if one_expert else lambda t: t.transpose(-1, -2))]
    stem = base.removesuffix("gate_up_proj")
    if one_expert:
        return [(stem + "gate_proj.weight", _first_half), (stem + "up_proj.weight", _second_half)]
    if is_bias:  # (E, 2I)
        return [(stem + "gate_proj.bias", lambda t: t[..., 0::2]), (stem + "up_proj.bias", lambda t: t[..., 1::2])]
    return [(stem + "gate_proj.weight", lambda t: t.transpose(-1, -2)[:, 0::2]),
            (stem + "up_proj.weight", lambda t: t.transpose(-1, -2)[:, 1::2])]


def _mla_parts(hf_name: str, config) -> list[tuple[str, Select]]:
    """MLA's kv_b (n_head * (nope + v), kv_lora_rank) as llama.cpp's k_b (n_head, kv_lora_rank, nope) and v_b
    (n_head, v, kv_lora_rank), the latent absorbed into the queries and the output (llama.cpp's
    `DeepseekV2Model.modify_tensors`)."""
    nope = config.head_size - config.qk_rope_head_dim

    def heads(tensor: torch.Tensor) -> torch.Tensor:  # (n_head, nope + v, kv_lora_rank)
        return tensor.reshape(config.n_head, nope + config.v_head_dim, tensor.shape[-1])

    stem = hf_name.removesuffix("kv_b_proj.weight")
    return [(stem + "k_b_proj.weight", lambda t: heads(t)[:, :nope].transpose(1, 2)),
            (stem + "v_b_proj.weight", lambda t: heads(t)[:, nope:])]


def _gguf_names(config, family: _Family):
    """litllm parameter name -> [(GGUF name, what it takes of the tensor)], via HF's names and gguf's TensorNameMap."""
    import gguf

    from litllm.hf.config import infer_model_type
    from litllm.hf.family import STACKED_EXPERTS
    from litllm.hf.weights import expert_index, hf_sources, split_sizes, weight_map

    mapping = weight_map(config, infer_model_type(config))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.n_layer)

    def gguf_name(hf_name: str) -> str:
        # a MoE layer's experts are one stacked GGUF tensor per projection: look up the expert-less name
        key = re.sub(r"\.experts\.\d+\.", ".experts.", hf_name).replace("_correction_bias", "_correction.bias")
        if key.endswith(".sinks"):  # llama.cpp's converter names gpt-oss's sinks `sinks.weight`
            key += ".weight"
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LitLLMError(f"{hf_name}: no GGUF tensor name for it in llama.cpp's {family.arch.lower()} layout")
        return name

    def parts(lit_name: str) -> list[tuple[str, Select]]:
        source = hf_sources(lit_name, mapping)
        if source.layout == STACKED_EXPERTS:
            one_expert = expert_index(lit_name) is not None
            return [(gguf_name(name), select) for name, select in _stacked_parts(source.names[0], one_expert)]
        if source.layout is not None:
            raise LitLLMError(f"{lit_name}: interleaved fused layouts have no GGUF export")
        if source.names[0].endswith("kv_b_proj.weight"):
            return [(gguf_name(name), select) for name, select in _mla_parts(source.names[0], config)]
        if not source.concatenated:
            return [(gguf_name(source.names[0]), _whole)]
        sizes, start, out = split_sizes(lit_name, config, len(source.names)), 0, []
        for hf_name, rows in zip(source.names, sizes):
            out.append((gguf_name(hf_name), _rows(start, rows)))
            start += rows
        return out

    return parts


def _reorder_qk(gguf_name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs (llama.cpp's `LlamaModel.permute`)."""
    if ".attn_q." in gguf_name:
        heads = config.n_head
    elif ".attn_k." in gguf_name:
        heads = config.n_query_groups
    else:
        return tensor
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *rest).swapaxes(1, 2).reshape(tensor.shape)


def _plan_model(folder: Path, outtype: str):
    """The GGUF writer with every key set, and the tensors to write (none read yet)."""
    import gguf

    from litllm.hf.config import infer_model_type

    config = read_config(folder)
    family = _family(config, infer_model_type(config))
    n_vocab = config.padded_vocab_size
    vocab = read_vocab(folder, n_vocab)  # a tokenizer llama.cpp can't reproduce fails before any write
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    _write_hparams(writer, config, family, outtype)
    vocab.add_to(writer)
    parts = _gguf_names(config, family)
    weights = folder / WEIGHTS_FILE
    lit = open_safetensors(weights)
    # GGUF name -> what it takes of which litllm tensors (several: one per MoE expert, stacked)
    sources: dict[str, list[tuple[str, Select]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for lit_name in lit.keys():
        meta = torch.empty(lit.get_slice(lit_name).get_shape(), device="meta")
        for name, select in parts(lit_name):
            sources.setdefault(name, []).append((lit_name, select))
            shapes[name] = tuple(select(meta).shape)

    def part(name: str, lit_name: str, select: Select) -> torch.Tensor:
        tensor = select(read_tensor(weights, lit_name))
        if family.permute_qk:
            tensor = _reorder_qk(name, tensor, config)
        if family.norm_offset and "norm.weight" in name:
            tensor = tensor.float() + family.norm_offset
        return tensor

    plan: list[_Tensor] = []
    for name, pieces in sources.items():
        pieces.sort(key=lambda p: _expert_index(p[0]))
        shape = shapes[name]
        if len(pieces) > 1:  # (n_expert, rows, columns)
            shape = (len(pieces), *shape)

        def make(name=name, pieces=pieces) -> torch.Tensor:
            tensors = [part(name, lit_name, select) for lit_name, select in pieces]
            return torch.stack(tensors) if len(tensors) > 1 else tensors[0]

        plan.append(_Tensor(name, shape, _tensor_type(name, shape, outtype), make))
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        factors = _llama3_rope_factors(config)
        plan.append(_Tensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors))
    if config.sliding_window_size and family.arch in ("LLAMA", "QWEN2", "PHI3", "MISTRAL3"):
        print(f"note: llama.cpp's {family.arch.lower()} graph attends to the whole context, not a sliding window of "
              f"{config.sliding_window_size}: outputs agree with litllm's up to that many tokens")
    return writer, plan


def _expert_index(lit_name: str) -> int:
    match = re.search(r"\.experts\.(\d+)\.", lit_name)
    return int(match.group(1)) if match else -1


def _write_hparams(writer, config, family: _Family, outtype: str) -> None:
    """The `{arch}.*` and `general.*` keys llama.cpp reads for this family."""
    import gguf

    writer.add_name(config.name or "litllm model")
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    if config.kv_lora_rank:
        _write_mla(writer, config)
    else:
        writer.add_head_count_kv(config.n_query_groups)
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_rope_dimension_count(config.rope_n_elem)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.padded_vocab_size)
    if config.is_moe_model:
        writer.add_expert_count(config.n_expert)
        writer.add_expert_used_count(config.n_expert_per_token)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size or config.intermediate_size)
    if family.routed_moe:
        _write_routed_moe(writer, config)
    if family.arch == "LLAMA4":
        writer.add_interleave_moe_layer_step(_llama4_moe_step(config))
        writer.add_sliding_window_pattern([config.is_chunked(i) for i in range(config.n_layer)])
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "yarn":
        _write_yarn(writer, scaling, family)
    if config.query_scale_beta is not None:
        writer.add_attn_temperature_scale(config.query_scale_beta)
    if family.arch == "GRANITE":
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_attention_scale(config.attention_multiplier or config.head_size**-0.5)
        writer.add_logit_scale(config.logits_divisor)  # llama.cpp divides the logits by it
    if config.attention_logit_softcapping:
        writer.add_attn_logit_softcapping(config.attention_logit_softcapping)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.sliding_window_size and family.arch in ("OLMO2", "GEMMA2", "GEMMA3", "GPT_OSS"):
        _write_sliding_window(writer, config, family)


def _write_mla(writer, config) -> None:
    """llama.cpp runs MLA as one shared latent head: keys (kv_lora_rank + rope) and values (kv_lora_rank) per token,
    decompressed to n_head heads of head_size / v_head_dim."""
    writer.add_head_count_kv(1)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.head_size)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_q_lora_rank(config.q_lora_rank or 0)


def _write_yarn(writer, scaling: dict, family: _Family) -> None:
    import gguf

    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if family.mla_yarn and scaling.get("mscale_all_dim"):  # llama.cpp divides it by 0.1 again
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])
    if family.yarn_keys:
        writer.add_rope_scaling_yarn_beta_fast(scaling.get("beta_fast") or 32.0)
        writer.add_rope_scaling_yarn_beta_slow(scaling.get("beta_slow") or 1.0)
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):  # else transformers' default attention factor
            writer.add_rope_scaling_yarn_log_mul(scaling["mscale_all_dim"])


def _write_sliding_window(writer, config, family: _Family) -> None:
    writer.add_sliding_window(config.sliding_window_size)
    if family.arch == "OLMO2":
        writer.add_sliding_window_pattern(config.sliding_window_period)
    else:  # which layers slide, one flag per layer (llama.cpp reads this before its per-family default)
        writer.add_sliding_window_pattern([config.is_sliding(i) for i in range(config.n_layer)])
    if config.rope_local_base is not None:
        writer.add_rope_freq_base_swa(config.rope_local_base)


def _write_routed_moe(writer, config) -> None:
    import gguf

    writer.add_leading_dense_block_count(len(config.dense_mlp_layers or []))
    writer.add_expert_shared_count(config.n_shared_expert)
    writer.add_expert_weights_norm(config.moe_normalize_topk)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType[config.moe_scoring.upper()])
    if _limits_groups(config):  # (llama.cpp asserts fewer groups used than there are)
        writer.add_expert_group_count(config.n_expert_groups)
        writer.add_expert_group_used_count(config.n_topk_groups)


def _llama3_rope_factors(config) -> torch.Tensor:
    """Llama 3.1's per-frequency rope factors, as the `rope_freqs` tensor llama.cpp divides frequencies by."""
    s = config.rope_scaling
    dim = config.rope_n_elem
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ---------------------------------------------------------------------- writing
def _write(writer, plan: list[_Tensor], out_file: Path) -> None:
    """Header, metadata and tensor table first, then each tensor's data as it is made."""
    import numpy as np
    from tqdm import tqdm

    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    with atomic_path(out_file) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc="convert_to_gguf", unit="tensor"):
            writer.write_tensor_data(t.data())
        writer.close()


# ---------------------------------------------------------------------- the tokenizer
# the pre-tokenizer split regexes llama.cpp implements (llama-vocab.cpp), as tokenizer.json writes them,
# and the `tokenizer.ggml.pre` name that selects each one
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_REGEXES = {
    _GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # o200k (gpt-oss), as llama.cpp quotes it from tokenizer.json
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
    # Mistral's Tekken (Mistral Nemo, Ministral), as llama.cpp quotes it from tokenizer.json
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
    # DeepSeek-V3's three splits in a row: digits, CJK runs, then words and punctuation
    (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
     r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|"
     r"\s*[\r\n]+|\s+(?!\S)|\s+"): "deepseek-v3",
}


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp's `tokenizer.ggml.*` keys hold it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    add_space_prefix: Optional[bool]
    chat_template: Optional[str]

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _split_regexes(pre_tokenizer: Optional[dict], path: Path) -> tuple[str, ...]:
    """The split regexes a byte-level pre-tokenizer applies in turn (ByteLevel's own is GPT-2's), with carriage
    returns and newlines spelled as regex escapes (tokenizer.json has either)."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer["type"] == "Sequence" else [
        pre_tokenizer] if pre_tokenizer else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return (_GPT2_REGEX,)
    splits, last = steps[:-1], steps[-1] if steps else {}
    if (splits and kinds == ["Split"] * len(splits) + ["ByteLevel"] and not last.get("use_regex", True)
            and not last.get("add_prefix_space")
            and all(s.get("behavior") == "Isolated" and not s.get("invert") and "Regex" in s.get("pattern", {})
                    for s in splits)):
        return tuple(s["pattern"]["Regex"].replace("\r", r"\r").replace("\n", r"\n") for s in splits)
    raise LitLLMError(
        f"{path}: pre_tokenizer {kinds or None} is not one llama.cpp reproduces "
        "(expected ByteLevel, or Split regexes followed by ByteLevel without its own regex)"
    )


def _space_prefix(tokenizer: dict, path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends '▁' (llama.cpp's add_space_prefix)."""
    normalizer, pre = tokenizer.get("normalizer"), tokenizer.get("pre_tokenizer")
    steps = normalizer.get("normalizers", []) if normalizer and normalizer["type"] == "Sequence" else (
        [normalizer] if normalizer else [])
    simple = [(s["type"], s.get("prepend") or s.get("content")) for s in steps]
    if pre and pre["type"] == "Split" and pre.get("pattern") == {"String": " "} and simple and simple[-1] == ("Replace", "▁"):
        pre = None  # Gemma's: a split on spaces the normalizer has already replaced does nothing
    if pre is None and simple == [("Prepend", "▁"), ("Replace", "▁")]:
        return True
    if pre is None and simple == [("Replace", "▁")]:
        return False
    if not steps and pre and pre["type"] == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split"):
        return pre.get("prepend_scheme", "always") in ("first", "always")
    raise LitLLMError(
        f"{path}: normalizer {[s[0] for s in simple] or None} with pre_tokenizer {pre and pre['type']} is not a "
        "SentencePiece layout llama.cpp reproduces (expected spaces replaced by '▁', optionally one prepended)"
    )


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """A model folder's tokenizer.json as `tokenizer.ggml.*` data, or one clear error if llama.cpp can't run it."""
    import gguf

    from litllm.tokenizer import Tokenizer

    path = Path(folder) / "tokenizer.json"
    litllm_tokenizer = Tokenizer(folder)  # a missing or unreadable tokenizer.json fails here, clearly
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise LitLLMError(f"{path}: a {model.get('type')} tokenizer; llama.cpp export supports BPE tokenizers only")
    if tokenizer.get("normalizer") and model.get("byte_fallback") is not True and tokenizer["normalizer"]["type"] != "NFC":
        raise LitLLMError(f"{path}: normalizer {tokenizer['normalizer']['type']} is not one llama.cpp applies")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values(), default=-1) >= n_vocab:
        raise LitLLMError(f"{path}: token ids reach {max(vocab.values())} but the model has {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    T = gguf.TokenType
    types = [T.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = T.NORMAL
        if text in added:
            types[i] = T.CONTROL if added[text].get("special") else T.USER_DEFINED
    special_ids = {k: v for k, v in (("bos", litllm_tokenizer.bos_id), ("eos", litllm_tokenizer.eos_id),
                                     ("pad", litllm_tokenizer.pad_id)) if v is not None}
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        special_ids["unk"] = vocab[unk]
    if model.get("byte_fallback"):
        add_space_prefix, scores = _space_prefix(tokenizer, path), _merge_scores(tokens, merges)
        for i, text in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = T.BYTE
        if "unk" in special_ids:
            types[special_ids["unk"]] = T.UNKNOWN
        kind, pre, merges = "llama", "default", []
    else:
        regexes = _split_regexes(tokenizer.get("pre_tokenizer"), path)
        key = regexes[0] if len(regexes) == 1 else regexes
        if key not in PRE_TOKENIZER_REGEXES:
            raise LitLLMError(f"{path}: the pre-tokenizer's split regex {key!r} is not one llama.cpp implements")
        kind, pre, scores, add_space_prefix = "gpt2", PRE_TOKENIZER_REGEXES[key], None, None
    return GGUFVocab(
        model=kind, pre=pre, tokens=tokens, types=[int(t) for t in types], scores=scores, merges=merges,
        special_ids=special_ids, add_bos=litllm_tokenizer.add_bos, add_eos=litllm_tokenizer.add_eos,
        add_space_prefix=add_space_prefix, chat_template=_chat_template(folder),
    )


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp's highest-score-first merging follow the BPE merge ranks:
    the token made by merge k scores -k; pieces no merge makes (characters, bytes, specials) score -1e9."""
    rank: dict[str, int] = {}
    for k, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), k)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e9) for t in tokens]


def _chat_template(folder: Path) -> Optional[str]:
    """The Jinja chat template (tokenizer_config.json's, or chat_template.jinja)."""
    template = read_json_object(Path(folder) / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        return template
    jinja = Path(folder) / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


# ---------------------------------------------------------------------- a LoRA adapter
def _plan_adapter(folder: Path, base_dir: Optional[Path], outtype: str):
    """A GGUF LoRA: `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r) with the adapter's alpha.

    llama.cpp scales each update by alpha / rank, the rank read from the tensor; a fused GGUF tensor
    (Phi-3's attn_qkv) adapted on several parts gets a block LoRA of rank n * r, so its B carries a
    factor n to keep each part's alpha / r.
    """
    import gguf

    from litllm.hf.config import infer_model_type
    from litllm.lora import lora_targets, read_lora_checkpoint
    from litllm.model import GPT

    hparams, settings = read_lora_checkpoint(folder)
    base_dir = Path(base_dir or hparams["checkpoint_dir"])
    if not (base_dir / CONFIG_FILE).is_file():
        raise LitLLMError(f"{folder}: base model {base_dir} not found (pass --pretrained_checkpoint_dir if it moved)")
    config = read_config(base_dir)
    family = _family(config, infer_model_type(config))
    if settings.mlp and config.is_moe_model:
        raise LitLLMError(f"{folder}: a LoRA on MoE experts has no GGUF LoRA form (llama.cpp stacks the experts)")
    if config.kv_lora_rank and (settings.key or settings.value):
        raise LitLLMError(f"{folder}: a LoRA on MLA's keys and values (kv_b) has no GGUF LoRA form (llama.cpp splits "
                          "kv_b per head into k_b and v_b)")
    if settings.head and config.tie_embeddings:
        raise LitLLMError(f"{folder}: a LoRA on a head tied to the embedding has no GGUF LoRA form (trained with --lora_head)")
    weights = read_safetensors(lora_weights_file(folder))
    with meta_device():
        targets = lora_targets(GPT(config), settings)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings.alpha))
    adapter_type = outtype if outtype in ("f32", "f16", "bf16") else "f16"  # rank-r rows fill no quant blocks
    parts_of = _gguf_names(config, family)
    plan: list[_Tensor] = []
    for path, (parts, enabled) in targets.items():
        a_of = {n: weights[f"{path}.lora_A.{n}"].float() for n in enabled}
        b_of = {n: weights[f"{path}.lora_B.{n}"].float() for n in enabled}
        outputs = parts_of(f"{path}.weight")
        if len(outputs) == len(parts):  # one GGUF tensor per part
            pieces = [(name, [part]) for (name, _), (part, _) in zip(outputs, parts)]
        else:  # one fused GGUF tensor for every part
            pieces = [(outputs[0][0], [p for p, _ in parts])]
        rows = dict(parts)
        for name, part_names in pieces:
            on = [p for p in part_names if p in a_of]
            if not on:
                continue
            a = torch.cat([a_of[p] for p in on])  # (n * r, in)
            b = torch.zeros(sum(rows[p] for p in part_names), len(on) * settings.r)  # (out, n * r), block-diagonal
            row, j = 0, 0
            for p in part_names:
                if p in b_of:
                    b[row: row + rows[p], j * settings.r: (j + 1) * settings.r] = b_of[p] * len(on)
                    j += 1
                row += rows[p]
            if family.permute_qk:
                b = _reorder_qk(name, b, config)
            for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
                shape = tuple(tensor.shape)
                plan.append(_Tensor(name + suffix, shape, _tensor_type(name, shape, adapter_type),
                                    lambda tensor=tensor: tensor))
    if not plan:
        raise LitLLMError(f"{folder / LORA_WEIGHTS}: no LoRA weights to export")
    return writer, plan
