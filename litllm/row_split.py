"""The fp32 one-row matmul of a compiled CPU decode step on every thread: `litllm_cpu::row_split_linear`, a small C++
op that splits the weight's output rows into one contiguous chunk per thread, hands them out to torch's OpenMP
threads as they come free (a thread the scheduler holds back on a busy machine leaves its chunk to another) and
multiplies each by litllm's AVX-512 kernel (a row-major weight on an AVX-512 CPU: `row_split_kernel`) or by the BLAS
GEMV a one-row `F.linear` runs (MKL's here), and `RowSplitLinear`, the Linear that calls it.

Why: MKL's fp32 GEMV, what a one-row `F.linear` (eager or compiled: inductor calls it out) runs, uses one thread
whatever torch's count, so on 2 cores a compiled fp32 step left the second one idle; inductor's own one-row
reduction (`torch.mv`, a `bmm` of one row: both lower to it on the CPU) splits the rows between threads but timed no
faster at 2 threads than MKL's GEMV at 1 (one 8-lane accumulator per row; tutorials/inference.md). Each chunk here is
a GEMV of its own, on its own core. On AVX-512 CPUs a row-major weight's chunks go through litllm's kernel (4 rows at a
time, 8 independent sums, the next rows prefetched: the 134M fp32 step 2-5% less CPU a token than on MKL's GEMV, at 1
thread too), so there the op serves 1-thread steps as well; elsewhere at one thread the op would be one GEMV over all
rows, as `F.linear`, and is not used. Where the kernel runs, 2-8 rows (a batched decode step, a speculative verify)
go through it too: each block of 4 weight rows read once for all of them, each row's sums in a one-row call's order
(bit for bit its result), where aten's `mm` read the weights at about half the rate (the 134M fp32 step of 4-8 rows
1.4-1.6x less CPU at 1 thread, 1.1-1.4x at 2; tutorials/inference_measurements.md#fp32rows-s35). Anything else goes
to `F.linear`.

The op is litllm's C++ (`litllm.cpu_ops` builds and loads it).
"""

from __future__ import annotations

import os

import torch

from litllm.cpu_layout import PromptLinear, plain_cpu_weight, swap_linears
from litllm.cpu_ops import has_avx512, row_split_op
from litllm.utils import switched_off


MAX_ROWS = 8
"""The most activation rows `RowSplitLinear` multiplies through the op (a batched decode step's, a speculative
verify's: the op's kernel reads each weight block once for all of them, `kMaxXRows` in litllm/cpu_ops.cpp); more go
through `prompt_linear`, a prompt's GEMM."""


class RowSplitLinear(PromptLinear):
    """An fp32 CPU Linear whose one-row calls (decoding) run `litllm_cpu::row_split_linear` (every thread streams its
    own block of the weight's rows), and on a row-major weight where litllm's kernel runs calls of up to `MAX_ROWS`
    rows too (a batched step); more rows go through `litllm.cpu_layout.prompt_linear` (`F.linear`, or oneDNN's GEMM
    where that is faster). The weight is used as it is laid out (row- or column-major); for a compiled step
    (`row_split_linears`)."""

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)
    blas = False  # every chunk MKL's GEMV (`row_split_linears` under `$LITLLM_ROW_SPLIT=blas`), read when traced
    max_rows = MAX_ROWS  # the most rows a call multiplies through the op (1: only one; read when traced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.in_features * self.op_rows() or torch.is_grad_enabled():  # no backward: training's F.linear
            return super().forward(x)  # a prompt: `prompt_linear`
        split = torch.ops.litllm_cpu.row_split_linear_blas if self.blas else torch.ops.litllm_cpu.row_split_linear
        y = split(x, self.weight)
        return y if self.bias is None else y + self.bias

    def op_rows(self) -> int:
        """The most rows a call multiplies through the op: `max_rows` where litllm's kernel multiplies them (a
        row-major weight, not `blas`), else one (the op's GEMV)."""
        return 1 if self.blas or self.weight.stride(1) != 1 else self.max_rows


def becomes_row_split(module) -> bool:
    """Does `row_split_linears` make `module` a `RowSplitLinear`: a plain fp32 CPU Linear (or `PromptLinear`; a
    Parameter weight, not a quantized tensor subclass), or one already."""
    if isinstance(module, RowSplitLinear):
        return True
    weight = plain_cpu_weight(module)
    return type(module) in (torch.nn.Linear, PromptLinear) and weight is not None and weight.dtype == torch.float32


ENV = "LITLLM_ROW_SPLIT"
"""`0`/`false`: compiled fp32 steps keep `F.linear` (one thread's GEMV); `blas`: the op's chunks are all BLAS's GEMV,
not litllm's AVX-512 kernel (`row_split_kernel`); e.g. to compare."""


def row_split_kernel() -> str:
    """What the op multiplies a row-major weight's chunks by here: "avx512" (litllm's kernel) on an AVX-512 CPU unless
    `$LITLLM_ROW_SPLIT` is `blas`, else "blas" (`litllm_cpu::row_split_linear_blas`: MKL's GEMV, column-major weights
    always). Part of the saved step's key (`litllm.compile_decode.steps_folder`)."""
    if os.environ.get(ENV, "").strip().lower() == "blas" or not has_avx512():
        return "blas"
    return "avx512"


def wants_row_split() -> bool:
    """Do fp32 compiled steps here take `RowSplitLinear`s: more than one thread to split the rows between (torch's
    thread budget), or litllm's own kernel to multiply by (`row_split_kernel`), unless `$LITLLM_ROW_SPLIT` is
    `0`/`false`."""
    if switched_off(ENV):
        return False
    return torch.get_num_threads() > 1 or row_split_kernel() == "avx512"


def row_split_linears(model) -> bool:
    """Every plain fp32 CPU Linear of `model` (`becomes_row_split`; a head tied to the embedding too) as a
    `RowSplitLinear` on the same tensors, where the op builds or loads (`row_split_op`), multiplying by the kernel
    `row_split_kernel` names; whether it did."""
    if not any(type(m) is not RowSplitLinear and becomes_row_split(m) for m in model.modules()) \
            or row_split_op() is None:
        return False
    swap_linears(model, RowSplitLinear, becomes_row_split)
    blas = row_split_kernel() == "blas"
    for module in model.modules():
        if isinstance(module, RowSplitLinear):
            module.blas = blas
    return True
