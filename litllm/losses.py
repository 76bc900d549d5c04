"""Next-token losses computed from hidden states one sequence chunk at a time.

Large-vocabulary logits dominate activation memory: a (B, T, V) fp32 tensor for a 128k vocabulary
is 0.5 GB per 1k tokens of a row. Both functions run `head` (the output projection) on `chunk_size`
positions at a time, so only one slice of logits exists in fp32 at once.

`head` is any callable from (B, t, C) hidden states to (B, t, V) logits; pass `nn.Identity()` with
`x` = logits that are already computed. `linear_cross_entropy` is `chunked_cross_entropy` for a plain fp32 linear
head, with each chunk's backward done in the forward while its logits are in cache.
"""

from __future__ import annotations

from typing import Callable, Optional

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


LINEAR_CE_ROWS = 256
"""Rows of logits `linear_cross_entropy` makes at once: (256, V) fp32 stays in cache between the head's matmul, the
log-softmax and the two gradient matmuls at small vocabularies (4 MiB at V 4096), and keeps each matmul large
enough for MKL's full rate. Head + loss, one thread, N 1024, C 256: 1.1x less CPU time than 1024 rows at V 4096,
1.5x less than 32 rows at V 32k; 128 rows took the same as 256. Repeated on that host (load ~2): 128, 256, 512
and 1024 rows within 2% of one another (46.1-46.9 ms best of 25, head + loss with gradients at V 4096), and the three
matmuls in the step cost no more than transformers' unchunked ones (`benchmarks/moe.py --floor`'s table by role)."""


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T + bias, `LINEAR_CE_ROWS` rows at a time, with each chunk's
    gradients computed in the forward while its logits are in cache (Liger's fused linear cross-entropy): the
    gradient of a row's loss with respect to its logits is softmax - one_hot(target), exp(log_softmax) with 1
    taken off at the target, made in place in the one reused chunk buffer. The weight's gradient is written by the
    first chunk's matmul and accumulated by the others' (no zero-filled (V, C) buffer). Backward only scales the saved
    gradients by the incoming one, in place. Against autograd through the head and `F.cross_entropy`, no (N, V)
    tensor is allocated, kept or zero-filled (the log-probabilities kept for the backward, cross-entropy's
    scattered gradient, log-softmax's backward output): 1.45x less CPU time for head + loss at
    `benchmarks/moe.py`'s shapes (N 1024, C 256, V 4096), 1.6-2x at V 32k. The gradients differ from autograd's
    by rounding only: the mean's 1/count (0 on an ignored row) multiplies the matmuls' (n, C) inputs or outputs,
    not the (n, V) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
        """x: (N, C) fp32 hidden states; weight: (V, C); bias: (V,) or None; targets: (N,). The mean loss over the
        targets that are not `ignore_index` (0 when there is none)."""
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = x.size(0), weight.size(0)
        keep = targets != ignore_index  # (N,)
        count = keep.sum().clamp(min=1)
        row_scale = keep[:, None].to(x.dtype) / count  # (N, 1): d(mean loss) / d(row's loss)
        safe_targets = torch.where(keep, targets, 0)[:, None]  # (N, 1) (an ignore_index may lie outside the vocabulary)
        minus_one = x.new_full((min(N, LINEAR_CE_ROWS), 1), -1.0)
        total = x.new_zeros(())
        grad_x = torch.empty_like(x) if need_x else None
        # the first chunk's mm writes grad_w (no zero fill); zeros where there is no chunk (N = 0)
        grad_w = (torch.empty_like(weight) if N else torch.zeros_like(weight)) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        buffer = x.new_empty(min(N, LINEAR_CE_ROWS), V)  # one chunk's logits, reused: no allocation per chunk
        for start in range(0, N, LINEAR_CE_ROWS):
            rows = slice(start, min(start + LINEAR_CE_ROWS, N))
            x_rows, scale = x[rows], row_scale[rows]  # (n, C), (n, 1)
            n = x_rows.size(0)
            z = buffer[:n]  # (n, V)
            if bias is None:
                torch.mm(x_rows, weight.t(), out=z)
            else:
                torch.addmm(bias, x_rows, weight.t(), out=z)
            torch.log_softmax(z, dim=-1, out=z)  # (in place: each element is read before it is written)
            total -= z.gather(1, safe_targets[rows]).mul_(keep[rows, None]).sum()
            if not (need_x or need_w or need_b):
                continue
            grad = z.exp_().scatter_add_(1, safe_targets[rows], minus_one[:n])  # (n, V) softmax - one_hot(target)
            # the mean's scale, 0 on an ignored row, goes on the matmuls' (n, C) sides: one pass less over (n, V)
            if need_x:
                torch.mm(grad, weight, out=grad_x[rows]).mul_(scale)
            if need_w and start == 0:
                torch.mm(grad.t(), x_rows * scale, out=grad_w)
            elif need_w:
                torch.addmm(grad_w, grad.t(), x_rows * scale, out=grad_w)  # (out=: FlopCounterMode counts it)
            if need_b:
                grad_b.addmv_(grad.t(), scale[:, 0])
        ctx.grads = grad_x, grad_w, grad_b  # (made here, not inputs of the graph: kept as attributes)
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were made in its forward for one backward: "
                               "no second backward through it (retain_graph)")
        # (in place, with no test for an incoming 1, which would be a host sync: a pass over (V, C) and (N, C))
        return (*(None if g is None else g.mul_(grad) for g in grads), None, None)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """`chunked_cross_entropy` with `head` = `F.linear(., weight, bias)`: the same mean loss (up to summation order)
    in fewer passes over memory (`LinearCrossEntropy`). x: (B, T, C) fp32 hidden states; targets: (B, T) next-token
    ids, already shifted."""
    return LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias, targets.reshape(-1), ignore_index)


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
