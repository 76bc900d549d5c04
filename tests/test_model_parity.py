"""Every family's logits match transformers; KV-cache decoding matches uncached decoding."""

from __future__ import annotations

import pytest
import torch

from hf_models import FAMILIES, VOCAB, save_hf_checkpoint
from litllm.convert import convert_to_litllm
from litllm.model import GPT


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF model, converted litllm model); built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            hf = save_hf_checkpoint(family, folder)
            convert_to_litllm(folder)
            cache[family] = (hf, GPT.from_checkpoint(folder).eval())
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, converted):
    hf, model = converted(family)
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 40))  # longer than every test sliding window / original rope context
    with torch.no_grad():
        expected = hf(idx).logits
        actual = model(idx)
    assert actual.shape[:2] == expected.shape[:2]
    torch.testing.assert_close(actual[..., : expected.shape[-1]], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["phi3-longrope"])
def test_longrope_short_sequences_use_short_factors(family, converted):
    hf, model = converted(family)
    idx = torch.randint(0, VOCAB, (1, 20))  # fits the original context: HF uses the short factors
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf(idx).logits, atol=1e-4, rtol=0)


# the families of 2025-26 (one module each in litllm/hf/families/)
NEW_FAMILIES = ["smollm3", "olmo3", "granite", "ministral3", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "deepseek_v2",
                "glm4_moe", "llama4"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral", "mixtral", "phi", "gemma3", "qwen3"] + NEW_FAMILIES)
def test_kv_cache_decoding_equals_uncached(family, converted):
    _, model = converted(family)
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 5))
    # uncached greedy: re-run the whole sequence for each new token
    seq = prompt
    uncached_logits = []
    with torch.no_grad():
        for _ in range(32):
            logits = model(seq)[:, -1]
            uncached_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        # cached greedy: prefill once, then one token at a time
        model.set_kv_cache(batch_size=1, max_seq_length=64)
        try:
            logits = model.decode(prompt, torch.arange(5))[:, -1]
            cached = prompt
            for step in range(32):
                torch.testing.assert_close(logits, uncached_logits[step], atol=1e-5, rtol=0)
                token = logits.argmax(-1, keepdim=True)
                cached = torch.cat([cached, token], dim=1)
                pos = torch.tensor([cached.shape[1] - 1])
                logits = model.decode(token, pos)[:, -1]
        finally:
            model.clear_kv_cache()
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
def test_logits_to_keep_equals_the_last_positions_of_all_logits(family, converted):
    """What a prefill asks for (the head over the last position only) is exactly those positions' logits,
    final softcapping (gemma2) and the final norm included."""
    _, model = converted(family)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        for keep in (1, 3):
            kept = model(idx, logits_to_keep=keep)
            assert kept.shape == (2, keep, full.size(-1))
            torch.testing.assert_close(kept, full[:, -keep:], atol=1e-6, rtol=0)


def test_left_padded_batch_equals_single_rows(converted):
    _, model = converted("llama")
    torch.manual_seed(3)
    a, b = torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (4,))
    pad = 3
    batch = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    valid = batch.new_ones(batch.shape, dtype=torch.bool)
    valid[1, :pad] = False
    position_ids = (valid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(batch, input_pos=position_ids, key_padding_mask=valid)
        torch.testing.assert_close(out[0], model(a[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, pad:], model(b[None])[0], atol=1e-5, rtol=0)


def test_loss_equals_cross_entropy_of_logits(converted):
    _, model = converted("qwen2")
    idx = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    targets[0, :4] = -100
    with torch.no_grad():
        logits = model(idx)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(idx, targets=targets), expected)


def test_training_rms_norm_backward_is_the_derivative(converted, monkeypatch):
    """The written-out RMSNorm backward (training) against finite differences, and a model's gradients with it
    against autograd through `F.rms_norm` (what inference runs); its forward is `F.rms_norm`'s, bit for bit."""
    from litllm.fused_norms import RMSNormFunction

    x = torch.randn(3, 2, 5, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # non-contiguous, as q_norm's
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, weight))
    x32, w32 = x.detach().float(), weight.detach().float()
    assert torch.equal(RMSNormFunction.apply(x32, w32, 1e-6), torch.nn.functional.rms_norm(x32, (8,), w32, 1e-6))

    _, model = converted("qwen3_moe")  # every norm an RMSNorm, per-head qk-norm too
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    grads = []
    for written_out in (True, False):
        if not written_out:  # autograd through F.rms_norm's ops
            rms_norm = torch.nn.functional.rms_norm
            monkeypatch.setattr(RMSNormFunction, "apply", lambda x, w, eps: rms_norm(x, w.shape, w, eps))
        model.zero_grad(set_to_none=True)
        model.train()(idx, targets=targets).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.eval().zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("size, scale", [(8, 1.0), (768, 1e-3), (2048, 1e3)])
def test_inference_rms_norm_is_f_rms_norm_bit_for_bit(size, scale):
    """RMSNorm's no-grad CPU fp32 path (a decode step's: its own few kernels, with 0-dim scalars made once in place
    of Python floats) computes what `F.rms_norm` computes, bit for bit, a non-contiguous input included."""
    from litllm.model import RMSNorm

    norm = RMSNorm(size, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 3, size).transpose(1, 2) * scale
    with torch.no_grad():
        assert torch.equal(norm(x), torch.nn.functional.rms_norm(x, (size,), norm.weight, 1e-5))
    with torch.inference_mode():
        assert torch.equal(norm(x), torch.nn.functional.rms_norm(x, (size,), norm.weight, 1e-5))


def reference_single_query_attention(q, k, v, mask, scale, softcap_at, sinks):
    """The one-token attention in plain ops (no 0-dim scalars, no single-thread region, no strided key view); 16-bit
    without softcapping or sinks, SDPA (the eager step's kernel there)."""
    from litllm.model import softcap, softmax_with_sinks

    B, nh, _, hs = q.shape
    if q.dtype != torch.float32 and softcap_at is None and sinks is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=nh != k.size(1))
    nkv, L = k.size(1), k.size(2)
    scores = torch.bmm(q.reshape(B * nkv, nh // nkv, hs), k.reshape(B * nkv, L, hs).transpose(1, 2))
    scores = (scores * scale).view(B, nkv, nh // nkv, L)
    if softcap_at is not None:
        scores = softcap(scores, softcap_at)
    if mask is not None:
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    probs = softmax_with_sinks(scores, sinks.view(nkv, nh // nkv)[None] if sinks is not None else None)
    y = torch.bmm(probs.to(q.dtype).view(B * nkv, nh // nkv, L), v.reshape(B * nkv, L, v.size(-1)))
    return y.view(B, nh, 1, v.size(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_is_its_plain_ops_bit_for_bit(dtype, threads, monkeypatch):
    """The eager one-token attention (keys viewed straight from a cache slice, 0-dim scalars made once, one thread
    for a short cache) computes what its plain ops compute, bit for bit: grouped heads, per-row masks, a cache
    slice or a key that is not one, softcapping and sinks; it leaves the thread count as it found it. bf16 without
    softcap or sinks: SDPA's values bit for bit, and those of the plain ops in fp32 within bf16's rounding."""
    from litllm.model import ONE_THREAD_ATTENTION_MAX, single_query_attention

    torch.manual_seed(5)
    B, nh, nkv, hs, L = 2, 6, 2, 16, 11
    q = torch.randn(B, nh, 1, hs, dtype=dtype)
    cache_k, cache_v = (torch.randn(B, nkv, 32, hs, dtype=dtype) for _ in range(2))
    cases = {"cache slice": (cache_k[:, :, :L], cache_v[:, :, :L]),
             "one row": (cache_k[1:, :, :L], cache_v[1:, :, :L]),
             "not a cache": (torch.randn(B, L, nkv, hs, dtype=dtype).transpose(1, 2),) * 2,
             "long cache": tuple(torch.randn(1, nkv, ONE_THREAD_ATTENTION_MAX // (nkv * hs) + 1, hs, dtype=dtype)
                                 for _ in range(2))}
    set_threads = torch.set_num_threads
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    for name, (k, v) in cases.items():
        rows = k.size(0)
        mask = torch.rand(rows, 1, 1, k.size(2)) < 0.7
        mask[..., 0] = True
        settings = [(m, cap, sinks) for m in (mask, mask[:1]) for cap, sinks in
                    ((None, None), (5.0, None), (None, torch.randn(nh)))]  # per-row and shared masks
        for mask, softcap_at, sinks in settings:
            args = (q[:rows], k, v, mask, 0.3, softcap_at, sinks)
            calls.clear()
            with torch.inference_mode():
                got = single_query_attention(*args)
            assert calls == ([1, threads] if threads > 1 and name != "long cache" else []), name
            assert torch.get_num_threads() == threads
            assert torch.equal(got, reference_single_query_attention(*args)), (name, mask.shape, softcap_at, sinks)
            fp32 = reference_single_query_attention(*(a.float() if isinstance(a, torch.Tensor)
                                                      and a.is_floating_point() else a for a in args))
            torch.testing.assert_close(got.float(), fp32, atol=2e-2, rtol=2e-2)
            assert torch.equal(single_query_attention(*args[:3], None, *args[4:]),
                               reference_single_query_attention(*args[:3], None, *args[4:])), name


def test_tied_embeddings_share_storage(converted):
    _, model = converted("qwen2")
    assert model.lm_head.weight is model.wte.weight


# ---------------------------------------------------------------------- MoE: sparse and dense dispatch
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_moe_both_dispatch_paths_match_transformers(path, converted, monkeypatch):
    from litllm.model import MoE

    hf, model = converted("mixtral")
    monkeypatch.setattr(MoE, "use_dense", lambda self, x: path == "dense")
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf(idx).logits, atol=1e-4, rtol=0)


def test_moe_sparse_eager_on_cpu_dense_for_decode_elsewhere_and_equal(converted):
    """Eager on the CPU every input, decode steps included, runs each expert on its routed tokens only
    (k/n_expert of the dense FLOPs and weight reads); the dense path (decode-sized inputs when compiled or
    off the CPU) runs every expert on every token; the two agree to 1e-6."""
    _, model = converted("mixtral")
    moe = model.blocks[0].mlp
    k, n_expert = moe.config.n_expert_per_token, moe.config.n_expert
    seen = []
    hooks = [e.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0])) for e in moe.experts]
    try:
        torch.manual_seed(4)
        for tokens in (2 * 40, n_expert, 1):
            x = torch.randn(1, tokens, moe.config.n_embd)
            x2 = x.reshape(-1, x.size(-1))
            assert not moe.use_dense(x2) and moe.use_dense(x2.to("meta")) == (tokens <= n_expert)
            with torch.no_grad():
                seen.clear()
                out = moe(x)
                assert sum(seen) == tokens * k, tokens  # expert token counts of moe(x)
                _, weights, chosen = moe.route(x2)
                seen.clear()
                dense = moe.dense_experts(x2, weights, chosen)
                assert seen == [tokens] * n_expert
                sparse = moe.sparse_experts(x2, weights, chosen)
            torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)
            torch.testing.assert_close(out.reshape(-1, x.size(-1)), dense, atol=1e-6, rtol=0)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss", "llama4", "deepseek_v2"])
def test_moe_one_token_path_is_the_sparse_sum_bit_for_bit(family, converted, monkeypatch):
    """Eager on the CPU a single token (a decode step at batch 1) calls its k chosen experts directly
    (`token_experts`): the very sum the sparse path makes, in the same order (OLMoE, DeepSeek-V2: top-3) -- plain
    experts, gpt-oss's stacked ones, Llama 4's input-scaled ones, DeepSeek's grouped routing beside shared experts."""
    from litllm.model import MoE

    _, model = converted(family)
    calls = []
    token_experts = MoE.token_experts
    monkeypatch.setattr(MoE, "token_experts", lambda self, *a: calls.append(1) or token_experts(self, *a))
    moes = [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
    torch.manual_seed(8)
    for moe in moes:
        for _ in range(8):
            x = torch.randn(1, 1, moe.config.n_embd)
            with torch.no_grad():
                out = moe(x)[0]
                _, weights, chosen = moe.route(x[0])
                sparse = moe.sparse_experts(x[0], weights.to(x.dtype), chosen)
                if moe.shared_experts is not None:
                    sparse = sparse + moe.shared_experts(x[0])
            assert torch.equal(out, sparse)
    assert len(calls) == 8 * len(moes)


@pytest.mark.parametrize("wrap", ["lora", "torchao.int8wo"])
def test_moe_one_token_path_runs_lora_and_quantized_experts(wrap, converted):
    """LoRA'd and quantized experts (their Linears replaced) run on the one-token path as on the sparse path."""
    import copy

    from litllm.lora import LoRALinear, add_lora
    from litllm.quantize import is_quantized, quantize_model

    _, base = converted("mixtral")
    model = copy.deepcopy(base)
    if wrap == "lora":
        add_lora(model, r=2, alpha=4, dropout=0.0, query=False, value=False, mlp=True).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    for b in m.lora_B.values():  # B = 0 at init: the adapters would add nothing
                        b.normal_(std=0.1)
    else:
        quantize_model(model, wrap, "cpu")
    moe = model.blocks[0].mlp
    wrapped = [m for m in moe.experts.modules() if isinstance(m, LoRALinear) or is_quantized(m)]
    assert len(wrapped) == 2 * len(moe.experts)
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(m)) for m in wrapped]
    try:
        torch.manual_seed(9)
        for _ in range(6):
            x = torch.randn(1, 1, moe.config.n_embd)
            with torch.no_grad():
                seen.clear()
                out = moe(x)[0]
                assert len(seen) == 2 * moe.config.n_expert_per_token  # fc and proj of each chosen expert
                _, weights, chosen = moe.route(x[0])
                sparse = moe.sparse_experts(x[0], weights.to(x.dtype), chosen)
                base_out = base.blocks[0].mlp(x)[0]
            assert torch.equal(out, sparse)
            assert not torch.equal(out, base_out)  # the wrapped experts ran, not the originals
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------- the families of 2025-26
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_engine_tokens_equal_transformers_generate(family, tmp_path):
    """The decode engine (prefill + KV cache) picks the tokens transformers' generate(do_sample=False) picks."""
    import transformers

    from conftest import make_converted_checkpoint
    from litllm.engine import generate_ids

    folder = make_converted_checkpoint(tmp_path, family=family, seed=3)
    model = GPT.from_checkpoint(folder).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(2, hf.config.vocab_size, (7,), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(
        prompt[None], attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=24,
        do_sample=False, pad_token_id=hf.config.vocab_size - 1, eos_token_id=None,  # 24 tokens, EOS not suppressed
    )[0, 7:].tolist()
    assert len(expected) == 24
    assert generate_ids(model, prompt.tolist(), 24) == expected


@pytest.mark.parametrize("family,field,neutral", [
    ("smollm3", "nope_layer_period", None),  # NoPE in layer 3
    ("olmo3", "sliding_window_period", None),  # every layer sliding instead of 3:1
    ("olmo3", "rope_local_base", None),  # sliding layers with the full layers' YaRN
    ("granite", "embedding_multiplier", 1.0),
    ("granite", "residual_multiplier", 1.0),
    ("granite", "attention_multiplier", None),
    ("granite", "logits_divisor", 1.0),
    ("ministral3", "query_scale_beta", None),
    ("qwen3_moe", "moe_normalize_topk", False),
    ("olmoe", "moe_normalize_topk", True),
    ("gpt_oss", "swiglu_limit", 1e9),  # the clamp (tests/hf_models.py lowers it so random weights reach it)
    ("gpt_oss", "sliding_window_period", None),
    ("deepseek_v3", "rope_interleaved", False),
    ("deepseek_v3", "moe_correction_bias", False),
    ("deepseek_v3", "n_topk_groups", 4),  # every group allowed: no group limit
    ("deepseek_v3", "routed_scaling_factor", 1.0),
    ("deepseek_v3", "rope_scaling", None),  # YaRN, and with it the mscale_all_dim softmax scale
    ("deepseek_v2", "n_topk_groups", 4),
    ("deepseek_v2", "routed_scaling_factor", 1.0),
    ("glm4_moe", "moe_correction_bias", False),
    ("glm4_moe", "rotary_percentage", 1.0),
    ("llama4", "attention_chunk_size", None),  # the test sequence (40) spans 3 chunks of 16
    ("llama4", "nope_attn_scale", None),  # temperature tuning of the NoPE layer
    ("llama4", "norm_qk", None),
    ("llama4", "rope_interleaved", False),
    ("llama4", "nope_layer_period", None),
])
def test_each_family_quirk_is_needed_to_match(family, field, neutral, converted):
    """The parity above is not luck: without the family's quirk the logits leave transformers' by over 5x
    the parity tolerance (random tiny models: small effects)."""
    import dataclasses

    hf, model = converted(family)
    plain = GPT(dataclasses.replace(model.config, **{field: neutral})).eval()
    kept = plain.state_dict()  # (without the correction bias, the routers have no such buffer)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in kept})
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (plain(idx)[..., :VOCAB] - hf(idx).logits).abs().max() > 5e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_training_loss_and_gradients_match_transformers(family, converted):
    """A training forward + backward (the CPU fp32 step's fused head + loss, `linear_cross_entropy`) gives
    transformers' loss (the router load-balancing loss included) and gradients: the output head's, which the
    fused loss makes itself, and the embedding's, which its hidden-state gradient reaches through every layer."""
    hf, model = converted(family)
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))  # 80 tokens >= hidden 64
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
    assert model._fused_loss_applies(torch.zeros(2, 40, model.config.n_embd))
    try:
        hf.train(), model.train()
        expected = hf(idx, labels=idx, output_router_logits=family == "qwen3_moe").loss
        expected.backward()
        loss = model(idx, targets=targets)
        loss.backward()
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
        for got, want in ((model.lm_head.weight.grad, hf.lm_head.weight.grad),
                          (model.wte.weight.grad, hf.model.embed_tokens.weight.grad)):
            torch.testing.assert_close(got[:VOCAB], want, atol=1e-6, rtol=1e-4)
    finally:
        hf.eval().zero_grad(set_to_none=True), model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "gpt_oss"])
def test_router_aux_loss_equals_transformers(family, converted):
    """Training with targets adds router_aux_loss_coef x the load-balancing loss, the same term and the same
    total as transformers' forward with output_router_logits=True and labels (no attention mask)."""
    hf, model = converted(family)
    coef = hf.config.router_aux_loss_coef
    assert model.config.router_aux_loss_coef == coef > 0  # read from config.json
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    # HF shifts its labels inside; here the targets are the next tokens, the last position ignored
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        expected = hf(idx, labels=idx, output_router_logits=True)
        try:
            model.train()
            loss = model(idx, targets=targets)
        finally:
            model.eval()
        plain = model(idx, targets=targets)  # eval: the LM loss alone
    torch.testing.assert_close(model.router_aux_loss, expected.aux_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss - plain, coef * expected.aux_loss, atol=1e-6, rtol=0)


def test_moe_dense_layers_and_expert_size(converted):
    """Qwen3-MoE's mlp_only_layers run one dense MLP of intermediate_size; the other layers experts of
    moe_intermediate_size."""
    from litllm.model import GatedMLP, MoE

    _, model = converted("qwen3_moe")
    kinds = [type(b.mlp) for b in model.blocks]
    assert kinds == [MoE, GatedMLP, MoE]
    assert model.blocks[1].mlp.intermediate_size == 112
    assert {e.intermediate_size for e in model.blocks[0].mlp.experts} == {32}


# the families of #21 without a module of their own (test_gpt_oss, test_llama4, test_mla, test_mistral3,
# test_moe_training hold the others' runs)
@pytest.mark.parametrize("family", ["smollm3", "olmo3", "granite", "olmoe", "deepseek_v2"])
def test_lora_finetune_runs_its_peft_export_loads_and_estimate_runs(family, numbers_file, tmp_path):
    """finetune_lora trains a few steps on the family (LoRA on attention and MLP, the experts included); its PEFT
    export applies in transformers + peft with litllm's logits; `litllm estimate` runs for finetune_lora and serve."""
    pytest.importorskip("peft")
    from conftest import assert_peft_export_computes_the_same, finetune_lora_briefly, make_converted_checkpoint

    base = make_converted_checkpoint(tmp_path / "base", family=family, seed=3)
    result = finetune_lora_briefly(base, tmp_path / "run", numbers_file, lora_mlp=True)
    assert result.losses[4] < result.losses[1]
    assert_peft_export_computes_the_same(result.final_dir, base, tmp_path / "peft")
    _assert_estimate_runs(base)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])  # their LoRA runs: test_moe_training, test_mla
def test_estimate_runs(family, tmp_path):
    from conftest import make_converted_checkpoint

    _assert_estimate_runs(make_converted_checkpoint(tmp_path, family=family))


def _assert_estimate_runs(folder) -> None:
    """`litllm estimate finetune_lora` and `estimate serve` on a converted folder: exit 0 and count its weights."""
    import json

    from conftest import litllm_in_process

    for command in (["finetune_lora", "--train.max_steps", "5", "--train.max_seq_length", "32"],
                    ["serve", "--max_batch_size", "2", "--max_seq_length", "64"]):
        proc = litllm_in_process(["estimate", command[0], str(folder), *command[1:], "--precision", "32-true",
                                  "--json"])
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["breakdown"]["weights"] > 0
