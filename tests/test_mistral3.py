"""`mistral3` checkpoints (Ministral 3, Mistral-Small-3.x): a vision tower + a text model in one folder. litllm
reads the text model (its own `model_type` from `text_config`, the `language_model.` weight prefix stripped,
the vision tower left out) and computes what transformers' Mistral3ForConditionalGeneration computes on text."""

from __future__ import annotations

import json

import pytest
import torch

from hf_models import perturb
from litllm.config import Config
from litllm.convert import convert_from_litllm, convert_to_litllm
from litllm.hf.config import config_from_hf
from litllm.model import GPT

VOCAB = 96
TEXT = {
    # Ministral 3: YaRN and the position-dependent query scale, whose step (16) the test sequences cross
    "ministral3": dict(
        model_type="ministral3", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=112, max_position_embeddings=128,
        rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=16,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5)),
    # Mistral-Small-3.1: a plain Mistral text model, its own head
    "mistral": dict(
        model_type="mistral", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=112, max_position_embeddings=128, rope_theta=1e9),
}
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, image_size=32, patch_size=8)


def _wrapper(text: str, folder, tie: bool, vocab_size: int = VOCAB):
    import transformers

    config = transformers.Mistral3Config(text_config=dict(TEXT[text], vocab_size=vocab_size), vision_config=VISION,
                                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    perturb(model)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("text,tie", [("ministral3", True), ("mistral", False)])
def test_text_model_of_a_mistral3_folder_matches_transformers_and_exports(text, tie, tmp_path):
    import transformers

    src = tmp_path / "hf"
    hf = _wrapper(text, src, tie)
    convert_to_litllm(src)
    model = GPT.from_checkpoint(src).eval()
    assert model.config.hf_model_type == text and model.config.tie_embeddings == tie
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=idx).logits
        torch.testing.assert_close(model(idx)[..., :VOCAB], expected, atol=1e-4, rtol=0)

    # the export is the text model alone, which transformers loads as its CausalLM class
    convert_from_litllm(src, tmp_path / "export")
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(exported).__name__ == {"ministral3": "Ministral3ForCausalLM", "mistral": "MistralForCausalLM"}[text]
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(idx).logits, expected, atol=1e-5, rtol=0)

    # greedy tokens through the engine (prefill + KV cache) are transformers' generate's
    from litllm.engine import generate_ids

    prompt = torch.randint(2, VOCAB, (7,), generator=torch.Generator().manual_seed(5))
    want = hf.generate(prompt[None], attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=20,
                       min_new_tokens=20, do_sample=False, pad_token_id=VOCAB - 1)[0, 7:].tolist()
    assert generate_ids(model, prompt.tolist(), 20) == want


# The 3B's and the 14B's text_config: the 8B's (transformers' defaults) but for these (NVIDIA Megatron-Bridge's
# Ministral3ModelProvider3B / 14B, see litllm/presets.yaml)
MINISTRAL_3_3B = dict(hidden_size=3072, intermediate_size=9216, num_hidden_layers=26, tie_word_embeddings=True)
MINISTRAL_3_14B = dict(hidden_size=5120, intermediate_size=16384, num_hidden_layers=40, rope_theta=1e9)


@pytest.mark.parametrize("preset,reference,changes", [
    ("Ministral-3-8B-Base-2512", "Ministral3Config", {}),  # its docstring: the defaults are Ministral-3-8B's
    ("Ministral-3-3B-Instruct-2512", "Ministral3Config", MINISTRAL_3_3B),
    ("Ministral-3-14B-Reasoning-2512", "Ministral3Config", MINISTRAL_3_14B),
    ("Mistral-Small-3.1-24B-Instruct-2503", "Mistral3Config", {}),  # text_config defaults: Mistral-Small-3.1-24B's
])
def test_presets_are_the_published_configs(preset, reference, changes):
    import transformers

    changes = dict(changes)
    rope_theta = changes.pop("rope_theta", None)
    hf = getattr(transformers, reference)(**changes)
    if rope_theta is not None:  # (Ministral3Config's rope_parameters default wins over a rope_theta argument)
        hf.rope_parameters["rope_theta"] = rope_theta
    text = hf.text_config.to_dict() if reference == "Mistral3Config" else hf.to_dict()
    expected = config_from_hf(text).to_dict()
    actual = Config.from_name(preset).to_dict()
    differ = {k: (actual[k], expected[k]) for k in expected if k not in ("name", "hf_repo") and actual[k] != expected[k]}
    assert not differ
    # the model cards' language-model sizes: 3.4B (with the embedding tied to the head), 8.4B, 13.5B
    card = {"Ministral-3-3B": 3.4, "Ministral-3-8B": 8.4, "Ministral-3-14B": 13.5}.get(preset.rsplit("-", 2)[0])
    if card is not None:
        with torch.device("meta"):
            n = sum(p.numel() for p in GPT(Config.from_name(preset)).parameters())
        assert abs(n / 1e9 - card) < 0.1, n


def test_lora_finetunes_the_text_model_and_its_peft_export_loads_on_the_exported_model(numbers_file, tmp_path):
    """finetune_lora runs on a converted mistral3 folder; its PEFT adapter applies to the exported text model
    (what `convert_from_litllm` writes) in transformers + peft with litllm's logits; `estimate` runs."""
    pytest.importorskip("peft")
    from tokenizers import Tokenizer

    from conftest import (assert_peft_export_computes_the_same, finetune_lora_briefly, litllm_in_process,
                          train_bpe_tokenizer)

    src = tmp_path / "hf"
    train_bpe_tokenizer(src)
    n_vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    _wrapper("ministral3", src, tie=False, vocab_size=n_vocab)
    convert_to_litllm(src)
    result = finetune_lora_briefly(src, tmp_path / "run", numbers_file, dict(global_batch_size=2, max_steps=3),
                                   lora_mlp=True)
    convert_from_litllm(src, tmp_path / "export")
    assert_peft_export_computes_the_same(result.final_dir, tmp_path / "export", tmp_path / "peft")

    proc = litllm_in_process(["estimate", "finetune_lora", src, "--train.max_steps", "5", "--train.max_seq_length", "32",
                              "--precision", "32-true", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "lora"
