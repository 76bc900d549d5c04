"""One-row (decoding) matmuls in bf16, fp16 and fp32 on the CPU: which kernel and layout stream weights fastest.

A decode step multiplies one activation row by every weight matrix of the model, so its speed is the rate at which
the kernel reads the weights. This times one such pass over the Linear weights of benchmarks/generate.py's Llama
(default: the 134M model, 12 layers of qkv 768->2304, proj 768->768, fc 768->4096, proj 2048->768, and the 768->32000
head; every candidate has its own copy of all of them, so a pass streams the model's bytes as a decode step does)
for each candidate, at each thread count, alternating candidates within each of `--rounds` rounds, and prints the
median GB/s of weight read (wall and CPU time) and the median per-round ratio of each candidate's time to fp32
`F.linear`'s at the same thread count (>1: faster; a bf16 pass reads half the bytes, so 2.0 is "at the same GB/s"),
and the best round's ms (on a machine shared with other jobs, the rounds where the cores were free).

Candidates (those this torch build or CPU cannot run are listed as unavailable):
  fp32 / bf16 / fp16 F.linear     row-major weight, as loaded (bf16/fp16: oneDNN matmul, weight not prepacked)
  fp32 / bf16 column-major        F.linear on the contiguous transpose
  fp32 / bf16 / fp16 onednn-packed `torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise` (litllm's
                                  `PackedLinear`; on AMX CPUs oneDNN's brgemm kernels)
  bf16 mv                         `torch.mv`
  fp32 / bf16 compiled F.linear   the pass under `torch.compile` with the weights as inputs, as litllm's compiled
                                  decode step takes them (inductor calls the same oneDNN/BLAS matmul as eager)
  fp32 compiled column-major      the same on column-major weights
  fp32 row-split (column-major)   litllm's `litllm_cpu::row_split_linear` (`litllm.row_split`: the weight's rows in
                                  one block per thread, each block litllm's AVX-512 kernel where the weight is
                                  row-major and the CPU has AVX-512, else MKL's GEMV; built on first use), eager and in
                                  the compiled pass (`RowSplitLinear`), on row- or column-major weights
  fp32 row-split blas             the same split, each block MKL's GEMV (`row_split_linear_blas`: the op before its
                                  AVX-512 kernel)
  fp32 prompt_linear              `litllm.cpu_layout.prompt_linear` (`--rows` > 1: a prompt's GEMM, oneDNN's where
                                  it is the faster here; what `RowSplitLinear` ran for several rows before session 35)
  fp32 mkl-packed                 `torch.ops.mkl._mkl_reorder_linear_weight` + `_mkl_linear` (MKL's packed sgemm)
  fp32 / bf16 / fp16 compiled mv  the same with litllm's `OneRowLinear` (`torch.mv`: inductor decomposes it into
                                  its own vectorized reduction, accumulating in fp32; on AVX2 16-bit ones convert the
                                  row to fp32 once, `litllm.cpu_layout.one_row_kernel`)
  bf16 compiled torch.mv          `torch.mv` on every CPU (the row converted again for every weight row)
  fp32 / bf16 compiled mv, step options  the same compiled with litllm's `ONE_ROW_COMPILE_OPTIONS`, as its 16-bit
                                  decode step is (its `realize_cpu_opcount_threshold` decides how inductor tiles the
                                  reduction); `fp32 compiled mv, cpu options`: with `CPU_COMPILE_OPTIONS`
  bf16 weight, fp32 x             `_linear_pointwise` with fp32 activations on a bf16-packed weight
  bf16 / fp16 compiled blocked    weights laid out (out/16, in, 16): inductor's reduction runs over `in` with the
                                  16 outputs of a block in the vector lanes (one 16-weight load and conversion per
                                  input element, the input broadcast, fp32 accumulators), llama.cpp-like
  bf16 / fp16 compiled mv, fp32 row  `litllm.cpu_layout.fp32_row_mv` on every CPU: the input row converted to
                                  fp32 once into a buffer (`prims.inductor_force_stride_order`)
  bf16 inductor max_autotune      (`--inductor`, instead of the compiled candidates above: its inductor settings
                                  are process-wide) the pass compiled with freezing and max_autotune (inductor's CPP
                                  GEMM template with its AMX/AVX512 micro-kernels against ATen's; slow to build)

    python benchmarks/one_row_matmul.py                       # 134M shapes, threads 1 and torch's count (~2-4 min)
    python benchmarks/one_row_matmul.py --threads 1 --inductor --rounds 9
    python benchmarks/one_row_matmul.py --threads 1 2 --rounds 15 --candidates "fp32 row-split" "fp32 row-split blas"
    python benchmarks/one_row_matmul.py --chain --threads 1 2 --rounds 15 --candidates \
        "bf16 compiled torch.mv" "bf16 compiled mv, fp32 row" "bf16 compiled blocked" "fp16 compiled mv"  # issue #27

`--chain`: each matmul multiplies the (RMS-normalized) output of the one before, as in a decode step; without it
every matmul of a pass takes the same input row, and inductor fuses the compiled passes' matmuls of the same input
width into one loop (12 reductions side by side), which a decode step never does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import litllm  # noqa: F401  (before torch, as litllm's commands: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args  # noqa: E402


def model_shapes(args) -> list[tuple[int, int]]:
    """(out_features, in_features) of every Linear a decode step of the benchmark Llama multiplies by."""
    per_layer = [(3 * args.n_embd, args.n_embd), (args.n_embd, args.n_embd),
                 (2 * args.intermediate_size, args.n_embd), (args.n_embd, args.intermediate_size)]
    return per_layer * args.n_layer + [(args.vocab_size, args.n_embd)]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _mkl_packed(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, 1), weight


def _mkl_linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed[0], packed[1], None, 1)


def _row_split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.litllm_cpu.row_split_linear(x, w)


def _row_split_blas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.litllm_cpu.row_split_linear_blas(x, w)


def _prompt_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from litllm.cpu_layout import prompt_linear

    return prompt_linear(x, w)


def _column_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


def _linears(weights: list[torch.Tensor], cls=torch.nn.Linear) -> torch.nn.ModuleList:
    linears = torch.nn.ModuleList()
    for w in weights:
        linear = cls(w.size(1), w.size(0), bias=False, device="meta")
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        linears.append(linear)
    return linears


ROWS = 1
"""`--rows`: activation rows every matmul multiplies (a batched decode step's: a pass still reads each weight
once)."""
CHAIN = False
"""`--chain`: each matmul of a pass multiplies the normalized output of the one before (`_one_pass`)."""


def _one_pass(linears, xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Every matmul of a pass (`linears`: callables with `in_features`) on its input row (`CHAIN`: the one before's
    output, RMS-normalized in fp32 and cut to the width it takes)."""
    if not CHAIN:
        return [linear(xs[linear.in_features]) for linear in linears]
    x, out = xs[linears[0].in_features], []
    for linear in linears:
        y = linear(x[..., : linear.in_features])  # (ROWS, out)
        yf = y.float()
        x = (yf * torch.rsqrt(yf.pow(2).mean() + 1e-6)).to(y.dtype)
        out.append(y)
    return out


class _Pass(torch.nn.Module):
    def __init__(self, linears: torch.nn.ModuleList) -> None:
        super().__init__()
        self.linears = linears

    def forward(self, xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return _one_pass(self.linears, xs)


class _Matmul:
    """An eager one-row matmul over a prepared weight, as `_one_pass` calls it."""

    def __init__(self, matmul: Callable, weight: torch.Tensor, in_features: int) -> None:
        self.matmul, self.weight, self.in_features = matmul, weight, in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight)


BLOCK = 16
"""Output rows per block of the blocked candidates (16 bf16/fp16 weights: one 32-byte AVX2 load)."""


class _BlockedOneRow(torch.nn.Module):
    """A one-row matmul over weights laid out (out/BLOCK, in, BLOCK): inductor reduces over `in` with a block's
    outputs in the vector lanes (a candidate of issue #27, not litllm's kernel)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out, self.in_features = weight.shape
        self.weight = weight.view(out // BLOCK, BLOCK, self.in_features).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        products = self.weight.float() * x.reshape(-1).float()[None, :, None]  # (out/BLOCK, in, BLOCK)
        return products.sum(1).to(self.weight.dtype).view(1, -1)


class _Fp32RowOneRow(torch.nn.Linear):
    """`litllm.cpu_layout.fp32_row_mv` whatever the CPU: the input row converted to fp32 once, into a buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from litllm.cpu_layout import fp32_row_mv

        return fp32_row_mv(self.weight, x.reshape(-1)).view(1, -1)


class _TorchMv(torch.nn.Linear):
    """`torch.mv` whatever the CPU: inductor's reduction converting the row once per weight row (`OneRowLinear`'s
    kernel before `litllm.cpu_layout.one_row_kernel`, and still where that is "mv")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, x.reshape(-1)).view(1, -1)


def _compiled_pass(weights: list[torch.Tensor], how: str) -> Callable:
    """One pass compiled as litllm's compiled decode step is (weights are inputs: "F.linear", or "mv" through
    `OneRowLinear`), or frozen into constants under max_autotune ("max_autotune")."""
    from litllm.compile_decode import ONE_ROW_COMPILE_OPTIONS
    from litllm.cpu_layout import OneRowLinear
    from litllm.row_split import RowSplitLinear

    if how == "max_autotune":  # weights frozen into constants; built last: the settings stay for the process
        import torch._inductor.config as inductor_config

        for key, value in AUTOTUNE.items():
            setattr(inductor_config, key, value)
        step = torch.compile(_Pass(_linears(weights)).eval())
        return lambda xs: step(xs)
    from litllm.compile_decode import CPU_COMPILE_OPTIONS

    if how == "blocked":
        linears = torch.nn.ModuleList(_BlockedOneRow(w) for w in weights)
    else:
        special = {"mv fp32 row": _Fp32RowOneRow, "torch.mv": _TorchMv, "row-split": RowSplitLinear}
        linears = _linears(weights, special.get(how, OneRowLinear if how.startswith("mv") else torch.nn.Linear))
    options = {"mv step options": ONE_ROW_COMPILE_OPTIONS, "mv cpu options": CPU_COMPILE_OPTIONS,
               "blocked": ONE_ROW_COMPILE_OPTIONS, "mv fp32 row": ONE_ROW_COMPILE_OPTIONS,
               "torch.mv": ONE_ROW_COMPILE_OPTIONS}.get(how, {})
    # as litllm's steps: its kernels take torch's thread count when they run (inductor's default bakes in the count
    # at the first call, which would time a 1-thread kernel at every count)
    # dynamic=False: each candidate recompiles `_one_pass`, which would otherwise turn to dynamic shapes
    step = torch.compile(_one_pass, fullgraph=True, dynamic=False, options={**options, "cpp.dynamic_threads": True})
    return lambda xs: step(linears, xs)


# name -> (weight dtype, activation dtype, weight preparation, one-row matmul or how the pass is compiled)
CANDIDATES: dict[str, tuple] = {
    "fp32 F.linear": (torch.float32, torch.float32, None, F.linear),
    "fp32 onednn-packed": (torch.float32, torch.float32, _packed, _packed_linear),
    "fp32 column-major": (torch.float32, torch.float32, _column_major, F.linear),
    "fp32 compiled F.linear": (torch.float32, torch.float32, None, "F.linear"),
    "fp32 compiled column-major": (torch.float32, torch.float32, _column_major, "F.linear"),
    "fp32 mkl-packed": (torch.float32, torch.float32, _mkl_packed, _mkl_linear),
    "fp32 row-split": (torch.float32, torch.float32, None, _row_split),
    "fp32 row-split column-major": (torch.float32, torch.float32, _column_major, _row_split),
    "fp32 row-split blas": (torch.float32, torch.float32, None, _row_split_blas),
    "fp32 prompt_linear": (torch.float32, torch.float32, None, _prompt_linear),
    "fp32 compiled row-split": (torch.float32, torch.float32, None, "row-split"),
    "fp32 compiled row-split column-major": (torch.float32, torch.float32, _column_major, "row-split"),
    "fp32 compiled mv": (torch.float32, torch.float32, None, "mv"),
    "fp32 compiled mv, step options": (torch.float32, torch.float32, None, "mv step options"),
    "fp32 compiled mv, cpu options": (torch.float32, torch.float32, None, "mv cpu options"),
    "bf16 F.linear": (torch.bfloat16, torch.bfloat16, None, F.linear),
    "bf16 column-major": (torch.bfloat16, torch.bfloat16, _column_major, F.linear),
    "bf16 onednn-packed": (torch.bfloat16, torch.bfloat16, _packed, _packed_linear),
    "bf16 mv": (torch.bfloat16, torch.bfloat16, None, lambda x, w: torch.mv(w, x[0])[None]),
    "bf16 weight, fp32 x": (torch.bfloat16, torch.float32, _packed, _packed_linear),
    "bf16 compiled F.linear": (torch.bfloat16, torch.bfloat16, None, "F.linear"),
    "bf16 compiled mv": (torch.bfloat16, torch.bfloat16, None, "mv"),
    "bf16 compiled mv, step options": (torch.bfloat16, torch.bfloat16, None, "mv step options"),
    "fp16 F.linear": (torch.float16, torch.float16, None, F.linear),
    "fp16 onednn-packed": (torch.float16, torch.float16, _packed, _packed_linear),
    "fp16 compiled mv": (torch.float16, torch.float16, None, "mv"),
    "bf16 compiled blocked": (torch.bfloat16, torch.bfloat16, None, "blocked"),
    "fp16 compiled blocked": (torch.float16, torch.float16, None, "blocked"),
    "bf16 compiled mv, fp32 row": (torch.bfloat16, torch.bfloat16, None, "mv fp32 row"),
    "bf16 compiled torch.mv": (torch.bfloat16, torch.bfloat16, None, "torch.mv"),
    "fp16 compiled mv, fp32 row": (torch.float16, torch.float16, None, "mv fp32 row"),
}
AUTOTUNE = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
"""inductor's settings for the max_autotune candidate (frozen weights: the CPP GEMM template prepacks them)."""
AUTOTUNED = {"bf16 inductor max_autotune": (torch.bfloat16, torch.bfloat16, None, "max_autotune"),
             "fp32 inductor max_autotune": (torch.float32, torch.float32, None, "max_autotune")}
REFERENCE = "fp32 F.linear"


def build(name: str, shapes: list[tuple[int, int]]) -> Optional[tuple[Callable, int]]:
    """(one pass over all weights, bytes read), or None where this candidate does not run (or is wrong) here."""
    g = torch.Generator().manual_seed(0)
    if "row-split" in name:
        from litllm.cpu_ops import row_split_op

        if row_split_op() is None:
            return None
    wdtype, xdtype, prepare, matmul = {**CANDIDATES, **AUTOTUNED}[name]
    weights = [torch.randn(shape, generator=g).to(wdtype) for shape in shapes]
    xs = {k: torch.randn(ROWS, k, generator=g).to(xdtype) for k in {s[1] for s in shapes}}
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    expected = _one_pass([_Matmul(F.linear, w.float(), w.size(1)) for w in weights],
                         {k: x.float() for k, x in xs.items()})[-1]
    try:
        if isinstance(matmul, str):
            step = _compiled_pass([w if prepare is None else prepare(w) for w in weights], matmul)
            got = step(xs)[-1]  # compiles (and autotunes)
            run = lambda: step(xs)  # noqa: E731
        else:
            ops = [_Matmul(matmul, w if prepare is None else prepare(w), w.size(1)) for w in weights]
            run = lambda: _one_pass(ops, xs)  # noqa: E731
            got = run()[-1]
    except Exception as e:  # an op or a kernel this torch build or CPU lacks
        print(f"{name}: unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
        return None
    # a chain's rounding compounds over the layers (16-bit: a few % of the largest output)
    atol = 0.05 * expected.abs().max().item() if CHAIN else 5e-1
    if not torch.allclose(got.float(), expected, rtol=2e-2, atol=atol):
        print(f"{name}: wrong result here, skipped")
        return None
    return run, n_bytes


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default: 1 and torch's)")
    parser.add_argument("--inductor", action="store_true",
                        help="the inductor max_autotune pass instead of the other compiled ones (slow build)")
    parser.add_argument("--candidates", nargs="*", default=None, help=f"only these (and {REFERENCE!r})")
    parser.add_argument("--rows", type=int, default=1, help="activation rows each matmul multiplies (a batched "
                        "step's; fp32 row-split: litllm's kernel up to 8, a GEMM beyond)")
    parser.add_argument("--chain", action="store_true",
                        help="each matmul multiplies the normalized output of the one before, as in a decode step")
    args = parser.parse_args()
    global CHAIN, ROWS
    CHAIN, ROWS = args.chain, args.rows
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a compile per candidate
    threads = args.threads or sorted({1, torch.get_num_threads()})
    shapes = model_shapes(args)
    names = list(CANDIDATES)
    if args.inductor:  # its settings are process-wide (they leaked into the other compiled passes): those stay out
        names = [n for n in names if not isinstance(CANDIDATES[n][3], str)] + list(AUTOTUNED)
    if args.candidates is not None:
        unknown = set(args.candidates) - set(names)
        if unknown:
            parser.error(f"--candidates: unknown {sorted(unknown)}; expected some of {names}")
        names = [n for n in names if n in args.candidates or n == REFERENCE]
    passes = {name: built for name in names if (built := build(name, shapes)) is not None}
    wall: dict = {(n, t): [] for n in passes for t in threads}
    cpu: dict = {(n, t): [] for n in passes for t in threads}
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        order = list(passes)[r % len(passes):] + list(passes)[: r % len(passes)]  # rotate who goes first
        for t in threads:
            torch.set_num_threads(t)
            for name in order:
                run = passes[name][0]
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                if r:
                    wall[name, t].append(time.perf_counter() - w0)
                    cpu[name, t].append(time.process_time() - c0)
    print(f"one decode pass over {len(shapes)} weights ({args.n_layer} layers + head), {args.rounds} rounds "
          "alternating, medians")
    print(f"{'candidate':36s} {'threads':>7s} {'ms':>8s} {'GB/s':>7s} {'GB/s cpu':>9s} {'x fp32 F.linear':>16s} "
          f"{'cpu x':>6s} {'best ms':>8s}")
    for t in threads:
        for name, (_, n_bytes) in passes.items():
            ref = (REFERENCE, t)
            ratio = statistics.median(a / b for a, b in zip(wall[ref], wall[name, t]))
            cpu_ratio = statistics.median(a / max(b, 1e-9) for a, b in zip(cpu[ref], cpu[name, t]))
            ms, cpu_s = statistics.median(wall[name, t]), statistics.median(cpu[name, t])
            gb_cpu = n_bytes / max(cpu_s, 1e-9) / t / 1e9  # per CPU-second of each thread
            print(f"{name:36s} {t:7d} {ms * 1e3:8.2f} {n_bytes / ms / 1e9:7.1f} {gb_cpu:9.1f} {ratio:16.2f} {cpu_ratio:6.2f} "
                  f"{min(wall[name, t]) * 1e3:8.2f}")


if __name__ == "__main__":
    main()
