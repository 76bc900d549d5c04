"""MoE under torch.compile: training-sized inputs keep their sparse dispatch (one graph break per MoE layer,
around the data-dependent expert blocks; the rest compiled) and compute what eager computes, gradients
included; a decode step traces as one graph (no host sync: the dense path)."""

from __future__ import annotations

import pytest
import torch

from hf_models import VOCAB, save_hf_checkpoint
from litllm.convert import convert_to_litllm
from litllm.model import GPT, MoE

FAMILIES = ["qwen3_moe", "llama4", "deepseek_v3"]  # MoE, Llama4MoE, GroupedMoE (+ gpt-oss's ClampedSwiGLUMoE below)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            save_hf_checkpoint(family, folder)
            convert_to_litllm(folder)
            cache[family] = folder
        return GPT.from_checkpoint(cache[family])

    return get


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _moe_layer(model) -> MoE:
    return next(b.mlp for b in model.blocks if isinstance(b.mlp, MoE))


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_moe_dispatches_sparsely_and_equals_eager(family, models):
    moe = _moe_layer(models(family).train())
    x = torch.randn(2, 24, moe.config.n_embd, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(moe)(x)
    # one break, at the expert dispatch, which runs eagerly; routing (and the shared expert) compiled
    assert len(explained.break_reasons) == 1
    assert "torch.compiler.disable()" in explained.break_reasons[0].reason
    assert "sparse_experts" in explained.break_reasons[0].reason
    seen = []
    hooks = [e.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0])) for e in moe.experts]
    try:
        x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = moe(x_eager)
        eager_rows = sum(seen)
        seen.clear()
        actual = torch.compile(moe, backend="aot_eager")(x_comp)
    finally:
        for h in hooks:
            h.remove()
    assert sum(seen) == eager_rows == 2 * 24 * moe.config.n_expert_per_token  # k experts per token, not n_expert
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, atol=1e-6, rtol=0)


def test_compiled_blocks_train_like_eager(models):
    """`--compile` (each block compiled): the loss and the experts' gradients equal eager's."""
    eager, compiled = models("qwen3_moe").train(), models("qwen3_moe").train()
    for block in compiled.blocks:
        block.compile(backend="aot_eager")
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss = model(idx, targets=idx)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES + ["gpt_oss"])
def test_decode_step_traces_as_one_graph(family, models):
    """The engine's compiled decode step (`Engine(compile=True)`, benchmarks/generate.py): one token through the
    whole model with a KV cache, no graph break (no host sync), and the logits eager gives."""
    model = models(family).eval()
    model.set_kv_cache(1, 32)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(prompt, input_pos=torch.arange(20))
        token, pos = prompt[:, -1:], torch.tensor([20])
        explained = torch._dynamo.explain(model)(token, input_pos=pos)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        expected = model(token, input_pos=pos)
        actual = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(token, input_pos=pos)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
