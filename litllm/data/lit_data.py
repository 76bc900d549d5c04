"""Stream data that is already tokenized into litdata chunks: `LitData` (any folders, weighted mix)
and `TinyLlama` (the SlimPajama + StarCoder mix of the TinyLlama recipe).

Folders may be local or remote (`s3://bucket/prefix`, anything litdata streams); remote chunks are
downloaded on demand into litdata's cache. Produce them with `litllm prepare_slimpajama`,
`litllm prepare_starcoder`, `TextFiles` (its `optimized_dir`) or your own `litdata.optimize` call
with `item_loader=TokensLoader()` and 1-D integer token arrays as items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from litllm.data.base import DataModule
from litllm.data.streaming import (
    check_optimized_dir,
    check_weights,
    mixed_token_dataset,
    token_dataset,
    token_loader,
)


def _join(root: str, *parts: str) -> str:
    """Join path parts with `/` (works for local paths and `s3://` URLs alike)."""
    return "/".join([str(root).rstrip("/"), *parts])


@dataclass
class LitData(DataModule):
    """Stream one or more litdata-optimized token folders; several folders are mixed by `weights`."""

    data_path: Union[str, list[str]] = "data/optimized"
    """An optimized folder (local or remote, e.g. `s3://bucket/tokens`), or a list of folders to mix."""
    weights: Optional[list[float]] = None
    """Sampling weights of the folders in `data_path` (normalized; any positive scale). Unset: each
    folder is sampled in proportion to its size and every block is visited once per epoch. Set: the
    epoch ends when the first folder runs out."""
    val_data_path: Optional[str] = None
    """An optimized folder for validation. Unset: no validation data."""
    seed: int = 42
    """Seed of the shuffle and of the mixing."""
    num_workers: int = 4
    """DataLoader worker processes."""

    @property
    def train_paths(self) -> list[str]:
        return [self.data_path] if isinstance(self.data_path, str) else [str(p) for p in self.data_path]

    def prepare_data(self) -> None:
        check_weights(self.weights, len(self.train_paths), "LitData")
        for path in self.train_paths:
            check_optimized_dir(path, "LitData --data.data_path")
        if self.val_data_path is not None:
            check_optimized_dir(self.val_data_path, "LitData --data.val_data_path")

    def setup(self) -> None:
        self.block_size = self._require_block_size()
        check_weights(self.weights, len(self.train_paths), "LitData")

    def train_dataloader(self):
        dataset = mixed_token_dataset(self.train_paths, self.block_size, self.weights, seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers)

    def val_dataloader(self):
        if self.val_data_path is None:
            return None
        dataset = token_dataset(self.val_data_path, self.block_size, shuffle=False, seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers, drop_last=False)


# token proportions of the TinyLlama mix (LitGPT's TinyLlama data module)
TINYLLAMA_WEIGHTS = {"slimpajama/train": 0.693584, "starcoder": 0.306416}


@dataclass
class TinyLlama(DataModule):
    """SlimPajama-627B and StarCoder data mixed 69.4% / 30.6% by tokens, as in the TinyLlama recipe.

    `data_path` holds the outputs of `litllm prepare_slimpajama` (`slimpajama/train`, `slimpajama/val`)
    and `litllm prepare_starcoder` (`starcoder`). Validation uses `slimpajama/val`.
    """

    data_path: str = "data/"
    """Folder (local or remote, e.g. `s3://bucket/tinyllama`) holding `slimpajama/train`, `slimpajama/val`
    and `starcoder`."""
    seed: int = 42
    """Seed of the shuffle and of the mixing."""
    num_workers: int = 8
    """DataLoader worker processes."""

    def prepare_data(self) -> None:
        for part in (*TINYLLAMA_WEIGHTS, "slimpajama/val"):
            check_optimized_dir(_join(self.data_path, part), f"TinyLlama {part}")

    def setup(self) -> None:
        self.block_size = self._require_block_size()

    def train_dataloader(self):
        paths = [_join(self.data_path, part) for part in TINYLLAMA_WEIGHTS]
        dataset = mixed_token_dataset(paths, self.block_size, list(TINYLLAMA_WEIGHTS.values()), seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers)

    def val_dataloader(self):
        dataset = token_dataset(_join(self.data_path, "slimpajama/val"), self.block_size, shuffle=False, seed=self.seed)
        return token_loader(dataset, self.batch_size, self.num_workers, drop_last=False)
