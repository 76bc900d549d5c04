"""`TextFiles`: pretrain on a folder of plain-text files (or on Python's own standard library).

`prepare_data()` tokenizes the files once with litdata `optimize` into binary token chunks, cached in
`optimized_dir/<name>-<key>/{train,val}` where the key hashes the tokenizer and the file set (paths,
sizes, modification times), so a changed file or tokenizer re-tokenizes and an unchanged one never
does. Training then streams blocks of `max_seq_length + 1` tokens with litdata.

Each file is one document: `<bos>? text <eos>`, BOS when the tokenizer adds one by default, EOS when it
has one, so documents are separated in the stream. Files are read as UTF-8 (undecodable bytes become
U+FFFD).
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from litllm.data.base import DataModule
from litllm.data.streaming import (
    DocumentEncoder,
    check_optimized_dir,
    optimize_tokens,
    token_dataset,
    token_loader,
)
from litllm.errors import LitLLMError

# bump when the token layout written by `_TokenizeFiles` changes: old caches are then not reused
_FORMAT_VERSION = 1
# large files are tokenized in pieces of about this many characters (bounded memory per worker)
_PIECE_CHARS = 1 << 20


def _python_stdlib() -> tuple[Path, frozenset[str]]:
    # third-party packages may live inside the stdlib folder: they are not the standard library
    return Path(sysconfig.get_paths()["stdlib"]), frozenset({"site-packages", "dist-packages", "__pycache__"})


# names a recipe can use instead of a machine-specific path: name -> (folder, folder names to skip)
NAMED_SOURCES: dict[str, Callable[[], tuple[Path, frozenset[str]]]] = {"python-stdlib": _python_stdlib}


def resolve_source(path: str | Path) -> tuple[str, Path, frozenset[str]]:
    """`(display name, folder, skipped folder names)` of a data path or a name in `NAMED_SOURCES`."""
    if str(path) in NAMED_SOURCES:
        folder, skip = NAMED_SOURCES[str(path)]()
        return str(path), folder, skip
    folder = Path(path).expanduser()
    return folder.name or "data", folder, frozenset()


def list_files(path: str | Path, pattern: str, max_files: Optional[int] = None) -> list[Path]:
    """Files under `path` matching `pattern` (sorted), skipping excluded folders; clear errors if none.

    `path` may also be a single file (taken whatever its name) or a name in `NAMED_SOURCES`.
    """
    _, folder, skip = resolve_source(path)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise LitLLMError(f"{path}: data folder not found")
    files = sorted(
        p for p in folder.glob(pattern) if p.is_file() and not skip.intersection(p.relative_to(folder).parts[:-1])
    )
    if not files:
        raise LitLLMError(f"{folder}: no files match '{pattern}' ({_glob_hint(folder)})")
    return files[:max_files] if max_files else files


def _glob_hint(folder: Path) -> str:
    """For a folder that `--data.glob` matched nothing in: the glob of the file type it holds most of (a recipe's
    `*.py` carried over to a folder of `.txt` files), found among its first 10,000 files."""
    from collections import Counter
    from itertools import islice

    suffixes = Counter(p.suffix for p in islice(folder.rglob("*"), 10_000) if p.suffix and p.is_file())
    if not suffixes:
        return "choose the files with --data.glob"
    suffix, count = suffixes.most_common(1)[0]
    return f"it holds {count} *{suffix} file(s): --data.glob '**/*{suffix}'"


class _TokenizeFiles:
    """litdata `optimize` fn: `(path, start, end)` -> 1-D token arrays of that line range of the file.

    `start`/`end` are fractions of the file's lines (0, 1 for a whole file). Holds the tokenizer itself,
    so worker processes need no access to the tokenizer folder.
    """

    def __init__(self, tokenizer) -> None:
        self.encode = DocumentEncoder(tokenizer)

    def __call__(self, item: tuple[str, float, float]):
        path, start, end = item
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        if (start, end) != (0.0, 1.0):
            lines = text.splitlines(keepends=True)
            text = "".join(lines[round(start * len(lines)) : round(end * len(lines))])
        if not text:
            return
        pieces = _split_text(text, _PIECE_CHARS)
        for i, piece in enumerate(pieces):
            yield self.encode(piece, starts=i == 0, ends=i == len(pieces) - 1)


def _split_text(text: str, size: int) -> list[str]:
    """Pieces of at most about `size` characters, cut after a newline when there is one."""
    pieces, begin = [], 0
    while len(text) - begin > size:
        cut = text.rfind("\n", begin, begin + size)
        cut = begin + size if cut <= begin else cut + 1
        pieces.append(text[begin:cut])
        begin = cut
    pieces.append(text[begin:])
    return pieces


def _pick_validation_files(sizes: list[int], fraction: float, seed: int) -> set[int]:
    """Indices of whole files (a seeded random pick) holding about `fraction` of the bytes.

    Counting bytes rather than files keeps a validation split of tiny files from holding almost no
    text. A file larger than twice the target is passed over, so one big file cannot swamp the split;
    at least one file is held out and at least one is kept for training.
    """
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    target = fraction * sum(sizes)
    picked: set[int] = set()
    held = 0
    for i in order:
        if held >= target or len(picked) == len(sizes) - 1:
            break
        if sizes[i] <= 2 * target:
            picked.add(i)
            held += sizes[i]
    return picked or {min(order, key=lambda i: sizes[i])}


def _fingerprint(tokenizer, inputs: dict[str, list[tuple[str, float, float]]]) -> str:
    """Hash of the token layout version, the tokenizer files and every input (path, line range, size, mtime)."""
    h = hashlib.sha256(f"v{_FORMAT_VERSION}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        file = Path(tokenizer.checkpoint_dir) / name
        if file.is_file():
            h.update(name.encode() + hashlib.sha256(file.read_bytes()).digest())
    for split in sorted(inputs):
        for path, start, end in inputs[split]:
            stat = Path(path).stat()
            h.update(json.dumps([split, path, start, end, stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


@dataclass
class TextFiles(DataModule):
    """Pretrain on plain-text files: tokenized once into litdata chunks, then streamed."""

    train_data_path: str = "data/text"
    """Folder of training files (or one file), or `python-stdlib` for the sources of the running Python's
    standard library."""
    val_data_path: Optional[str] = None
    """Folder (or named source) of validation files. Unset: hold out `val_split_fraction` of the training files."""
    glob: str = "**/*.txt"
    """Which files to read, relative to the folder (`**/` descends into sub-folders), e.g. `**/*.py`."""
    val_split_fraction: float = 0.05
    """Fraction of the training text held out for validation when `val_data_path` is unset: whole files
    holding about this fraction of the bytes (seeded pick), or, with a single file, the last fraction of
    its lines. 0 disables validation."""
    max_files: Optional[int] = None
    """Use only the first N files (sorted by path) of each folder: a quick smoke test."""
    optimized_dir: Path = Path("data/optimized")
    """Where the tokenized chunks are cached (one sub-folder per tokenizer and file set)."""
    seed: int = 42
    """Seed of the validation pick and of the streaming shuffle."""
    num_workers: int = 4
    """DataLoader worker processes."""
    optimize_workers: Optional[int] = None
    """Processes tokenizing files in `prepare_data` (default: min(CPU count, number of files))."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_split_fraction < 1:
            raise LitLLMError(f"TextFiles: val_split_fraction must be in [0, 1) (got {self.val_split_fraction})")

    # which (file, line range) inputs go to each split -----------------------------------------------

    def split_inputs(self) -> dict[str, list[tuple[str, float, float]]]:
        """`(path, first line fraction, last line fraction)` inputs of each split ("train", maybe "val")."""
        train_files = list_files(self.train_data_path, self.glob, self.max_files)

        def whole(files) -> list[tuple[str, float, float]]:
            return [(str(f), 0.0, 1.0) for f in files]

        if self.val_data_path is not None:
            return {
                "train": whole(train_files),
                "val": whole(list_files(self.val_data_path, self.glob, self.max_files)),
            }
        if self.val_split_fraction == 0:
            return {"train": whole(train_files)}
        if len(train_files) == 1:
            cut = 1.0 - self.val_split_fraction
            path = str(train_files[0])
            return {"train": [(path, 0.0, cut)], "val": [(path, cut, 1.0)]}
        sizes = [f.stat().st_size for f in train_files]
        val = _pick_validation_files(sizes, self.val_split_fraction, self.seed)
        return {
            "train": whole(f for i, f in enumerate(train_files) if i not in val),
            "val": whole(f for i, f in enumerate(train_files) if i in val),
        }

    def cache_dirs(self, inputs: Optional[dict[str, list]] = None) -> dict[str, Path]:
        """Optimized folder of each split (depends on the tokenizer and the files, not on max_seq_length)."""
        tokenizer = self._require_tokenizer()
        inputs = self.split_inputs() if inputs is None else inputs
        root = Path(self.optimized_dir) / f"{resolve_source(self.train_data_path)[0]}-{_fingerprint(tokenizer, inputs)}"
        return {split: root / split for split in inputs}

    # the DataModule hooks ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        tokenizer = self._require_tokenizer()
        inputs = self.split_inputs()
        fn = _TokenizeFiles(tokenizer)
        for split, out_dir in self.cache_dirs(inputs).items():
            if (out_dir / "index.json").is_file():
                continue  # tokenized before with the same tokenizer and files
            print(f"Tokenizing {len(inputs[split])} {split} file(s) into {out_dir}")
            optimize_tokens(fn, inputs[split], out_dir, num_workers=self.optimize_workers, keep_order=True)

    def setup(self) -> None:
        self.block_size = self._require_block_size()
        self._dirs = self.cache_dirs()
        for split, path in self._dirs.items():
            check_optimized_dir(path, f"TextFiles {split} data (was prepare_data() run?)")
            dataset = token_dataset(path, self.block_size, shuffle=False, seed=self.seed)
            if len(dataset) == 0:
                raise LitLLMError(
                    f"TextFiles: the {split} split ({path}) has fewer than max_seq_length + 1 = {self.block_size}"
                    " tokens per chunk; use more data or a smaller max_seq_length"
                )

    def train_dataloader(self):
        dataset = token_dataset(self._dirs["train"], self.block_size, shuffle=True, seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers)

    def val_dataloader(self):
        if "val" not in self._dirs:
            return None
        dataset = token_dataset(self._dirs["val"], self.block_size, shuffle=False, seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers, drop_last=False)
