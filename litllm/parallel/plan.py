"""Which parameter of the GPT goes where under tensor parallelism (TP) over N ranks.

Megatron's split, written as torch DTensor plans (`parallelize_module` with `ColwiseParallel` /
`RowwiseParallel`): in each block the fused q/k/v projection and the MLP's first layer are split by
output rows (attention by heads, key/value heads included; MLP and every MoE expert by hidden units),
the attention output projection and the MLP's second layer by input columns (one all-reduce each),
the embedding and the head by vocabulary rows (a vocabulary-parallel head, whose logits are gathered).
Norms, the MoE router, RoPE tables and biases after an all-reduce are replicated.

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
    if config.mlp_class_name == "MoE":
        sizes["expert_intermediate_size"] = config.expert_intermediate_size
    if config.mlp_class_name != "MoE" or any(not config.is_moe(i) for i in range(config.n_layer)):
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
    if owner == "proj":
        return (1, (_proj_in(name, c),)) if leaf == "weight" else None
    if owner == "fc":
        hidden = _mlp_hidden(name, c)
        return (0, (hidden, hidden) if c.mlp_class_name in ("GatedMLP", "MoE") else (hidden,))
    return None


def _proj_in(name: str, c) -> int:
    if ".attn." in name:
        return c.n_head * c.head_size
    return _mlp_hidden(name, c)


def _mlp_hidden(name: str, c) -> int:
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


def tp_plan(model: nn.Module, n: int) -> dict:
    """The `parallelize_module` plan of a GPT: {module path: ParallelStyle}."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from litllm.model import MoE

    plan = {}
    if split_vocab(model.config, n):
        plan["wte"] = RowwiseParallel(input_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    for i, block in enumerate(model.blocks):
        plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
        plan[f"blocks.{i}.attn.proj"] = RowwiseParallel()
        mlps = [(f"blocks.{i}.mlp.experts.{e}", m) for e, m in enumerate(block.mlp.experts)] \
            if isinstance(block.mlp, MoE) else [(f"blocks.{i}.mlp", block.mlp)]
        for path, _ in mlps:
            plan[f"{path}.fc"] = ColwiseParallel()
            plan[f"{path}.proj"] = RowwiseParallel()
    for style in plan.values():
        style.src_data_rank = None  # every rank fills its own shard (loading.py): nothing to scatter
    return plan


def check_supported(model: nn.Module, n: int) -> None:
    """Refuse a model with a layer the plan does not cover (it would run with the wrong shapes)."""
    from litllm.model import CausalSelfAttention, GatedMLP, GeluMLP, MoE

    for i, block in enumerate(model.blocks):
        if type(block.attn) is not CausalSelfAttention or getattr(block.attn, "adapter", None) is not None:
            raise LitLLMError(f"--devices {n}: tensor parallelism does not cover block {i}'s attention "
                              f"({type(block.attn).__name__}{' with an adapter' if block.attn.adapter else ''})")
        if block.attn.sinks is not None:
            raise LitLLMError(f"--devices {n}: tensor parallelism does not cover block {i}'s attention sinks (gpt-oss)")
        if type(block.mlp) not in (GatedMLP, GeluMLP, MoE):
            raise LitLLMError(f"--devices {n}: tensor parallelism does not cover block {i}'s MLP "
                              f"({type(block.mlp).__name__})")


def parallelize(model: nn.Module, mesh, n: int) -> nn.Module:
    """Shard `model` (a GPT, typically on the meta device) over the 1-D `mesh` of n ranks in place; returns it.
    Its attention layers then compute n_head / N query heads and n_query_groups / N key/value heads."""
    from torch.distributed.tensor.parallel import parallelize_module

    c = model.config
    check_divisible(c, n)
    check_supported(model, n)
    tied = c.tie_embeddings
    parallelize_module(model, mesh, tp_plan(model, n))
    if tied:
        model.lm_head.weight = model.wte.weight  # both Shard(0) (or replicated): one tensor again
    local = dataclasses.replace(c, n_head=c.n_head // n, n_query_groups=c.n_query_groups // n)
    for block in model.blocks:
        block.attn.config = local
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


def local_kv_heads(model: nn.Module) -> int:
    """The key/value heads this rank's KV cache holds."""
    return model.blocks[0].attn.config.n_query_groups


# ---------------------------------------------------------------------- bytes per rank
def local_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds: {"weights": bytes of its parameter shards (a tied head once), "replicated": the
    part of it every rank holds in full, "kv_cache": bytes of its KV cache}."""
    from torch.distributed.tensor import DTensor

    weights = replicated = 0
    seen = set()
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.data_ptr() in seen:  # a tied head is the embedding
            continue
        seen.add(local.data_ptr())
        size = local.numel() * local.element_size()
        weights += size
        if not isinstance(p, DTensor) or all(pl.is_replicate() for pl in p.placements):
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
