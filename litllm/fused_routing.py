"""Softmax top-k MoE routing of a CPU fp32 training step as one autograd Function: `softmax_topk`.

`MoE.route` (Qwen3-MoE, Mixtral, OLMoE, gpt-oss) runs softmax, topk and the renormalisation's sum and division on the
router's logits; `MoE.sparse_experts` then sorts the (token, slot)s by expert (argsort, bincount, the scatter of
their places), and the load-balancing loss computes softmax and topk a second time from the kept logits, plus a
one-hot sum. Each is a few autograd nodes and fresh tensors, forward and backward, per MoE layer. Here all of it is
one C++ op each way (litllm/cpu_ops.cpp, section "training: MoE routing"), one pass over the logits' rows:
- forward: each row's softmax, its top k as `torch.topk` picks them (ties too: where the k + 1 largest hold two
  equal values, aten's own algorithm runs), the renormalised weights, each expert's summed probability and
  assignments (the load-balancing loss's two terms, `MoE.router_stats`), and the counting sort of the slots by expert
  that `sparse_experts` takes (`order`, `pos`, `counts`: a stable argsort's order).
- backward: the logits' gradient from the weights' and the summed probabilities' in one pass per row (the
  renormalisation's and softmax's backward).
The values are the unfused ones up to rounding (another exp, sums in another order). At `benchmarks/moe.py`'s shapes
(1024 tokens, 16 experts, top-2) one layer's routing, sort and loss terms, forward + backward, one thread, take
~0.17 CPU-ms beyond the loss's own plumbing against ~0.84 unfused (medians of 301 alternating, load 3.6-4.7; the
forward op alone 75 us, the backward 27): ~2.7 ms of a ~260 ms step over its 4 MoE layers.

`MoE._fused_routing` says where it runs: `MoE`'s own softmax top-k `route` (subclasses with their own routers,
Llama 4's and the grouped ones, keep theirs), in train mode, on logits of an eager CPU fp32 training forward
(`litllm.cpu_ops.eager_fp32_training`) where litllm's op library runs (AVX-512), and not where `$LITLLM_FUSED_ROUTING`
is `0`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from litllm.cpu_ops import eager_fp32_training, training_ops_ready

FUSED_ROUTING_ENV = "LITLLM_FUSED_ROUTING"
"""`0`/`false`: MoE training keeps the unfused routing (`MoE.route`, the sort in `MoE.sparse_experts`), e.g. to
compare (`benchmarks/moe.py --unfused_routing`)."""


def ops_ready() -> bool:
    """Whether the fused routing can run here: `$LITLLM_FUSED_ROUTING` not off, an AVX-512 CPU, and litllm's op library
    loaded, or built (once per machine) and loaded now."""
    return training_ops_ready(FUSED_ROUTING_ENV)


def applies(logits: torch.Tensor) -> bool:
    """Whether `softmax_topk` takes the router's logits (N, E): an eager CPU fp32 training forward of real tensors,
    and `ops_ready`. Not `litllm estimate`'s fake step (`litllm.cpu_ops.fake_cpu_training`): the sort's counts are
    data, and the unfused routing keeps what this one keeps, the (N, E) probabilities."""
    return type(logits) is torch.Tensor and eager_fp32_training(logits) and ops_ready()


class Routing(NamedTuple):
    """What `softmax_topk` returns: all (N, ...) tensors are per token, the (N*k,) ones per (token, slot),
    slot-major per token."""

    weights: torch.Tensor
    """(N, k) fp32: each token's chosen experts' probabilities (renormalised to sum 1 where asked)."""
    chosen: torch.Tensor
    """(N, k) int64: each token's experts, as `torch.topk` orders them."""
    order: torch.Tensor
    """(N*k,) the (token, slot)s sorted by expert, tokens in order within an expert."""
    pos: torch.Tensor
    """(N*k,) each (token, slot)'s place in `order`."""
    counts: list[int]
    """(E,) the (token, slot)s of each expert (read back once: the sparse dispatch's one host sync)."""
    stats: tuple[torch.Tensor, torch.Tensor, int]
    """The load-balancing loss's terms of this layer: (assignments (E,) fp32, summed probabilities (E,), N)."""


class SoftmaxTopK(torch.autograd.Function):
    """Softmax top-k routing, forward and backward each one C++ op (`moe_route_forward` / `moe_route_backward`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int, normalize: bool):
        weights, chosen, probs, prob_sum, assigned, order, pos = torch.ops.litllm_cpu.moe_route_forward(
            logits, k, normalize)
        ctx.save_for_backward(probs, chosen)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(chosen, assigned, order, pos)
        return weights, prob_sum, chosen, assigned, order, pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights: torch.Tensor, grad_prob_sum: torch.Tensor, *_):
        probs, chosen = ctx.saved_tensors
        grad = torch.ops.litllm_cpu.moe_route_backward(grad_weights.contiguous(), grad_prob_sum.contiguous(), probs,
                                                        chosen, ctx.normalize)
        return grad, None, None


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> Routing:
    """The routing of router logits (N, E) (callers check `applies`): what `MoE.route` computes (softmax in fp32, its
    top k, divided by their sum where `normalize`), the sort `MoE.sparse_experts` makes and the load-balancing loss's
    terms (`Routing`)."""
    weights, prob_sum, chosen, assigned, order, pos = SoftmaxTopK.apply(logits.contiguous(), k, normalize)
    counts = assigned.tolist()
    return Routing(weights, chosen, order, pos, counts, (assigned.float(), prob_sum, logits.size(0)))
