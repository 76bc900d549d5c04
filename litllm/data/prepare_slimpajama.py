"""`litllm prepare_slimpajama`: tokenize SlimPajama-627B into litdata chunks for `TinyLlama` / `LitData`.

Raw layout (the `cerebras/SlimPajama-627B` dataset repository):
`<input_dir>/{train,validation,test}/chunk<N>/example_<split>_<M>.jsonl.zst`, one JSON document per
line: `{"text": ..., "meta": {"redpajama_set_name": "RedPajamaC4" | ...}}`. Documents of the
`RedPajamaGithub` subset are skipped (the StarCoder data covers code), as in the TinyLlama recipe.

Disk: the raw download is about 893 GB. Tokenized, a document costs 2 bytes per token when the
vocabulary has at most 65,536 entries (Llama-2's 32,000) and 4 bytes otherwise: about 1.2 TB for the
~600B training tokens with a Llama-2 tokenizer, 2.4 TB with a larger vocabulary.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator, Optional, Union

from litllm.errors import LitLLMError

# raw split folder -> output folder (the names `TinyLlama` reads)
SPLIT_OUTPUT_NAMES = {"train": "train", "validation": "val", "test": "test"}


def read_slimpajama(path: str) -> Iterator[str]:
    """Texts of one `.jsonl.zst` file, without the RedPajamaGithub documents."""
    import zstandard

    with open(path, "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LitLLMError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LitLLMError(f"{path}: line {number} has no 'text' string")
            if (row.get("meta") or {}).get("redpajama_set_name") == "RedPajamaGithub":
                continue
            yield row["text"]


def prepare(
    input_dir: Path = Path("data/SlimPajama-627B"),
    output_dir: Path = Path("data/slimpajama"),
    tokenizer_path: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    splits: list[str] = ["train", "validation"],  # noqa: B006 (jsonargparse shows it as the default)
    chunk_size: int = 2049 * 8192,
    num_workers: Optional[int] = None,
    max_files: Optional[int] = None,
    fast_dev_run: Union[bool, int] = False,
) -> None:
    """Tokenize SlimPajama's `.jsonl.zst` files into `<output_dir>/train` and `<output_dir>/val`.

    A split whose output folder already holds an `index.json` is skipped; an interrupted split leaves
    no output folder behind.

    Args:
        input_dir: The downloaded SlimPajama-627B folder (holds `train/`, `validation/`, `test/`).
        output_dir: Where the tokenized splits go (`train`, `val`, `test` sub-folders).
        tokenizer_path: A folder with `tokenizer.json` (a model folder, or one from `litllm train_tokenizer`).
        splits: Which raw splits to tokenize (`train`, `validation`, `test`).
        chunk_size: The most tokens per chunk file.
        num_workers: Tokenizing processes (default: min(CPU count, number of files)).
        max_files: Tokenize only the first N files of each split (a quick smoke test).
        fast_dev_run: Check the pipeline in seconds: `true` (2 files per split) or N files per split go through
            litdata's `optimize(fast_dev_run=N)` on one worker into the real output folders, marked with
            `fast_dev_run.txt` (a later full run replaces them); prints each folder's layout.
    """
    from litllm.data.streaming import fast_dev_run_files, is_prepared, tokenize_files
    from litllm.tokenizer import Tokenizer
    from litllm.utils import check_output_dir

    _require_zstandard()
    fast_dev_run_files(fast_dev_run)  # a bad --fast_dev_run fails before any file is read
    unknown = [s for s in splits if s not in SPLIT_OUTPUT_NAMES]
    if unknown:
        raise LitLLMError(f"--splits: unknown split(s) {unknown}; choose from {list(SPLIT_OUTPUT_NAMES)}")
    files_of = {}  # every split is checked before hours are spent on the first one
    for split in splits:
        split_dir = Path(input_dir) / split
        if not split_dir.is_dir():
            raise LitLLMError(
                f"{split_dir}: SlimPajama split folder not found (expected {input_dir}/{split}/chunk*/*.jsonl.zst)"
            )
        files = sorted(str(p) for p in split_dir.rglob("*.jsonl.zst"))
        if not files:
            raise LitLLMError(f"{split_dir}: no .jsonl.zst files found")
        files_of[split] = files[:max_files] if max_files else files
    check_output_dir(output_dir, "--output_dir")
    tokenizer = Tokenizer(tokenizer_path)
    for split, files in files_of.items():
        out = Path(output_dir) / SPLIT_OUTPUT_NAMES[split]
        if is_prepared(out):
            print(f"{out} already holds tokenized data: skipping the {split} split")
            continue
        tokenize_files(tokenizer, read_slimpajama, files, out, f"{split} file(s)", num_workers, chunk_size, fast_dev_run)


def _require_zstandard() -> None:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise LitLLMError(
            "prepare_slimpajama reads .zst files with the zstandard package: pip install zstandard"
            " (or pip install 'litllm[pretrain]')"
        ) from None
