"""FLOPs of a training step, device peaks, and the throughput/MFU meter the loop logs.

Training FLOPs per token (PaLM, appendix B): 6N + 12·L·H·Q·T (6·L·H·(Q+V)·T when values' head size V differs), with N the weights used in
matmuls (the Linear layers; not the input embedding lookup, norms or biases), L layers, H query heads, Q head size, T the
sequence length. The attention term counts the full T x T score matrix (as FlopCounterMode does).
Frozen parameters (LoRA's base) need no weight gradient: 4 FLOPs per token instead of 6.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from litllm.config import Config

# dense peak FLOP/s per device, from the vendors' data sheets: (bf16/fp16 tensor, tf32 tensor, fp32)
PEAK_FLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494e12, 67e12),
    "H100 NVL": (835e12, 418e12, 60e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100": (989e12, 494e12, 67e12),  # SXM
    "A100": (312e12, 156e12, 19.5e12),
    "A800": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10G": (125e12, 62.5e12, 31.2e12),
    "A10": (125e12, 62.5e12, 31.2e12),
    "RTX 4090": (165e12, 82.6e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12, 35.6e12),
    "V100": (125e12, 15.7e12, 15.7e12),  # no bf16: fp16 tensor cores
    "T4": (65e12, 8.1e12, 8.1e12),
}


def matmul_parameters(config: Config) -> int:
    """Weights used in matmuls: every Linear layer's (the head included, once even when tied), and every
    expert's of stacked experts (gpt-oss's `StackedLinear`).

    The input embedding is a lookup, and norms/biases cost O(1) per weight: neither is counted.
    """
    from litllm.model import GPT, StackedLinear

    with torch.device("meta"):
        model = GPT(config)
    linears = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, StackedLinear))}
    return sum(linears.values())


def flops_per_token(config: Config, seq_length: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_length` sequence."""
    n = matmul_parameters(config)
    n_trainable = n * trainable_fraction
    dense = 6 * n_trainable + 4 * (n - n_trainable)
    # q @ k^T over head_size, probs @ v over the value head size (MLA's v_head_dim may differ)
    attention = 6 * config.n_layer * config.n_head * (config.head_size + (config.v_head_dim or config.head_size)) * seq_length
    if config.n_expert:  # only the routed experts' MLPs run per token (counted above at the same mix of 6 and 4)
        moe_layers = sum(config.is_moe(i) for i in range(config.n_layer))
        experts = moe_layers * config.n_expert * 3 * config.n_embd * config.expert_intermediate_size
        unused = experts * (1 - config.n_expert_per_token / config.n_expert)
        dense -= unused * (6 * trainable_fraction + 4 * (1 - trainable_fraction))
    return dense + attention


def device_peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of a known GPU at this precision; None for CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_FLOPS.items():
        if key in name:
            if precision.startswith(("bf16", "16")):
                return half
            if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
                return tf32
            return fp32
    return None


class Throughput:
    """Tokens/s, samples/s, achieved FLOP/s per device and MFU between two `update` calls."""

    def __init__(self, fabric, config: Config, seq_length: int, peak_flops: Optional[float], trainable_fraction: float = 1.0):
        self.fabric = fabric
        self.seq_length = seq_length
        self.flops_per_token = flops_per_token(config, seq_length, trainable_fraction)
        precision = str(getattr(fabric.strategy.precision, "precision", "32-true"))
        self.peak = peak_flops if peak_flops is not None else device_peak_flops(fabric.device, precision)
        self._time = 0.0
        self._tokens = 0

    def start(self, state: dict) -> None:
        self._sync()
        self._time, self._tokens = time.perf_counter(), state["tokens"]

    def update(self, state: dict) -> dict[str, float]:
        self._sync()
        now = time.perf_counter()
        elapsed = max(now - self._time, 1e-9)
        tokens = state["tokens"] - self._tokens
        self._time, self._tokens = now, state["tokens"]
        metrics = {
            "tokens_per_sec": tokens / elapsed,
            "samples_per_sec": tokens / self.seq_length / elapsed,
            "flops_per_sec_per_device": self.flops_per_token * tokens / elapsed / self.fabric.world_size,
        }
        if self.peak:
            metrics["mfu"] = metrics["flops_per_sec_per_device"] / self.peak
        return metrics

    def _sync(self) -> None:
        if self.fabric.device.type == "cuda":
            torch.cuda.synchronize(self.fabric.device)


def measured_flops(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward + backward as counted by `torch.utils.flop_counter` (for checks).

    Attention runs on SDPA's math backend here: FlopCounterMode sees its matmuls, while fused CPU
    kernels are not counted at all.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from litllm.fused_experts import fused_experts_available

    fused_experts_available()  # loads the fused MoE experts' ops, whose FLOP formulas the counter copies when made
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(input_ids, targets=labels).backward()
    return counter.get_total_flops()
