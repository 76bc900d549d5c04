"""The fused training norms and RoPE (litllm.fused_norms): values and gradients against the model's unfused code run
in float64 (the oracle), on odd shapes, at 1 and 2 threads; and a whole model's training step, fused against unfused."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from conftest import tiny_config

from litllm import fused_norms
from litllm.model import GPT, RMSNorm, apply_rope, rope_cache


@pytest.fixture(scope="module", autouse=True)
def ops():
    if not fused_norms.ops_ready():
        pytest.skip("the fused norm ops do not build here (no C++ compiler or no AVX-512)")


def reference_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def grads(outputs, inputs, upstream):
    """d(sum of outputs * upstream)/d(inputs)."""
    total = sum((o * u).sum() for o, u in zip(outputs, upstream))
    return torch.autograd.grad(total, inputs)


def close(fused, reference):
    for a, b in zip(fused, reference):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_matches_float64(threads, residual):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 200, requires_grad=True)  # 111 rows: chunks of uneven sizes on 2 threads
    h = torch.randn(3, 37, 200, requires_grad=True)
    w = (torch.rand(200) + 0.5).requires_grad_()
    up = [torch.randn(3, 37, 200), torch.randn(3, 37, 200)]
    inputs = (x, h, w) if residual else (x, w)
    if residual:
        outs = fused_norms.add_rms_norm(x, h, w, 1e-6)
    else:
        outs = (fused_norms.rms_norm(x, w, 1e-6),)
    fused = [*outs, *grads(outs, inputs, up[-len(outs):])]
    d = [t.detach().double().requires_grad_() for t in inputs]
    if residual:
        s = d[0] + d[1]
        ref_outs = (s, reference_rms_norm(s, d[2], 1e-6))
    else:
        ref_outs = (reference_rms_norm(d[0], d[1], 1e-6),)
    reference = [*ref_outs, *grads(ref_outs, d, [u.double() for u in up[-len(outs):]])]
    close(fused, reference)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "rope_only"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_qk_norm_rope_matches_float64(threads, norm, per_row):
    torch.manual_seed(0)
    B, T, nh, nkv, hs, eps = 3, 19, 6, 2, 24, 1e-6
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, requires_grad=True)
    q_w = (torch.rand(hs) + 0.5).requires_grad_() if norm else None
    k_w = (torch.rand(hs) + 0.5).requires_grad_() if norm else None
    cos_all, sin_all = rope_cache(64, hs, 10000.0, None, "cpu")
    positions = torch.randint(0, 64, (B, T)) if per_row else torch.arange(5, 5 + T)
    cos, sin = cos_all[positions], sin_all[positions]  # (T, hs) or (B, T, hs)
    if per_row:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs), as GPT._rope makes them
    q, k, v = fused_norms.qk_norm_rope(qkv, q_w, k_w, cos, sin, nh, nkv, eps)
    # SDPA's gradients come in (B, heads, T, hs) memory: the backward must read those strides
    up = [torch.randn(B, n, T, hs).transpose(1, 2) for n in (nh, nkv, nkv)]
    inputs = [t for t in (qkv, q_w, k_w) if t is not None]
    fused = [q, k, v, *grads((q, k, v), inputs, up)]

    d = [t.detach().double().requires_grad_() for t in inputs]
    dq, dk, dv = d[0].split((nh * hs, nkv * hs, nkv * hs), dim=-1)
    dq, dk, dv = dq.view(B, T, nh, hs), dk.view(B, T, nkv, hs), dv.view(B, T, nkv, hs)
    if norm:
        dq, dk = reference_rms_norm(dq, d[1], eps), reference_rms_norm(dk, d[2], eps)
    rc, rs = cos.double(), sin.double()
    dq = apply_rope(dq.transpose(1, 2), rc, rs).transpose(1, 2)  # (the model's own RoPE, on (B, heads, T, hs))
    dk = apply_rope(dk.transpose(1, 2), rc, rs).transpose(1, 2)
    reference = [dq, dk, dv, *grads((dq, dk, dv), d, [u.double() for u in up])]
    close(fused, reference)


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])  # (a qwen3_moe-like config: MoE, per-head qk-norm)
def test_training_step_fused_equals_unfused(family):
    """A model's loss and every parameter's gradient with the fused ops equal those of the unfused code."""
    if family == "qwen3_moe":
        config = tiny_config(mlp_class_name="MoE", norm_qk="head", n_expert=4, n_expert_per_token=2,
                             moe_intermediate_size=32, router_aux_loss_coef=0.01)
    else:
        config = tiny_config()
    torch.manual_seed(0)
    model = GPT(config).train()
    idx = torch.randint(0, config.vocab_size, (2, 13))

    def loss_and_grads(fused: bool):
        model.zero_grad(set_to_none=True)
        with unittest.mock.patch.object(fused_norms, "ops_ready", lambda: fused):
            loss = model(idx, targets=idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_f, grads_f = loss_and_grads(True)
    loss_u, grads_u = loss_and_grads(False)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_ops_stay_out_of_inference_and_bf16():
    x = torch.randn(2, 5, 16)
    w = torch.ones(16, requires_grad=True)
    with torch.no_grad():
        assert not fused_norms.applies(x, w)
    assert not fused_norms.applies(x.bfloat16(), w)
    assert fused_norms.applies(x, w)
    with unittest.mock.patch.dict("os.environ", {fused_norms.FUSED_NORMS_ENV: "0"}):
        fused_norms.ops_ready.cache_clear()
        try:
            assert not fused_norms.applies(x, w)
        finally:
            fused_norms.ops_ready.cache_clear()
    norm = RMSNorm(16)
    assert norm(x).grad_fn.name() == "FusedRMSNormBackward"


def test_rms_norm_with_a_frozen_weight():
    """A frozen norm (LoRA finetuning): the input's gradient only, as the unfused code gives it."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 48, requires_grad=True)
    w = torch.rand(48) + 0.5
    fused_norms.rms_norm(x, w, 1e-5).pow(2).sum().backward()
    d = x.detach().double().requires_grad_()
    reference_rms_norm(d, w.double(), 1e-5).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), d.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_bf16_decode_norm_op_matches_float64(residual):
    """litllm's eager bf16 norm op (`bf16_rms_norm`, the eager bf16 decode step's norms): the residual sum is bf16's
    own `x + h` bit for bit, the norm within bf16's rounding of the float64 norm of that sum, on odd shapes."""
    from litllm.cpu_ops import bf16_norm_op

    op = bf16_norm_op()
    torch.manual_seed(0)
    for shape in [(1, 1, 768), (3, 5, 96), (7, 40)]:
        x = (torch.randn(shape) * 3).bfloat16()
        h = torch.randn(shape).bfloat16() if residual else None
        w = torch.randn(shape[-1]).bfloat16()
        y, s = op(x, h, w, 1e-5)
        assert torch.equal(s, x + h) if residual else s.numel() == 0
        expected = reference_rms_norm((x + h if residual else x).double(), w.double(), 1e-5)
        torch.testing.assert_close(y.double(), expected, rtol=2 ** -8, atol=1e-6)  # bf16: 8 significant bits
        assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_eager_bf16_decoding_through_the_norm_op_equals_the_unfused_norms(monkeypatch):
    """A bf16 model's eager KV-cache decoding calls the op for its norms (inference only: not with autograd) and gives
    the unfused norms' logits within bf16 rounding and their greedy tokens."""
    import litllm.model
    from litllm.engine import Engine
    from test_compile_decode import greedy_tokens

    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, intermediate_size=128)).to(torch.bfloat16).eval()
    calls = []
    op = litllm.model.bf16_norm_op
    monkeypatch.setattr(litllm.model, "bf16_norm_op", lambda: calls.append(1) or op())
    ids, pos = torch.tensor([list(range(1, 9))]), torch.arange(8)[None]
    with torch.inference_mode():
        model.set_kv_cache(1, 16)
        fused = model.decode(ids, pos, kv_len=8).float()
        assert calls
        with monkeypatch.context() as m:
            m.setattr(RMSNorm, "_bf16_op_applies", lambda self, x, w: False)
            model.set_kv_cache(1, 16)
            unfused = model.decode(ids, pos, kv_len=8).float()
    torch.testing.assert_close(fused, unfused, atol=3e-2 * unfused.abs().max().item(), rtol=0)
    calls.clear()
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    model.blocks[0].norm_1(x).sum().backward()  # training: the unfused norm, with autograd
    assert not calls and x.grad is not None
    tokens = greedy_tokens(Engine(model, None, 1, 64, threads=1), list(range(1, 9)))
    monkeypatch.setattr(RMSNorm, "_bf16_op_applies", lambda self, x, w: False)
    assert greedy_tokens(Engine(model, None, 1, 64, threads=1), list(range(1, 9))) == tokens


def test_the_eager_norm_op_lookup_reads_no_file_and_a_load_for_decoding_loads_the_built_library(monkeypatch):
    """`bf16_norm_op`, asked by each eager bf16 CPU norm (~25 a token), reads nothing from disk in a process that has
    not loaded the op library (it used to look for the file, hashing the 120 kB source for its name: ~170 us a call);
    a model's load for decoding (`choose_decode_layout`) loads the library built already, and so does a build later
    in the process (`row_split_op`): the norms take the op from then on."""
    from litllm import cpu_ops
    from litllm.compile_ledger import choose_decode_layout

    monkeypatch.setattr(cpu_ops, "_loaded", False)  # a process that has not loaded the library yet
    cpu_ops.row_split_op.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "library_folder", lambda: pytest.fail("the per-call lookup looked at the disk"))
        assert cpu_ops.bf16_norm_op() is None
    model = GPT(tiny_config()).to(torch.bfloat16).eval()
    choose_decode_layout(model, None)
    assert cpu_ops.bf16_norm_op() is torch.ops.litllm_cpu.bf16_rms_norm
    with monkeypatch.context() as m:  # loaded: the other lookups (per call in int8 layers) read no file either
        m.setattr(cpu_ops, "library_folder", lambda: pytest.fail("a lookup of the loaded library looked at the disk"))
        assert cpu_ops.library_built() and cpu_ops.load_built_library()
    with torch.inference_mode():
        x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
        assert model.blocks[0].norm_1._bf16_op_applies(x, model.blocks[0].norm_1.weight)
    monkeypatch.setattr(cpu_ops, "_loaded", False)
    cpu_ops.row_split_op.cache_clear()
    assert cpu_ops.bf16_norm_op() is None and cpu_ops.row_split_op() is not None  # a build (or load) later
    assert cpu_ops.bf16_norm_op() is torch.ops.litllm_cpu.bf16_rms_norm
