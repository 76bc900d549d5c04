"""Which parameter of the GPT goes where under tensor parallelism (TP) over N ranks.

Megatron's split, each rank holding its shares as plain tensors (`parallelize`; the collectives are
`layers.py`'s): in each block the fused q/k/v projection and the MLP's first layer are split by
output rows (attention by heads, key/value heads included; MLP and every MoE expert by hidden units),
the attention output projection and the MLP's second layer by input columns (one all-reduce each),
the embedding and the head by vocabulary rows (a vocabulary-parallel head, whose logits are gathered).
Norms, the MoE router and the RoPE tables are replicated.

MoE: every expert (and the shared experts) is split by hidden units like a dense MLP; the router, its
correction bias (DeepSeek/GLM's grouped router) and the routing are replicated, so every rank picks the same
experts. Each expert's second layer leaves a partial sum and the MoE's output is all-reduced once, not once per
expert.

Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) is split by heads too: the query up-projection (`q`) and
the key/value up-projection (`kv_b`) by output rows, the output projection by input columns. The low-rank
down-projections (`q_a`, `kv_a`), their norms and hence the latent KV cache are replicated: every rank caches
the whole latent (kv_lora_rank + rope dims per token), as vLLM does without data-parallel attention.

Parameters the forward reads directly rather than through an `nn.Linear` -- gpt-oss's attention sinks (one logit
per query head, split with their heads) and stacked experts, MLA's `kv_b` (its weight enters the absorbed
decode) -- are split the same way (`shard_pieces` says how). A bias added inside a partial sum (every layer split
by input columns: `proj`, gpt-oss's stacked `down`) is held by rank 0 only (zeros elsewhere): the all-reduce adds
it once.

Fused layers hold several pieces (q | k | v rows, gate | up rows): each rank takes its share of every
piece, so its local rows are [q_r | k_r | v_r] and the forward splits them as one rank's heads. The
model's attention then sees a config with n_head / N query and n_query_groups / N key/value heads.

`layer_placement` is the other strategy (`--strategy sequential`): whole blocks on consecutive devices.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

from litllm.errors import LitLLMError


def check_divisible(config, n: int) -> None:
    """Refuse, in one line naming the numbers, a model whose heads or hidden units don't split over n ranks."""
    sizes = {"n_head": config.n_head, "n_query_groups (key/value heads)": config.n_query_groups}
    if config.is_moe_model:
        sizes["expert_intermediate_size"] = config.expert_intermediate_size
    if not config.is_moe_model or any(not config.is_moe(i) for i in range(config.n_layer)):
        sizes["intermediate_size"] = config.intermediate_size
    bad = [f"{name} {size}" for name, size in sizes.items() if size % n]
    if bad:
        raise LitLLMError(f"--devices {n}: tensor parallelism splits heads and hidden units evenly over the devices, "
                          f"but this model has {', '.join(bad)}, not divisible by {n}: pick a divisor of "
                          f"{_gcd(list(sizes.values()))}")
    if config.norm_qk == "full":
        raise LitLLMError(f"--devices {n}: tensor parallelism does not support norm_qk 'full' (a norm over all "
                          f"heads at once, {config.name or 'this model'}) yet: use --strategy sequential")


def _gcd(values: list[int]) -> int:
    import math

    out = 0
    for v in values:
        out = math.gcd(out, v)
    return out


def split_vocab(config, n: int) -> bool:
    """Shard the embedding and head by vocabulary rows (when the padded vocabulary divides by n; else replicate them)."""
    return config.padded_vocab_size % n == 0


def shard_pieces(name: str, config, n: int) -> Optional[tuple[int, tuple[int, ...]]]:
    """How the parameter `name` of the full model is split: (dim, piece sizes along dim) -- each rank takes
    1/n of every piece -- or None when it is replicated."""
    c = config
    parts = name.split(".")
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    if parts[0] in ("wte", "lm_head"):
        if not split_vocab(c, n):
            return None
        return (0, (c.padded_vocab_size,))
    if owner == "qkv":
        q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
        return (0, (q, kv, kv))
    if owner == "q":  # MLA's query (up-)projection: rows by heads
        return (0, (c.n_head * c.head_size,))
    if owner == "kv_b":  # MLA's key/value up-projection: each head's [nope key | value] rows
        return (0, (c.n_head * (c.head_size - c.qk_rope_head_dim + c.v_head_dim),))
    if leaf == "sinks":  # gpt-oss: one logit per query head
        return (0, (c.n_head,))
    if owner == "gate_up":  # gpt-oss's stacked experts: (E, C, 2I) columns [gate, up] interleaved; (E, 2I) bias
        return (2 if leaf == "weight" else 1, (2 * c.expert_intermediate_size,))
    if owner == "down":  # (E, I, C); its bias (E, C) is rank 0's (`rank0_only`)
        return (1, (c.expert_intermediate_size,)) if leaf == "weight" else None
    if owner == "proj":
        return (1, (_proj_in(name, c),)) if leaf == "weight" else None
    if owner == "fc":
        hidden = _mlp_hidden(name, c)
        return (0, (hidden, hidden) if c.mlp_class_name != "GeluMLP" else (hidden,))
    return None


def rank0_only(name: str) -> bool:
    """A bias added inside each rank's partial sum (a layer split by input columns, gpt-oss's stacked experts'
    output): rank 0 holds it, the others zeros."""
    return name.endswith((".proj.bias", ".experts.down.bias"))


def _proj_in(name: str, c) -> int:
    if ".attn." in name:
        return c.n_head * (c.v_head_dim if c.kv_lora_rank else c.head_size)
    return _mlp_hidden(name, c)


def _mlp_hidden(name: str, c) -> int:
    if ".shared_experts." in name:
        return c.expert_intermediate_size * c.n_shared_expert
    if ".experts." in name:
        return c.expert_intermediate_size
    return c.intermediate_size


def local_slices(pieces: tuple[int, tuple[int, ...]], rank: int, n: int) -> tuple[int, list[slice]]:
    """(dim, the index ranges along dim that rank `rank` holds, in order)."""
    dim, sizes = pieces
    out, start = [], 0
    for size in sizes:
        share = size // n
        out.append(slice(start + rank * share, start + (rank + 1) * share))
        start += size
    return dim, out


def check_supported(model: nn.Module, n: int) -> None:
    """Refuse a model with a layer the plan does not cover (it would run with the wrong shapes)."""
    from litllm.model import (CausalSelfAttention, ClampedSwiGLUMoE, GatedMLP, GeluMLP, GroupedMoE, Llama4MoE,
                              MLAttention, MoE)

    for i, block in enumerate(model.blocks):
        if type(block.attn) not in (CausalSelfAttention, MLAttention) or block.attn.adapter is not None:
            raise LitLLMError(f"--devices {n}: tensor parallelism does not cover block {i}'s attention "
                              f"({type(block.attn).__name__}{' with an adapter' if block.attn.adapter else ''})")
        if type(block.mlp) not in (GatedMLP, GeluMLP, MoE, GroupedMoE, ClampedSwiGLUMoE, Llama4MoE):
            raise LitLLMError(f"--devices {n}: tensor parallelism does not cover block {i}'s MLP "
                              f"({type(block.mlp).__name__})")


def parallelize(model: nn.Module, rank: int, n: int) -> nn.Module:
    """Make `model` (a GPT, typically on the meta device) rank `rank`'s shard of n in place; returns it. Every
    split parameter becomes a plain tensor shaped as this rank's share (`shard_pieces`; on the model's device,
    to be filled by `loading`), and the layers get their collectives (`layers.localize`). Its attention layers
    then compute n_head / N query heads and n_query_groups / N key/value heads."""
    import torch

    from litllm.parallel.layers import localize

    c = model.config
    check_divisible(c, n)
    check_supported(model, n)
    for name, p in list(model.named_parameters()):  # (a tied head is the embedding: once)
        pieces = shard_pieces(name, c, n)
        if pieces is None:
            continue
        dim, sizes = pieces
        shape = list(p.shape)
        shape[dim] = sum(sizes) // n
        owner, _, leaf = name.rpartition(".")
        local = torch.empty(shape, device=p.device, dtype=p.dtype)
        module = model.get_submodule(owner)
        setattr(module, leaf, nn.Parameter(local, requires_grad=p.requires_grad))
        if isinstance(module, nn.Linear) and leaf == "weight":  # what layouts made from it read (not the full sizes)
            module.out_features, module.in_features = shape
    if c.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    localize(model, rank, n, split_vocab(c, n))
    local = dataclasses.replace(c, n_head=c.n_head // n, n_query_groups=c.n_query_groups // n)
    for block in model.blocks:
        block.attn.config = local
        if hasattr(block.attn, "qkv_sizes"):
            q, kv = local.n_head * local.head_size, local.n_query_groups * local.head_size
            block.attn.qkv_sizes = (q, kv, kv)
    model.tp_size = n
    return model


def rank_config(config, n: int):
    """A config whose GPT has one tensor-parallel rank's shapes (of n): its heads, hidden units and vocabulary rows
    (what `litllm estimate --devices N` sizes). Checked like `parallelize` checks."""
    check_divisible(config, n)
    if n == 1:
        return config
    c = config
    changes = dict(n_head=c.n_head // n, n_query_groups=c.n_query_groups // n, head_size=c.head_size,
                   intermediate_size=c.intermediate_size // n)
    if c.moe_intermediate_size is not None:  # else the experts' size follows intermediate_size
        changes["moe_intermediate_size"] = c.moe_intermediate_size // n
    if split_vocab(c, n):
        changes.update(padded_vocab_size=c.padded_vocab_size // n, vocab_size=min(c.vocab_size, c.padded_vocab_size // n))
    return dataclasses.replace(c, **changes)


# ---------------------------------------------------------------------- bytes per rank
def local_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds: {"weights": bytes of its parameter shards (a tied head once), "replicated": the
    part of it every rank holds in full, "kv_cache": bytes of its KV cache}."""
    n = getattr(model, "tp_size", 1)
    weights = replicated = 0
    seen = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:  # a tied head is the embedding
            continue
        seen.add(p.data_ptr())
        size = p.numel() * p.element_size()
        weights += size
        if n == 1 or shard_pieces(name, model.config, n) is None:
            replicated += size
    kv = 0
    for block in model.blocks:
        cache = block.attn.kv_cache
        if cache is not None:
            kv += cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    return {"weights": weights, "replicated": replicated, "kv_cache": kv}


# ---------------------------------------------------------------------- --strategy sequential
def layer_placement(n_layer: int, devices: list) -> list:
    """The device of each block when consecutive blocks go on consecutive devices (as evenly as possible:
    the first n_layer % N devices take one block more), as LitGPT's `generate_sequentially` places them."""
    n = len(devices)
    if n > n_layer:
        raise LitLLMError(f"--strategy sequential: {n} devices but only {n_layer} blocks: use at most {n_layer} devices")
    per, extra = divmod(n_layer, n)
    out = []
    for d, device in enumerate(devices):
        out += [device] * (per + (d < extra))
    return out
