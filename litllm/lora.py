"""LoRA: low-rank updates on a built `GPT`'s Linears, merging them back, and `litllm merge_lora`.

`add_lora(model, ...)` wraps the chosen Linears in `LoRALinear`: the frozen base Linear stays as
`.base` (possibly quantized, for QLoRA) and the update is `scaling * B @ A` with `A: (r, in)`,
`B: (rows, r)`, `scaling = alpha / r`. Fused projections get one (A, B) pair per *part*:
`attn.qkv` has rows [query | key | value] and GatedMLP `fc` rows [gate | up], so `--lora_query`
without `--lora_key` adapts only the query rows (exactly what PEFT does on separate
`q_proj`/`k_proj` modules) and the exported PEFT adapter is the same function.

B starts at zero, so a freshly wrapped model computes exactly the base model's logits.
`merge_lora_weights(model)` folds every update into its base weight and unwraps, leaving a
plain `GPT` that saves as a normal `lit_model.safetensors`.

A LoRA checkpoint folder holds `lit_lora.safetensors` (the LoRA weights alone) and
`hyperparameters.yaml` (the base `checkpoint_dir` and the `lora_*` settings it was trained with).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litllm.errors import LitLLMError
from litllm.hparams import HYPERPARAMETERS_FILE as HYPERPARAMETERS
from litllm.model_folder import LORA_WEIGHTS, lora_weights_file  # noqa: F401 (the folder's files)
from litllm.model_folder import TRAINABLE_WEIGHTS as STEP_WEIGHTS


FLAG_PREFIX = "lora_"
"""LoRASettings' fields are the flags `--lora_r`, `--lora_alpha`, ... (a job declares `flat(FLAG_PREFIX, LoRASettings)`)."""


@dataclass
class LoRASettings:
    """Which Linears get LoRA and how large it is (the `--lora_*` flags of `finetune_lora`)."""

    r: int = 8
    """LoRA rank."""
    alpha: float = 16
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    query: bool = True
    """Apply LoRA to the query rows of the attention projection."""
    key: bool = False
    """Apply LoRA to the key rows of the attention projection."""
    value: bool = True
    """Apply LoRA to the value rows of the attention projection."""
    projection: bool = False
    """Apply LoRA to the attention output projection."""
    mlp: bool = False
    """Apply LoRA to the MLP (every expert's, for MoE models)."""
    head: bool = False
    """Apply LoRA to the output head."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise LitLLMError(f"--lora_r: expected a positive rank, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise LitLLMError(f"--lora_dropout: expected a probability in [0, 1), got {self.dropout}")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head)):
            raise LitLLMError(
                "LoRA is enabled on no layer: set at least one of --lora_query/--lora_key/--lora_value/"
                "--lora_projection/--lora_mlp/--lora_head"
            )

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> "LoRASettings":
        """Read the `lora_r`, `lora_alpha`, ... flags (as in `hyperparameters.yaml`; missing ones keep their defaults)."""
        from litllm.flags import unflatten

        return unflatten(cls, values, FLAG_PREFIX)

    def to_flags(self) -> dict[str, Any]:
        """The settings as their flags {`lora_r`: ..., ...}."""
        from litllm.flags import flatten

        return flatten(self, FLAG_PREFIX)


# ---------------------------------------------------------------------- the wrapper
class LoRALinear(nn.Module):
    """`base(x)` plus a low-rank update on chosen row ranges ("parts") of the output.

    parts: the output rows in order as (name, rows), e.g. [("query", 512), ("key", 128), ("value", 128)];
    enabled: the part names that get an update (the others get none).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        parts: list[tuple[str, int]],
        enabled: list[str],
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        if sum(rows for _, rows in parts) != self.out_features:
            raise ValueError(f"parts {parts} don't add up to {self.out_features} output rows")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.parts = list(parts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        device = weight.device
        # a quantized base stores packed integers: LoRA then trains in the default float dtype
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.get_default_dtype())
        rows = dict(parts)
        # ParameterDict sorts its keys: keep the parts' output order separately
        self.enabled = [n for n, _ in parts if n in enabled]
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype)) for n in enabled}
        )
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(rows[n], r, device=device, dtype=dtype)) for n in enabled}
        )
        if device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A as nn.Linear's default (Kaiming-uniform, like PEFT); B = 0 so the update starts at zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    adapter_disabled = False
    """True inside `disable_adapters(model)`: the layer computes `base(x)` only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        names = self.enabled
        if not names or self.adapter_disabled:
            return y
        # one matmul for every part's A: (..., in) -> (..., n_parts * r)
        a = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])
        h = F.linear(self.dropout(x).to(a.dtype), a).split(self.r, dim=-1)
        chunks, j = [], 0
        for name, rows in self.parts:
            if name in self.lora_B:
                chunks.append(F.linear(h[j], self.lora_B[name]))  # (..., rows)
                j += 1
            else:
                chunks.append(h[0].new_zeros(*h[0].shape[:-1], rows))
        delta = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update `scaling * B @ A` as a dense (out, in) fp32 matrix (zeros on parts without LoRA)."""
        factors = {name: (self.lora_A[name], self.lora_B[name]) for name in self.lora_A}
        return lora_delta(self.parts, factors, self.scaling, self.in_features)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, parts={[n for n, _ in self.parts if n in self.lora_A]}"


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model inside the block: LoRA updates and (v1 and v2) adapters are off.

    No second copy of the weights: each LoRA/adapter module (any module with an `adapter_disabled`
    attribute) is switched off in place and back on at exit, exceptions included. This is the
    reference model of preference tuning with LoRA/adapters. Works on a Fabric-wrapped or sharded model.
    Adapter v2 also trains the base's norm weights; those stay as trained (freeze them for an exact base).
    """
    switched = [m for m in model.modules() if hasattr(m, "adapter_disabled") and not m.adapter_disabled]
    for module in switched:
        module.adapter_disabled = True
    try:
        yield model
    finally:
        for module in switched:
            module.adapter_disabled = False


# ---------------------------------------------------------------------- transforms of a GPT
def lora_targets(model: nn.Module, settings: LoRASettings) -> dict[str, tuple[list[tuple[str, int]], list[str]]]:
    """Module path -> (output parts, enabled parts) for every Linear the settings adapt."""
    from litllm.model import GatedMLP, GeluMLP, MLAttention, MoE

    s = settings
    c = model.config
    targets: dict[str, tuple[list[tuple[str, int]], list[str]]] = {}
    qkv = [("query", c.n_head * c.head_size), ("key", c.n_query_groups * c.head_size),
           ("value", c.n_query_groups * c.head_size)]
    qkv_on = [n for n, on in (("query", s.query), ("key", s.key), ("value", s.value)) if on]

    def mlp_targets(prefix: str, mlp: nn.Module) -> None:
        if not isinstance(mlp, (GatedMLP, GeluMLP)):  # gpt-oss's stacked experts: no Linear to wrap
            return
        if isinstance(mlp, GatedMLP):
            targets[f"{prefix}.fc"] = ([("gate", mlp.intermediate_size), ("up", mlp.intermediate_size)], ["gate", "up"])
        elif isinstance(mlp, GeluMLP):
            targets[f"{prefix}.fc"] = ([("all", mlp.fc.out_features)], ["all"])
        targets[f"{prefix}.proj"] = ([("all", mlp.proj.out_features)], ["all"])

    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, MLAttention):  # queries: `q` (q_b_proj/q_proj); keys and values: `kv_b`
            if s.query:
                targets[f"blocks.{i}.attn.q"] = ([("all", block.attn.q.out_features)], ["all"])
            if s.key or s.value:
                targets[f"blocks.{i}.attn.kv_b"] = ([("all", block.attn.kv_b.out_features)], ["all"])
        elif qkv_on:
            targets[f"blocks.{i}.attn.qkv"] = (qkv, qkv_on)
        if s.projection:
            targets[f"blocks.{i}.attn.proj"] = ([("all", block.attn.proj.out_features)], ["all"])
        if s.mlp:
            if isinstance(block.mlp, MoE):
                for e, expert in enumerate(block.mlp.experts):
                    mlp_targets(f"blocks.{i}.mlp.experts.{e}", expert)
                if getattr(block.mlp, "shared_experts", None) is not None:
                    mlp_targets(f"blocks.{i}.mlp.shared_experts", block.mlp.shared_experts)
            else:
                mlp_targets(f"blocks.{i}.mlp", block.mlp)
    if s.head:
        targets["lm_head"] = ([("all", model.lm_head.out_features)], ["all"])
    if not targets:
        raise LitLLMError("LoRA adapts no layer of this model with these flags (gpt-oss's stacked experts take no "
                          "LoRA: add --lora_query/--lora_value/--lora_projection/--lora_head)")
    return targets


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    query: bool = True,
    key: bool = False,
    value: bool = True,
    projection: bool = False,
    mlp: bool = False,
    head: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Wrap the chosen Linears of `model` in `LoRALinear`, in place; returns `model`.

    dtype: dtype of the LoRA weights (default: the base weight's, or the default float dtype if quantized).
    """
    settings = LoRASettings(r, alpha, dropout, query, key, value, projection, mlp, head)
    for path, (parts, enabled) in lora_targets(model, settings).items():
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has LoRA")
        parent, _, name = path.rpartition(".")
        wrapped = LoRALinear(base, r, alpha, dropout, parts, enabled, dtype=dtype).train(base.training)
        setattr(model.get_submodule(parent) if parent else model, name, wrapped)
    return model


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights alone (what a LoRA checkpoint stores)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "LoRA weights") -> None:
    """Load LoRA weights into a model wrapped with the same settings; fail clearly on any mismatch."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LitLLMError(
            f"{source}: LoRA weights don't match the LoRA settings: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise LitLLMError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state_dict, strict=False)


@torch.no_grad()
def lora_delta(parts: list[tuple[str, int]], factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
               in_features: int) -> torch.Tensor:
    """The LoRA update of one wrapped Linear, `scaling * B @ A` per part, as a dense (out, in) fp32 matrix:
    `parts` [(name, rows)] in row order, `factors` {name: (A (r, in), B (rows, r))}, zeros for parts without."""
    device = next((a.device for a, _ in factors.values()), None)
    blocks = []
    for name, rows in parts:
        if name in factors:
            a, b = factors[name]
            blocks.append(b.float() @ a.float() * scaling)
        else:
            blocks.append(torch.zeros(rows, in_features, device=device))
    return torch.cat(blocks)


def merge_lora_state_dict(
    base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], layout: dict[str, tuple[list, list, float]]
) -> dict[str, torch.Tensor]:
    """Base weights (plain GPT names) + LoRA tensors (on any device) -> merged weights, `W += scaling * B @ A`
    per part; `layout` {module path: (parts, enabled parts, scaling)}, as `LoRALinear` holds them."""
    merged = dict(base)
    for path, (parts, enabled, scaling) in layout.items():
        name = f"{path}.weight"
        weight = merged[name]
        factors = {part: (lora[f"{path}.lora_A.{part}"].cpu(), lora[f"{path}.lora_B.{part}"].cpu())
                   for part, _ in parts if part in enabled}
        merged[name] = (weight.float() + lora_delta(parts, factors, scaling, weight.shape[1])).to(weight.dtype)
    return merged


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and unwrap to plain `nn.Linear`s, in place.

    A quantized base is dequantized first (the merged model is dense). A LoRA on a head tied to the
    embedding unties it (the embedding keeps the base weight), and `model.config.tie_embeddings`
    becomes False so the saved folder says so.
    """
    for path, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        weight, bias = dense_weight(module.base)
        merged = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        new_weight = (weight.float() + module.delta_weight().to(weight.device)).to(weight.dtype)
        merged.weight = nn.Parameter(new_weight, requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, merged)
        if path == "lm_head" and getattr(model.config, "tie_embeddings", False):
            model.config = replace(model.config, tie_embeddings=False)
    return model


def dense_weight(linear: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of a Linear as floats; dequantizes bitsandbytes layers."""
    weight = linear.weight
    if weight.is_floating_point() and type(weight).__name__ == "Parameter":
        return weight.detach(), linear.bias
    import bitsandbytes.functional as bnbf

    if type(weight).__name__ == "Params4bit":
        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    elif type(weight).__name__ == "Int8Params":  # rows of int8 with one absmax scale each
        dense = weight.data.float() * (weight.SCB.float()[:, None] / 127.0)
        dense = dense.to(getattr(linear, "compute_dtype", None) or torch.get_default_dtype())
    else:
        raise TypeError(f"can't read the weights of a {type(linear).__name__}")
    return dense.reshape(linear.out_features, linear.in_features), linear.bias


# ---------------------------------------------------------------------- LoRA as a training method
def lora_method(settings: LoRASettings, base_weights: Optional[Path] = None, quantize: Optional[str] = None,
                device: str | torch.device = "cpu", param_dtype: Optional[torch.dtype] = None,
                compute_dtype: Optional[torch.dtype] = None):
    """The `litllm.train.loop.Method` of LoRA finetuning: add LoRA as `settings` says, train only its factors,
    export the base weights of `base_weights` with the update merged (dense even if the run quantized the base:
    QLoRA, bitsandbytes mode `quantize`, computing in `compute_dtype`), and add `lit_lora.safetensors` to final/.
    param_dtype: dtype of the LoRA factors (fp32 under mixed precision)."""
    import functools

    from litllm.model_folder import read_safetensors, save_model_weights
    from litllm.quantize import quantize_frozen
    from litllm.train.loop import Method

    layout: dict[str, tuple[list, list, float]] = {}  # LoRA module path -> (parts, enabled, scaling), of the transform

    def transform(model: nn.Module) -> nn.Module:
        add_lora(model, **asdict(settings), dtype=None if model.wte.weight.is_meta else param_dtype)
        layout.update({path: (module.parts, module.enabled, module.scaling)
                       for path, module in model.named_modules() if isinstance(module, LoRALinear)})
        return model

    def export(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trained = {k: v for k, v in state_dict.items() if is_lora_parameter(k)}
        return merge_lora_state_dict(read_safetensors(base_weights), trained, layout)

    def write_outputs(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
        trained = {k: v.contiguous() for k, v in state_dict.items() if is_lora_parameter(k)}
        save_model_weights(trained, folder / LORA_WEIGHTS)

    return Method(name="lora", transform=transform, trainable=lambda name, _: is_lora_parameter(name),
                  export=export, write_outputs=write_outputs,
                  after_freeze=functools.partial(quantize_frozen, quantize=quantize, device=device,
                                                 compute_dtype=compute_dtype))


# ---------------------------------------------------------------------- LoRA checkpoint folders
def read_lora_checkpoint(folder: Path) -> tuple[dict[str, Any], LoRASettings]:
    """The hyperparameters and LoRA settings a LoRA checkpoint folder was trained with."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LitLLMError(f"{folder}: LoRA checkpoint folder not found")
    from litllm.hparams import read_hyperparameters

    lora_weights_file(folder)
    hparams = read_hyperparameters(folder, required=("checkpoint_dir",))  # the base model it was trained on
    return hparams, LoRASettings.from_flags(hparams)


def load_lora_model(
    folder: Path,
    pretrained_checkpoint_dir: Optional[Path] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Build the base model recorded in a LoRA checkpoint folder, wrap it, and load the LoRA weights."""
    from litllm.model import GPT
    from litllm.model_folder import read_safetensors

    hparams, settings = read_lora_checkpoint(folder)
    base_dir = Path(pretrained_checkpoint_dir or hparams["checkpoint_dir"])
    model = GPT.from_checkpoint(base_dir, device=device, dtype=dtype)
    add_lora(model, **asdict(settings))
    weights = lora_weights_file(folder)
    load_lora_state_dict(model, read_safetensors(weights, device=device), str(weights))
    return model


def merge_lora(
    checkpoint_dir: Path,
    out_dir: Optional[Path] = None,
    pretrained_checkpoint_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    peft_dir: Optional[Path] = None,
) -> None:
    """Merge a LoRA checkpoint into its base model and write a plain model folder.

    The result (`lit_model.safetensors`, `model_config.yaml`, tokenizer files, `prompt_style.yaml`)
    works with `litllm generate`, `chat`, `evaluate` and `convert_from_litllm`.

    Args:
        checkpoint_dir: A LoRA checkpoint folder (`lit_lora.safetensors` + `hyperparameters.yaml`),
            e.g. `out/finetune/lora/final`, or a training checkpoint `out/finetune/lora/step-XXXXXXXX`.
        out_dir: Where to write the merged model (default: `checkpoint_dir` itself; required for a
            training checkpoint, which must stay resumable).
        pretrained_checkpoint_dir: The base model folder, if it moved since training
            (default: the `checkpoint_dir` recorded in `hyperparameters.yaml`).
        precision: Weights dtype of the merged model: `float32`, `float16` or `bfloat16` (default: the base's).
        peft_dir: Also export the (unmerged) LoRA weights here as a Hugging Face PEFT adapter folder
            (`adapter_config.json` + `adapter_model.safetensors`).
    """
    from litllm.model_folder import WEIGHTS_FILE, check_model_folder, parse_dtype, save_model_folder

    checkpoint_dir = Path(checkpoint_dir)
    dtype = parse_dtype(precision, "--precision")
    hparams, _ = read_lora_checkpoint(checkpoint_dir)
    if out_dir is None and lora_weights_file(checkpoint_dir).name == STEP_WEIGHTS:
        raise LitLLMError(
            f"{checkpoint_dir}: a training checkpoint; pass --out_dir (a model written into it would stop it resuming)"
        )
    base_dir = Path(pretrained_checkpoint_dir or hparams["checkpoint_dir"])
    if not (base_dir / WEIGHTS_FILE).is_file():
        raise LitLLMError(
            f"{checkpoint_dir / HYPERPARAMETERS}: base model {base_dir} not found "
            "(pass --pretrained_checkpoint_dir if it moved)"
        )
    check_model_folder(base_dir)  # a damaged base fails before anything is written
    from litllm.utils import check_output_dir

    check_output_dir(out_dir or checkpoint_dir)
    if peft_dir is not None:
        check_output_dir(peft_dir, "--peft_dir")
    model = load_lora_model(checkpoint_dir, base_dir, dtype=dtype)
    if peft_dir is not None:
        save_peft_adapter(model, peft_dir, base_model_name_or_path=str(base_dir))
        print(f"Exported the LoRA adapter (Hugging Face PEFT format) to {peft_dir}")
    merge_lora_weights(model)
    out_dir = Path(out_dir or checkpoint_dir)
    save_model_folder(model, out_dir, checkpoint_dir, base_dir)
    print(f"Merged LoRA weights into {out_dir / WEIGHTS_FILE}")


# ---------------------------------------------------------------------- PEFT export
def save_peft_adapter(model: nn.Module, folder: Path, base_model_name_or_path: Optional[str] = None) -> None:
    """Export a LoRA-wrapped model's updates as a PEFT folder that `PeftModel.from_pretrained` loads.

    litllm's fused layers are split into HF's modules (q_proj/k_proj/v_proj, gate_proj/up_proj, ...)
    with `litllm/hf/weights.py`'s maps. Where HF's module is fused too (Phi-3 `qkv_proj`, GPT-NeoX
    `query_key_value`), the per-part updates become one block-structured LoRA of rank `n_parts * r`
    (recorded in `rank_pattern`/`alpha_pattern` so the scaling stays `alpha / r`). MoE experts' LoRA goes
    to transformers' stacked expert tensors as PEFT `target_parameters` (`_stacked_expert_lora`).
    """
    from litllm.hf.config import infer_model_type
    from litllm.hf.family import FAMILIES
    from litllm.hf.weights import hf_sources, qkv_to_interleaved, weight_map
    from litllm.utils import atomic_path

    config = model.config
    model_type = infer_model_type(config)
    mapping = weight_map(config, model_type)
    tensors, parameters, rank_pattern, alpha_pattern = _stacked_expert_lora(model, FAMILIES[model_type], mapping)
    # peft re-maps every gate/up/down_proj *module* target of a transformers-5 MoE model whose per-expert checkpoint
    # tensors transformers stacks at load (Mixtral, Qwen MoE) onto its stacked experts: a dense MLP layer of such a
    # model (Qwen3-MoE mlp_only_layers) is targeted by its weight tensor instead. A checkpoint stored stacked already
    # (Llama 4) has no such conversion, so its dense layers stay module targets.
    moe_dense = FAMILIES[model_type].stacked_experts is not None and not _experts_stored_stacked(mapping)
    targets: list[str] = []

    def add_target(path: str, hf_name: str) -> None:
        if moe_dense and ".mlp." in path:
            parameters.append(hf_name)
        else:
            targets.append(hf_name.removesuffix(".weight"))

    r = alpha = None
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        r, alpha = module.r, module.alpha
        if EXPERT_PATH.fullmatch(path):
            continue  # exported above
        source = hf_sources(f"{path}.weight", mapping)
        enabled = [n for n, _ in module.parts if n in module.lora_A]
        if source.concatenated:  # HF has one module per part
            for (name, _), hf_name in zip(module.parts, source.names):
                if name in enabled:
                    hf_module = hf_name.removesuffix(".weight")
                    add_target(path, hf_name)
                    tensors[f"base_model.model.{hf_module}.lora_A.weight"] = module.lora_A[name].detach().float()
                    tensors[f"base_model.model.{hf_module}.lora_B.weight"] = module.lora_B[name].detach().float()
            continue
        a, b = _block_diagonal_lora(module)
        if source.layout:  # interleaved fused qkv rows (GPT-NeoX, Falcon)
            b = qkv_to_interleaved(b, source.layout, config)
        hf_name = source.names[0]
        hf_module = hf_name.removesuffix(".weight")
        add_target(path, hf_name)
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b
        if len(enabled) > 1:
            rank_pattern[_exact(hf_module)] = len(enabled) * module.r
            alpha_pattern[_exact(hf_module)] = len(enabled) * module.alpha
    if r is None:
        raise LitLLMError("the model has no LoRA layers to export")
    adapter_config = _peft_config(r, alpha, base_model_name_or_path or config.hf_repo or None, targets, parameters,
                                  rank_pattern, alpha_pattern)
    from litllm.model_folder import save_model_weights

    with atomic_path(Path(folder)) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        # our writer, not safetensors' save_file (which creates its files 0600): the usual permissions
        save_model_weights(tensors, tmp / "adapter_model.safetensors")


def _peft_config(r: int, alpha: float, base_model: Optional[str], targets: list[str], parameters: list[str],
                 rank_pattern: dict, alpha_pattern: dict) -> dict:
    """PEFT's `adapter_config.json` for these LoRA targets (modules, and stacked expert parameters)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "target_parameters": parameters or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


EXPERT_PATH = re.compile(r"blocks\.(\d+)\.mlp\.experts\.(\d+)\.(fc|proj)")


def _block_diagonal_lora(module: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's per-part LoRA as one: A stacked (n*r, in), B block-diagonal (out, n*r), n its enabled parts."""
    enabled = [n for n, _ in module.parts if n in module.lora_A]
    a = torch.cat([module.lora_A[n].detach().float() for n in enabled])
    b = torch.zeros(module.out_features, len(enabled) * module.r)
    row, j = 0, 0
    for name, rows in module.parts:
        if name in enabled:
            b[row: row + rows, j * module.r: (j + 1) * module.r] = module.lora_B[name].detach().float()
            j += 1
        row += rows
    return a, b


def _experts_stored_stacked(mapping) -> bool:
    """Whether the checkpoint stores each MoE layer's experts as stacked (E, in, out) tensors (Llama 4)."""
    from litllm.hf.family import STACKED_EXPERTS

    source = mapping.get("blocks.{i}.mlp.experts.{e}.fc")
    return source is not None and source.layout == STACKED_EXPERTS


def _stacked_expert_lora(model: nn.Module, family, mapping) -> tuple[dict, list[str], dict, dict]:
    """LoRA on MoE experts as PEFT `target_parameters` on transformers' stacked expert tensors (transformers >= 5:
    `experts.gate_up_proj` (E, 2I, C), rows [gate | up] as litllm's `fc`, and `experts.down_proj` (E, C, I)).
    PEFT's LoRA of a stacked tensor is one (A, B) per expert: lora_A (E*r, in) holds expert e's A in rows
    e*r..e*r+r, lora_B (out, r*E) its B in columns j*E + e; PEFT adds B_e @ A_e to the stack's [e].
    Llama 4's stacks are (E, in, out) instead (`gate_up_proj` (E, C, 2I), columns [gate | up]; `down_proj`
    (E, I, C)), which PEFT (no `is_transposed` on Llama4TextExperts) reads as (E, out, in) all the same: its
    lora_A then holds B_e^T and its lora_B A_e^T, so that B_e @ A_e there is (B A)^T, the update of [e] = W_e^T.
    (Llama 4 scales each expert's *input* by its router score: LoRA, linear without bias, scales with it.)
    Returns (tensors, target_parameters, rank_pattern, alpha_pattern)."""
    groups: dict[tuple[int, str], dict[int, LoRALinear]] = {}
    for path, module in model.named_modules():
        match = EXPERT_PATH.fullmatch(path)
        if match and isinstance(module, LoRALinear):
            groups.setdefault((int(match[1]), match[3]), {})[int(match[2])] = module
    if groups and family.stacked_experts is None:
        raise LitLLMError(f"PEFT export: LoRA on the experts of a {family.model_type} model has no PEFT form here; "
                          "train without --lora_mlp to export")
    transposed = _experts_stored_stacked(mapping)
    tensors, parameters, ranks, alphas = {}, [], {}, {}
    for (layer, kind), experts in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] == "proj")):
        if sorted(experts) != list(range(model.config.n_expert)):
            raise LitLLMError(f"PEFT export: layer {layer} has LoRA on some of its experts only")
        factors = [_block_diagonal_lora(experts[e]) for e in sorted(experts)]  # (A (rank, in), B (out, rank))
        if transposed:
            factors = [(b.T, a.T) for a, b in factors]
        rank = factors[0][0].size(0)  # n_parts * r
        a = torch.cat([f[0] for f in factors])  # (E * rank, in)
        b = torch.stack([f[1] for f in factors], dim=-1).reshape(factors[0][1].size(0), -1)  # (out, rank * E)
        module = family.stacked_experts.format(i=layer)
        parameter = f"{module}.{'gate_up_proj' if kind == 'fc' else 'down_proj'}"
        # PEFT nests one wrapper per targeted tensor in the module's parameter order: gate_up_proj innermost
        inner = kind == "fc" and (layer, "proj") in groups
        prefix = f"base_model.model.{module}{'.base_layer' if inner else ''}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a.contiguous(), b.contiguous()
        parameters.append(parameter)
        ranks[_exact(parameter)] = rank
        alphas[_exact(parameter)] = rank // experts[0].r * experts[0].alpha
    return tensors, parameters, ranks, alphas


def _exact(module_name: str) -> str:
    """A PEFT pattern key that matches exactly this module (PEFT matches keys as regexes)."""
    import re

    return re.escape(module_name)
