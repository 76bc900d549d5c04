"""How fast litllm's one-row int8 decode ops multiply weights, held in cache and read from DRAM (issue #27).

A decode step is at the bandwidth bound only where its kernel multiplies weights faster than DRAM delivers them.
This times `litllm_cpu::int8wo_rows_linear` (int8wo, the activations unrounded: on AVX-512 VNNI CPUs each activation
row as a 31-bit integer in 4 signed 8-bit digits, int8 dot products by vpdpbusd, exact), its fp32 kernel
`int8wo_rows_linear_fma` ("int8wo-fma": each int8 weight converted to fp32 for an fp32 FMA, what it runs without
VNNI), `litllm_cpu::int8_rows_linear` (int8dq: activations rounded per block of 32, int8 dot products by
vpdpbusd), all on row-major weights, and `litllm_cpu::int8_packed_rows_linear` (what the compiled steps of both call
on AVX-512 VNNI CPUs: "-packed", the weights 16 output rows a vector) on one activation row, over a 2 MB weight held
in L2 ("hot"), over the 61 int8 weights of benchmarks/generate.py's default Llama (104 MB: "model", a decode step's
reads, held in a large L3) and over 48 weights of 2048 x 5632
(553 MB, twice a 260 MiB L3: "cold", read from DRAM as a decode step of benchmarks/generate.py's `--model_size large`
reads them), alternating within each of `--rounds` rounds, and prints GB of weights per CPU-second (less disturbed by
other jobs on a shared machine) and per wall second, best rounds, beside `read_bandwidth`'s DRAM read rate per
CPU-second on the same threads. An op whose hot rate is not well above DRAM's can't hide the reads behind its work.
First it prints how far int8wo's two kernels and an fp32 GEMM on the dequantized weights (`F.linear`) are from the
exact product (float64) on activation rows with outlier features and with one massive feature (`accuracy`).

`--amx` times instead int8wo's packed op through AMX tiles (`LITLLM_INT8_AMX=1`: from one activation row; by default
the op takes them from 2 rows) against its VNNI kernel (`LITLLM_INT8_AMX=0`), alternating, on CPUs with AMX-INT8: CPU
ms a pass over the Llama's 104 MB at 1 to 8 activation rows (a speculative or batched decode step's), and at one row
on each of its weight shapes (copies of it that add up to >= 16 MB, held in L3 as a decode step's weights are): GB per
CPU-second and wall microseconds a call.

    python benchmarks/int8_op_rate.py --threads 1 2 --rounds 3
    python benchmarks/int8_op_rate.py --threads 1 2 --rounds 5 --amx
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import litllm  # noqa: F401  (before torch, as litllm's commands: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

from _int8_weights import int8_rows, random_weight, row_words
from generate import read_bandwidth


def int8_weights(shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A random weight of each (rows, cols) shape: (its int8 values row-major in the layers' fp32-typed carrier, 4 to a
    word; laid out for the packed-rows op, `pack_int8_rows`; a scale per row; one activation row (1, cols))."""
    from litllm.quantize import pack_int8_rows

    g = torch.Generator().manual_seed(0)
    weights = []
    for rows, cols in shapes:
        q, scales = int8_rows(random_weight(rows, cols, g))
        weights.append((row_words(q), pack_int8_rows(q), scales, torch.randn(1, cols, generator=g)))
    return weights


LLAMA_134M = [(2304, 768), (768, 768), (2048, 768), (2048, 768), (768, 2048)] * 12 + [(32000, 768)]
"""The int8 matrices of benchmarks/generate.py's default Llama, in a decode step's order (12 layers' qkv,
attention projection, the MLP's two inputs and its projection; the output head): 104 MB, held in a large L3."""


def activation_rows(kind: str, n_in: int, g: torch.Generator) -> torch.Tensor:
    """8 activation rows: "plain" Gaussian; "outliers": every 100th feature 50x (as LLM.int8()'s outlier features);
    "massive": one feature 1000x the rest (as some models' massive activations)."""
    x = torch.randn(8, n_in, generator=g)
    if kind == "outliers":
        x[:, ::100] *= 50
    elif kind == "massive":
        x[:, 7] = 1000.0
    return x


def accuracy(ops: dict, n_out: int = 1024, n_in: int = 5632) -> None:
    """Print each op's error against the exact product x @ (w * s)^T (float64) over (8, n_in) activation rows of each
    `activation_rows` kind: relative L2 over the outputs, and the largest error of one output relative to
    |x| @ |w * s|^T (the scale fp32 rounding errs in)."""
    g = torch.Generator().manual_seed(1)
    w8 = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8, generator=g)
    scales = torch.rand(n_out, generator=g) / 100
    words, w = w8.view(torch.int32).view(torch.float32), w8.double() * scales.double()[:, None]
    print(f"error against the exact product ({n_out} x {n_in} int8 weights): relative L2 / worst output")
    for kind in ("plain", "outliers", "massive"):
        x = activation_rows(kind, n_in, g)
        exact, magnitude = x.double() @ w.t(), x.double().abs() @ w.abs().t()
        cells = []
        for name, op in (*ops.items(), ("fp32 GEMM", lambda x, words, s: torch.nn.functional.linear(x, w.float()))):
            err = op(x, words, scales).double() - exact
            cells.append(f"{name} {float(err.norm() / exact.norm()):.1e} / {float((err.abs() / magnitude).max()):.1e}")
        print(f"  {kind:8s}: " + ", ".join(cells))


def rate(op, weights, passes: int) -> tuple[float, float]:
    """(GB per CPU-second, GB per wall second) of `passes` passes of `op` over `weights`."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(passes):
        for weight in weights:
            op(*weight)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n_bytes = passes * sum(weight[0].nbytes for weight in weights)
    return n_bytes / cpu / 1e9, n_bytes / wall / 1e9


@contextmanager
def amx_setting(value: str):
    """`$LITLLM_INT8_AMX` (read by the op each call) set to `value` inside the block, as it was afterwards."""
    from litllm.cpu_ops import INT8_AMX_ENV

    before = os.environ.get(INT8_AMX_ENV)
    os.environ[INT8_AMX_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(INT8_AMX_ENV) if before is None else os.environ.__setitem__(INT8_AMX_ENV, before)


KERNELS = {"AMX": "1", "VNNI": "0"}
"""int8wo's packed-rows kernels by their `$LITLLM_INT8_AMX` setting."""


def amx_rows(packed, rounds: int, row_counts=(1, 2, 4, 5, 8)) -> None:
    """CPU ms a pass of int8wo's packed op over the Llama's 104 MB, AMX and VNNI kernels alternating, at each count of
    activation rows; best of `rounds`."""
    g = torch.Generator().manual_seed(2)
    weights = [(p, s) for _, p, s, _ in int8_weights(LLAMA_134M)]
    best = {}
    for _ in range(rounds):
        for n in row_counts:
            xs = [torch.randn(n, p.size(1) * 4, generator=g) for p, _ in weights]
            for kernel, value in KERNELS.items():
                with amx_setting(value):
                    c0 = time.process_time()
                    for (p, s), x in zip(weights, xs):
                        packed(x, p, s, 0)
                    cpu = time.process_time() - c0
                best[n, kernel] = min(best.get((n, kernel), float("inf")), cpu)
    for n in row_counts:
        print(f"  {n} row(s): AMX {best[n, 'AMX'] * 1e3:5.1f} ms, VNNI {best[n, 'VNNI'] * 1e3:5.1f} ms CPU a pass "
              f"(AMX {best[n, 'VNNI'] / best[n, 'AMX']:.2f}x)")


def amx_shapes(packed, rounds: int) -> None:
    """One activation row times each weight shape of the Llama, AMX and VNNI kernels alternating, over copies of it
    that add up to >= 16 MB: GB per CPU-second and wall microseconds a call, best of `rounds`."""
    for rows, cols in dict.fromkeys(LLAMA_134M):
        copies = -(-16 * 2**20 // (rows * cols))
        weights = [(p, s, x) for _, p, s, x in int8_weights([(rows, cols)] * copies)]
        best = {}
        for _ in range(rounds):
            for kernel, value in KERNELS.items():
                with amx_setting(value):
                    cpu, wall = rate(lambda p, s, x: packed(x, p, s, 0), weights, max(2, 100 // copies))
                old = best.get(kernel, (0.0, 0.0))
                best[kernel] = (max(old[0], cpu), max(old[1], wall))
        us = {kernel: rows * cols / wall / 1e3 for kernel, (_, wall) in best.items()}
        print(f"  {rows:5d} x {cols:4d} ({copies:2d} copies): AMX {best['AMX'][0]:5.1f}, VNNI {best['VNNI'][0]:5.1f} "
              f"GB/CPU-s ({best['AMX'][0] / best['VNNI'][0]:.2f}x); {us['AMX']:6.1f} / {us['VNNI']:6.1f} us a call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amx", action="store_true", help="int8wo's packed op, AMX tiles against VNNI (see above)")
    args = parser.parse_args()
    from litllm.cpu_ops import int8_packed_rows_wanted, int8_rows_op, int8wo_rows_op

    wo, dq = int8wo_rows_op(), int8_rows_op()
    if wo is None or dq is None or not int8_packed_rows_wanted():
        raise SystemExit("the int8 ops need AVX-512 (int8wo) and AVX-512 VNNI (int8dq, packed rows): not on this CPU")
    if args.amx:
        from litllm.utils import cpu_flags

        if not {"amx_tile", "amx_int8"} <= cpu_flags():
            raise SystemExit("--amx: this CPU has no AMX-INT8")
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"{threads} thread(s), int8wo's packed op, AMX / VNNI, over the Llama's weights:")
            amx_rows(torch.ops.litllm_cpu.int8_packed_rows_linear, args.rounds)
            print(f"{threads} thread(s), one row, on each shape:")
            amx_shapes(torch.ops.litllm_cpu.int8_packed_rows_linear, args.rounds)
        return
    accuracy({"int8wo": wo, "int8wo-fma": torch.ops.litllm_cpu.int8wo_rows_linear_fma})
    wo_fma, packed = torch.ops.litllm_cpu.int8wo_rows_linear_fma, torch.ops.litllm_cpu.int8_packed_rows_linear
    ops = {"int8wo": lambda w, p, s, x: wo(x, w, s), "int8wo-fma": lambda w, p, s, x: wo_fma(x, w, s),
           "int8wo-packed": lambda w, p, s, x: packed(x, p, s, 0),
           "int8dq": lambda w, p, s, x: dq(x, w, s, 32), "int8dq-packed": lambda w, p, s, x: packed(x, p, s, 32)}
    regimes = {"hot": (int8_weights([(1024, 2048)]), 200), "model": (int8_weights(LLAMA_134M), 5),
               "cold": (int8_weights([(5632, 2048)] * 48), 2)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        best: dict[tuple[str, str], tuple[float, float]] = {}
        for _ in range(args.rounds):  # alternating: other jobs' load falls on every row alike
            for name, op in ops.items():
                for regime, (weights, passes) in regimes.items():
                    cpu, wall = rate(op, weights, passes)
                    old = best.get((name, regime), (0.0, 0.0))
                    best[name, regime] = (max(old[0], cpu), max(old[1], wall))
        dram = read_bandwidth(clock=time.process_time) / 1e9
        print(f"{threads} thread(s): DRAM read (a 512 MiB sum) {dram:.1f} GB per CPU-second")
        for name in ops:
            (hot, hot_wall), (model, model_wall), (cold, cold_wall) = (best[name, regime] for regime in regimes)
            print(f"  {name:13s}: hot {hot:5.1f} GB/CPU-s ({hot_wall:5.1f} GB/s wall), "
                  f"model {model:5.1f} ({model_wall:5.1f}), cold {cold:5.1f} ({cold_wall:5.1f}); "
                  f"hot / DRAM {hot / dram:.2f}x, cold / DRAM {cold / dram:.0%}")


if __name__ == "__main__":
    main()
