"""LLaMA-Adapter and LLaMA-Adapter v2 as transforms of a built `GPT`.

LLaMA-Adapter (Zhang et al., 2023): in every layer from `adapter_start_layer` on, each query also
attends to `prefix_length` learned prefix tokens, with their own softmax, and the result is added
to the attention output times a per-head gate that starts at zero. At init the model is exactly
the base model; only the prefixes and gates train. The hook is `CausalSelfAttention.adapter` in
`litllm/model.py`.

Adapter v2 (Gao et al., 2023) adds a trainable per-output scale and bias to every Linear
(`scale * (W x + b + bias)`, starting at scale 1, bias 0) and also trains the norms.

An adapter model can't be merged into a plain `GPT`, so its model folder carries `adapter.yaml`
(which transform to apply before loading `lit_model.safetensors`); `load_adapter_model` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.model_folder import ADAPTER_SPEC, AdapterSettings, read_adapter_settings  # noqa: F401 (the folder's files)


class PrefixAdapter(nn.Module):
    """Gated attention of every query to `prefix_length` learned tokens (no causal mask, no RoPE)."""

    def __init__(self, n_embd: int, n_head: int, prefix_length: int, device=None, dtype=None) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.empty(prefix_length, n_embd, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(1, n_head, 1, 1, device=device, dtype=dtype))
        if self.prefix.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.prefix)  # the scale of the normed hidden states qkv usually sees
        nn.init.zeros_(self.gate)  # zero-init gating: training starts from the base model

    adapter_disabled = False
    """True inside `litllm.lora.disable_adapters(model)`: the branch adds nothing."""

    def forward(self, q: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        """q: (B, nh, T, hs) queries of `attn` (a CausalSelfAttention) -> (B, nh, T, hs)."""
        from litllm.model import attention

        if self.adapter_disabled:
            return torch.zeros_like(q)  # y + 0 == y exactly

        c = attn.config
        B, _, T, _ = q.shape
        P = self.prefix.size(0)
        _, k, v = attn.qkv(self.prefix.to(q.dtype)[None]).split(attn.qkv_sizes, dim=-1)  # (1, P, nkv*hs)
        if c.norm_qk == "full":
            k = attn.k_norm(k)
        k = k.view(1, P, c.n_query_groups, c.head_size).transpose(1, 2)  # (1, nkv, P, hs)
        v = v.view(1, P, c.n_query_groups, c.head_size).transpose(1, 2)  # (1, nkv, P, hs)
        if c.norm_qk == "head":
            k = attn.k_norm(k)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        every = torch.ones(1, 1, T, P, dtype=torch.bool, device=q.device)  # each query sees all of the prefix
        scale = 1.0 / (c.attention_scores_scalar or c.head_size) ** 0.5
        y = attention(q, k, v, every, scale, c.attention_logit_softcapping)  # (B, nh, T, hs)
        return self.gate.to(y.dtype) * y


class AdapterV2Linear(nn.Module):
    """`scale * (base(x) + bias)` with per-output `adapter_scale` (init 1) and `adapter_bias` (init 0)."""

    def __init__(self, base: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.get_default_dtype())
        self.adapter_scale = nn.Parameter(torch.empty(self.out_features, device=weight.device, dtype=dtype))
        self.adapter_bias = nn.Parameter(torch.empty(self.out_features, device=weight.device, dtype=dtype))
        if weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.adapter_scale)
        nn.init.zeros_(self.adapter_bias)

    adapter_disabled = False
    """True inside `litllm.lora.disable_adapters(model)`: the layer computes `base(x)` only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.adapter_disabled:
            return y
        return (self.adapter_scale.to(y.dtype) * (y + self.adapter_bias.to(y.dtype)))


# ---------------------------------------------------------------------- transforms of a GPT
def add_adapter(
    model: nn.Module, adapter_start_layer: int = 2, prefix_length: int = 10, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Give the attention of blocks `adapter_start_layer..` a gated learned prefix, in place.

    dtype: of the new weights (default: the embedding's).
    """
    n_layer = len(model.blocks)
    if not 0 <= adapter_start_layer < n_layer:
        raise LitLLMError(f"--adapter_start_layer: expected 0..{n_layer - 1} for this {n_layer}-layer model, "
                          f"got {adapter_start_layer}")
    if prefix_length < 1:
        raise LitLLMError(f"--adapter_prefix_length: expected a positive length, got {prefix_length}")
    c = model.config
    if c.kv_lora_rank:
        raise LitLLMError(f"model {c.name!r}: the adapter's learned prefix is not supported on Multi-head Latent "
                          "Attention (DeepSeek) models; use finetune_lora")
    weight = model.wte.weight
    for block in model.blocks[adapter_start_layer:]:
        if block.attn.adapter is not None:
            raise ValueError("the model already has an adapter")
        block.attn.adapter = PrefixAdapter(c.n_embd, c.n_head, prefix_length, weight.device, dtype or weight.dtype)
    return model


def add_adapter_v2(
    model: nn.Module, adapter_start_layer: int = 2, prefix_length: int = 10, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """LLaMA-Adapter v2: the prefixes of `add_adapter` plus a scale and bias on every Linear, in place."""
    add_adapter(model, adapter_start_layer, prefix_length, dtype)
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not p.endswith(".router")]
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, name, AdapterV2Linear(getattr(owner, name), dtype))
    return model


def apply_adapter(model: nn.Module, settings: AdapterSettings, dtype: Optional[torch.dtype] = None) -> nn.Module:
    transform = add_adapter if settings.version == 1 else add_adapter_v2
    return transform(model, settings.start_layer, settings.prefix_length, dtype)


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters an adapter (v1 or v2) trains: prefixes, gates, v2 scales/biases and norms."""
    from litllm.model import RMSNorm

    v2 = any(isinstance(m, AdapterV2Linear) for m in model.modules())
    names = {n for n, _ in model.named_parameters() if ".adapter." in n or ".adapter_" in n}
    if v2:
        for path, module in model.named_modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                names.update(f"{path}.{n}" for n, _ in module.named_parameters())
    return names


# ---------------------------------------------------------------------- adapters as a training method
def adapter_method(settings: AdapterSettings, base_weights: Optional[Path] = None, quantize: Optional[str] = None,
                   device: str | torch.device = "cpu", param_dtype: Optional[torch.dtype] = None,
                   compute_dtype: Optional[torch.dtype] = None):
    """The `litllm.train.loop.Method` of LLaMA-Adapter finetuning (`settings.version` 1 or 2): add the adapter,
    train only its weights, export the base weights of `base_weights` (dense even if the run quantized them,
    bitsandbytes mode `quantize` computing in `compute_dtype`) plus the trained ones, and carry `adapter.yaml`.
    param_dtype: dtype of the new weights (fp32 under mixed precision)."""
    import functools

    from litllm.model_folder import adapter_settings_yaml, read_safetensors
    from litllm.quantize import quantize_frozen
    from litllm.train.loop import Method

    names: set[str] = set()  # the trained parameters, as the transform made them

    def transform(model: nn.Module) -> nn.Module:
        apply_adapter(model, settings, dtype=None if model.wte.weight.is_meta else param_dtype)
        names.update(adapter_parameter_names(model))
        return model

    def export(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the frozen base from its file (dense even if the run quantized it) under the names of the trained model
        # (v2 keeps a wrapped Linear's weight as `<path>.base.weight`) + the trained tensors, in the base's dtype;
        # a tied head stays stored once (as wte.weight)
        def base_key(name: str) -> str:
            module, _, param = name.rpartition(".")
            return f"{module}.base.{param}" if f"{module}.base.{param}" in state_dict else name

        base = {base_key(k): v for k, v in read_safetensors(base_weights).items()}
        dtype = base["wte.weight"].dtype
        base.update({k: state_dict[k].to(dtype) for k in names})
        return base

    return Method(name=f"adapter_v{settings.version}", transform=transform,
                  trainable=lambda name, _: name in names, export=export,
                  after_freeze=functools.partial(quantize_frozen, quantize=quantize, device=device,
                                                 compute_dtype=compute_dtype),
                  extra_files={ADAPTER_SPEC: adapter_settings_yaml(settings)})


# ---------------------------------------------------------------------- model folders
def load_adapter_model(
    checkpoint_dir: Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Load a model folder, applying the adapter structure its `adapter.yaml` describes (if any)."""
    from litllm.model import GPT
    from litllm.model_folder import WEIGHTS_FILE, check_model_folder, load_model_weights, read_config

    checkpoint_dir = check_model_folder(checkpoint_dir)
    settings = read_adapter_settings(checkpoint_dir)
    if settings is None:
        return GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    with torch.device("meta"):
        model = apply_adapter(GPT(read_config(checkpoint_dir)), settings)
    load_model_weights(model, checkpoint_dir / WEIGHTS_FILE, device=device, dtype=dtype)
    return model
