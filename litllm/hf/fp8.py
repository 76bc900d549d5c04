"""Block-quantized FP8 checkpoints (DeepSeek-V3/R1 and Kimi K2 as the Hub ships them): each Linear weight
is stored as float8_e4m3fn with one fp32 `weight_scale_inv` per block of `weight_block_size` (128 x 128)
weights; the real weight is `fp8 x scale`. `convert_to_litllm` dequantizes them to the requested dtype."""

from __future__ import annotations

from typing import Optional

import torch

SCALE_SUFFIX = "_scale_inv"


def block_size(hf_config: dict) -> Optional[tuple[int, int]]:
    """(rows, cols) of a scale block when config.json declares block-wise FP8 weights, else None."""
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        return None
    rows, cols = quant["weight_block_size"]
    return int(rows), int(cols)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight (rows, cols) in FP8, scale_inv (ceil(rows / block[0]), ceil(cols / block[1])) -> fp32 (rows, cols);
    the last blocks of a dimension that is no multiple of the block are partial."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * scale
