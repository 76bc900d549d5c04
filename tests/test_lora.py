"""LoRA as a transform of GPT: exact at init, per-part updates on fused layers, merging, checkpoints,
and a PEFT export that `peft` + `transformers` (the oracle) compute identically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import make_converted_checkpoint, write_lora_folder
from litllm.errors import LitLLMError
from litllm.lora import (
    LORA_WEIGHTS, LoRALinear, LoRASettings, add_lora, is_lora_parameter, load_lora_model, lora_state_dict,
    merge_lora, merge_lora_weights, read_lora_checkpoint, save_peft_adapter,
)
from litllm.model import GPT

ALL_ON = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


def _randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give B (zero at init) random values so the updates are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _tokens(n: int = 12, vocab: int = 300, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    """Converted tiny checkpoints of a few families, built on demand."""
    class Lazy(dict):
        def __missing__(self, family: str) -> Path:
            self[family] = make_converted_checkpoint(tmp_path_factory.mktemp(family), family=family)
            return self[family]

    return Lazy()


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt_neox", "qwen2"])
def test_lora_at_init_is_exactly_the_base_model(families, family):
    model = GPT.from_checkpoint(families[family]).eval()
    x = _tokens()
    expected = model(x)
    add_lora(model, r=4, alpha=8, dropout=0.0, **ALL_ON)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) > 0
    assert torch.equal(model(x), expected)


def test_query_only_lora_changes_only_query_rows(tiny_checkpoint):
    model = GPT.from_checkpoint(tiny_checkpoint)
    c = model.config
    base_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    add_lora(model, r=4, alpha=8, dropout=0.0, query=True, key=False, value=True)
    _randomize_lora(model)
    qkv = model.blocks[0].attn.qkv
    assert set(qkv.lora_A) == {"query", "value"}
    x = torch.randn(3, c.n_embd)
    q_rows, kv_rows = c.n_head * c.head_size, c.n_query_groups * c.head_size
    # reference: dense update that is zero on the key rows
    delta = torch.zeros_like(base_weight)
    delta[:q_rows] = qkv.lora_B["query"] @ qkv.lora_A["query"] * qkv.scaling
    delta[q_rows + kv_rows:] = qkv.lora_B["value"] @ qkv.lora_A["value"] * qkv.scaling
    out = qkv(x)
    torch.testing.assert_close(out, x @ (base_weight + delta).T, rtol=0, atol=1e-6)
    key_cols = slice(q_rows, q_rows + kv_rows)
    torch.testing.assert_close(out[:, key_cols], x @ base_weight[key_cols].T, rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, :q_rows], x @ base_weight[:q_rows].T, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt_neox", "phi3"])
def test_merged_equals_unmerged(families, family):
    model = GPT.from_checkpoint(families[family]).eval()
    base_keys = set(model.state_dict())
    add_lora(model, r=4, alpha=8, dropout=0.1, **ALL_ON)
    _randomize_lora(model)
    x = _tokens()
    unmerged = model(x)
    base_logits = GPT.from_checkpoint(families[family]).eval()(x)
    assert (unmerged - base_logits).abs().max() > 1e-3  # the update really does something
    merge_lora_weights(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "proj", "fc", "lm_head")))
    assert set(model.state_dict()) == base_keys
    assert (model(x) - unmerged).abs().max() <= 1e-5


def test_merging_a_lora_head_unties_a_tied_embedding(families, tmp_path):
    model = GPT.from_checkpoint(families["qwen2"]).eval()
    assert model.config.tie_embeddings
    embedding = model.wte.weight.detach().clone()
    add_lora(model, r=4, alpha=8, dropout=0.0, head=True)
    _randomize_lora(model)
    x = _tokens()
    unmerged = model(x)
    merge_lora_weights(model)
    assert not model.config.tie_embeddings
    assert torch.equal(model.wte.weight, embedding)  # the embedding keeps the base weight
    assert (model(x) - unmerged).abs().max() <= 1e-5
    from litllm.model_folder import save_model_folder

    save_model_folder(model, tmp_path / "merged", families["qwen2"])
    reloaded = GPT.from_checkpoint(tmp_path / "merged").eval()
    assert (reloaded(x) - unmerged).abs().max() <= 1e-5


def _train_model(checkpoint, settings: LoRASettings, quantize=None) -> nn.Module:
    """The model `finetune_lora` trains with these settings (`--quantize`: QLoRA's quantized base)."""
    from litllm.lora import lora_method
    from litllm.train.loop import build_train_model

    model = GPT.from_checkpoint(checkpoint)
    return build_train_model(model.config, lora_method(settings, quantize=quantize), model=model)


def test_only_lora_parameters_get_gradients(tiny_checkpoint):
    model = _train_model(tiny_checkpoint, LoRASettings(r=4, alpha=8, dropout=0.0, **ALL_ON))
    x = _tokens()
    loss = model(x, targets=torch.roll(x, -1, dims=1))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, _ in model.named_parameters() if is_lora_parameter(n)}
    assert with_grad == lora
    # B starts at zero, so A's gradient is zero at step 0 but B's is not
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if ".lora_B." in n)
    assert set(lora_state_dict(model)) == lora


def test_lora_checkpoint_and_merge_command(tiny_checkpoint, tmp_path):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    settings = LoRASettings(r=4, alpha=16, dropout=0.0, query=True, value=True, mlp=True)
    add_lora(model, **vars(settings))
    _randomize_lora(model)
    x = _tokens()
    expected = model(x)
    folder = tmp_path / "lora"
    write_lora_folder(model, folder, {"checkpoint_dir": tiny_checkpoint, **settings.to_flags()})
    hparams, read = read_lora_checkpoint(folder)
    assert read == settings and Path(hparams["checkpoint_dir"]) == tiny_checkpoint
    # the LoRA file holds the LoRA weights alone: far smaller than the model
    assert (folder / LORA_WEIGHTS).stat().st_size < (tiny_checkpoint / "lit_model.safetensors").stat().st_size / 2
    torch.testing.assert_close(load_lora_model(folder).eval()(x), expected, rtol=0, atol=0)

    merge_lora(folder, out_dir=tmp_path / "merged")
    merged = GPT.from_checkpoint(tmp_path / "merged").eval()
    assert (merged(x) - expected).abs().max() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # in place by default: the LoRA folder becomes a model folder too
    merge_lora(folder)
    assert (GPT.from_checkpoint(folder).eval()(x) - expected).abs().max() <= 1e-5


def test_merge_lora_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(LitLLMError, match="not found"):
        merge_lora(tmp_path / "nope")
    folder = tmp_path / "lora"
    model = add_lora(GPT.from_checkpoint(tiny_checkpoint), r=2)
    write_lora_folder(model, folder, {"checkpoint_dir": tmp_path / "moved", "lora_r": 2})
    with pytest.raises(LitLLMError, match="pretrained_checkpoint_dir"):
        merge_lora(folder)
    assert not (folder / "lit_model.safetensors").exists()
    (folder / "hyperparameters.yaml").unlink()
    with pytest.raises(LitLLMError, match="hyperparameters.yaml"):
        merge_lora(folder)
    # settings that don't match the saved weights
    write_lora_folder(model, folder, {"checkpoint_dir": tiny_checkpoint, "lora_r": 3})
    with pytest.raises(LitLLMError, match="shape"):
        merge_lora(folder)
    with pytest.raises(LitLLMError, match=r"^--precision: expected one of .*bfloat16, got 'bf16'"):  # its own flag
        merge_lora(folder, out_dir=tmp_path / "merged", precision="bf16")
    with pytest.raises(LitLLMError, match="lora_r"):
        LoRASettings(r=0)
    with pytest.raises(LitLLMError, match="no layer"):
        LoRASettings(query=False, value=False)


def test_merge_lora_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "litllm", "merge_lora", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "family, flags",
    [
        ("llama", ALL_ON),
        ("llama", dict(query=True, value=True)),
        ("phi3", ALL_ON),  # HF's qkv_proj / gate_up_proj are fused too: block-structured export
        ("gpt_neox", dict(query=True, key=True, value=False, mlp=True)),  # interleaved fused qkv rows
        # MoE experts: PEFT target_parameters on transformers' stacked expert tensors (and a dense layer)
        ("qwen3_moe", ALL_ON),
        ("olmoe", ALL_ON),  # stacked experts, no dense layer
        ("mixtral", dict(query=True, value=True, mlp=True)),
        ("llama4", ALL_ON),
        ("deepseek_v2", dict(query=True, value=True, mlp=True)),  # MLA; softmax router, 2 shared experts  # (E, in, out) stacks: factors transposed and swapped; dense + shared expert modules
    ],
)
def test_peft_export_computes_what_litllm_computes(families, family, flags, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    folder = families[family]
    model = GPT.from_checkpoint(folder).eval()
    add_lora(model, r=4, alpha=8, dropout=0.0, **flags)
    _randomize_lora(model)
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
    save_peft_adapter(model, tmp_path / "peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        base_hf = hf(x).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(x).logits
    assert (got - base_hf).abs().max() > 1e-3  # the adapter was applied
    torch.testing.assert_close(got, expected[..., : got.size(-1)], rtol=0, atol=1e-4)
    merge_lora_weights(model)
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(got, merged[..., : got.size(-1)], rtol=0, atol=1e-4)


def test_peft_export_refuses_expert_lora_of_a_family_without_stacked_experts(families, tmp_path, monkeypatch):
    """A family that declares no `stacked_experts` (one added from outside): its experts' LoRA has no PEFT form,
    refused in one line and nothing written."""
    from litllm.hf.family import FAMILIES

    model = add_lora(GPT.from_checkpoint(families["mixtral"]), r=2, mlp=True)
    monkeypatch.setattr(FAMILIES["mixtral"], "stacked_experts", None)
    with pytest.raises(LitLLMError, match="LoRA on the experts of a mixtral model has no PEFT form"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_qlora_base_is_quantized_and_lora_trains(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    from litllm.quantize import is_quantized

    x = _tokens()
    model = _train_model(tiny_checkpoint, LoRASettings(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True),
                         quantize="bnb.nf4")
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and is_quantized(qkv.base)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_lora_parameter(n))
    loss = model(x, targets=torch.roll(x, -1, dims=1))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(is_lora_parameter(n) for n in grads)
    # merging dequantizes: the merged layer is dense and computes what the quantized LoRA layer computes
    _randomize_lora(model)
    with torch.no_grad():
        h = torch.randn(2, model.config.n_embd)
        before = qkv(h)
        merge_lora_weights(model)
        after = model.blocks[0].attn.qkv(h)
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
