"""MXFP4, the format gpt-oss's experts are published in: `<name>_blocks` (..., G, 16) uint8 holding two FP4 (e2m1)
values per byte, low nibble first, and `<name>_scales` (..., G) uint8 holding one power-of-two exponent (biased by
127) per block of 32 values. Dequantized at conversion, to the dtype asked for; transformers' reference is
`transformers.integrations.mxfp4.convert_moe_packed_tensors` (tests/test_gpt_oss.py compares the two)."""

from __future__ import annotations

import torch

# the 16 e2m1 values, indexed by the 4-bit code (sign bit 3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
ROWS_PER_CHUNK = 1 << 20  # bounds the int64 index temporaries (a 120b layer holds ~10^8 blocks)


def packed_names(name: str) -> tuple[str, str]:
    """The two tensors a MXFP4-packed weight `name` is stored as."""
    return name + "_blocks", name + "_scales"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks (E, R, G, 16) + scales (E, R, G) -> (E, G * 32, R): each row of R's 32-value groups laid out
    along the last dim, then transposed so the stored (out, in) rows become litllm's (in, out) columns."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *prefix, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    blocks, exponents = blocks.reshape(-1, width), scales.reshape(-1, 1).to(torch.int32) - 127
    out = torch.empty(blocks.size(0), width * 2, dtype=dtype)
    for start in range(0, blocks.size(0), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        chunk = blocks[rows]
        out[rows, 0::2] = lut[(chunk & 0x0F).long()]
        out[rows, 1::2] = lut[(chunk >> 4).long()]
        torch.ldexp(out[rows], exponents[rows], out=out[rows])
    return out.reshape(*prefix, groups * width * 2).transpose(-2, -1).contiguous()
