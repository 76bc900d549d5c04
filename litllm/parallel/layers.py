"""A tensor-parallel rank's forward: plain local tensors and explicit collectives (gpt-fast's way), no DTensor.

Each rank's parameters are ordinary tensors holding its share (`plan.parallelize`), so the model's own forward
runs its heads and hidden units unchanged; what it needs on top is communication at three kinds of places:
- a layer split by input columns (attention's output projection, a dense MLP's second layer) and a whole MoE
  (its experts' and shared experts' second layers are split that way) leave each rank a partial sum: one
  all-reduce of their output (`reduce_output`). A bias inside such a partial sum is held by rank 0 alone
  (`plan.rank0_only`), so the sum adds it once;
- an embedding split by vocabulary rows (`VocabShardEmbedding`): each rank looks up the ids in its rows, zeros
  the others, and the all-reduce sums the one row that was found;
- a head split by vocabulary rows (`VocabShardHead`): the ranks' logits are gathered along the vocabulary.
So a decode step costs two all-reduces per layer plus one for the embedding and one gather for the head, and no
host sync of its own: on CUDA (NCCL) the collectives are queued on the stream like any kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: sum the ranks' partial outputs of `module` (in place: the output is the layer's own)."""
    dist.all_reduce(output)
    return output


class VocabShardEmbedding(nn.Embedding):
    """An embedding holding vocabulary rows [vocab_start, vocab_start + rows) of the full table."""

    vocab_start = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))  # (B, T): ids another rank holds
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x)
        return x


class VocabShardHead(nn.Linear):
    """A head holding a contiguous share of the vocabulary's rows: every rank gets all the logits, in order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight, self.bias)  # (..., V / N)
        parts = torch.empty((dist.get_world_size(),) + local.shape, dtype=local.dtype, device=local.device)
        _all_gather_single(parts.flatten(0, 1), local.contiguous())  # (N, ..., V / N): one collective
        return parts.movedim(0, -2).reshape(*local.shape[:-1], -1)  # (..., V)


def _all_gather_single(output: torch.Tensor, local: torch.Tensor) -> None:
    """The ranks' `local` concatenated along dim 0 into `output` (`all_gather_into_tensor` before torch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local)


def localize(model: nn.Module, rank: int, n: int, split_vocab: bool) -> None:
    """Install the communication above on `model`, whose parameters already hold rank `rank`'s shares (of n)."""
    from litllm.model import MoE

    if split_vocab:
        model.wte.__class__ = VocabShardEmbedding
        model.wte.vocab_start = rank * (model.config.padded_vocab_size // n)
        model.lm_head.__class__ = VocabShardHead
    for block in model.blocks:
        block.attn.proj.register_forward_hook(reduce_output)
        # a MoE's experts leave partial sums (routing is replicated: every rank runs the same experts): one
        # all-reduce of their total, not one per expert
        (block.mlp if isinstance(block.mlp, MoE) else block.mlp.proj).register_forward_hook(reduce_output)
