"""Random int8 weights as litllm's int8 layers hold them, for the benchmarks that time int8 matmuls
(`benchmarks/int8_matmul.py`, `benchmarks/int8_op_rate.py`): one way to make them, so both time the same data."""

from __future__ import annotations

from typing import Optional

import torch


def random_weight(rows: int, cols: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random fp32 (rows, cols) weight at a trained Linear's scale (std 0.02)."""
    return torch.randn(rows, cols, generator=generator) * 0.02


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row (torchao's int8 weight-only values): (int8 (out, in), fp32 scales (out,))."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def row_words(q: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) rows in the carrier litllm's C++ int8 ops take (`litllm.cpu_ops.int8_rows_op`,
    `int8wo_rows_op`): row-major, 4 weights to an fp32-typed word, (out, in / 4)."""
    return q.view(torch.int32).view(torch.float32)
