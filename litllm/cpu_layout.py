"""The CPU weight layout of decoding: which layout of a Linear's weight makes one-token matmuls fastest here
(`optimize_for_decoding`: row-major, column-major, oneDNN's packed `PackedLinear`, litllm's packed bf16 op's
`litllm.packed_bf16.BlockedBf16Linear`), and what a compiled decode step
multiplies by (`PackedLinear.unpacked`, `OneRowLinear`, `one_row_linears`), and how many threads decode fastest (`fastest_threads`).
Used by `litllm.inference` (the loader
picks the layout) and `litllm.compile_decode` (a compiled step's weights)."""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from litllm.errors import LitLLMError
from litllm.packed_bf16 import BlockedBf16Linear, bf16_block, onednn_bf16_blocks, packed_bf16_op


class PackedLinear(torch.nn.Module):
    """A Linear whose weight oneDNN has reordered into its own blocked layout (CPU inference only).

    One-row matmuls (decoding) stream the weight from memory; oneDNN's kernel on its packed layout
    does that up to ~2x faster than the BLAS call `F.linear` makes on some CPUs. The packed weight
    is an opaque `mkldnn` tensor kept out of the state dict: the module is for generation, not
    for saving, moving between devices or training. `unpack_column_major`: `unpacked` gives an fp32 weight
    column-major (the layout `optimize_for_decoding` found faster than row-major for a one-row `F.linear` here).
    """

    def __init__(self, linear: torch.nn.Linear, unpack_column_major: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.unpack_column_major = unpack_column_major and linear.weight.dtype not in ONE_ROW_DTYPES
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def unpacked(self) -> torch.nn.Linear:
        """The plain Linear again (`to_dense` undoes oneDNN's reorder exactly): what a compiled step multiplies by
        (a `OneRowLinear` for 16-bit weights; column-major with `unpack_column_major`)."""
        cls = OneRowLinear if self.packed_weight.dtype in ONE_ROW_DTYPES else torch.nn.Linear
        linear = cls(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(self.packed_weight.to_dense(), requires_grad=False)
        linear.bias = self.bias
        return _column_major(linear) if self.unpack_column_major else linear


class OneRowLinear(torch.nn.Linear):
    """A Linear that a compiled step multiplies one row by through `torch.mv`; more rows, and every eager call, go
    through `F.linear` as usual, a prompt's eagerly in fp32 where the CPU has no 16-bit GEMM (`upcast_16_bit_gemm`:
    the prefill of a compiled run).

    For the compiled decode step of 16-bit weights on the CPU (`one_row_linears`): inductor lowers a one-row
    `F.linear` to the same oneDNN matmul as eager (bf16: ~7 GB/s of weight read on an AMX Xeon, slower than fp32;
    14 on a 2-core AVX2 EPYC), but decomposes `mv` into its own vectorized reduction that accumulates in fp32 and
    streams bf16 weights faster (~1.8x there, 20 GB/s here; benchmarks/one_row_matmul.py). Eager, `torch.mv` is
    no faster than `PackedLinear`, which stays the eager pick, and slower than `F.linear` on AVX-512 BF16 CPUs.
    Compiled where `one_row_kernel()` is "fp32-row" (AVX2 CPUs), the row is converted to fp32 once (`fp32_row_mv`)
    rather than once per weight row.
    """

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # eager: a prompt, or one row (its last, through the head: the prefill)
            if x.numel() != self.in_features and upcast_16_bit_gemm(self.weight):
                return upcast_linear(x, self.weight, self.bias)
            # one row: `F.linear`, the kernel an eager `torch.mv` runs where oneDNN has no 16-bit GEMM (bit for bit);
            # where it has one (AVX-512 BF16), its GEMV: 1.5x faster than `torch.mv` (a 32000 x 768 bf16 head on a
            # Zen 4 EPYC: 6.8 vs 10.1 CPU-ms; the first token of a compiled bf16 run, benchmarks/prefill.py)
            return super().forward(x)
        if x.numel() != self.in_features:
            return super().forward(x)
        if one_row_kernel() == "fp32-row":  # inductor's kernels
            y = fp32_row_mv(self.weight, x.reshape(-1))
        else:
            y = torch.mv(self.weight, x.reshape(-1))  # (out,)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def upcast_16_bit_gemm(weight: torch.Tensor) -> bool:
    """Does a multi-row matmul by this 16-bit CPU weight go faster as fp32 (`upcast_linear`)? Where oneDNN has no
    kernel for its dtype (no AVX-512 BF16/FP16 nor AMX: an AVX2 CPU) torch's CPU GEMM falls back to a scalar loop:
    a 32-row prefill's (32, 768) x (768, 2304) bf16 product took 19.2 ms on a 2-core AVX2 EPYC, converted to fp32
    2.0 ms (fp16 17.4 vs 2.3): the 16-bit prefill of a compiled run (issue #27)."""
    if weight.device.type != "cpu" or weight.dtype not in ONE_ROW_DTYPES:
        return False
    if weight.dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


UPCAST_BYTES = 64 * 2**20
"""The most fp32 weight bytes `upcast_linear` converts at once (a large model's layer goes by blocks of rows)."""


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` of 16-bit tensors computed in fp32 (each weight and input exact in fp32, fp32
    sums as the 16-bit GEMM's, one rounding of each output back to `x.dtype`), the weight converted by blocks of
    rows so that no more than `UPCAST_BYTES` of fp32 copy is alive at once."""
    rows = max(1, UPCAST_BYTES // (4 * weight.size(1)))
    x32 = x.float()
    parts = [F.linear(x32, weight[i: i + rows].float(), None if bias is None else bias[i: i + rows].float())
             for i in range(0, weight.size(0), rows)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)  # (..., out)


ONEDNN_PROMPT_CAPABILITIES = ("AVX512",)
"""The `CPU_CAPABILITY`s where a prompt's fp32 matmuls go through oneDNN (`prompt_linear`), not `F.linear` (MKL's
sgemm): measured on a 2-core AVX-512 AMD EPYC (Zen 4), where MKL takes no AVX-512 path (it reports "Intel(R)
Architecture processors") and a second thread cost it a third more CPU time: the 134M Llama's 32-token prefill at 2
threads 115-117 CPU-ms through oneDNN (its weights reordered per call) against 175-176 through MKL, at 1 thread
109-115 against 132-134 (`benchmarks/prefill.py --compare_gemm`). AVX2 CPUs keep `F.linear`, as measured there
(tutorials/inference.md, "the first token")."""
PROMPT_GEMM_ENV = "LITLLM_PROMPT_GEMM"
"""`onednn` / `blas`: which GEMM `prompt_linear` takes whatever the CPU (e.g. to compare)."""


def prompt_gemm() -> str:
    """The GEMM of a prompt's fp32 rows here: "onednn" where `CPU_CAPABILITY` is one of `ONEDNN_PROMPT_CAPABILITIES`
    and torch has oneDNN, else "blas" (`F.linear`); `$LITLLM_PROMPT_GEMM` overrides."""
    forced = os.environ.get(PROMPT_GEMM_ENV, "").strip().lower()
    if forced not in ("", "onednn", "blas"):
        raise LitLLMError(f"${PROMPT_GEMM_ENV}: expected onednn or blas, got {forced!r}")
    if not _has_onednn_linear():
        return "blas"
    return forced or ("onednn" if CPU_CAPABILITY in ONEDNN_PROMPT_CAPABILITIES else "blas")


@lru_cache(maxsize=None)
def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prompt_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for several rows of fp32 CPU activations (a prompt) by the faster GEMM here
    (`prompt_gemm`): oneDNN's on the weight as laid out (row- or column-major; reordered into its blocks per call,
    nothing kept), on every thread. Equal to `F.linear` up to fp32 summation order. One row (decoding), other dtypes,
    autograd and compiled code take `F.linear`."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu" or weight.dim() != 2
            or x.numel() == x.size(-1) or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or type(weight) not in (torch.Tensor, torch.nn.Parameter) or prompt_gemm() != "onednn"):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class PromptLinear(torch.nn.Linear):
    """A Linear whose calls on several rows (a prompt's prefill) go through `prompt_linear`, oneDNN's GEMM on CPUs
    where it is the faster (`prompt_gemm`); one row (decoding), training and compiled code are `F.linear` as before.
    What `prompt_linears` makes the fp32 CPU Linears of an inference model there."""

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return prompt_linear(x, self.weight, self.bias)
        return super().forward(x)


def plain_cpu_weight(module) -> Optional[torch.Tensor]:
    """`module.weight` where it is a plain Parameter on the CPU (not a quantized tensor subclass: torchao's kernels
    decide for those), else None: the weights the CPU layouts put other Linears on. (Read from the registered
    parameters: a module's computed `weight` property, `litllm.packed_bf16.BlockedBf16Linear`'s, is not evaluated.)"""
    weight = getattr(module, "_parameters", {}).get("weight")
    return weight if type(weight) is torch.nn.Parameter and weight.device.type == "cpu" else None


def prompt_linears(model) -> None:
    """Every plain fp32 CPU Linear of `model` (a Parameter weight, row- or column-major; a head tied to the embedding
    too) as a `PromptLinear` on the same tensors, where a prompt's GEMM here is oneDNN's (`prompt_gemm`)."""
    def plain_fp32(child) -> bool:
        weight = plain_cpu_weight(child)
        return type(child) is torch.nn.Linear and weight is not None and weight.dtype == torch.float32

    if prompt_gemm() == "onednn":
        swap_linears(model, PromptLinear, plain_fp32)


ONE_ROW_DTYPES = (torch.bfloat16, torch.float16)
"""Weight dtypes a compiled CPU step multiplies through `OneRowLinear` (`one_row_linears`)."""
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
"""The SIMD level torch's kernels run at here ("AVX2", "AVX512"...; `ATEN_CPU_CAPABILITY` can lower it), read once:
a compiled step's trace reads it as a constant (`one_row_kernel`)."""
FP32_ROW_CAPABILITIES = ("AVX2",)
"""The `CPU_CAPABILITY`s where a compiled `OneRowLinear` converts its input row to fp32 once (`one_row_kernel`):
measured on a 2-core AVX2 EPYC (tutorials/inference.md section 6, "the 16-bit one-row kernel"). AVX-512 CPUs keep
inductor's `mv` reduction: on a 2-core AVX-512-BF16 EPYC (Zen 4) the row-once kernel's 134M bf16 step took 0.74-1.03x
`mv`'s CPU time a token at 1 thread and 0.85-1.08x at 2 (three runs at load 8-12, `benchmarks/decode_threads.py
--one_row_kernel`): no gain beyond the noise; both read ~18 GB/s per CPU-second there, one core's read rate."""


def one_row_kernel() -> str:
    """How a compiled CPU step's `OneRowLinear` multiplies one row: "fp32-row" (`fp32_row_mv`) on the CPUs of
    `FP32_ROW_CAPABILITIES`, else "mv" (`torch.mv`, inductor's reduction converting the row once per weight row).
    Part of the saved step's key (`litllm.compile_decode.steps_folder`)."""
    return "fp32-row" if CPU_CAPABILITY in FP32_ROW_CAPABILITIES else "mv"


def fp32_row_mv(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """`torch.mv(weight, row)` (16-bit, fp32 sums) for inductor with the row converted to fp32 once, into a buffer.

    Inductor inlines a one-row `mv`'s `row.float()` into its reduction, so each weight row converts the whole input
    row again (on AVX2: 5 more shuffles and shifts per 16 weights). `prims.inductor_force_stride_order` makes inductor
    realize the fp32 row first; the reduction stays tiled by the 16-bit lane count (whole weight vectors) and loads
    the row as two fp32 vectors, and whatever inductor inlined into the row is computed once. The 134M model's compiled
    bf16 step on a 2-core AVX2 EPYC: 1.19-1.25x less CPU time a token at 1 thread, 1.14-1.18x at 2 (two loaded runs,
    `benchmarks/decode_threads.py --one_row_kernel mv`); the matmuls alone, 1.01-1.28x (`benchmarks/one_row_matmul.py
    --chain`, noisy). Eager, it would materialize the fp32 product: compiled steps only (`OneRowLinear.forward`)."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    row = torch.ops.prims.inductor_force_stride_order(row.float(), (1,))  # (in,) fp32, realized
    return (weight.float() * row).sum(-1).to(weight.dtype)  # (out,)


def becomes_one_row(module) -> bool:
    """Does a compiled CPU step multiply by `module` through a `OneRowLinear` (`one_row_linears`)? Plain row-major
    16-bit Linears on the CPU do (oneDNN-packed ones unpack so); so do OneRowLinears already. Column-major ones (the
    eager pick where it timed `F.linear` faster so) keep `F.linear`: inductor's `mv` reduction reads rows."""
    if isinstance(module, OneRowLinear):
        return True
    weight = plain_cpu_weight(module)
    return (type(module) is torch.nn.Linear and weight is not None and weight.dtype in ONE_ROW_DTYPES
            and weight.is_contiguous())


def one_row_linears(model, only: Optional[Callable] = None) -> None:
    """Every plain row-major 16-bit CPU Linear of `model` (`becomes_one_row`; a head tied to the embedding too) as a
    `OneRowLinear` on the same tensors, for a compiled step: on the CPU a one-row `F.linear` of 16-bit weights
    is oneDNN's or BLAS's unpacked matmul, slower than inductor's own reduction of `torch.mv` on every CPU
    measured (AVX2 and AMX, benchmarks/one_row_matmul.py). `only(linear)`: those of them it accepts."""
    swap_linears(model, OneRowLinear, lambda child: becomes_one_row(child) and (only is None or only(child)))


def swap_linears(model, cls: type, accept: Callable[[torch.nn.Module], bool]) -> None:
    """Every submodule of `model` that `accept`s (and is no `cls` yet) as a `cls` Linear on the same tensors (the
    same Parameters: ties stay)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not cls and accept(child):
                swapped = cls(child.in_features, child.out_features, bias=False, device="meta")
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(module, name, swapped)


def _column_major(linear: torch.nn.Linear) -> torch.nn.Linear:
    # same values and shape; the transpose F.linear multiplies by becomes contiguous
    linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return linear


def becomes_blocked_bf16(module, shared: set[int]) -> bool:
    """Does `blocked_bf16_linears` make `module` a `BlockedBf16Linear`: a bf16 CPU Linear of whole `bf16_block`s
    that a compiled step would multiply by through `OneRowLinear` (`becomes_one_row`, or
    oneDNN-packed), whose weight no other module shares (`shared`: ids of the parameters outside Linears, e.g. a tied
    embedding)."""
    if isinstance(module, BlockedBf16Linear):
        return True
    if type(module) not in (OneRowLinear, torch.nn.Linear) and not isinstance(module, PackedLinear):
        return False
    block = bf16_block()
    if block is None or module.in_features % (2 * block[0]) or module.out_features % block[1]:
        return False  # whole blocks only: oneDNN pads others its own way
    if isinstance(module, PackedLinear):
        return module.packed_weight.dtype == torch.bfloat16
    return becomes_one_row(module) and module.weight.dtype == torch.bfloat16 and id(module.weight) not in shared


def shared_parameters(model) -> set[int]:
    """The ids of `model`'s parameters that a module other than a Linear holds (a tied embedding's weight)."""
    return {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}


def blocked_bf16_linears(model) -> None:
    """Every bf16 CPU Linear of `model` that `becomes_blocked_bf16` (a plain one or a `OneRowLinear`) as a
    `BlockedBf16Linear` on its weight packed by oneDNN, where the op builds or loads (`packed_bf16_op`); one layer at a
    time (at most one layer's second copy is alive), the row-major weight dropped. Layers oneDNN packs otherwise
    stay as they are."""
    if packed_bf16_op() is None:
        return
    shared = shared_parameters(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (OneRowLinear, torch.nn.Linear) and becomes_blocked_bf16(child, shared):
                setattr(module, name, blocked_bf16_linear(child))
    _release_freed_memory()


def blocked_bf16_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """`linear` (bf16, whole `bf16_block`s) as a `BlockedBf16Linear` on its weight packed by oneDNN; `linear` itself
    where oneDNN packs it otherwise."""
    made = onednn_bf16_blocks(linear.weight)
    return linear if made is None else BlockedBf16Linear(linear.in_features, linear.out_features, *made, linear.bias)


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; nothing where it is absent): the
    row-major weights `blocked_bf16_linears` drops lie below later allocations in the heap, and glibc kept them
    (the 134M bf16 model's process: 705 MB resident after the conversion, 506 MB trimmed, as before it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _packed_bf16(linear: torch.nn.Linear) -> torch.nn.Module:
    """`linear` as a `litllm.packed_bf16.BlockedBf16Linear` where it is a bf16 one of whole blocks (oneDNN's packed
    bytes; one row through litllm's AVX512-BF16 op, as the compiled step there multiplies), else as it is."""
    return blocked_bf16_linear(linear) if becomes_blocked_bf16(linear, set()) else linear


def _packed_bf16_runs(linear: torch.nn.Linear, build: bool) -> bool:
    """Does "packed-bf16" lay `linear` out here: litllm's packed bf16 op builds or loads (`packed_bf16_op`; `build`
    False: is built already) and `linear` is a bf16 one of whole blocks?"""
    return packed_bf16_op(build) is not None and becomes_blocked_bf16(linear, set())


LAYOUTS = {"column-major": _column_major, "onednn-packed": PackedLinear,
           "onednn-packed+column-major": lambda linear: PackedLinear(linear, unpack_column_major=True),
           "packed-bf16": _packed_bf16}
"""How `optimize_for_decoding` lays Linears out. The eager step of "onednn-packed+column-major" is oneDNN's packed
one; a compiled step (which takes plain weights, `PackedLinear.unpacked`) multiplies by fp32 ones column-major.
"packed-bf16": bf16 Linears of whole blocks held as a compiled step on AVX512-BF16 CPUs holds them (the others stay
row-major), one row through litllm's op: on the 2-core AMX Xeon the 134M bf16 eager step took 1.13-1.26x less CPU time
than "onednn-packed" at 1 thread (median 1.18x, five runs), 1.57-1.70x less than row-major (`benchmarks/eager_step.py
--layouts`)."""
TIMED_LAYOUTS = ("column-major", "onednn-packed", "packed-bf16")
"""The layouts `optimize_for_decoding` times (the others differ only in what a compiled step multiplies by); 16-bit
weights all but column-major (`UNTIMED_16_BIT_LAYOUTS`)."""
UNTIMED_16_BIT_LAYOUTS = ("column-major",)
"""Layouts `optimize_for_decoding` does not time for 16-bit weights: a compiled step multiplies by row-major ones
through `OneRowLinear` (inductor's reduction reads rows), column-major ones through `F.linear`'s oneDNN matmul, slower
on every CPU measured (AMX Xeon: 0.72x fp32 `F.linear`; AVX-512-BF16 EPYC: the 134M bf16 step 37 CPU-ms a token
against 12-16 row-major), and where oneDNN has no 16-bit GEMM (AVX2) a column-major prompt would miss
`eager_upcast_linears`. On a loaded machine the timing alone picked it (tutorials/inference.md section 6c)."""


def _layout_works(name: str, linear: torch.nn.Linear, build: bool = True) -> bool:
    """Can this layout run here (oneDNN ops present; litllm's C++ ops where it takes them, with `build` False only
    if built already) and give the same numbers?"""
    if name.startswith("onednn-packed") and not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    if name == "packed-bf16" and not _packed_bf16_runs(linear, build):
        return False
    probe = torch.nn.Linear(linear.in_features, 64, bias=True, dtype=linear.weight.dtype)  # 64: whole bf16 blocks
    x = torch.randn(3, 2, linear.in_features, dtype=linear.weight.dtype)
    try:
        expected = probe(x)
        got = LAYOUTS[name](probe)(x)
    except Exception:  # an op missing from this torch build
        return False
    # another summation order: fp32 differs in its last bits, bf16/fp16 (8/11-bit mantissas) in its last ones
    tol = 1e-3 if linear.weight.dtype == torch.float32 else 2e-2
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol)


@torch.inference_mode()
def optimize_for_decoding(model, min_gain: float = 1.1, layout: Optional[str] = None) -> str:
    """On the CPU, lay Linear weights out in whichever way makes one-token matmuls fastest here.

    Decoding multiplies one activation row by each weight matrix, a pass over memory whose speed
    depends on the BLAS, the kernel and the CPU. Candidates: as loaded (row-major, `F.linear`),
    column-major (`F.linear` then multiplies by a contiguous transpose; 1.1-1.6x faster than
    row-major with MKL on AMD EPYC), oneDNN's packed layout (`PackedLinear`; up to ~2x), and for bf16
    weights where litllm's packed bf16 op runs, "packed-bf16" (`litllm.packed_bf16.BlockedBf16Linear`). Each is
    timed on (up to 128 MB of) the largest layer (interleaved, medians); the fastest replaces every plain
    Linear whose weight isn't shared with the embedding, one layer at a time, if it beats the
    loaded layout by `min_gain`. Values are unchanged; only the summation order differs.
    `layout` forces one (`LAYOUTS` or "row-major") without timing. A compiled step multiplies by packed weights
    unpacked (`PackedLinear.unpacked`; 16-bit ones through `OneRowLinear`); fp32 ones column-major
    ("onednn-packed+column-major") where column-major beat row-major by `min_gain` too: the compiled step's
    `F.linear` is the same BLAS call as eager's (MKL's: 1.5x faster column-major on a 2-core AVX2 AMD EPYC).
    Returns the layout in use: "row-major", "column-major", "onednn-packed", "onednn-packed+column-major", or
    "unchanged" (GPU). Row-major 16-bit weights that oneDNN has no GEMM for (`upcast_16_bit_gemm`: AVX2 CPUs) become
    `OneRowLinear`s (`eager_upcast_linears`): the same one-row kernel, and a prompt's matmuls in fp32. Plain fp32
    Linears become `PromptLinear`s where a prompt's GEMM is oneDNN's (`prompt_linears`): the same one-row matmul.
    """
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if packed:  # already done
        return "onednn-packed+column-major" if packed[0].unpack_column_major else "onednn-packed"
    if any(isinstance(m, BlockedBf16Linear) for m in model.modules()):
        return "packed-bf16"  # already done (or the compiled step's `unpack_weights`)
    if layout in (None, "row-major") and any(type(m) is OneRowLinear for m in model.modules()):
        return "row-major"  # already done (`eager_upcast_linears`)
    layout_in_use = _pick_layout(model, min_gain, layout)
    eager_upcast_linears(model)
    prompt_linears(model)
    return layout_in_use


def eager_upcast_linears(model) -> None:
    """Make the row-major 16-bit CPU Linears whose multi-row matmul is faster in fp32 (`upcast_16_bit_gemm`)
    `OneRowLinear`s for eager use too: one row (decoding) is the same matmul as before (eager `torch.mv` and a one-row
    `F.linear` are the same kernel, bit for bit), while a prompt's rows go through `upcast_linear` as a compiled run's
    prefill does, not torch's scalar 16-bit GEMM (a 32-token bf16 prefill of the 134M Llama on one AVX2 core: ~550 ->
    ~135 CPU-ms, benchmarks/prefill.py; issue #27). The weight is converted per call (no fp32 copy kept)."""
    one_row_linears(model, only=lambda linear: upcast_16_bit_gemm(linear.weight))


def _pick_layout(model, min_gain: float, layout: Optional[str]) -> str:
    import torch.nn as nn

    linears = [
        (name, m) for name, m in model.named_modules()
        if type(m) in (nn.Linear, PromptLinear) and plain_cpu_weight(m) is not None and m.weight is not model.wte.weight
    ]
    if not linears:
        return "unchanged"
    if not linears[0][1].weight.is_contiguous():
        return "column-major"  # already done
    largest = max((m for _, m in linears), key=lambda m: m.weight.numel())
    if layout is not None:
        if layout != "row-major" and not (layout in LAYOUTS and _layout_works(layout, largest)):
            raise LitLLMError(
                f"weight layout {layout!r} is not available here (expected one of row-major, {', '.join(LAYOUTS)})"
            )
        return _apply_layout(model, linears, layout)
    # time on (up to) 128 MB of the largest weight's rows: bigger than caches, small enough to copy
    w = largest.weight.detach()
    w = w[: max(1, min(w.size(0), (128 << 20) // (w.size(1) * w.element_size())))]
    candidates = {"row-major": torch.nn.Linear(w.size(1), w.size(0), bias=False, device="meta")}
    candidates["row-major"].weight = nn.Parameter(w)
    for name in TIMED_LAYOUTS:
        if w.dtype in ONE_ROW_DTYPES and name in UNTIMED_16_BIT_LAYOUTS:
            continue
        if _layout_works(name, largest, build=False):  # an eager run does not wait ~1 min for a first build
            copy = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
            copy.weight = nn.Parameter(w)
            candidates[name] = LAYOUTS[name](copy)
    x = torch.randn(1, 1, w.size(1), dtype=w.dtype)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(7):
        for name, layer in candidates.items():
            t0 = time.perf_counter()
            layer(x)
            times[name].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = min(median, key=median.get)
    del candidates
    if best == "row-major" or median["row-major"] < min_gain * median[best]:
        return "row-major"
    if best == "onednn-packed" and w.dtype == torch.float32 and "column-major" in median \
            and median["column-major"] * min_gain < median["row-major"]:
        best = "onednn-packed+column-major"  # what a compiled step's F.linear reads faster
    return _apply_layout(model, linears, best)


def _apply_layout(model, linears, layout: str) -> str:
    if layout == "row-major":
        return layout
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LAYOUTS[layout](linear))
    return layout


def thread_candidates() -> list[int]:
    """The torch thread counts a decode step is timed at (`fastest_threads`): the current one (the default), half
    of it and 1."""
    current = torch.get_num_threads()
    return sorted({current, max(1, current // 2), 1}, reverse=True)


def fastest_threads(run: Callable[[int], None], candidates: list[int], rounds: int = 5,
                    budget_s: float = 3.0, min_gain: float = 1.1,
                    clock: Callable[[], float] = time.perf_counter) -> int:
    """The thread count among `candidates` (the first one the default) at which `run(round)` is fastest: each round
    times one `run` at each count (interleaved: a busy moment hits them alike) by `clock`, `rounds` rounds or, after
    two, until `budget_s` of wall time is spent; medians compared, a later candidate taken only if `min_gain` faster
    than the best before it. Torch's setting is restored."""
    current = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in candidates}
    start = time.perf_counter()
    try:
        for rep in range(rounds):
            for n in candidates:
                torch.set_num_threads(n)
                t0 = clock()
                run(rep)
                times[n].append(clock() - t0)
            if rep >= 1 and time.perf_counter() - start > budget_s:  # big models: fewer samples
                break
    finally:
        torch.set_num_threads(current)
    median = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best = candidates[0]
    for n in candidates[1:]:
        if median[n] * min_gain < median[best]:
            best = n
    return best
