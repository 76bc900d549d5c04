"""A tensor-parallel rank's forward: plain local tensors and explicit collectives (gpt-fast's way), no DTensor.

Each rank's parameters are ordinary tensors holding its share (`plan.parallelize`), so the model's own forward
runs its heads and hidden units unchanged; what it needs on top is communication at three kinds of places:
- attention (its output projection is split by input columns), a dense MLP (its second layer is) and a whole MoE
  (its experts' and shared experts' second layers are) leave each rank a partial sum: one all-reduce of the
  module's output (`reduce_output`, a hook on the attention and MLP modules, not on their output Linears: the
  CPU weight layouts and a compiled step's `OneRowLinear`s replace those Linears). A bias inside such a partial
  sum is held by rank 0 alone (`plan.rank0_only`), so the sum adds it once;
- an embedding split by vocabulary rows (`VocabShardEmbedding`): each rank looks up the ids in its rows, zeros
  the others, and the all-reduce sums the one row that was found;
- a head split by vocabulary rows (`VocabShardHead`): the ranks' logits are gathered along the vocabulary.
So a decode step costs two all-reduces per layer plus one for the embedding and one gather for the head, and no
host sync of its own: on CUDA (NCCL) the collectives are queued on the stream like any kernel.

The collectives are c10d's functional ops (`torch.ops._c10d_functional`, what
`torch.distributed._functional_collectives` issues): eager, each is the process group's collective and its wait;
traced (`torch.export`, dynamo), they are graph nodes, so a rank's compiled decode step
(`litllm.compile_decode`) issues them from inside its graph, in the same order (on gloo in a process group of
their own, `step_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


_group = {"name": "", "step": "", "size": 1}
"""The process groups the collectives run in (`localize` notes them), by name, which the ops take (and a compiled
step keeps): "name" the run's group (eager forwards, the engine's broadcasts), "step" the one a compiled step's
collectives run in (`step_group`), and their size."""


def step_group() -> str:
    """The name of the process group a compiled step's collectives run in: on gloo a group of their own (every rank
    calls this at the same point: making one is a collective). A saved AOTInductor step runs holding Python's GIL,
    and gloo's worker thread, under the group's queue lock, releases each finished collective's tensors, which
    takes the GIL where a tensor is one Python made (the engine's broadcasts, an eager forward's all-reduces): in one
    group the step's next collective then waited for that lock, the worker for the GIL (a deadlock after a few
    tokens, torch 2.13). The step's own group only ever holds the step's buffers. NCCL: the run's group (the step
    is `torch.compile`'s there, which drops the GIL at each op)."""
    if dist.get_backend() != "gloo":
        return dist.group.WORLD.group_name
    return dist.new_group(backend="gloo").group_name


def _group_name() -> str:
    """The group of a collective issued now: the compiled step's while tracing it (`torch.export`, dynamo)."""
    return _group["step"] if torch.compiler.is_compiling() else _group["name"]


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `x` (a new tensor)."""
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(x, "sum", _group_name()))


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order: (N * x.size(0), ...)."""
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_gather_into_tensor(x.contiguous(), _group["size"], _group_name()))


def reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: sum the ranks' partial outputs of `module`."""
    return all_reduce(output)


class VocabShardEmbedding(nn.Embedding):
    """An embedding holding vocabulary rows [vocab_start, vocab_start + rows) of the full table."""

    vocab_start = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))  # (B, T): ids another rank holds
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        return all_reduce(x.masked_fill(outside[..., None], 0))


class VocabShardHead(nn.Linear):
    """A head holding a contiguous share of the vocabulary's rows: every rank gets all the logits, in order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight, self.bias)  # (..., V / N)
        parts = all_gather(local[None]).view(-1, *local.shape)  # (N, ..., V / N): one collective
        # a copy, never a view of the gathered buffer: a saved step's output is no tensor its collective holds
        # (`step_group`)
        return torch.cat(parts.unbind(0), dim=-1)  # (..., V)


def localize(model: nn.Module, rank: int, n: int, split_vocab: bool) -> None:
    """Install the communication above on `model`, whose parameters already hold rank `rank`'s shares (of n)."""
    _group.update(name=dist.group.WORLD.group_name, step=step_group(), size=n)
    model.tp_step_group = _group["step"]
    if split_vocab:
        model.wte.__class__ = VocabShardEmbedding
        model.wte.vocab_start = rank * (model.config.padded_vocab_size // n)
        model.lm_head.__class__ = VocabShardHead
    for block in model.blocks:
        # attention and the MLP return their output Linear's result as is (`plan.check_supported`'s classes); a
        # MoE's experts leave partial sums (routing is replicated: every rank runs the same experts): one
        # all-reduce of their total, not one per expert
        block.attn.register_forward_hook(reduce_output)
        block.mlp.register_forward_hook(reduce_output)
