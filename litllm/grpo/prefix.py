"""Score each prompt once per group: a prompt's G completions over one forward (and backward) of its tokens.

A rollout's rows are B prompts x G completions, a prompt's G rows adjacent and equal up to their completions.
Scored row by row, every prompt runs G times through the model, forward and backward. `shared_prompt_logps` packs
each group into one row instead: its prompt, then its G completions one after the other, each completion token at the
position it has in its own row (prompt_len + j) and attending to the prompt and to its own earlier tokens only (a
(B, 1, T, T) mask). Every completion token so sees exactly the keys and values it sees alone, the prompt's last
position predicts the G first tokens from one logits row, and the prompt's gradients gather the G completions'
contributions. The log-probs and gradients equal the row-by-row ones up to float rounding.

The packed row costs attention over all its (T, T) pairs (a mask, no causal kernel), so for long completions of a
short prompt on a narrow model the row-by-row pass is cheaper: `worth_sharing` compares both costs' estimates.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def _layout(completion_mask: torch.Tensor, prompt_lens: torch.Tensor, G: int):
    """The packed rows' shape: (each completion's first column in its group's row (N,), prompt lengths (B,), row
    lengths (B,))."""
    lengths = completion_mask.sum(1).view(-1, G)  # (B, G)
    prompts = prompt_lens[::G]  # (B,)
    starts = prompts[:, None] + torch.cumsum(lengths, dim=1) - lengths  # (B, G): after the completions before it
    return starts.reshape(-1), prompts, prompts + lengths.sum(1)


def worth_sharing(config, completion_mask: torch.Tensor, prompt_lens: torch.Tensor, G: int) -> bool:
    """Whether the packed rows cost fewer FLOPs than the row-by-row pass, per layer: the projections and MLP
    (~24 x n_embd^2 a token) over the tokens each pass runs, plus attention (4 x the heads' width a query/key pair)
    over all (T, T) pairs of a packed row against half of each (L, L) row (SDPA's causal kernel skips the rest)."""
    if G < 2 or (config.rope_scaling or {}).get("rope_type") == "longrope":
        return False  # (LongRoPE picks its factors by a forward's longest position, which packing changes)
    _, _, row_lens = _layout(completion_mask, prompt_lens, G)
    n, length = completion_mask.size(0), int((prompt_lens + completion_mask.sum(1)).max())
    width = int(row_lens.max())
    packed_tokens, packed_pairs = row_lens.size(0) * width, row_lens.size(0) * width**2
    linear, attention = 24 * config.n_embd**2, 4 * config.n_head * config.head_size
    packed = linear * packed_tokens + attention * packed_pairs
    rows = linear * n * length + attention * n * length**2 / 2
    return packed < rows


def packed_groups(input_ids: torch.Tensor, completion_mask: torch.Tensor, prompt_lens: torch.Tensor, G: int,
                  window: Optional[int] = None, chunk: Optional[int] = None):
    """(ids (B, T), positions (B, T), masks {local: (B, 1, T, T) bool}, keep (B, T) bool, source (M,), targets (M,)):
    each group's packed row (see the module; right-padded with 0), where the head runs (`keep`), and for each of the
    M completion tokens (row-major over `completion_mask`) the index among the kept positions of the one that
    predicts it, and the token itself. A completion's tokens must be its mask's first ones (as `rollout.pack` lays
    them out). Local layers (`window`: a sliding window, `chunk`: Llama 4's attention chunks) count distance in
    positions, as in the row-by-row pass."""
    device = input_ids.device
    starts, prompts, row_lens = _layout(completion_mask, prompt_lens, G)
    B, T, L = prompts.size(0), int(row_lens.max()), input_ids.size(1)
    valid = completion_mask.bool()  # (N, C)
    source_rows, token_index = valid.nonzero(as_tuple=True)  # (M,) each: row-major over the completion tokens
    rows, columns = source_rows // G, starts[source_rows] + token_index  # (M,): where each goes in the packed rows
    index = torch.arange(T, device=device)
    in_prompt = index[None, :] < prompts[:, None]  # (B, T)
    ids = torch.zeros(B, T, dtype=input_ids.dtype, device=device)
    width = min(T, L)  # (a prompt fits both)
    prompt_cells = in_prompt[:, :width]
    ids[:, :width][prompt_cells] = input_ids[::G, :width][prompt_cells]  # each group's prompt, from its first row
    positions = torch.where(in_prompt, index, 0)  # (B, T)
    docs = torch.where(in_prompt, 0, -1)  # (B, T): 0 the prompt, g + 1 completion g, -1 padding
    ids[rows, columns] = input_ids[source_rows, prompt_lens[source_rows] + token_index]
    positions[rows, columns] = prompt_lens[source_rows] + token_index
    docs[rows, columns] = source_rows % G + 1
    # a query sees earlier columns of its own completion and the prompt (padding sees itself and the prompt)
    allowed = (index[None, :, None] >= index[None, None, :]) & (
        (docs[:, :, None] == docs[:, None, :]) | (docs[:, None, :] == 0))  # (B, T, T)
    local = allowed
    if window is not None:
        local = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    if chunk is not None:
        local = allowed & (positions[:, :, None] // chunk == positions[:, None, :] // chunk)
    masks = {False: allowed[:, None], True: local[:, None]}
    # the position predicting token j: the prompt's last for j = 0 (one for the whole group), else token j - 1's column
    predicting = torch.where(token_index == 0, prompts[rows] - 1, columns - 1)  # (M,)
    keep = torch.zeros(B, T, dtype=torch.bool, device=device)
    keep[rows, predicting] = True
    rank = torch.cumsum(keep.view(-1), 0) - 1  # (B * T,): each kept position's index among the kept ones
    return ids, positions, masks, keep, rank[rows * T + predicting], ids[rows, columns]


def shared_prompt_logps(model: nn.Module, gpt: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                        prompt_lens: torch.Tensor, temperature: float, G: int) -> torch.Tensor:
    """`completion_logps` (N, C) fp32 of rows whose G consecutive ones share their prompt, each prompt run once.
    `model`: what to call (Fabric's wrapper), `gpt`: the GPT inside it."""
    from litllm.preference import head_only_at

    c = gpt.config
    ids, positions, masks, keep, source, targets = packed_groups(input_ids, completion_mask, prompt_lens, G,
                                                        c.sliding_window_size, c.attention_chunk_size)
    with head_only_at(gpt, keep):  # (the masks reach the blocks as arguments: checkpointing recomputes with them)
        logits = model(ids, input_pos=positions, attention_masks=masks)  # (1, K, V)
    if temperature != 1.0:
        logits = logits / temperature
    logps = torch.log_softmax(logits[0].float(), dim=-1)  # (K, V): K < M, the G first tokens share a row
    picked = logps[source, targets]  # (M,)
    out = torch.zeros(completion_mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(completion_mask.bool(), picked)
