"""Next-token losses computed from hidden states one sequence chunk at a time.

Large-vocabulary logits dominate activation memory: a (B, T, V) fp32 tensor for a 128k vocabulary
is 0.5 GB per 1k tokens of a row. Both functions run `head` (the output projection) on `chunk_size`
positions at a time, so only one slice of logits exists in fp32 at once.

`head` is any callable from (B, t, C) hidden states to (B, t, V) logits; pass `nn.Identity()` with
`x` = logits that are already computed. `linear_cross_entropy` is `chunked_cross_entropy` for a plain linear
head, with each chunk's backward done in the forward.
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


class LinearCrossEntropy(torch.autograd.Function):
    """Summed next-token loss of the logits x @ weight.T + bias, chunk by chunk, with each chunk's gradients
    computed in the forward while its logits are at hand (Liger's fused linear cross-entropy): the gradient of
    the summed loss with respect to the logits is softmax - one_hot(target) (0 on ignored rows), which is
    exp(log_softmax) with 1 taken off at the target. Backward then only scales the saved gradients by the
    incoming one. Against autograd through `F.linear` -> `F.cross_entropy` this saves cross-entropy's own
    backward pass over the (N, V) logits and the zero-filled (N, V) gradient it scatters into, and keeps no
    logits alive between forward and backward. The loss is the same ops' (bit for bit); the gradients differ
    by rounding (the incoming scale multiplies the matmuls' outputs instead of their inputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                ignore_index: int, chunk_size: int) -> torch.Tensor:
        """x: (B, T, C) hidden states; weight: (V, C); bias: (V,) or None; targets: (B, T). Chunks of
        `chunk_size` positions of every row, as `chunked_cross_entropy` takes them."""
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        total = x.new_zeros((), dtype=torch.float32)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for start in range(0, x.size(1), chunk_size):
            x_chunk = x[:, start:start + chunk_size]  # (B, chunk, C)
            t_chunk = targets[:, start:start + chunk_size].reshape(-1)  # (n,), n = B * chunk
            # the logits as `chunked_cross_entropy`'s head computes them (a 3-D input: in bf16 with a bias, a 2-D
            # one rounds differently), then the same log_softmax and nll_loss: the same loss, bit for bit
            logits = F.linear(x_chunk, weight, bias).float()  # (B, chunk, V)
            logprobs = torch.log_softmax(logits.view(-1, logits.size(-1)), dim=-1)  # (n, V)
            total = total + F.nll_loss(logprobs, t_chunk, ignore_index=ignore_index, reduction="sum")
            if not (need_x or need_w or need_b):
                continue
            keep = t_chunk != ignore_index
            grad = logprobs.exp_()  # (n, V): softmax - one_hot(target), in place of the log-probabilities
            grad.scatter_add_(1, torch.where(keep, t_chunk, 0)[:, None], -keep[:, None].to(grad.dtype))
            ignored = (~keep).nonzero()[:, 0]  # (a host sync: GPT takes this path on the CPU only)
            if ignored.numel():  # (rows by index: a boolean mask would rewrite every row)
                grad.index_fill_(0, ignored, 0)
            grad = grad.to(x.dtype)
            if need_x:
                grad_x[:, start:start + chunk_size] = (grad @ weight).view(x.size(0), -1, x.size(-1))
            if need_w:
                # (out= rather than addmm_: torch's FlopCounterMode counts the one, not the other)
                torch.addmm(grad_w, grad.t(), x_chunk.reshape(-1, x.size(-1)), out=grad_w)
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ignore_index: int = -100, chunk_size: int = 1024,
) -> torch.Tensor:
    """`chunked_cross_entropy` with `head` = `F.linear(., weight, bias)`, the same loss in fewer passes over the
    logits (`LinearCrossEntropy`). x: (B, T, C) hidden states; targets: (B, T) next-token ids, already shifted."""
    total = LinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, chunk_size)
    return total / (targets != ignore_index).sum().clamp(min=1)


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
