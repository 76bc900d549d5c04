"""Next-token losses computed from hidden states one sequence chunk at a time.

Large-vocabulary logits dominate activation memory: a (B, T, V) fp32 tensor for a 128k vocabulary
is 0.5 GB per 1k tokens of a row. Both functions run `head` (the output projection) on `chunk_size`
positions at a time, so only one slice of logits exists in fp32 at once.

`head` is any callable from (B, t, C) hidden states to (B, t, V) logits; pass `nn.Identity()` with
`x` = logits that are already computed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Head = Callable[[torch.Tensor], torch.Tensor]


def chunked_cross_entropy(
    head: Head, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk_size: int = 1024
) -> torch.Tensor:
    """Mean next-token loss over the targets that are not `ignore_index` (0 when there is none).

    x: (B, T, C) hidden states; targets: (B, T) next-token ids, already shifted.
    """
    total = x.new_zeros((), dtype=torch.float32)
    for x_chunk, t_chunk in zip(x.split(chunk_size, dim=1), targets.split(chunk_size, dim=1)):
        logits = head(x_chunk).float()  # (B, chunk, V)
        total = total + F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), t_chunk.reshape(-1), ignore_index=ignore_index, reduction="sum"
        )
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count


def token_logprobs(
    head: Head, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-probability of every target token, unreduced: (B, T) fp32, 0 where the target is `ignore_index`.

    Summing a row over its response tokens gives a sequence's log-likelihood (what DPO compares);
    `-token_logprobs(...).sum() / count` is `chunked_cross_entropy` up to rounding.
    """
    pieces = []
    for x_chunk, t_chunk in zip(x.split(chunk_size, dim=1), targets.split(chunk_size, dim=1)):
        logits = head(x_chunk).float()  # (B, chunk, V)
        keep = t_chunk != ignore_index
        # cross_entropy with reduction="none" is the fused log_softmax + gather, and gives 0 at ignored targets
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), t_chunk.reshape(-1), ignore_index=ignore_index, reduction="none"
        ).view_as(t_chunk)
        pieces.append(torch.where(keep, -nll, torch.zeros_like(nll)))
    return torch.cat(pieces, dim=1)
