"""`Prompts`: prompts (and the fields rewards check them with) for `litllm finetune_grpo`.

    litllm finetune_grpo checkpoints/Qwen/Qwen2.5-1.5B-Instruct --data Prompts --data.json_path prompts.jsonl --reward accuracy

A `.json` file holds a list of records, a `.jsonl` file one per line. A record is `{"prompt": str}` (rendered by
the prompt style like an instruction) or `{"messages": [...]}` (a chat, rendered with the generation prompt),
plus any other fields (`"answer": "42"`), which the reward functions receive as keyword arguments.

A batch of B prompts is `{"input_ids": (B, P) right-padded prompt ids, "prompt_lens": (B,), "index": (B,),
"generation": (B, 3)}`: `index` names each prompt's record and `generation` = (epoch, micro-batch index in the
epoch, iteration). The training loader serves each generation window (`steps_per_generation` micro-batches,
one optimizer step's worth) `num_iterations` times in a row (TRL's `num_iterations`: the completions sampled at
iteration 0 are reused, with importance ratios, by the later ones). The loader keeps its own position, and the
GRPO method's buffered rollouts, in its `state_dict()`, so a resumed run is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from litllm.data.base import DataModule
from litllm.data.json_data import load_split_records
from litllm.data.sft import (
    TokenizedDataset, _parse_messages, instruction_prompt, record_object, resolve_prompt_style, string_field,
)
from litllm.errors import LitLLMError

RESERVED = ("prompts", "completions", "completion_ids")


@dataclass
class PromptRecord:
    origin: str  # "<file> record <index>"
    prompt: Any
    """As given: a string, or the message list (what reward functions get as `prompts`)."""
    fields: dict[str, Any]


def parse_prompt_record(raw: Any, origin: str) -> PromptRecord:
    raw = record_object(raw, origin)
    if ("prompt" in raw) == ("messages" in raw):
        raise LitLLMError(f"{origin}: expected exactly one of 'prompt' (a string) or 'messages' (a chat), found "
                          f"{sorted(raw)}")
    reserved = [k for k in RESERVED if k in raw]
    if reserved:
        raise LitLLMError(f"{origin}: field '{reserved[0]}' is reserved (reward functions get it as an argument)")
    fields = {k: v for k, v in raw.items() if k not in ("prompt", "messages")}
    if "prompt" in raw:
        prompt = string_field(raw, "prompt", origin, "a non-empty string", allow_empty=False)
        return PromptRecord(origin, prompt, fields)
    messages = _parse_messages(raw["messages"], f"{origin}: 'messages'", need_reply=False)
    if messages[-1]["role"] == "assistant":
        raise LitLLMError(f"{origin}: the last message must not be the assistant's (the completion follows it)")
    return PromptRecord(origin, messages, fields)


def encode_prompt(record: PromptRecord, tokenizer, style) -> list[int]:
    if isinstance(record.prompt, str):
        return style.encode(tokenizer, instruction_prompt(style, record.prompt)).tolist()
    return style.encode(tokenizer, style.render_messages(record.prompt, add_generation_prompt=True)).tolist()


def collate_prompts(samples: list[dict[str, torch.Tensor]], generation: tuple[int, int, int] = (0, 0, 0)) -> dict:
    lens = torch.tensor([len(s["prompt_ids"]) for s in samples], dtype=torch.long)
    input_ids = torch.zeros(len(samples), int(lens.max()), dtype=torch.long)  # (B, P)
    for i, s in enumerate(samples):
        input_ids[i, : len(s["prompt_ids"])] = s["prompt_ids"]
    return {"input_ids": input_ids, "prompt_lens": lens, "index": torch.stack([s["index"] for s in samples]),
            "generation": torch.tensor([generation] * len(samples), dtype=torch.long)}


class PromptLoader:
    """The training loader: shuffled (seed + epoch) micro-batches of `batch_size` prompts, each window of
    `window` micro-batches served `num_iterations` times; an incomplete last window is dropped.

    Keeps its position (and `extra_state`, the GRPO method's buffered rollouts) in `state_dict()`, which the
    loop saves in every checkpoint: the loop treats it like a streaming loader."""

    def __init__(self, dataset: TokenizedDataset, batch_size: int, window: int, num_iterations: int, seed: int,
                 extra_state: Any = None, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.batch_size, self.window, self.num_iterations = dataset, batch_size, window, num_iterations
        self.seed, self.extra_state, self.rank, self.world_size = seed, extra_state, rank, world_size
        step = batch_size * window * world_size
        self.windows = len(dataset) // step
        if self.windows == 0:
            raise LitLLMError(f"the training set has {len(dataset)} prompts, fewer than one step's {step} "
                              "(--train.global_batch_size): add prompts or lower the batch size")
        self.epoch, self.position = 0, 0  # batches served in the epoch

    def __len__(self) -> int:
        return self.windows * self.window * self.num_iterations

    def __iter__(self):
        per_window = self.window * self.num_iterations
        while self.position < len(self):
            w, k = divmod(self.position, per_window)
            iteration, micro = divmod(k, self.window)
            self.position += 1
            yield self.batch_at(self.epoch, w * self.window + micro, iteration)
        self.epoch, self.position = self.epoch + 1, 0

    def batch_at(self, epoch: int, batch_index: int, iteration: int = 0) -> dict:
        """This rank's micro-batch `batch_index` of `epoch` (a pure function of them: the GRPO method fetches a whole
        generation window's prompts when its first micro-batch comes)."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        first = (batch_index * self.world_size + self.rank) * self.batch_size  # each rank its own prompts
        samples = [self.dataset[int(i)] for i in order[first: first + self.batch_size]]
        return collate_prompts(samples, (epoch, batch_index, iteration))

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position}
        if self.extra_state is not None:
            state["extra"] = self.extra_state.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.extra_state is not None and "extra" in state:
            self.extra_state.load_state_dict(state["extra"])


@dataclass(kw_only=True)
class Prompts(DataModule):
    """Prompts for GRPO from a `.json` / `.jsonl` file (see `litllm.data.prompts`)."""

    json_path: Path
    """A .json file (a list of prompt records) or a .jsonl file (one per line)."""
    prompt_style: Optional[str] = None
    """How prompts and chats are laid out (`litllm.prompts.style_names()`). Unset: the checkpoint's own
    style (prompt_style.yaml or chat template), else `alpaca`."""
    val_split_fraction: float = 0.05
    """Fraction of the prompts held out for validation (seeded); validation samples their completions and
    reports `val_reward`."""
    val_json_path: Optional[Path] = None
    """A separate validation file (then nothing is split off)."""
    seed: int = 42
    """Seed of the train/validation split (the training order follows the run's seed)."""

    train_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)
    val_dataset: Optional[TokenizedDataset] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # set by finetune_grpo before the loop connects the module (not flags)
        self.max_new_tokens = 0
        self.steps_per_generation = 1
        self.num_iterations = 1
        self.run_seed = 0
        self.extra_state = None
        self.rank, self.world_size = 0, 1
        self.train_loader: Optional[PromptLoader] = None
        self.records: dict[str, list[PromptRecord]] = {}

    def load_records(self) -> tuple[list[PromptRecord], list[PromptRecord]]:
        return load_split_records(parse_prompt_record, self.json_path, self.val_json_path, self.val_split_fraction, self.seed)

    def setup(self) -> None:
        tokenizer = self._require_tokenizer()
        self.style = resolve_prompt_style(self.prompt_style, tokenizer)
        train, val = self.load_records()
        self.records = {"train": train, "val": val}
        self.train_dataset = self._tokenize(train)
        self.val_dataset = self._tokenize(val) if val else None

    def _tokenize(self, records: list[PromptRecord]) -> TokenizedDataset:
        limit = self.max_seq_length if self.max_seq_length and self.max_seq_length > 0 else None
        samples = []
        for i, record in enumerate(records):
            ids = encode_prompt(record, self.tokenizer, self.style)
            if limit is not None and len(ids) + self.max_new_tokens > limit:
                raise LitLLMError(f"{record.origin}: the prompt has {len(ids)} tokens; with --max_new_tokens "
                                  f"{self.max_new_tokens} that exceeds max_seq_length {limit} (raise "
                                  "--train.max_seq_length or shorten the prompt)")
            samples.append({"prompt_ids": torch.tensor(ids, dtype=torch.long), "index": torch.tensor(i)})
        return TokenizedDataset(samples)

    def record_fields(self, split: str, indices: list[int]) -> tuple[list[Any], dict[str, list[Any]]]:
        """(prompts as given, {field: values}) of records `indices` of `split` (a field a record lacks is None)."""
        records = [self.records[split][i] for i in indices]
        names = sorted({k for r in records for k in r.fields})
        return [r.prompt for r in records], {k: [r.fields.get(k) for r in records] for k in names}

    def longest_sample(self) -> Optional[int]:
        """Prompt + completion: the run's sequences are this long at most."""
        lengths = [len(s["prompt_ids"]) + self.max_new_tokens
                   for d in (self.train_dataset, self.val_dataset) if d for s in d.samples]
        return max(lengths, default=None)

    def train_dataloader(self) -> PromptLoader:
        self.train_loader = PromptLoader(self.train_dataset, self.batch_size, self.steps_per_generation,
                                         self.num_iterations, self.run_seed, self.extra_state, self.rank,
                                         self.world_size)
        return self.train_loader

    def val_dataloader(self):
        if not self.val_dataset:
            return None
        from torch.utils.data import DataLoader

        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)
