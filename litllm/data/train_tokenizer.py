"""`litllm train_tokenizer`: train a byte-level BPE tokenizer on text files.

The result is GPT-2 / Llama-3 style: text is split with the Llama-3 (GPT-4) regex, then bytes are
mapped to printable characters (`ByteLevel`), so any input round-trips exactly and no `<unk>` exists.
One special token, `<|endoftext|>`, is both BOS and EOS; no BOS is added by default
(`add_bos_token: false`), so pretraining documents read `text<|endoftext|>text<|endoftext|>...`
and generation stops at `<|endoftext|>`. Add more special tokens (e.g. chat markers) with
`--special_tokens`.

Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, which
`litllm.tokenizer.Tokenizer` and `transformers.AutoTokenizer` both load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Optional

from litllm.errors import LitLLMError

ENDOFTEXT = "<|endoftext|>"
# Llama-3's split pattern (cl100k): contractions, words, 1-3 digit numbers, punctuation runs, newlines, spaces
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _batches_of_text(files: list[Path], batch_size: int = 64) -> Iterator[list[str]]:
    for begin in range(0, len(files), batch_size):
        yield [f.read_bytes().decode("utf-8", errors="replace") for f in files[begin : begin + batch_size]]


def train_tokenizer(
    data_path: str = "data/text",
    out_dir: Path = Path("checkpoints/tokenizer"),
    vocab_size: int = 32000,
    glob: str = "**/*.txt",
    max_files: Optional[int] = None,
    min_frequency: int = 2,
    special_tokens: Optional[list[str]] = None,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE tokenizer and write it to `out_dir`.

    Args:
        data_path: A folder of text files, one file, or `python-stdlib` (this Python's standard library sources).
        out_dir: Where `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` are written.
        vocab_size: Size of the vocabulary, special tokens and the 256 byte symbols included.
        glob: Which files of the folder to read (`**/` descends into sub-folders), e.g. `**/*.py`.
        max_files: Read only the first N files (sorted by path).
        min_frequency: A pair must occur at least this often to be merged.
        special_tokens: Extra special tokens besides `<|endoftext|>` (e.g. `<|im_start|>` `<|im_end|>`).
        model_max_length: The context length recorded in `tokenizer_config.json`.

    Returns:
        `out_dir`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from litllm.data.text_files import list_files
    from litllm.utils import check_output_dir, output_folder

    check_output_dir(out_dir)
    specials = [ENDOFTEXT] + [t for t in (special_tokens or []) if t != ENDOFTEXT]
    if vocab_size < 256 + len(specials):
        raise LitLLMError(
            f"--vocab_size must be at least {256 + len(specials)} (256 bytes + special tokens), got {vocab_size}"
        )
    files = list_files(data_path, glob, max_files)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # elsewhere (a log file) its bar leaves only blank lines
    )
    batches = _batches_of_text(files)
    tokenizer.train_from_iterator(batches, trainer, length=-(-len(files) // 64))

    out_dir = Path(out_dir)
    with output_folder(out_dir) as folder:
        _write_tokenizer_files(folder, tokenizer, specials, model_max_length)
    print(f"Trained a {tokenizer.get_vocab_size()}-token BPE tokenizer on {len(files)} file(s): {out_dir}")
    return out_dir


def _write_tokenizer_files(out_dir: Path, tokenizer, specials: list[str], model_max_length: int) -> None:
    from litllm.utils import atomic_write_text

    eot = tokenizer.token_to_id(ENDOFTEXT)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    atomic_write_text(
        out_dir / "tokenizer_config.json",
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "additional_special_tokens": specials[1:],
                "clean_up_tokenization_spaces": False,
                "model_max_length": model_max_length,
            },
            indent=2,
        ),
    )
    atomic_write_text(
        out_dir / "generation_config.json", json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2)
    )
