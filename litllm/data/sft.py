"""Supervised fine-tuning data: records -> token ids and loss masks -> padded batches.

Two record shapes are accepted (after each data set's own fields are renamed to these):

- instruction: `{"instruction": str, "input": str (optional), "output": str}`. The prompt is
  `PromptStyle.apply(instruction, input=input)`; the sample is `prompt + output + <eos>`.
- conversation: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`,
  rendered with the prompt style (a checkpoint's chat template, usually). Assistant turns are found by
  rendering the chat prefix by prefix; each turn's text, through the template's end-of-turn marker,
  is a target. A turn whose text holds no stop token (templates without one, like Alpaca's) gets the
  tokenizer's EOS appended, so the model learns to stop.

Prompt and reply are tokenized separately and concatenated, exactly as at inference, where the
rendered prompt is encoded and the reply is generated token by token.

With `mask_prompt` (the default), every label whose target is a prompt token is `ignore_index`, so
the loss covers replies only. Samples are `input_ids = tokens[:-1]`, `labels = tokens[1:]`.

With `packing`, the loaders serve rows of several samples (`PackedDataset`): `input_pos` restarts at
each sample and `document_ids` tells the model which tokens may attend to which (block-diagonal causal
attention), so each label token's loss equals its unpacked loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, get_args

import torch
from torch.utils.data import DataLoader, Dataset

from litllm.data.base import DataModule
from litllm.errors import LitLLMError

ROLES = ("system", "user", "assistant")
LongRecords = Literal["truncate", "skip", "error"]


# ---------------------------------------------------------------------- records
@dataclass
class Record:
    """One validated fine-tuning example and where it came from (for messages)."""

    origin: str  # "<file> record <index>"
    instruction: Optional[str] = None
    input: str = ""
    output: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None


# the checks every record parser (here, `litllm.data.preference`, `litllm.data.prompts`) makes of its fields
def record_object(raw: Any, origin: str) -> dict:
    """`raw` if it is a JSON object, else an error naming `origin`."""
    if not isinstance(raw, dict):
        raise LitLLMError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    return raw


def require_keys(raw: dict, keys: Sequence[str], origin: str, expected: str) -> None:
    """An error naming `origin`, the first of `keys` that `raw` lacks, and the record shapes `expected`."""
    for key in keys:
        if key not in raw:
            raise LitLLMError(f"{origin}: missing key '{key}' (expected {expected}; found {sorted(raw)})")


def string_field(raw: dict, key: str, origin: str, what: str = "a string", allow_empty: bool = True) -> str:
    """`raw[key]` if it is a string (a non-empty one unless `allow_empty`), else an error naming `origin`, the key,
    `what` it must be and what it is."""
    value = raw.get(key)
    if isinstance(value, str) and (allow_empty or value):
        return value
    got = "missing" if key not in raw else repr(value) if isinstance(value, str) else type(value).__name__
    raise LitLLMError(f"{origin}: '{key}' must be {what}, got {got}")


def parse_record(raw: Any, origin: str) -> Record:
    """Validate one raw record (instruction or conversation shape); errors name `origin` and the field."""
    raw = record_object(raw, origin)
    if "messages" in raw:
        return Record(origin, messages=_parse_messages(raw["messages"], origin))
    require_keys(raw, ("instruction", "output"), origin,
                 "'instruction', 'output' and optionally 'input', or 'messages'")
    for key in ("instruction", "input", "output"):
        if key != "input" or raw.get(key) is not None:
            string_field(raw, key, origin)
    return Record(origin, instruction=raw["instruction"], input=raw.get("input") or "", output=raw["output"])


def _parse_messages(messages: Any, origin: str, need_reply: bool = True) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LitLLMError(f"{origin}: 'messages' must be a non-empty list")
    parsed = []
    for i, m in enumerate(messages):
        where = f"{origin}: messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LitLLMError(f"{where}: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LitLLMError(f"{where}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        string_field(m, "content", where)
        parsed.append({"role": m["role"], "content": m["content"]})
    if need_reply and not any(m["role"] == "assistant" for m in parsed):
        raise LitLLMError(f"{origin}: 'messages' has no assistant turn (nothing to learn from)")
    return parsed


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random split; at least one validation record when `val_fraction > 0` (none for a single record)."""
    if not 0 <= val_fraction < 1:
        raise LitLLMError(f"val_split_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return records, []
    if len(records) < 2:  # a default fraction must not fail a tiny data set: train on it, say so once
        print(f"{len(records)} record(s): too few to split off a validation set; training without validation")
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# ---------------------------------------------------------------------- tokenization
def encode_record(record: Record, tokenizer, style) -> tuple[list[int], list[bool]]:
    """Token ids of a record and, per token, whether it is reply text (a training target)."""
    if record.messages is None:
        prompt = style.encode(tokenizer, instruction_prompt(style, record.instruction, record.input)).tolist()
        reply = tokenizer.encode(record.output, bos=False).tolist() + _eos(tokenizer, record)
        return prompt + reply, [False] * len(prompt) + [True] * len(reply)
    stops = style.stop_tokens(tokenizer)  # token sequences that end a turn
    ids: list[int] = []
    is_reply: list[bool] = []
    done = ""  # the text rendered and tokenized so far
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        prompt = style.render_messages(record.messages[:i], add_generation_prompt=True)
        full = style.render_messages(record.messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LitLLMError(
                f"{record.origin}: the prompt style '{style.name}' does not render this chat prefix by prefix"
                " (an earlier turn changes when a later one is added), so assistant turns cannot be located"
            )
        ids += _encode_piece(tokenizer, style, prompt[len(done) :], first=not ids)
        reply = _encode_piece(tokenizer, style, full[len(prompt) :], first=not ids)
        if not any(_contains(reply, stop) for stop in stops):
            reply += _eos(tokenizer, record)
        is_reply += [False] * (len(ids) - len(is_reply)) + [True] * len(reply)
        ids += reply
        done = full
    return ids, is_reply


def instruction_prompt(style, instruction: str, input: str = "") -> str:
    """The prompt of an instruction record. A style whose template has no place for `input` (all but
    Alpaca's) gets it appended to the instruction after a blank line, instead of silently dropping it."""
    prompt = style.apply(instruction, input=input)
    if input and prompt == style.apply(instruction):
        prompt = style.apply(f"{instruction}\n\n{input}")
    return prompt


def _encode_piece(tokenizer, style, text: str, first: bool) -> list[int]:
    if first:
        return style.encode(tokenizer, text).tolist()  # BOS unless the template wrote it
    return tokenizer.encode(text, bos=False).tolist() if text else []


def _contains(seq: list[int], sub: list[int]) -> bool:
    n = len(sub)
    return n > 0 and any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def _eos(tokenizer, record: Record) -> list[int]:
    if tokenizer.eos_id is None:
        raise LitLLMError(f"{record.origin}: the tokenizer has no EOS token to end the reply with")
    return [tokenizer.eos_id]


def sample_limit(max_seq_length: Optional[int], policy: str, flag: str) -> Optional[int]:
    """The most tokens a sample may have: max_seq_length + 1 (its inputs and its last target), None without a
    limit; first, `policy` (the flag `flag`: what to do with longer ones) must be one of `LongRecords`."""
    if policy not in get_args(LongRecords):
        raise LitLLMError(f"{flag} must be truncate, skip or error, got {policy!r}")
    return max_seq_length + 1 if max_seq_length and max_seq_length > 0 else None


@dataclass
class TokenizeStats:
    """What the length policy did to the samples longer than the limit (`report`: one line)."""

    unit: str = "records"
    """What a sample is ("records", "pairs")."""
    dropped_because: str = "no reply token fit"
    total: int = 0
    too_long: int = 0
    truncated: int = 0  # kept, cut to the limit
    skipped: int = 0  # dropped by the policy `skip`
    dropped: int = 0  # dropped: truncation left nothing to learn from (`dropped_because`)

    def report(self, name: str, limit: Optional[int]) -> None:
        """Print what happened to the samples longer than `limit`, if there were any."""
        if not self.too_long:
            return
        parts = [f"{n} {what}" for n, what in ((self.truncated, "truncated"), (self.skipped, "skipped"),
                                                (self.dropped, f"dropped ({self.dropped_because})")) if n]
        print(f"{name}: {self.too_long} of {self.total} {self.unit} are longer than max_seq_length + 1 = {limit} "
              f"tokens: {', '.join(parts)}")


def tokenize_records(
    records: Sequence[Record],
    tokenizer,
    style,
    max_seq_length: int,
    mask_prompt: bool,
    ignore_index: int,
    long_records: LongRecords = "truncate",
    name: str = "data",
) -> list[dict[str, torch.Tensor]]:
    """Samples `{"input_ids", "labels"}` (1-D int64, already shifted) of every record that fits the policy."""
    limit = sample_limit(max_seq_length, long_records, "long_records")
    stats = TokenizeStats(total=len(records))
    samples = []
    for record in _progress(records, name):
        ids, is_reply = encode_record(record, tokenizer, style)
        if limit is not None and len(ids) > limit:
            if long_records == "error":
                raise LitLLMError(
                    f"{record.origin}: {len(ids)} tokens, longer than max_seq_length + 1 = {limit}"
                    " (use --data.long_records truncate or skip, or a larger max_seq_length)"
                )
            stats.too_long += 1
            if long_records == "skip":
                stats.skipped += 1
                continue
            ids, is_reply = ids[:limit], is_reply[:limit]
            if mask_prompt and not any(is_reply[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        tokens = torch.tensor(ids, dtype=torch.long)
        labels = tokens[1:].clone()
        if mask_prompt:
            labels[~torch.tensor(is_reply[1:], dtype=torch.bool)] = ignore_index
        samples.append({"input_ids": tokens[:-1], "labels": labels})
    stats.report(name, limit)
    return samples


def _progress(records: Sequence[Record], name: str):
    if len(records) < 2000:
        return records
    from tqdm import tqdm

    return tqdm(records, desc=f"Tokenizing {name}", unit="record")


class TokenizedDataset(Dataset):
    """Tokenized samples held in memory (map-style): `dataset[i]` -> one sample's tensors, e.g.
    `{"input_ids": (T,), "labels": (T,)}` (SFT) or `{"prompt_ids", "chosen_ids", "rejected_ids"}` (preference pairs;
    plus `ref_logps` (2,), the reference's [chosen, rejected], once precomputed)."""

    def __init__(self, samples: list[dict[str, torch.Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


@dataclass
class PadCollate:
    """Pad a list of samples to the longest one: `input_ids` with `pad_id`, `labels` with `ignore_index`.

    Packed rows also carry `input_pos` (padded with 0) and `document_ids` (padded with -1: the padding
    is one document of its own, so every pad query still sees a key and attention stays finite).
    """

    pad_id: int = 0
    ignore_index: int = -100

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        fill = {"input_ids": self.pad_id, "labels": self.ignore_index, "input_pos": 0, "document_ids": -1}
        batch = {}
        for key in samples[0]:
            padded = torch.full((len(samples), length), fill[key], dtype=torch.long)  # (B, T)
            for i, s in enumerate(samples):
                padded[i, : len(s[key])] = s[key]
            batch[key] = padded
        return batch


# ---------------------------------------------------------------------- packing
def pack_samples(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Sample indices of each packed row: best-fit decreasing, every row holding <= `row_length` tokens.

    Samples are placed longest first (ties in index order), each into the open row it fills most
    tightly, else into a new row. Deterministic: it depends on the lengths only, not on a seed (the
    loader shuffles the rows each epoch). O(n log n): open rows are kept by their free space.
    """
    import bisect

    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free spaces that some open row has
    rows_by_free: dict[int, list[int]] = {}  # free space -> indices of the rows with it
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        if n > row_length:
            raise ValueError(f"sample {index} has {n} tokens, more than the row length {row_length}")
        at = bisect.bisect_left(free_sizes, n)
        if at < len(free_sizes):  # the tightest open row it fits in
            free = free_sizes[at]
            row = rows_by_free[free].pop()
            if not rows_by_free[free]:
                del rows_by_free[free], free_sizes[at]
        else:
            free, row = row_length, len(rows)
            rows.append([])
        rows[row].append(index)
        left = free - n
        if left > 0:
            if left not in rows_by_free:
                bisect.insort(free_sizes, left)
                rows_by_free[left] = []
            rows_by_free[left].append(row)
    return rows


class PackedDataset(Dataset):
    """Rows of several samples each: `dataset[i] -> {"input_ids", "labels", "input_pos", "document_ids"}`.

    `input_pos` restarts at 0 at each sample (its RoPE positions) and `document_ids` numbers the samples
    of the row (0, 1, ...), from which the model builds block-diagonal causal attention. Labels stay
    each sample's own (already shifted), so no token learns to predict the next sample.
    """

    def __init__(self, samples: list[dict[str, torch.Tensor]], row_length: int) -> None:
        self.samples = samples
        self.row_length = row_length
        self.rows = pack_samples([len(s["input_ids"]) for s in samples], row_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        parts = [self.samples[i] for i in self.rows[index]]
        return {
            "input_ids": torch.cat([s["input_ids"] for s in parts]),
            "labels": torch.cat([s["labels"] for s in parts]),
            "input_pos": torch.cat([torch.arange(len(s["input_ids"])) for s in parts]),
            "document_ids": torch.cat([torch.full((len(s["input_ids"]),), d) for d, s in enumerate(parts)]),
        }

    def fill(self) -> float:
        """Fraction of the rows' `row_length` positions that hold a sample token."""
        return sum(len(s["input_ids"]) for s in self.samples) / max(1, len(self.rows) * self.row_length)


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of the positions of batches of `batch_size` consecutive lengths, each padded to its longest, that are padding."""
    positions = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return 1 - sum(lengths) / max(1, positions)


def packing_summary(name: str, dataset: PackedDataset, batch_size: int, seed: int) -> str:
    """One line of packing statistics: rows, fill, and the padding saved versus padded batches (seeded order)."""
    lengths = [len(s["input_ids"]) for s in dataset.samples]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = padding_fraction([lengths[i] for i in order], batch_size)
    rows = [sum(lengths[i] for i in row) for row in dataset.rows]
    packed = padding_fraction(rows, batch_size)
    return (
        f"{name}: packed {len(lengths)} samples into {len(rows)} rows of {dataset.row_length} tokens, fill"
        f" {dataset.fill():.1%}; padding {packed:.1%} of the positions of batches of {batch_size} rows, versus"
        f" {padded:.1%} for padded batches of {batch_size} samples (saves {padded - packed:.1%} of the positions)"
    )


# ---------------------------------------------------------------------- the shared data module
def resolve_prompt_style(name: Optional[str], tokenizer):
    """The style training data is laid out in: `name` if given; else the tokenizer's checkpoint's own
    (`PromptStyle.from_checkpoint`), with Alpaca where that has none (instructions need a template)."""
    from litllm.prompts import PromptStyle

    return PromptStyle.from_checkpoint(getattr(tokenizer, "checkpoint_dir", None), name, fallback="alpaca",
                                       flag="--data.prompt_style")


@dataclass(kw_only=True)
class SFTDataModule(DataModule):
    """Fields and loaders shared by every fine-tuning data module; a subclass only loads its records."""

    mask_prompt: bool = True
    """Compute the loss on replies only (labels are `ignore_index` wherever the target is a prompt token)."""
    prompt_style: Optional[str] = None
    """How instructions and chats are laid out (`litllm.prompts.style_names()`). Unset: the checkpoint's own
    style (prompt_style.yaml or chat template), else `alpaca`."""
    val_split_fraction: float = 0.05
    """Fraction of the records held out for validation (seeded) when the data has no validation split."""
    long_records: LongRecords = "truncate"
    """Records longer than max_seq_length + 1 tokens: `truncate` (cut the end), `skip`, or `error`."""
    ignore_index: int = -100
    """Label of positions without a loss (padding, masked prompts); the training loop and its loss read it from here."""
    seed: int = 42
    """Seed of the train/validation split and of the shuffle (the training loop reseeds each epoch with its seed)."""
    num_workers: int = 0
    """DataLoader worker processes (samples are tokenized up front, so 0 is usually enough)."""
    packing: bool = False
    """Pack several samples into each row of max_seq_length tokens (best-fit decreasing) instead of padding
    every sample to the longest of its batch. Positions restart and attention stays within each sample, so
    every label token gets the loss it has unpacked; a micro-batch is `micro_batch_size` rows, and an epoch
    (every sample once) is the rows once."""

    train_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)
    val_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)
    _packed: dict = field(default_factory=dict, init=False, repr=False)  # (split, row length) -> PackedDataset

    def load_records(self) -> tuple[list[Record], list[Record]]:
        """(train, validation) records of this data set. Subclasses implement this."""
        raise NotImplementedError

    def setup(self) -> None:
        tokenizer = self._require_tokenizer()
        style = resolve_prompt_style(self.prompt_style, tokenizer)
        self.style = style
        self._packed = {}
        train, val = self.load_records()
        if not train:
            raise LitLLMError(f"{type(self).__name__}: no training records")
        common = dict(
            tokenizer=tokenizer,
            style=style,
            max_seq_length=self.max_seq_length,
            mask_prompt=self.mask_prompt,
            ignore_index=self.ignore_index,
            long_records=self.long_records,
        )
        self.train_dataset = TokenizedDataset(tokenize_records(train, name=f"{type(self).__name__} train", **common))
        self.val_dataset = (
            TokenizedDataset(tokenize_records(val, name=f"{type(self).__name__} val", **common)) if val else None
        )
        if len(self.train_dataset) == 0:
            raise LitLLMError(f"{type(self).__name__}: every training record was dropped (see the counts above)")

    def longest_sample(self) -> Optional[int]:
        datasets = [d for d in (self.train_dataset, self.val_dataset) if d]
        return max((len(s["input_ids"]) for d in datasets for s in d.samples), default=None)

    def _collate(self) -> PadCollate:
        pad_id = getattr(self.tokenizer, "pad_id", None)
        return PadCollate(pad_id=pad_id if pad_id is not None else 0, ignore_index=self.ignore_index)

    def _dataset(self, split: str) -> Dataset:
        """The samples of `split`, or with `packing` their rows of max_seq_length tokens (built once per length).

        max_seq_length is read here, not at setup: with --train.max_seq_length unset, the loop sizes the run
        for the longest sample after setup and connects that length before asking for the loaders."""
        samples = self.train_dataset if split == "train" else self.val_dataset
        if not self.packing:
            return samples
        row_length = self.max_seq_length if self.max_seq_length > 0 else self.longest_sample()
        key = (split, row_length)
        if key not in self._packed:
            self._packed[key] = PackedDataset(samples.samples, row_length)
            print(packing_summary(f"{type(self).__name__} {split}", self._packed[key], self.batch_size, self.seed))
        return self._packed[key]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset("train"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=self._collate(),
        )

    def val_dataloader(self) -> Optional[DataLoader]:
        if not self.val_dataset:
            return None
        return DataLoader(
            self._dataset("val"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
        )
