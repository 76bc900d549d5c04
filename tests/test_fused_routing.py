"""The fused softmax top-k routing of a CPU fp32 training step (`litllm.fused_routing`, C++ in litllm/cpu_ops.cpp)
computes what `MoE.route`, the sort in `MoE.sparse_experts` and `router_stats` compute: the same experts as torch.topk
(ties too), the weights, the sort and the load-balancing loss's terms, and the logits' gradient against float64 as
the oracle, on odd shapes; MoE layers and whole training steps of the MoE families (Qwen3-MoE, OLMoE, Mixtral,
gpt-oss) take it with the unfused path's loss and gradients."""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from hf_models import VOCAB, save_hf_checkpoint
from litllm import fused_routing
from litllm.config import Config
from litllm.convert import convert_to_litllm
from litllm.model import GPT, GroupedMoE, Llama4MoE, MoE, router_stats

pytestmark = pytest.mark.skipif(not fused_routing.ops_ready(), reason="no AVX-512 or litllm's op library here")


def unfused_routing():
    """`MoE.route` and the sort of `MoE.sparse_experts` as aten ops (the path before the fused routing)."""
    return unittest.mock.patch.object(fused_routing, "ops_ready", lambda: False)


def logits_with_ties(N: int, E: int, seed: int = 0) -> torch.Tensor:
    """(N, E) random logits, a third of the rows with equal values: all equal, half the row equal to the largest, a
    repeated value every third expert, values rounded to integers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, E, generator=g) * 2
    z[0:4] = 0.5
    z[4:8, : (E + 1) // 2] = 3.0
    z[8:12, ::3] = 2.5
    z[12 : N // 3] = z[12 : N // 3].round()
    return z


def routing_reference(z: torch.Tensor, k: int, normalize: bool):
    """`MoE.route`'s weights and chosen experts from the logits z, as its code computes them."""
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    weights, chosen = probs.topk(k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), chosen


@pytest.mark.parametrize("E,k", [(5, 1), (5, 2), (16, 2), (37, 3), (64, 8), (128, 2), (3, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_picks_torch_topks_experts_ties_included_and_its_sort_and_loss_terms(E, k, normalize):
    # (128, 2): k * 64 <= E, where torch.topk takes partial_sort instead of nth_element
    N = 61
    z = logits_with_ties(N, E)
    got = fused_routing.softmax_topk(z, k, normalize)
    weights, chosen = routing_reference(z, k, normalize)
    assert torch.equal(got.chosen, chosen)
    torch.testing.assert_close(got.weights, weights, rtol=1e-6, atol=1e-7)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(got.order, order)
    assert torch.equal(got.pos, torch.empty_like(order).scatter_(0, order, torch.arange(N * k)))
    assert got.counts == torch.bincount(flat, minlength=E).tolist()
    assigned, prob_sum, rows = router_stats(z, k)
    assert torch.equal(got.stats[0], assigned) and got.stats[2] == rows == N
    torch.testing.assert_close(got.stats[1], prob_sum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E,k", [(5, 1), (16, 2), (37, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_gradient_equals_the_unfused_one_and_float64s(E, k, normalize):
    N = 45
    g = torch.Generator().manual_seed(2)
    z = logits_with_ties(N, E, seed=1)
    grad_weights, grad_prob_sum = torch.randn(N, k, generator=g), torch.randn(E, generator=g)

    def logits_grad(z, fused):
        z = z.detach().requires_grad_()
        if fused:
            routing = fused_routing.softmax_topk(z, k, normalize)
            weights, prob_sum = routing.weights, routing.stats[1]
        else:  # the unfused path's ops, on the experts the fused op chose (in float64: the oracle)
            probs = torch.softmax(z, dim=-1)
            weights = probs.gather(1, chosen)
            weights = weights / weights.sum(dim=-1, keepdim=True) if normalize else weights
            prob_sum = probs.sum(dim=0)
        loss = (weights * grad_weights.to(z.dtype)).sum() + (prob_sum * grad_prob_sum.to(z.dtype)).sum()
        return torch.autograd.grad(loss, z)[0]

    chosen = fused_routing.softmax_topk(z, k, normalize).chosen
    got, plain, oracle = logits_grad(z, True), logits_grad(z, False), logits_grad(z.double(), False)
    error, rounding = (got.double() - oracle).abs().max(), (plain.double() - oracle).abs().max()
    assert error <= 4 * rounding + 1e-7, (error, rounding)


def moe_config(**overrides) -> Config:
    settings = dict(n_embd=24, n_head=2, n_layer=2, block_size=16, vocab_size=32, padded_vocab_size=32,
                    mlp_class_name="MoE", activation="silu", n_expert=5, n_expert_per_token=2,
                    moe_intermediate_size=20, intermediate_size=48, norm_class_name="RMSNorm",
                    router_aux_loss_coef=0.01)
    return Config(**{**settings, **overrides})


def test_fused_routing_applies_to_softmax_topk_routers_in_eager_cpu_fp32_training_only():
    config = moe_config()
    torch.manual_seed(0)
    moe = MoE(config).train()
    x = torch.randn(8, config.n_embd)
    with unittest.mock.patch.object(fused_routing, "softmax_topk", wraps=fused_routing.softmax_topk) as op:
        moe._fused_routing(x)
        assert op.call_count == 1
    assert moe._fused_routing(x) is not None
    with torch.no_grad():  # inference
        assert moe._fused_routing(x) is None
    assert moe.eval()._fused_routing(x) is None
    moe.train()
    assert moe._fused_routing(x.double()) is None
    with unittest.mock.patch.dict("os.environ", {fused_routing.FUSED_ROUTING_ENV: "0"}):
        assert moe._fused_routing(x) is None
    assert Llama4MoE(config).train()._fused_routing(x) is None  # sigmoid of the top-k logits
    grouped = moe_config(n_expert=4, n_expert_groups=2, n_topk_groups=1, moe_scoring="sigmoid")
    assert GroupedMoE(grouped).train()._fused_routing(torch.randn(8, grouped.n_embd)) is None


def loss_and_grads(model: GPT, idx: torch.Tensor):
    targets = torch.cat([idx[:, 1:], torch.full((idx.size(0), 1), -100)], dim=1)
    loss = model(idx, targets=targets)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), model.router_aux_loss, grads


def assert_same_step(fused, plain, atol=1e-6):
    (loss, aux, grads), (plain_loss, plain_aux, plain_grads) = fused, plain
    torch.testing.assert_close(loss, plain_loss, atol=atol, rtol=0)
    torch.testing.assert_close(aux, plain_aux, atol=atol, rtol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert (grads[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(grads[name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "gpt_oss"])
def test_moe_family_training_step_takes_the_fused_routing_with_the_unfused_loss_and_gradients(family, tmp_path):
    save_hf_checkpoint(family, tmp_path)
    convert_to_litllm(tmp_path)
    model = GPT.from_checkpoint(tmp_path, router_aux_loss_coef=0.02).train()
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with unittest.mock.patch.object(fused_routing, "softmax_topk", wraps=fused_routing.softmax_topk) as op:
        fused = loss_and_grads(model, idx)
    assert op.call_count == sum(isinstance(m, MoE) for m in model.modules()) > 0
    with unfused_routing():
        plain = loss_and_grads(model, idx)
    assert_same_step(fused, plain)


@pytest.mark.parametrize("k", [1, 2])
def test_training_step_with_ties_takes_the_unfused_experts(k):
    """A router of zero weights: every token's logits tie; both paths must pick torch.topk's experts."""
    torch.manual_seed(0)
    model = GPT(moe_config(n_expert_per_token=k)).train()
    for block in model.blocks:
        torch.nn.init.zeros_(block.mlp.router.weight)
    idx = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(1))
    fused = loss_and_grads(model, idx)
    with unfused_routing():
        plain = loss_and_grads(model, idx)
    assert_same_step(fused, plain)
