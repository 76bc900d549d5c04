"""LLaMA-Adapter (v1, v2) as transforms of GPT: exact at init, the gated prefix attention against a
direct computation, KV-cache decoding, trainable parameters, and model folders that reload."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import make_converted_checkpoint
from litllm.adapter import (
    AdapterSettings, AdapterV2Linear, PrefixAdapter, adapter_parameter_names, add_adapter,
    add_adapter_v2, load_adapter_model,
)
from litllm.errors import LitLLMError
from litllm.model import GPT, RMSNorm
from litllm.model_folder import save_model_folder


def _tokens(n: int = 10, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def _perturb_adapter(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapter_parameter_names(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("add", [add_adapter, add_adapter_v2])
def test_adapter_at_init_is_exactly_the_base_model(tiny_checkpoint, add):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    x = _tokens()
    expected = model(x)
    add(model, adapter_start_layer=1, prefix_length=4)
    assert model.blocks[0].attn.adapter is None and isinstance(model.blocks[1].attn.adapter, PrefixAdapter)
    assert torch.equal(model(x), expected)
    _perturb_adapter(model)
    assert (model(x) - expected).abs().max() > 1e-3


def test_prefix_attention_matches_a_direct_computation(tiny_checkpoint):
    model = GPT.from_checkpoint(tiny_checkpoint)
    add_adapter(model, adapter_start_layer=0, prefix_length=3)
    attn = model.blocks[0].attn
    adapter = attn.adapter
    _perturb_adapter(model)
    c = model.config
    B, T = 2, 5
    q = torch.randn(B, c.n_head, T, c.head_size)
    got = adapter(q, attn)
    # direct: per head, softmax over the prefix keys only, times the head's gate
    _, k, v = attn.qkv(adapter.prefix).split(attn.qkv_sizes, dim=-1)  # (P, nkv*hs)
    k = k.view(-1, c.n_query_groups, c.head_size)
    v = v.view(-1, c.n_query_groups, c.head_size)
    group = c.n_head // c.n_query_groups
    expected = torch.empty_like(got)
    for h in range(c.n_head):
        kh, vh = k[:, h // group], v[:, h // group]  # (P, hs)
        scores = q[:, h] @ kh.T / math.sqrt(c.head_size)  # (B, T, P)
        expected[:, h] = adapter.gate[0, h, 0, 0] * (scores.softmax(-1) @ vh)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("add", [add_adapter, add_adapter_v2])
def test_adapter_decoding_with_kv_cache_matches_full_forward(tiny_checkpoint, add):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    add(model, adapter_start_layer=0, prefix_length=4)
    _perturb_adapter(model)
    x = _tokens(8, batch=1)
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(1, 16)
        steps = [model.decode(x[:, :5], torch.arange(5))]
        for t in range(5, 8):
            steps.append(model.decode(x[:, t: t + 1], torch.tensor([t])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def _train_model(checkpoint, version: int) -> nn.Module:
    """The model `finetune_adapter(_v2) --adapter_start_layer 1 --adapter_prefix_length 4` trains."""
    from litllm.adapter import adapter_method
    from litllm.train.loop import build_train_model

    method = adapter_method(AdapterSettings(version=version, start_layer=1, prefix_length=4))
    model = GPT.from_checkpoint(checkpoint)
    return build_train_model(model.config, method, model=model)


def test_trainable_parameters(tiny_checkpoint):
    model = _train_model(tiny_checkpoint, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1.attn.adapter.prefix", "blocks.1.attn.adapter.gate"}

    model = _train_model(tiny_checkpoint, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    linears = [n for n, m in model.named_modules() if isinstance(m, AdapterV2Linear)]
    norms = [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    assert "lm_head" in linears and "blocks.0.attn.qkv" in linears
    expected = {"blocks.1.attn.adapter.prefix", "blocks.1.attn.adapter.gate"}
    expected |= {f"{n}.adapter_scale" for n in linears} | {f"{n}.adapter_bias" for n in linears}
    expected |= {f"{n}.weight" for n in norms}
    assert trainable == expected
    assert not any(".base." in n for n in trainable)
    _perturb_adapter(model)  # a non-zero gate lets gradients reach the prefix
    x = _tokens()
    model(x, targets=torch.roll(x, -1, dims=1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert adapter_parameter_names(model) == expected


@pytest.mark.parametrize("family, version", [("llama", 1), ("qwen2", 2)])  # qwen2: tied embedding + v2 head
def test_adapter_model_folder_round_trip(tmp_path, family, version):
    folder = make_converted_checkpoint(tmp_path / "base", family=family)
    model = GPT.from_checkpoint(folder).eval()
    settings = AdapterSettings(version=version, start_layer=1, prefix_length=3)
    (add_adapter if version == 1 else add_adapter_v2)(model, settings.start_layer, settings.prefix_length)
    _perturb_adapter(model)
    x = _tokens()
    expected = model(x)
    save_model_folder(model, tmp_path / "out", folder, adapter=settings)  # as finetune_adapter writes final/
    assert (tmp_path / "out" / "adapter.yaml").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    reloaded = load_adapter_model(tmp_path / "out").eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    if model.config.tie_embeddings:
        head = reloaded.lm_head.base if version == 2 else reloaded.lm_head
        assert head.weight is reloaded.wte.weight
    # a plain GPT can't silently load an adapter folder
    with pytest.raises(LitLLMError, match="unexpected"):
        GPT.from_checkpoint(tmp_path / "out")
    # and a plain folder loads as a plain GPT
    assert isinstance(load_adapter_model(folder), GPT)


def test_adapter_errors(tiny_checkpoint, tmp_path):
    model = GPT.from_checkpoint(tiny_checkpoint)
    with pytest.raises(LitLLMError, match="adapter_start_layer"):
        add_adapter(model, adapter_start_layer=model.config.n_layer)
    with pytest.raises(LitLLMError, match="prefix_length"):
        add_adapter(model, adapter_start_layer=0, prefix_length=0)
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    (tmp_path / "m" / "adapter.yaml").write_text("version: 3\nstart_layer: 0\nprefix_length: 2\n")
    with pytest.raises(LitLLMError, match="version"):
        load_adapter_model(tmp_path / "m")
    (tmp_path / "m" / "adapter.yaml").write_text("layers: 2\n")
    with pytest.raises(LitLLMError, match="expected keys"):
        load_adapter_model(tmp_path / "m")
