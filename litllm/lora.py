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
        """Read `lora_r`, `lora_alpha`, ... keys (as in `hyperparameters.yaml`)."""
        names = {f: values[f"lora_{f}"] for f in asdict(cls()) if f"lora_{f}" in values}
        return cls(**names)

    def to_flags(self) -> dict[str, Any]:
        return {f"lora_{k}": v for k, v in asdict(self).items()}


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
    from litllm.model import GatedMLP, GeluMLP, MoE

    s = settings
    c = model.config
    targets: dict[str, tuple[list[tuple[str, int]], list[str]]] = {}
    qkv = [("query", c.n_head * c.head_size), ("key", c.n_query_groups * c.head_size),
           ("value", c.n_query_groups * c.head_size)]
    qkv_on = [n for n, on in (("query", s.query), ("key", s.key), ("value", s.value)) if on]

    def mlp_targets(prefix: str, mlp: nn.Module) -> None:
        if isinstance(mlp, GatedMLP):
            targets[f"{prefix}.fc"] = ([("gate", mlp.intermediate_size), ("up", mlp.intermediate_size)], ["gate", "up"])
        elif isinstance(mlp, GeluMLP):
            targets[f"{prefix}.fc"] = ([("all", mlp.fc.out_features)], ["all"])
        targets[f"{prefix}.proj"] = ([("all", mlp.proj.out_features)], ["all"])

    for i, block in enumerate(model.blocks):
        if qkv_on:
            targets[f"blocks.{i}.attn.qkv"] = (qkv, qkv_on)
        if s.projection:
            targets[f"blocks.{i}.attn.proj"] = ([("all", block.attn.proj.out_features)], ["all"])
        if s.mlp:
            if isinstance(block.mlp, MoE):
                for e, expert in enumerate(block.mlp.experts):
                    mlp_targets(f"blocks.{i}.mlp.experts.{e}", expert)
            else:
                mlp_targets(f"blocks.{i}.mlp", block.mlp)
    if s.head:
        targets["lm_head"] = ([("all", model.lm_head.out_features)], ["all"])
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


# ---------------------------------------------------------------------- LoRA checkpoint folders
def save_lora_checkpoint(model: nn.Module, folder: Path, hyperparameters: dict[str, Any]) -> None:
    """Write `lit_lora.safetensors` and `hyperparameters.yaml` (which must record `checkpoint_dir`)."""
    from litllm.hparams import write_hyperparameters
    from litllm.model_folder import save_model_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    write_hyperparameters(folder, hyperparameters)
    save_model_weights(state, folder / LORA_WEIGHTS)


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
    dtype = parse_dtype(precision)
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
    (recorded in `rank_pattern`/`alpha_pattern` so the scaling stays `alpha / r`).
    """
    from litllm.hf.config import infer_model_type
    from litllm.hf.family import STACKED_EXPERTS
    from litllm.hf.weights import hf_sources, qkv_to_interleaved, weight_map
    from litllm.utils import atomic_path

    config = model.config
    mapping = weight_map(config, infer_model_type(config))
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    r = alpha = None
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        r, alpha = module.r, module.alpha
        source = hf_sources(f"{path}.weight", mapping)
        enabled = [n for n, _ in module.parts if n in module.lora_A]
        a_of = {n: module.lora_A[n].detach().float() for n in enabled}
        b_of = {n: module.lora_B[n].detach().float() for n in enabled}
        if source.layout == STACKED_EXPERTS:
            raise LitLLMError(f"{path}: its HF weight {source.names[0]} holds every expert in one parameter, which a "
                              "PEFT LoRA can't adapt; export without LoRA on the experts (no --lora_mlp) or merge it")
        if source.concatenated:  # HF has one module per part
            for (name, _), hf_name in zip(module.parts, source.names):
                if name in a_of:
                    hf_module = hf_name.removesuffix(".weight")
                    targets.append(hf_module)
                    tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a_of[name]
                    tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b_of[name]
            continue
        # one HF module for all parts: A stacked (n*r, in), B block-diagonal (out, n*r)
        a = torch.cat([a_of[n] for n in enabled])
        b = torch.zeros(module.out_features, len(enabled) * module.r)
        row, j = 0, 0
        for name, rows in module.parts:
            if name in b_of:
                b[row: row + rows, j * module.r: (j + 1) * module.r] = b_of[name]
                j += 1
            row += rows
        if source.layout:  # interleaved fused qkv rows (GPT-NeoX, Falcon)
            b = qkv_to_interleaved(b, source.layout, config)
        hf_name = source.names[0]
        hf_module = hf_name.removesuffix(".weight")
        targets.append(hf_module)
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b
        if len(enabled) > 1:
            rank_pattern[_exact(hf_module)] = len(enabled) * module.r
            alpha_pattern[_exact(hf_module)] = len(enabled) * module.alpha
    if r is None:
        raise LitLLMError("the model has no LoRA layers to export")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.hf_repo or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    from litllm.model_folder import save_model_weights

    with atomic_path(Path(folder)) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        # our writer, not safetensors' save_file (which creates its files 0600): the usual permissions
        save_model_weights(tensors, tmp / "adapter_model.safetensors")


def _exact(module_name: str) -> str:
    """A PEFT pattern key that matches exactly this module (PEFT matches keys as regexes)."""
    import re

    return re.escape(module_name)
