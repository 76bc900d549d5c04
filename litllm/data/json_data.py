"""`JSON`: fine-tune on your own records from `.json` / `.jsonl` files.

A `.json` file holds a list of records; a `.jsonl` file one record per line (blank lines are skipped).
Records are instruction records `{"instruction", "input" (optional), "output"}` or conversations
`{"messages": [{"role", "content"}, ...]}` (see `litllm.data.sft`). Every problem is reported with
the file and the record's index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from litllm.data.sft import Record, SFTDataModule, parse_record, split_records
from litllm.errors import LitLLMError

SUFFIXES = (".json", ".jsonl")


def load_split_records(parse: Callable[[Any, str], Any], json_path: Path, val_json_path: Optional[Path],
                       val_split_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) records, each parsed by `parse(raw, origin)`: `val_json_path`'s records, or a seeded
    `val_split_fraction` of `json_path`'s."""
    records = [parse(raw, origin) for raw, origin in read_json_records(Path(json_path))]
    if val_json_path is not None:
        return records, [parse(raw, origin) for raw, origin in read_json_records(Path(val_json_path))]
    return split_records(records, val_split_fraction, seed)


def read_json_records(path: Path) -> list[tuple[Any, str]]:
    """`(raw record, origin)` pairs of a `.json` list or a `.jsonl` file; origin names file and index."""
    path = Path(path)
    if not path.is_file():
        raise LitLLMError(f"{path}: file not found")
    if path.suffix not in SUFFIXES:
        raise LitLLMError(f"{path}: expected a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LitLLMError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".jsonl":
        pairs = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise LitLLMError(
                    f"{path}: line {line_number} is not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            pairs.append((raw, f"{path} record {len(pairs)} (line {line_number})"))
    else:
        if not text.strip():
            raise LitLLMError(f"{path}: the file is empty (expected a list of records)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LitLLMError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
        if not isinstance(data, list):
            raise LitLLMError(f"{path}: expected a list of records at the top level, got {type(data).__name__}")
        pairs = [(raw, f"{path} record {i}") for i, raw in enumerate(data)]
    if not pairs:  # `[]`, or a .jsonl of blank lines
        raise LitLLMError(f"{path}: no records ({'no JSON lines' if path.suffix == '.jsonl' else 'an empty list'})")
    return pairs


def load_record_file(path: Path) -> list[Record]:
    return [parse_record(raw, origin) for raw, origin in read_json_records(path)]


def _find_split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise LitLLMError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


@dataclass(kw_only=True)
class JSON(SFTDataModule):
    """Fine-tune on records from a `.json` / `.jsonl` file, or a folder with `train.json(l)` and `val.json(l)`."""

    json_path: Path
    """A .json file (a list of records), a .jsonl file (one record per line), or a folder holding
    `train.json(l)` and optionally `val.json(l)`. Without a validation file, `val_split_fraction` of the
    training records are held out."""

    def load_records(self) -> tuple[list[Record], list[Record]]:
        path = Path(self.json_path)
        if path.is_dir():
            train_file = _find_split_file(path, "train")
            if train_file is None:
                raise LitLLMError(f"{path}: no train.json or train.jsonl in this folder")
            val_file = _find_split_file(path, "val")
            train = load_record_file(train_file)
            if val_file is not None:
                return train, load_record_file(val_file)
            return split_records(train, self.val_split_fraction, self.seed)
        if not path.exists():
            raise LitLLMError(f"{path}: file or folder not found (--data.json_path)")
        return split_records(load_record_file(path), self.val_split_fraction, self.seed)
