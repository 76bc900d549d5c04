"""`litllm.tokenizer.Tokenizer` against `transformers.AutoTokenizer` (the oracle) on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_bpe_tokenizer

from litllm.errors import LitLLMError
from litllm.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  two  spaces  ",
    "",
    " ",
    "\n\nnewlines\n",
    "tabs\tand\r\nCRLF",
    "café naïve 東京 🙂 ǅ ß Ω",
    "<s> literal specials </s> inside",
    "<|im_start|>user\nhi<|im_end|>\n",
    "1234567890 3.14159 -0.5e10",
    "a" * 60,
    "def f(x):\n    return x ** 2  # square\n",
    "The quick brown fox jumps over the lazy dog.",
    "zzzz qqqq unseen-words xylophone",
]

# (byte_fallback, tokenizer_class). transformers 5 rebuilds the pipeline of some classes from the
# class's own conventions instead of reading tokenizer.json's (Qwen2Tokenizer's digit-splitting regex,
# LlamaTokenizer's Metaspace pre-tokenizer, which treats a leading space differently from the
# Prepend+Replace normalizer Llama-2's tokenizer.json has). Those rebuilt pipelines only equal the
# files for the real checkpoints, so the toy tokenizers are paired with classes that use the file as is.
KINDS = [
    (False, "PreTrainedTokenizerFast"),  # Llama-3 style byte-level BPE
    (False, "GPT2Tokenizer"),  # GPT-NeoX / Pythia
    (True, "PreTrainedTokenizerFast"),  # Llama-2 / Mistral style SentencePiece BPE with byte fallback
]


def _make(folder: Path, byte_fallback: bool, tokenizer_class: str, **config_updates) -> Path:
    train_bpe_tokenizer(folder, byte_fallback=byte_fallback)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = tokenizer_class
    config.update(config_updates)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("byte_fallback,tokenizer_class", KINDS)
def test_encode_decode_match_transformers(tmp_path, byte_fallback, tokenizer_class):
    from transformers import AutoTokenizer

    folder = _make(tmp_path, byte_fallback, tokenizer_class)
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    if tokenizer_class == "PreTrainedTokenizerFast":  # other classes may add their own default tokens
        assert ours.vocab_size == len(hf)
    for text in TEXTS:
        ids = ours.encode(text).tolist()
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, bos=False).tolist() == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_special_tokens_follow_the_post_processor(tmp_path, byte_fallback):
    """transformers 5 adds what tokenizer.json's post-processor adds; add_bos_token/add_eos_token don't change it."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    folder = _make(tmp_path, byte_fallback, "PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=True)
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = None
    raw.save(str(folder / "tokenizer.json"))
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert not ours.add_bos and not ours.add_eos
    assert ours.encode("hello world").tolist() == hf("hello world")["input_ids"]
    # explicit requests still work
    ids = ours.encode("hello world", bos=True, eos=True).tolist()
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id
    assert ids[1:-1] == hf("hello world")["input_ids"]


def test_eos_appended_once(tmp_path):
    folder = _make(tmp_path, False, "PreTrainedTokenizerFast")
    tok = Tokenizer(folder)
    assert tok.add_bos and not tok.add_eos
    ids = tok.encode("hi there", eos=True).tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.encode("hi there", max_length=2).tolist() == ids[:2]


def test_special_ids_from_configs(tmp_path):
    """Llama-3 style: eos in tokenizer_config, extra stop ids (<|im_end|>) in generation_config's list."""
    from transformers import AutoTokenizer

    folder = _make(tmp_path, False, "PreTrainedTokenizerFast", pad_token="<unk>")
    raw = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in raw["added_tokens"]}
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids["<s>"], "eos_token_id": [ids["</s>"], ids["<|im_end|>"]]})
    )
    tok, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.stop_ids == sorted([ids["</s>"], ids["<|im_end|>"]])


def test_special_tokens_from_special_tokens_map(tmp_path):
    from transformers import AutoTokenizer

    folder = _make(tmp_path, True, "PreTrainedTokenizerFast")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token"):
        config.pop(key)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": {"content": "<|im_end|>"}}
    ))
    (folder / "generation_config.json").unlink()
    tok, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tok.stop_ids == [hf.eos_token_id]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(LitLLMError, match="tokenizer.json not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(LitLLMError, match="not a valid tokenizer.json"):
        Tokenizer(tmp_path)
    train_bpe_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(LitLLMError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer(tmp_path)
