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


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral", "mixtral", "phi", "gemma3", "qwen3"])
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
            logits = model(prompt, input_pos=torch.arange(5))[:, -1]
            cached = prompt
            for step in range(32):
                torch.testing.assert_close(logits, uncached_logits[step], atol=1e-5, rtol=0)
                token = logits.argmax(-1, keepdim=True)
                cached = torch.cat([cached, token], dim=1)
                pos = torch.tensor([cached.shape[1] - 1])
                logits = model(token, input_pos=pos)[:, -1]
        finally:
            model.clear_kv_cache()
    assert torch.equal(cached, seq)


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


def test_tied_embeddings_share_storage(converted):
    _, model = converted("qwen2")
    assert model.lm_head.weight is model.wte.weight
