"""Pretraining plumbing shared by every token-stream data module (litdata under the hood).

Token data lives in litdata "optimized" folders: binary chunks of token ids plus an `index.json`.
`TokensLoader(block_size)` cuts each chunk into consecutive blocks of `block_size` tokens. A block
never crosses a chunk boundary: the last `dim % block_size` tokens of every chunk are never read.
Chunks here hold millions of tokens, so that loss is under 0.1% (see `CHUNK_TOKENS`).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from litllm.errors import LitLLMError

# the most tokens per chunk written by `optimize_tokens` (16 MiB of uint16, 32 MiB of int32). A chunk
# ends at a document (piece) boundary, so a block size that divides it would not avoid the tail loss;
# keeping it independent of the block size lets one optimized folder serve every context length.
CHUNK_TOKENS = 1 << 23
FAST_DEV_RUN_FILES = 2
"""Input files a `prepare_* --fast_dev_run true` tokenizes (per split)."""
FAST_DEV_RUN_MARKER = "fast_dev_run.txt"
"""Written into an output folder made by `--fast_dev_run`: a later full run replaces that folder."""

PathLike = Union[str, Path]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every token id (halves disk and I/O for vocabularies <= 65536)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def check_optimized_dir(path: PathLike, what: str) -> None:
    """Fail clearly unless a local `path` is a litdata optimized folder (remote ones are checked by litdata)."""
    if is_remote(path):
        return
    path = Path(path)
    if not path.is_dir():
        raise LitLLMError(f"{what}: folder {path} not found")
    if not (path / "index.json").is_file():
        raise LitLLMError(f"{what}: {path} is not a litdata optimized folder (no index.json)")
    from litllm.utils import read_json_object

    config = read_json_object(path / "index.json").get("config")
    loader = config.get("item_loader") if isinstance(config, dict) else None
    if loader is not None and loader != "TokensLoader":
        raise LitLLMError(
            f"{what}: {path} holds litdata items in the {loader} (pickled) format, not token arrays; write it with "
            "`litdata.optimize(..., item_loader=TokensLoader())` yielding 1-D integer token arrays (or use "
            "--data TextFiles, which tokenizes text files into that format)"
        )


def collate_blocks(blocks: list[Any]) -> dict[str, torch.Tensor]:
    """Blocks of `T + 1` tokens -> `input_ids = block[:-1]`, `labels = block[1:]`, both (B, T) int64."""
    batch = torch.stack([torch.as_tensor(np.asarray(b).astype(np.int64)) for b in blocks])  # (B, T + 1)
    return {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


def token_dataset(input_dir: PathLike, block_size: int, shuffle: bool, seed: int, drop_last: bool = True):
    """A `StreamingDataset` of `block_size`-token blocks read from an optimized folder."""
    from litdata import StreamingDataset, TokensLoader

    try:
        return StreamingDataset(
            input_dir=str(input_dir),
            item_loader=TokensLoader(block_size=block_size),
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
        )
    except Exception as e:
        if not is_remote(input_dir):
            raise
        # litdata reads a remote folder's index.json here: no connection, no credentials, no such bucket
        from litllm.utils import unreachable_reason

        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        reason = unreachable_reason(e) or f"{type(e).__name__}: {first_line}"
        raise LitLLMError(
            f"{input_dir}: can't read the remote token folder ({reason}); check the connection and credentials, "
            "or copy the folder (index.json and chunks) to a local disk and give its path"
        ) from None


def mixed_token_dataset(
    input_dirs: Sequence[PathLike],
    block_size: int,
    weights: Optional[Sequence[float]],
    seed: int,
    shuffle: bool = True,
):
    """One dataset, or several sampled with `weights` (litdata `CombinedStreamingDataset`)."""
    from litdata import CombinedStreamingDataset

    datasets = [token_dataset(d, block_size, shuffle=shuffle, seed=seed) for d in input_dirs]
    if len(datasets) == 1:
        return datasets[0]
    # with weights, sampling stops when the first source runs out (iterate_over_all=False)
    return CombinedStreamingDataset(
        datasets=datasets,
        seed=seed,
        weights=None if weights is None else list(weights),
        iterate_over_all=weights is None,
    )


def token_loader(dataset, batch_size: int, num_workers: int, drop_last: bool = True):
    """A `StreamingDataLoader` yielding `{"input_ids", "labels"}` batches (it has `state_dict()` for resume)."""
    from litdata import StreamingDataLoader

    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_blocks,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )


def check_weights(weights: Optional[Sequence[float]], n_sources: int, what: str) -> None:
    if weights is None:
        return
    if len(weights) != n_sources:
        raise LitLLMError(f"{what}: {len(weights)} weights given for {n_sources} data paths")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise LitLLMError(f"{what}: weights must be non-negative with a positive sum (got {list(weights)})")


def default_workers(n_inputs: int) -> int:
    return max(1, min(os.cpu_count() or 1, n_inputs))


def fast_dev_run_files(value: Union[bool, int, None]) -> Optional[int]:
    """`prepare_* --fast_dev_run` -> input files to tokenize per split (None: all of them)."""
    if value is None or value is False or (value is not True and value == 0):
        return None
    if value is True:
        return FAST_DEV_RUN_FILES
    if not isinstance(value, int) or value < 1:
        raise LitLLMError(f"--fast_dev_run: expected true, false or a number of input files >= 1, got {value!r}")
    return value


def is_prepared(folder: PathLike) -> bool:
    """Whether `folder` holds a complete optimized output of a full run (not of a `--fast_dev_run`)."""
    folder = Path(folder)
    return (folder / "index.json").is_file() and not (folder / FAST_DEV_RUN_MARKER).is_file()


def describe_optimized(folder: PathLike) -> str:
    """One line on an optimized folder's layout: its chunk files and tokens."""
    folder = Path(folder)
    chunks = json.loads((folder / "index.json").read_text()).get("chunks", [])
    tokens = sum(int(c.get("dim") or 0) for c in chunks)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return f"{folder}: index.json + {len(chunks)} chunk file(s), {tokens:,} tokens, {size / 2**20:.2f} MiB"


def optimize_tokens(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    output_dir: PathLike,
    num_workers: Optional[int] = None,
    chunk_tokens: int = CHUNK_TOKENS,
    keep_order: bool = False,
    fast_dev_run: Union[bool, int] = False,
) -> None:
    """Run litdata `optimize` over `inputs` (each `fn(input)` yields 1-D token arrays) into `output_dir`.

    Local outputs are written to a temporary folder and renamed when complete, so an interrupted run
    leaves nothing behind. With `keep_order=True`, inputs are not reordered by size (token order
    follows `inputs` when one worker is used). `fast_dev_run` (true or N): litdata's fast dev run on
    one worker, so only the first N inputs (`FAST_DEV_RUN_FILES` for true) are tokenized; the folder
    is marked (`FAST_DEV_RUN_MARKER`) so a full run replaces it.
    """
    from litdata import TokensLoader, optimize

    from litllm.utils import atomic_path

    if not inputs:
        raise LitLLMError(f"{output_dir}: nothing to optimize (no input files)")
    dev_files = fast_dev_run_files(fast_dev_run)
    num_workers = default_workers(len(inputs)) if num_workers is None else max(1, min(num_workers, len(inputs)))
    if dev_files is not None:
        num_workers = 1  # litdata keeps N items per worker: one worker makes it N files
    kwargs = dict(
        fn=fn,
        inputs=list(inputs),
        chunk_size=chunk_tokens,
        num_workers=num_workers,
        item_loader=TokensLoader(),
        reorder_files=not keep_order,
    )
    if dev_files is not None:
        kwargs["fast_dev_run"] = dev_files
    if "verbose" in inspect.signature(optimize).parameters:
        # quiet: litdata's account advert, per-worker logs and a progress bar that moves only as workers finish
        kwargs["verbose"] = False
    # litdata switches the process-wide start method to "spawn"; put the caller's back afterwards
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        if is_remote(output_dir):
            _optimize(optimize, output_dir=str(output_dir), **kwargs)
            return
        with atomic_path(output_dir) as tmp:  # on failure it also removes the parent folders it created
            _optimize(optimize, output_dir=str(tmp), **kwargs)
            if not _has_chunks(tmp):
                raise LitLLMError(f"{output_dir}: no tokens were produced (are the input files empty?)")
            if dev_files is not None:
                (tmp / FAST_DEV_RUN_MARKER).write_text(
                    f"made by --fast_dev_run from the first {dev_files} of {len(inputs)} input file(s); "
                    "a full run replaces this folder\n"
                )
    finally:
        multiprocessing.set_start_method(start_method, force=True)


def tokenize_files(
    tokenizer: Any,
    read: Callable[[str], Any],
    files: Sequence[str],
    output_dir: PathLike,
    what: str = "file(s)",
    num_workers: Optional[int] = None,
    chunk_tokens: int = CHUNK_TOKENS,
    fast_dev_run: Union[bool, int] = False,
) -> None:
    """A `prepare_*` command's last step: tokenize the documents `read(file)` yields from every file into
    `output_dir` (`optimize_tokens` with `TokenizeDocuments`), saying what it does; `what` names the files."""
    dev_files = fast_dev_run_files(fast_dev_run)
    count = f"{min(dev_files, len(files))} of {len(files)}" if dev_files else f"{len(files)}"
    print(f"Tokenizing {count} {what} into {output_dir}")
    optimize_tokens(
        TokenizeDocuments(tokenizer, read), files, output_dir, num_workers=num_workers, chunk_tokens=chunk_tokens,
        fast_dev_run=fast_dev_run,
    )
    if dev_files:
        print(f"fast_dev_run: {describe_optimized(output_dir)}")


def _optimize(optimize, **kwargs) -> None:
    """litdata `optimize`, with a `LitLLMError` raised in a worker (bad input data) re-raised as itself."""
    try:
        optimize(**kwargs)
    except RuntimeError as e:
        marker = f"{LitLLMError.__module__}.{LitLLMError.__name__}: "
        lines = [line for line in str(e).splitlines() if line.startswith(marker)]
        if lines:
            raise LitLLMError(lines[-1][len(marker) :]) from None
        raise


def _has_chunks(folder: Path) -> bool:
    index = folder / "index.json"
    if not index.is_file():
        return False
    try:
        return bool(json.loads(index.read_text()).get("chunks"))
    except (json.JSONDecodeError, AttributeError):
        return False


class DocumentEncoder:
    """Text -> token array (`token_dtype`) of a pretraining document: `<bos>? text <eos>`.

    BOS when the tokenizer adds one by default (`tokenizer.encode(text)` starts with it), EOS when it
    has one, so documents stay separated in the token stream. Encodes with the `tokenizers` object
    directly: no tensor round trip on the hot path of `optimize`.
    """

    def __init__(self, tokenizer) -> None:
        self.processor = tokenizer.processor
        self.dtype = token_dtype(tokenizer.vocab_size)
        adds_bos = tokenizer.bos_id is not None and tokenizer.encode("x").tolist()[:1] == [tokenizer.bos_id]
        self.bos = [tokenizer.bos_id] if adds_bos else []
        self.eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def __call__(self, text: str, starts: bool = True, ends: bool = True) -> np.ndarray:
        """`starts`/`ends`: whether `text` begins/ends the document (a long one is encoded in pieces)."""
        ids = self.processor.encode(text, add_special_tokens=False).ids
        return np.asarray((self.bos if starts else []) + ids + (self.eos if ends else []), dtype=self.dtype)


class TokenizeDocuments:
    """litdata `optimize` fn: a raw file -> one token array per document it holds.

    `read(path)` yields the documents' texts (a module-level function, so worker processes can import
    it). Holds the tokenizer itself, so workers need no access to the tokenizer folder.
    """

    def __init__(self, tokenizer, read: Callable[[str], Any]) -> None:
        self.encode = DocumentEncoder(tokenizer)
        self.read = read

    def __call__(self, path: str):
        for text in self.read(path):
            if text:
                yield self.encode(text)
