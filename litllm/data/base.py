"""The contract between a data module and the training loop.

The loop calls, in this order:

1. `connect(tokenizer, batch_size, max_seq_length)`: hand over what the data depends on.
2. `prepare_data()`: once, on global rank 0, before any `setup()` (tokenize, optimize, download).
3. `setup()`: on every rank (read what `prepare_data` produced).
4. `train_dataloader()` / `val_dataloader()`.

Every batch is a dict `{"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)}` whose labels
are already shifted: `labels[:, t]` is the target for `input_ids[:, t]`, and `-100` (or the data
module's `ignore_index`) marks positions without a loss. `T <= max_seq_length`.

Pretraining loaders are litdata `StreamingDataLoader`s (`state_dict()` / `load_state_dict()` give an
exact resume). Fine-tuning loaders are map-style torch `DataLoader`s shuffled by a `RandomSampler`; the training
loop reseeds it with `seed + epoch` at each epoch, so the order is a pure function of both.
A batch may carry more keys (e.g. `input_pos`, RoPE positions per row); the loop moves them to the device and the
method's loss passes them to the model.
"""

from __future__ import annotations

from typing import Any, Optional

from litllm.errors import LitLLMError


class DataModule:
    """Base of every data module: no-op defaults for the hooks a module may not need.

    Data modules are dataclasses whose fields are CLI flags (`--data JSON --data.json_path x.jsonl`).
    What `connect` receives is kept in plain attributes, not fields, so it never shows up as a flag.
    """

    tokenizer: Any = None
    batch_size: int = 1
    max_seq_length: int = -1
    ignore_index: int = -100
    """The label of positions without a loss (the loop and the losses read it from here)."""

    def connect(self, tokenizer: Any = None, batch_size: int = 1, max_seq_length: Optional[int] = None) -> None:
        """Hand over the tokenizer (`litllm.tokenizer.Tokenizer`), micro-batch size and context length.

        `max_seq_length` is the number of input positions per sample (`T` above); `None` or `-1`
        means no limit (fine-tuning only).
        """
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length

    def prepare_data(self) -> None:
        """Work done once on global rank 0 before `setup()` (download, tokenize, optimize)."""

    def setup(self) -> None:
        """Load what `prepare_data` produced; runs on every rank."""

    def train_dataloader(self):
        raise NotImplementedError(f"{type(self).__name__} has no training data")

    def val_dataloader(self):
        """The validation loader, or `None` when the module has no validation data."""
        return None

    def longest_sample(self) -> Optional[int]:
        """Tokens in the longest sample after `setup()` (None: unknown, or every sample is max_seq_length).

        With `--train.max_seq_length` unset, the loop sizes the run for this rather than for the
        model's whole context window."""
        return None

    # helpers for subclasses -------------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise LitLLMError(f"{type(self).__name__}: a tokenizer is needed (connect() was called without one)")
        return self.tokenizer

    def _require_block_size(self) -> int:
        """Tokens per pretraining sample: `max_seq_length` inputs plus the one extra next-token target."""
        if self.max_seq_length is None or self.max_seq_length < 1:
            raise LitLLMError(
                f"{type(self).__name__}: pretraining needs a positive max_seq_length (got {self.max_seq_length})"
            )
        return self.max_seq_length + 1
