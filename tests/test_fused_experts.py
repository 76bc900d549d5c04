"""The fused MoE experts of a CPU fp32 training step (`litllm.fused_experts`, C++ in litllm/cpu_ops.cpp) compute what
the experts' module calls compute: outputs and every gradient (input, routing weights, each expert's weights) against
the module path in fp32 and against it in float64 as the oracle, on shapes that are no multiple of the kernels'
16 lanes; and a Qwen3-MoE training step takes the fused path with the module path's loss and gradients."""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from hf_models import VOCAB, save_hf_checkpoint
from litllm.config import Config
from litllm.convert import convert_to_litllm
from litllm.fused_experts import SparseExperts, fused_experts_available
from litllm.model import GPT, Llama4MoE, MoE

pytestmark = pytest.mark.skipif(not fused_experts_available(), reason="no AVX-512 or litllm's op library here")


def module_path():
    """The experts as module calls (`MoE.sparse_experts` before the fused path)."""
    return unittest.mock.patch.object(MoE, "_fused_experts_apply", lambda self, x: False)


def moe_layer(n_expert: int = 5, k: int = 2, C: int = 24, I: int = 20) -> MoE:
    config = Config(n_embd=C, n_head=2, n_layer=1, block_size=16, vocab_size=32, padded_vocab_size=32,
                    mlp_class_name="MoE", activation="silu", n_expert=n_expert, n_expert_per_token=k,
                    moe_intermediate_size=I, intermediate_size=2 * C)
    torch.manual_seed(0)
    return MoE(config)


def experts_and_grads(moe: MoE, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, grad: torch.Tensor):
    """sparse_experts' output and the gradients of x, the routing weights and every expert weight (None where an
    expert got no gradient) for the incoming gradient `grad`."""
    x, weights = x.detach().requires_grad_(), weights.detach().requires_grad_()
    y = moe.sparse_experts(x, weights, chosen)
    params = [p for e in moe.experts for p in (e.fc.weight, e.proj.weight)]
    return y.detach(), torch.autograd.grad(y, [x, weights, *params], grad, allow_unused=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_experts_equal_the_module_path_and_the_float64_oracle(k):
    moe = moe_layer(k=k)
    N, C = 37, moe.config.n_embd
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g)
    chosen = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])  # expert 4 chosen by no token
    weights = torch.rand(N, k, generator=g)
    grad = torch.randn(N, C, generator=g)
    assert moe._fused_experts_apply(x)
    fused = experts_and_grads(moe, x, weights, chosen, grad)
    with module_path():
        plain = experts_and_grads(moe, x, weights, chosen, grad)
        oracle = experts_and_grads(moe.double(), x.double(), weights.double(), chosen, grad.double())
    moe.float()
    fused_all = [fused[0], *fused[1]]
    plain_all, oracle_all = [plain[0], *plain[1]], [oracle[0], *oracle[1]]
    assert all(g is None for g in fused_all[-2:]) and all(g is None for g in plain_all[-2:])  # expert 4: no gradient
    for got, same, want in zip(fused_all[:-2], plain_all[:-2], oracle_all[:-2]):
        # as close to float64's as the module path's fp32 is (rounding only)
        error, rounding = (got.double() - want).abs().max(), (same.double() - want).abs().max()
        assert error <= 4 * rounding + 1e-6 * want.abs().max(), (error, rounding)
        torch.testing.assert_close(got, same, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fused_experts_apply_only_to_cpu_fp32_training_of_plain_silu_experts():
    moe = moe_layer()
    x = torch.randn(8, moe.config.n_embd)
    assert moe._fused_experts_apply(x)
    with torch.no_grad():  # inference: the module path
        assert not moe._fused_experts_apply(x)
    assert not moe.eval()._fused_experts_apply(x)  # eval with gradients too (its outputs as inference's, bit for bit)
    moe.train()
    assert not moe._fused_experts_apply(x.bfloat16())
    hook = moe.experts[1].fc.register_forward_hook(lambda *a: None)  # e.g. an adapter's
    assert not moe._fused_experts_apply(x)
    hook.remove()
    with unittest.mock.patch.dict("os.environ", {"LITLLM_FUSED_EXPERTS": "0"}):
        assert not moe._fused_experts_apply(x)
    llama4 = Llama4MoE(moe.config)  # routing weight on the experts' inputs
    assert not llama4._fused_experts_apply(x)


def test_qwen3_moe_training_step_takes_the_fused_experts_with_the_module_paths_loss_and_gradients(tmp_path):
    save_hf_checkpoint("qwen3_moe", tmp_path)
    convert_to_litllm(tmp_path)
    model = GPT.from_checkpoint(tmp_path).train()
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)

    def loss_and_grads():
        loss = model(idx, targets=targets)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    with unittest.mock.patch.object(SparseExperts, "apply", wraps=SparseExperts.apply) as op:
        fused_loss, fused = loss_and_grads()
    assert op.call_count == 2  # the two MoE layers (the checkpoint's middle layer is dense)
    with module_path():
        loss, plain = loss_and_grads()
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=0)
    assert fused.keys() == plain.keys()
    for name, grad in plain.items():
        assert (fused[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(fused[name], grad, atol=1e-6, rtol=1e-4, msg=name)
