"""`--precision`: the names every command takes (Lightning's) and the dtypes each one means."""

from __future__ import annotations

import torch

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
"""What training takes; inference takes the `-true` ones but 64 (`DECODE_PRECISIONS`)."""


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the trained weights, dtype of the computation) for a precision name: `-mixed` keeps fp32
    weights and computes in half precision, `-true` does both in its dtype."""
    half = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    if half is None:
        return (torch.float64, torch.float64) if precision.startswith("64") else (torch.float32, torch.float32)
    return (torch.float32 if precision.endswith("mixed") else half), half


DECODE_PRECISIONS = {p: precision_dtypes(p)[1] for p in ("32-true", "bf16-true", "16-true")}
"""`generate`'s `--precision` names -> the dtype the model loads in."""


PRECISION_ENV = "LITLLM_PRECISION"
"""Overrides the inference commands' default `--precision` (the test suite pins `32-true`)."""

