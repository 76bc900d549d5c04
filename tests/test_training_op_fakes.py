"""The fake (meta) functions of litllm's fused training ops (`litllm.cpu_ops._register_training_fakes`): for every op
and its optional arguments, on odd shapes, the outputs on fake tensors have the real op's shapes, dtypes, strides and
aliasing (`torch.library.opcheck`'s fake-tensor check); `litllm estimate` runs them (tests/test_estimate.py)."""

from __future__ import annotations

import pytest
import torch

from litllm import fused_norms


@pytest.fixture(scope="module", autouse=True)
def ops():
    if not fused_norms.ops_ready():
        pytest.skip("litllm's fused training ops do not build here (no C++ compiler or no AVX-512)")


GENERATOR = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GENERATOR)


def check(op, *args) -> None:
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_fakes(residual):
    ops = torch.ops.litllm_cpu
    N, C = 7, 37
    check(ops.rms_norm_forward, randn(N, C), randn(N, C) if residual else None, randn(C), 1e-6)
    for weight_grad in (True, False):
        check(ops.rms_norm_backward, randn(N, C), randn(N, C), randn(N).abs(), randn(C),
              randn(N, C) if residual else None, weight_grad)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "rope_only"])
def test_qk_norm_rope_fakes(norm):
    ops = torch.ops.litllm_cpu
    B, T, nh, nkv, hs = 3, 5, 3, 1, 6
    qkv = randn(B, T, (nh + 2 * nkv) * hs)
    cos, sin = randn(B, T, hs), randn(B, T, hs)
    weights = (randn(hs), randn(hs)) if norm else (None, None)
    check(ops.qk_norm_rope_forward, qkv, *weights, cos, sin, nh, nkv, 1e-6)
    q, k, v, rstd = ops.qk_norm_rope_forward(qkv, *weights, cos, sin, nh, nkv, 1e-6)
    grad_q = randn(B, nh, T, hs).transpose(1, 2)  # SDPA's gradients come transposed
    check(ops.qk_norm_rope_backward, grad_q, randn(*k.shape), randn(*v.shape), qkv, *weights, cos, sin, rstd)


def test_moe_experts_fakes():
    ops = torch.ops.litllm_cpu
    N, C, k, I = 5, 24, 2, 10
    M = N * k
    h, w = randn(M, 2 * I), randn(M)
    check(ops.moe_swiglu_forward, h, w)
    check(ops.moe_swiglu_backward, h, w, randn(M, I))
    counts = [6, 0, 4]  # an expert no token chose
    order = torch.randperm(M, generator=GENERATOR)
    token, pos = order // k, torch.empty_like(order).scatter_(0, order, torch.arange(M))
    check(ops.moe_combine, randn(M, C), pos, k)
    fc, proj, x = [randn(2 * I, C) for _ in counts], [randn(C, I) for _ in counts], randn(N, C)
    check(ops.moe_experts_forward, x, w, token, pos, k, fc, proj, counts)
    _, xs, h = ops.moe_experts_forward(x, w, token, pos, k, fc, proj, counts)
    for need_x in (True, False):
        for need_weights in (True, False):
            check(ops.moe_experts_backward, randn(N, C), xs, h, w, token, pos, k, fc, proj, counts, need_x,
                  need_weights)
