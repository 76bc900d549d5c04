"""The sparse MoE experts of a CPU fp32 training step as one autograd Function: `fused_sparse_experts`.

`MoE.sparse_experts` runs each expert as a module call on its block of routed tokens: per expert and layer a
dozen autograd nodes (the block's slice, fc, chunk, SiLU, the product with up, proj, the routing weight's product,
cat) and as many small passes over memory, forward and backward, then `index_add_` back into token order. Here the
whole experts' path is one `torch.autograd.Function` whose forward and backward are each one C++ op (litllm/cpu_ops.cpp,
section "training: the MoE experts' path"): the experts' matmuls are the same at::mm (MKL) calls, looped over the
experts in C++, and each elementwise step is one AVX-512 pass over every routed row of every expert at once:
- forward: gather the tokens in expert order (one `index_select`), fc per expert into one (M, 2I) buffer
  (M = N k routed rows), a = w * silu(gate) * up in one pass (the routing weight goes on a, not on proj's output:
  proj has no bias, so the product is the same up to rounding), proj per expert into one (M, C) buffer, and each
  token's k rows summed back in expert order (`moe_combine`: no zero-filled output, no scatter).
- backward: the incoming gradient gathered in expert order, proj's input gradient per expert, then one pass that
  makes fc's output gradient, the routing weights' gradient (the dot of that gradient with silu(gate) * up) and
  w * silu(gate) * up for proj's weight gradient (a is not kept from the forward), then the weight and input
  gradients per expert, the input's summed back per token as in the forward.
Saved for the backward: the gathered inputs (M, C) and fc's outputs (M, 2I), where autograd keeps those and also
the SiLU output, the product and proj's output. One MoE layer of `benchmarks/moe.py` (N 1024, C 256, 16 experts
top-2 of size 256), forward + backward, one thread: 26.3 ms against 30.2 through the module calls (CPU time,
medians of 21).

`MoE._fused_experts_apply` says where it runs (as `GPT._fused_loss_applies` for the fused head + loss): SwiGLU experts
(`GatedMLP` with SiLU) with plain bias-free fp32 Linears and no hooks on them (LoRA, FSDP, quantized experts keep the
module calls), fp32 CPU tensors with gradients to make, not under torch.compile or autocast, the routing weight on
the experts' outputs, on an AVX-512 CPU where litllm's op library builds or loads (`litllm.cpu_ops.row_split_op`,
built once per machine); elsewhere the module path runs. `$LITLLM_FUSED_EXPERTS=0` turns it off. `litllm estimate`'s
fake step of a CPU run takes it too (`litllm.cpu_ops.fake_cpu_training`; `MoE.balanced_experts`), the ops' outputs
from their fake functions (`litllm.cpu_ops._register_training_fakes`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from litllm.cpu_ops import training_ops_ready

FUSED_EXPERTS_ENV = "LITLLM_FUSED_EXPERTS"
"""`0`/`false`: MoE training keeps the experts' module calls (`MoE.sparse_experts`), e.g. to compare."""


def fused_experts_available() -> bool:
    """Whether this process can run `SparseExperts`: `$LITLLM_FUSED_EXPERTS` not off, an AVX-512 CPU, and litllm's op
    library loaded, or built (once per machine) and loaded now."""
    if not training_ops_ready(FUSED_EXPERTS_ENV):
        return False
    _register_flop_formulas()
    return True


@lru_cache(maxsize=None)
def _register_flop_formulas() -> None:
    """The experts' matmul FLOPs of the two ops for `torch.utils.flop_counter` (its mode sees an op, not the
    matmuls it makes): the same as the module path's matmuls. A FlopCounterMode made after this counts them."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.litllm_cpu.moe_experts_forward)
    def _(x, w, token, pos, k, fc, proj, counts, out_shape=None) -> int:
        M, C, I = token[0], x[1], fc[0][0] // 2
        return 2 * M * C * 3 * I  # fc (2I outputs) and proj (C outputs) on every routed row

    @register_flop_formula(torch.ops.litllm_cpu.moe_experts_backward)
    def _(grad_y, xs, h, w, token, pos, k, fc, proj, counts, need_x, need_weights, out_shape=None) -> int:
        M, C, I = xs[0], xs[1], h[1] // 2
        # proj's input gradient; the weight gradients of proj and fc; fc's input gradient
        return 2 * M * C * I * (1 + 3 * need_weights + 2 * need_x)


class SparseExperts(torch.autograd.Function):
    """The experts' path of `MoE.sparse_experts` for SwiGLU experts, forward and backward (module docstring): each
    one C++ op (`moe_experts_forward` / `moe_experts_backward`), whose loop over the experts calls at::mm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, pos: torch.Tensor, counts: list,
                *expert_weights: torch.Tensor) -> torch.Tensor:
        """x (N, C); weights (M,) the routing weights of the M = N k (token, slot)s, slot-major per token; order (M,)
        those slots sorted by expert (tokens in order within an expert); pos (M,) each slot's place in that order;
        counts: the slots of each expert; expert_weights: every expert's fc weight (2I, C), then every expert's
        proj weight (C, I)."""
        E, k = len(counts), order.numel() // x.size(0)
        token = order // k  # (M,) the token of each sorted slot
        sorted_weights = weights.index_select(0, order)  # (M,)
        y, xs, h = torch.ops.litllm_cpu.moe_experts_forward(
            x, sorted_weights, token, pos, k, expert_weights[:E], expert_weights[E:], counts)
        ctx.save_for_backward(xs, h, sorted_weights, token, pos, *expert_weights)
        ctx.counts, ctx.k = counts, k
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xs, h, sorted_weights, token, pos, *expert_weights = ctx.saved_tensors
        counts, E = ctx.counts, len(ctx.counts)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_weights = any(ctx.needs_input_grad[5:])
        grad_x, grad_w, grad_fc, grad_proj = torch.ops.litllm_cpu.moe_experts_backward(
            grad, xs, h, sorted_weights, token, pos, ctx.k, expert_weights[:E], expert_weights[E:], counts, need_x,
            need_weights)
        if not need_weights:
            grad_fc = grad_proj = [None] * E
        # an expert no token chose gets no gradient, as in the module path (AdamW skips it)
        needs = ctx.needs_input_grad[5:]
        grad_fc = [g if n and c else None for g, n, c in zip(grad_fc, needs[:E], counts)]
        grad_proj = [g if n and c else None for g, n, c in zip(grad_proj, needs[E:], counts)]
        grad_w = grad_w.index_select(0, pos) if need_w else None  # (M,) back in (token, slot) order
        return (grad_x if need_x else None, grad_w, None, None, None, *grad_fc, *grad_proj)


def fused_sparse_experts(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                         counts: list[int], pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`MoE.sparse_experts` (x (N, C), weights (N, k)) through `SparseExperts`, from its sort: order (N*k,) the
    (token, slot)s grouped by expert, counts the slots of each expert, pos (N*k,) each slot's place in order (made
    here where the caller has none: the fused routing makes it). The same sum, each token's experts in expert index
    order, up to rounding (the routing weight multiplies proj's input, not its output)."""
    if pos is None:
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))  # (N*k,)
    return SparseExperts.apply(x.contiguous(), weights.reshape(-1).contiguous(), order, pos, counts,
                               *(m.fc.weight for m in experts), *(m.proj.weight for m in experts))
