"""`Preference`: pairs of a prompt, a preferred (chosen) and a dispreferred (rejected) reply, for DPO/IPO/SimPO.

    litllm finetune_dpo checkpoints/Qwen/Qwen2.5-1.5B-Instruct --data Preference --data.json_path pairs.jsonl

A `.json` file holds a list of records, a `.jsonl` file one per line. Three record shapes:

- strings: `{"prompt": str, "chosen": str, "rejected": str}`; the prompt is rendered by the prompt
  style like an instruction (`PromptStyle.apply`), the replies follow it, each ended by EOS.
- chat: `{"chosen": [messages], "rejected": [messages]}`, two conversations that share every message
  but the last, which is the assistant's reply (TRL's "implicit prompt" form); or an explicit
  `"prompt": [messages]` with `chosen`/`rejected` lists that continue it.
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...],
  "chosen": {"from": "gpt", "value": str}, "rejected": {...}}` (LLaMA-Factory's layout).

Messages are rendered with the prompt style (a checkpoint's chat template, usually). Each reply is
encoded exactly as supervised finetuning encodes it (`litllm.data.sft.encode_record`), so only the
reply's tokens (through its end-of-turn marker) are targets.

A batch of B pairs is one (2B, T) batch: rows 0..B-1 are prompt + chosen, rows B..2B-1 the same
prompts + rejected (TRL's concatenated forward), right-padded; labels are `ignore_index` except on
reply tokens. With precomputed reference log-probs the batch also carries `ref_logps` (2B,).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from litllm.data.base import DataModule
from litllm.data.json_data import load_split_records
from litllm.data.sft import (
    LongRecords, Record, TokenizedDataset, TokenizeStats, _parse_messages, encode_record, record_object, require_keys,
    resolve_prompt_style, sample_limit, string_field,
)
from litllm.errors import LitLLMError

LongPairs = LongRecords
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ---------------------------------------------------------------------- records
@dataclass
class PreferenceRecord:
    """One validated pair: a prompt (string, or the messages before the reply) and two different replies."""

    origin: str  # "<file> record <index>"
    chosen: str
    rejected: str
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None


def parse_preference_record(raw: Any, origin: str) -> PreferenceRecord:
    """Validate one raw record of any of the three shapes; errors name `origin` and the field."""
    raw = record_object(raw, origin)
    require_keys(raw, ("chosen", "rejected"), origin,
                 "'prompt', 'chosen', 'rejected', or ShareGPT's 'conversations' with 'chosen' and 'rejected'")
    if "conversations" in raw:
        record = _parse_sharegpt(raw, origin)
    elif isinstance(raw["chosen"], list) or isinstance(raw["rejected"], list):
        record = _parse_chat(raw, origin)
    else:
        prompt, chosen, rejected = (string_field(raw, key, origin, "a string (or a message list for chat records)")
                                    for key in ("prompt", "chosen", "rejected"))
        record = PreferenceRecord(origin, chosen=chosen, rejected=rejected, prompt=prompt)
    if record.chosen == record.rejected:
        raise LitLLMError(f"{origin}: 'chosen' and 'rejected' are the same reply (a pair must differ)")
    return record


def _parse_chat(raw: dict, origin: str) -> PreferenceRecord:
    prefix = raw.get("prompt", [])
    if isinstance(prefix, str):
        prefix = [{"role": "user", "content": prefix}]
    replies = {}
    for key in ("chosen", "rejected"):
        if not isinstance(raw[key], list):
            raise LitLLMError(f"{origin}: '{key}' must be a message list like the other reply, got {type(raw[key]).__name__}")
        replies[key] = _parse_messages(list(prefix) + raw[key], f"{origin}: '{key}'")
    chosen, rejected = replies["chosen"], replies["rejected"]
    for key, messages in replies.items():
        if messages[-1]["role"] != "assistant":
            raise LitLLMError(f"{origin}: the last message of '{key}' must be the assistant's reply")
    if chosen[:-1] != rejected[:-1]:
        raise LitLLMError(f"{origin}: 'chosen' and 'rejected' must share every message before the final reply")
    if len(chosen) < 2:
        raise LitLLMError(f"{origin}: no prompt: the conversations hold only the assistant's reply")
    return PreferenceRecord(origin, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"],
                            messages=chosen[:-1])


def _parse_sharegpt(raw: dict, origin: str) -> PreferenceRecord:
    turns = raw["conversations"]
    if not isinstance(turns, list) or not turns:
        raise LitLLMError(f"{origin}: 'conversations' must be a non-empty list")

    def message(turn: Any, where: str) -> dict[str, str]:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise LitLLMError(f"{origin}: {where}: expected an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise LitLLMError(f"{origin}: {where}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {turn['from']!r}")
        return {"role": SHAREGPT_ROLES[turn["from"]], "content": string_field(turn, "value", f"{origin}: {where}")}

    messages = [message(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    if messages[-1]["role"] != "user":
        raise LitLLMError(f"{origin}: the last turn of 'conversations' must be the user's (the reply follows it)")
    replies = {}
    for key in ("chosen", "rejected"):
        reply = message(raw[key], key)
        if reply["role"] != "assistant":
            raise LitLLMError(f"{origin}: '{key}' must be the assistant's reply ('from': 'gpt')")
        replies[key] = reply["content"]
    return PreferenceRecord(origin, chosen=replies["chosen"], rejected=replies["rejected"], messages=messages)


# ---------------------------------------------------------------------- tokenization
def encode_pair(record: PreferenceRecord, tokenizer, style) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen reply ids, rejected reply ids); each reply is encoded as SFT encodes a reply."""
    pieces = []
    for reply in (record.chosen, record.rejected):
        if record.messages is None:
            sft = Record(record.origin, instruction=record.prompt, output=reply)
        else:
            sft = Record(record.origin, messages=record.messages + [{"role": "assistant", "content": reply}])
        ids, is_reply = encode_record(sft, tokenizer, style)
        start = len(is_reply)  # where the final reply begins (earlier assistant turns belong to the prompt)
        while start > 0 and is_reply[start - 1]:
            start -= 1
        pieces.append((ids[:start], ids[start:]))
    (prompt, chosen), (prompt_r, rejected) = pieces
    if prompt != prompt_r:
        raise LitLLMError(f"{record.origin}: the prompt style '{style.name}' renders the shared prompt differently "
                          "before the two replies")
    return prompt, chosen, rejected


def tokenize_pairs(records: list[PreferenceRecord], tokenizer, style, max_seq_length: int,
                   long_pairs: LongPairs = "truncate", name: str = "data") -> list[dict[str, torch.Tensor]]:
    """Samples `{"prompt_ids", "chosen_ids", "rejected_ids"}` (1-D int64) of the pairs that fit the policy.

    A pair is too long when prompt + its longer reply exceeds max_seq_length + 1 tokens. `truncate`
    cuts the prompt from its beginning first (the end, next to the reply, is kept; one token at least),
    then the replies' ends; `skip` drops the pair; `error` stops with the record's name.
    """
    limit = sample_limit(max_seq_length, long_pairs, "long_pairs")
    stats = TokenizeStats("pairs", "the truncated replies were identical", total=len(records))
    samples = []
    for record in records:
        prompt, chosen, rejected = encode_pair(record, tokenizer, style)
        longest = len(prompt) + max(len(chosen), len(rejected))
        if limit is not None and longest > limit:
            if long_pairs == "error":
                raise LitLLMError(f"{record.origin}: {longest} tokens (prompt + longer reply), more than "
                                  f"max_seq_length + 1 = {limit} (use --data.long_pairs truncate or skip, or a larger "
                                  "--train.max_seq_length)")
            stats.too_long += 1
            if long_pairs == "skip":
                stats.skipped += 1
                continue
            keep = max(1, limit - max(len(chosen), len(rejected)))
            prompt = prompt[-keep:]
            chosen, rejected = chosen[: limit - len(prompt)], rejected[: limit - len(prompt)]
            if chosen == rejected:
                stats.dropped += 1
                continue
            stats.truncated += 1
        samples.append({"prompt_ids": torch.tensor(prompt, dtype=torch.long),
                        "chosen_ids": torch.tensor(chosen, dtype=torch.long),
                        "rejected_ids": torch.tensor(rejected, dtype=torch.long)})
    stats.report(name, limit)
    return samples


@dataclass
class PairCollate:
    """B pairs -> one (2B, T) batch: [prompt + chosen] * B then [prompt + rejected] * B, right-padded."""

    pad_id: int = 0
    ignore_index: int = -100

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = [(s["prompt_ids"], s["chosen_ids"]) for s in samples] + [(s["prompt_ids"], s["rejected_ids"]) for s in samples]
        length = max(len(p) + len(r) for p, r in rows) - 1  # input positions: the last token is only a target
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (2B, T)
        labels = torch.full((len(rows), length), self.ignore_index, dtype=torch.long)  # (2B, T)
        for i, (prompt, reply) in enumerate(rows):
            tokens = torch.cat([prompt, reply])
            input_ids[i, : len(tokens) - 1] = tokens[:-1]
            labels[i, len(prompt) - 1 : len(tokens) - 1] = reply  # labels[t] is the target of input_ids[t]
        batch = {"input_ids": input_ids, "labels": labels}
        if "ref_logps" in samples[0]:
            refs = torch.stack([s["ref_logps"] for s in samples])  # (B, 2)
            batch["ref_logps"] = torch.cat([refs[:, 0], refs[:, 1]])  # (2B,) in the rows' order
        return batch


# ---------------------------------------------------------------------- the data module
@dataclass(kw_only=True)
class Preference(DataModule):
    """Preference pairs from a `.json` / `.jsonl` file (see `litllm.data.preference`)."""

    json_path: Path
    """A .json file (a list of pair records) or a .jsonl file (one per line)."""
    prompt_style: Optional[str] = None
    """How prompts and chats are laid out (`litllm.prompts.style_names()`). Unset: the checkpoint's own
    style (prompt_style.yaml or chat template), else `alpaca`."""
    val_split_fraction: float = 0.05
    """Fraction of the pairs held out for validation (seeded); validation reports the reward accuracy."""
    val_json_path: Optional[Path] = None
    """A separate validation file (then nothing is split off)."""
    long_pairs: LongPairs = "truncate"
    """Pairs whose prompt + longer reply exceed max_seq_length + 1 tokens: `truncate` (the prompt's beginning
    first, then the replies' ends), `skip`, or `error`."""
    ignore_index: int = -100
    """Label of positions without a loss (prompt, padding)."""
    seed: int = 42
    """Seed of the train/validation split (the training loop shuffles each epoch with its own seed)."""
    num_workers: int = 0
    """DataLoader worker processes."""

    train_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)
    val_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)
    reference_logps: Optional[dict[str, torch.Tensor]] = field(default=None, init=False, repr=False)
    """Set by `finetune_dpo --precompute_reference true`: {"train": (N, 2), "val": (M, 2)}, attached to the samples."""

    def load_records(self) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
        return load_split_records(parse_preference_record, self.json_path, self.val_json_path, self.val_split_fraction, self.seed)

    def setup(self) -> None:
        tokenizer = self._require_tokenizer()
        self.style = resolve_prompt_style(self.prompt_style, tokenizer)
        train, val = self.load_records()
        common = dict(tokenizer=tokenizer, style=self.style, max_seq_length=self.max_seq_length, long_pairs=self.long_pairs)
        self.train_dataset = TokenizedDataset(tokenize_pairs(train, name="Preference train", **common))
        self.val_dataset = TokenizedDataset(tokenize_pairs(val, name="Preference val", **common)) if val else None
        if len(self.train_dataset) == 0:
            raise LitLLMError(f"{self.json_path}: every training pair was dropped (see the counts above)")
        if self.reference_logps is not None:
            self.attach_reference(self.reference_logps)

    def datasets(self) -> dict[str, TokenizedDataset]:
        return {k: d for k, d in (("train", self.train_dataset), ("val", self.val_dataset)) if d}

    def attach_reference(self, logps: dict[str, torch.Tensor]) -> None:
        """Give every sample its reference log-probs `ref_logps` (2,): {split: (N, 2)} in dataset order."""
        for split, dataset in self.datasets().items():
            if split not in logps or len(logps[split]) != len(dataset):
                raise LitLLMError(f"the precomputed reference log-probs do not match the {split} pairs of {self.json_path}")
            for sample, ref in zip(dataset.samples, logps[split]):
                sample["ref_logps"] = ref
        self.reference_logps = logps

    def longest_sample(self) -> Optional[int]:
        lengths = [len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) - 1
                   for d in self.datasets().values() for s in d.samples]
        return max(lengths, default=None)

    def collate(self) -> PairCollate:
        pad_id = getattr(self.tokenizer, "pad_id", None)
        return PairCollate(pad_id=pad_id if pad_id is not None else 0, ignore_index=self.ignore_index)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
                          collate_fn=self.collate())

    def val_dataloader(self) -> Optional[DataLoader]:
        if not self.val_dataset:
            return None
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate())
