"""`litllm prepare_starcoder`: tokenize StarCoder data into litdata chunks for `TinyLlama` / `LitData`.

Raw layout (the `bigcode/starcoderdata` dataset repository): `<input_dir>/<language>/train-*.parquet`,
the source code in the `content` column.

Disk: the raw download is about 290 GB. Tokenized, a token costs 2 bytes when the vocabulary has at
most 65,536 entries (Llama-2's 32,000) and 4 bytes otherwise: about 0.5 TB for the ~250B tokens with
a Llama-2 tokenizer, 1.1 TB with a larger vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

from litllm.errors import LitLLMError


def read_starcoder(path: str) -> Iterator[str]:
    """The `content` column of one parquet file, read in batches (bounded memory)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "content" not in parquet.schema_arrow.names:
        raise LitLLMError(f"{path}: no 'content' column (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(batch_size=1024, columns=["content"]):
        yield from batch.column(0).to_pylist()


def prepare(
    input_dir: Path = Path("data/starcoderdata"),
    output_dir: Path = Path("data/starcoder"),
    tokenizer_path: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    languages: Optional[list[str]] = None,
    chunk_size: int = 2049 * 8192,
    num_workers: Optional[int] = None,
    max_files: Optional[int] = None,
    fast_dev_run: Union[bool, int] = False,
) -> None:
    """Tokenize StarCoder's parquet files into `output_dir`.

    Does nothing when `output_dir` already holds an `index.json`; an interrupted run leaves no output
    folder behind.

    Args:
        input_dir: The downloaded starcoderdata folder (one sub-folder per language).
        output_dir: Where the tokenized chunks go.
        tokenizer_path: A folder with `tokenizer.json` (a model folder, or one from `litllm train_tokenizer`).
        languages: Only these language sub-folders (default: all of them).
        chunk_size: The most tokens per chunk file.
        num_workers: Tokenizing processes (default: min(CPU count, number of files)).
        max_files: Tokenize only the first N files (a quick smoke test).
        fast_dev_run: Check the pipeline in seconds: `true` (2 files) or N files go through litdata's
            `optimize(fast_dev_run=N)` on one worker into output_dir, marked with `fast_dev_run.txt` (a later
            full run replaces it); prints the folder's layout.
    """
    from litllm.data.streaming import fast_dev_run_files, is_prepared, tokenize_files
    from litllm.tokenizer import Tokenizer
    from litllm.utils import check_output_dir

    fast_dev_run_files(fast_dev_run)  # a bad --fast_dev_run fails before any file is read

    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LitLLMError("prepare_starcoder reads parquet files with pyarrow: pip install pyarrow") from None
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise LitLLMError(f"{input_dir}: StarCoder data folder not found")
    folders = [input_dir / lang for lang in languages] if languages else [input_dir]
    for folder in folders:
        if not folder.is_dir():
            raise LitLLMError(f"{folder}: language folder not found")
    files = sorted(str(p) for folder in folders for p in folder.rglob("*.parquet"))
    if not files:
        raise LitLLMError(f"{input_dir}: no .parquet files found (expected <language>/train-*.parquet)")
    files = files[:max_files] if max_files else files
    out = Path(output_dir)
    if is_prepared(out):
        print(f"{out} already holds tokenized data: nothing to do")
        return
    check_output_dir(out, "--output_dir")
    tokenizer = Tokenizer(tokenizer_path)
    tokenize_files(tokenizer, read_starcoder, files, out, "file(s)", num_workers, chunk_size, fast_dev_run)
