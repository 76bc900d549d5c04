"""Fused training ops for the elementwise work around attention: RMSNorm, a residual add + RMSNorm, and qwen3's
per-head qk-norm + RoPE straight from the fused qkv projection. Each forward and each backward is ONE pass of a C++
kernel over its rows (litllm/cpu_ops.cpp, section "training: norms and RoPE"; built and loaded with litllm's other CPU
ops by `litllm.cpu_ops.row_split_op`), where autograd through aten's ops runs 5-10 ops a direction, each writing a
fresh tensor, plus the roll (a cat) and its backward of RoPE. The values are the unfused ones up to rounding (sums
taken in another order).

They apply (`applies`) to eager CPU fp32 training with gradients, on CPUs with AVX-512 where the op library builds or
loads, outside torch.compile and autocast, and not where `$LITLLM_FUSED_NORMS` is `0`; `litllm.model` keeps its own
code everywhere else (GPU, bf16, compiled steps, inference, the fake tensors of `litllm estimate` but for a CPU
run's, `litllm.cpu_ops.fake_cpu_training`). A CPU training norm calls `training_rms_norm`: the fused kernel where it
applies, else `RMSNormFunction` (aten ops with the backward written out).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from litllm.cpu_ops import eager_fp32_training, plain_tensor, training_ops_ready

FUSED_NORMS_ENV = "LITLLM_FUSED_NORMS"
"""`0`/`false`: training keeps the unfused norms and RoPE (e.g. to compare; `benchmarks/moe.py --unfused_norms`)."""


@lru_cache(maxsize=None)
def ops_ready() -> bool:
    """Whether the fused ops can run here: `$LITLLM_FUSED_NORMS` is not `0`, the CPU has AVX-512 and the op library
    builds or loads (a first training step on a machine builds it, about a minute, once)."""
    return training_ops_ready(FUSED_NORMS_ENV)


def applies(x: torch.Tensor, *weights: Optional[torch.Tensor]) -> bool:
    """Whether the fused ops take `x` (and the norm `weights`): plain fp32 CPU tensors (not DTensor or a
    torch.compile trace; fake ones only in `litllm.cpu_ops.fake_cpu_training`), gradients on, no autocast, and
    `ops_ready`."""
    return (eager_fp32_training(x)
            and all(w is None or (plain_tensor(w.data) and w.dtype == torch.float32 and w.is_cpu) for w in weights)
            and ops_ready())


class FusedRMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, optionally of s = x + residual (returned too: the
    block's residual stream), forward and backward each one kernel; the backward sums the weight's gradient over rows
    in the same pass. Saved: the normalized input and one rstd per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()  # (N, C)
        res = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
        y, s, rstd = torch.ops.litllm_cpu.rms_norm_forward(rows, res, weight.contiguous(), eps)
        normed_input = rows if res is None else s
        ctx.save_for_backward(normed_input, rstd, weight)
        ctx.has_residual = res is not None
        if res is None:
            return y.view(shape)
        return s.view(shape), y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        normed_input, rstd, weight = ctx.saved_tensors
        grad_sum, grad_y = grads if ctx.has_residual else (None, grads[0])
        C = normed_input.size(1)
        add = None if grad_sum is None else grad_sum.reshape(-1, C).contiguous()
        grad_x, grad_w = torch.ops.litllm_cpu.rms_norm_backward(
            grad_y.reshape(-1, C).contiguous(), normed_input, rstd, weight, add, ctx.needs_input_grad[2])
        grad_x = grad_x.view(grad_y.shape)
        # s = x + residual: both get s's gradient (as aten's add does)
        return grad_x, (grad_x if ctx.has_residual else None), (grad_w if ctx.needs_input_grad[2] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., C) with weight (C,), fused (callers check `applies`)."""
    return FusedRMSNorm.apply(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s)) with s = x + residual, both (..., C), in one kernel each way (callers check `applies`)."""
    return FusedRMSNorm.apply(x, residual, weight, eps)


class RMSNormFunction(torch.autograd.Function):
    """fp32 RMSNorm, x * rsqrt(mean(x^2) + eps) * weight over the last dim, with its backward written out.
    `F.rms_norm`'s forward on the CPU is this one (the same values) but autograd differentiates its ops one by
    one; written out, forward + backward take 1.4-1.6x less CPU time (Qwen3-MoE's norms at `benchmarks/moe.py`'s
    shapes). What CPU training runs where the fused kernel does not (no AVX-512, `$LITLLM_FUSED_NORMS` 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        normed, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of normed = rstd * (g - normed * mean(g * normed)) along the normed dim
            grad_x = torch.addcmul(grad_normed, normed, (grad_normed * normed).mean(-1, keepdim=True), value=-1)
            grad_x = grad_x.mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, weight.numel()).sum(0)
        return grad_x, grad_weight, None


def training_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of an eager CPU fp32 training forward, x (..., C), weight (C,) a plain tensor: the fused kernel where it
    applies (`applies`), else `RMSNormFunction` (the same forward as F.rms_norm, a cheaper backward than autograd
    through its ops)."""
    if applies(x, weight):
        return rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


class FusedQKNormRope(torch.autograd.Function):
    """From the fused projection's output qkv (B, T, (nh + 2 nkv) hs): q (B, T, nh, hs) and k (B, T, nkv, hs), each
    head RMS-normalized with its weight (qwen3's qk-norm; no weights: no norm, as Llama) and rotated by RoPE over the
    whole head, and v (B, T, nkv, hs), a copy, so that the backward writes qkv's whole gradient in one pass (no split's
    cat). Callers transpose to SDPA's (B, heads, T, hs) as views; the backward reads SDPA's gradients in whatever
    strides they come."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, eps: float):
        q, k, v, rstd = torch.ops.litllm_cpu.qk_norm_rope_forward(qkv, q_weight, k_weight, cos, sin, nh, nkv, eps)
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, rstd)
        return q, k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        qkv, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
        grad_qkv, grad_qw, grad_kw = torch.ops.litllm_cpu.qk_norm_rope_backward(
            *grads, qkv, q_weight, k_weight, cos, sin, rstd)
        need = ctx.needs_input_grad
        return (grad_qkv, grad_qw if need[1] else None, grad_kw if need[2] else None, None, None, None, None, None)


def qk_norm_rope(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) (B, T, heads, hs) of `FusedQKNormRope` (callers check `applies`). qkv: (B, T, (nh + 2 nkv) hs), its
    last dim contiguous; cos/sin: (T, hs) or (B, 1, T, hs), as `litllm.model.rope_cache` makes them (sin's first half
    negated); q_weight/k_weight: (hs,) each, or both None."""
    B, T = qkv.shape[:2]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if cos.dim() == 4:  # (B, 1, T, hs): per-row positions
        cos, sin = cos[:, 0], sin[:, 0]
    else:  # (T, hs): the same positions in every row, read with a 0 stride
        cos, sin = cos.expand(B, T, cos.size(-1)), sin.expand(B, T, sin.size(-1))
    return FusedQKNormRope.apply(qkv, q_weight, k_weight, cos, sin, nh, nkv, eps)
