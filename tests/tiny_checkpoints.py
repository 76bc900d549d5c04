"""Tiny tokenizers and converted checkpoints built on the spot (no downloads), for the suite (re-exported by
conftest.py) and for benchmarks/. A plain module: importing it leaves the environment alone, where conftest.py sets the
suite's (`LITLLM_COMPILE=0`, `LITLLM_PRECISION=32-true`, ...), which a benchmark's `litllm` subprocesses would inherit:
session 36's `benchmarks/serve.py` servers decoded eagerly that way."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Numbers: 12345 67.89 -0.5e10; unicode: café, naïve, 東京, emoji 🙂, tabs\tand  spaces.
Instruction: Write a haiku about autumn.\nResponse: Leaves drift on cold wind.
"""


def train_bpe_tokenizer(folder: Path, vocab_size: int = 320, byte_fallback: bool = False) -> Path:
    """Train a small BPE tokenizer with `tokenizers` and write it like a HF checkpoint does.

    byte_fallback=False: byte-level BPE (Llama-3 / Qwen / GPT-NeoX style).
    byte_fallback=True: SentencePiece-style BPE with byte fallback (Llama-2 / Mistral style).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    corpus = [SAMPLE_TEXT] * 20 + [line for line in SAMPLE_TEXT.splitlines()]
    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    if byte_fallback:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials + byte_tokens)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save(str(folder / "tokenizer.json"))
    if byte_fallback:
        # as in Llama-2's tokenizer.json, the <0xNN> byte pieces are ordinary vocabulary entries, not
        # added special tokens (which decode(skip_special_tokens=True) would drop)
        raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in byte_tokens]
        (folder / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": tok.token_to_id("</s>")}))
    return folder


def make_converted_checkpoint(
    folder: Path, family: str = "llama", seed: int = 0, vocab_size: int = 320, byte_fallback: bool = False
) -> Path:
    """A tiny HF model of `family` + trained tokenizer (byte-level, or SentencePiece-style with
    `byte_fallback`), saved and converted to litllm format."""
    import transformers

    from hf_models import FAMILIES, perturb
    from litllm.convert import convert_to_litllm

    train_bpe_tokenizer(folder, vocab_size=vocab_size, byte_fallback=byte_fallback)
    from tokenizers import Tokenizer

    n_vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**dict(kwargs, vocab_size=n_vocab, bos_token_id=0, eos_token_id=1))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    perturb(model)
    model.save_pretrained(folder)
    convert_to_litllm(folder)
    return folder
