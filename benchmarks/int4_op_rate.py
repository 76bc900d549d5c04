"""How fast litllm's int4 decode op multiplies `torchao.int4wo` weights against torch's CPU int4 kernel (issue #27).

Times `litllm_cpu::int4_rows_linear` (bf16 activations, the uint4 weights repacked 32 outputs x 2 inputs a line;
`litllm.quantize.Int4RowsLinear`) and torch's `_weight_int4pack_mm_for_cpu` (what torchao's CPU `Int4OpaqueTensor`
calls) on the same torchao-quantized weights: one decode token's Linears of benchmarks/generate.py's 134M Llama (12
layers of 768 -> 2304, 768 -> 768, 768 -> 4096, 2048 -> 768; 85M weights, ~45 MB as int4 with their scales: held in a
large L3) and one layer at a prompt's 32 rows, each kernel called directly (no layer's Python around it), alternating
within each of `--rounds` rounds; prints GB of int4 weights (values, scales and zeros) per CPU-second and per wall
second, best rounds, and first how far each is from the float64 product of the dequantized weights. Where AMX-BF16
tiles run, litllm's op is timed by each kernel: `litllm avx512` (the inputs as int16, vpdpwssd; `LITLLM_INT4_AMX=0`)
and `litllm amx` (tiles from one row, `LITLLM_INT4_AMX=1`; by default the op takes them from 3 rows).

    python benchmarks/int4_op_rate.py --threads 1 2 --rounds 5
    python benchmarks/int4_op_rate.py --rows 1 2 4 16 --threads 1   # batched steps' and a prompt's row counts
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch, as litllm's commands: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import env_set  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (4096, 768), (768, 2048)]  # (out, in) of one layer of the benchmark Llama


def both_layers(out_f: int, in_f: int, g: torch.Generator):
    """(torchao's layer, litllm's `Int4RowsLinear`) of one random bf16 weight, the same int4 values."""
    from litllm.quantize import _torchao_int4wo

    linear = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    os.environ["LITLLM_INT4_ROWS"] = "0"
    theirs = _torchao_int4wo(linear, torch.device("cpu"), torch.bfloat16)
    del os.environ["LITLLM_INT4_ROWS"]
    return theirs, _torchao_int4wo(linear, torch.device("cpu"), torch.bfloat16)


def torch_kernel(pair):
    """torch's CPU int4 kernel on torchao's tensors, called as torchao's layer calls it (without its Python dispatch)."""
    weight = pair[0].weight
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.qdata, weight.block_size[1],
                                                                weight.scale_and_zero)


def litllm_kernel(pair):
    """litllm's op on the layer's repacked tensors (as `Int4RowsLinear.forward` calls it)."""
    ours = pair[1]
    return lambda x: torch.ops.litllm_cpu.int4_rows_linear(x, ours.packed, ours.scale_zero, ours.group,
                                                           ours.out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="*", default=[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="activation rows a call (1: one decode "
                        "token, all layers; more: the first layer's four Linears)")
    args = parser.parse_args()
    from litllm.cpu_ops import INT4_AMX_ENV, int4_rows_op
    from litllm.utils import cpu_flags

    if int4_rows_op() is None:
        raise SystemExit("litllm's int4 op does not run here (needs AVX512-BF16 and its library)")
    g = torch.Generator().manual_seed(0)
    layers = [both_layers(o, i, g) for _ in range(args.layers) for o, i in SHAPES]
    stored = sum(ours.stored_bytes for _, ours in layers)
    print(f"{len(layers)} Linears, {sum(o * i for o, i in SHAPES) * args.layers / 1e6:.0f}M int4 weights, "
          f"{stored / 1e6:.1f} MB with scales and zeros; load average {os.getloadavg()[0]:.1f}")
    # (name, kernel, $LITLLM_INT4_AMX while it runs: None leaves the op's default)
    kernels = [("torch", torch_kernel, None), ("litllm", litllm_kernel, None)]
    if {"amx_bf16", "amx_tile"} <= cpu_flags():  # litllm's op by each of its kernels
        kernels[1:] = [("litllm avx512", litllm_kernel, "0"), ("litllm amx", litllm_kernel, "1")]
    x = {i: torch.randn(max(args.rows), i, generator=g).bfloat16() for _, i in SHAPES}
    with torch.no_grad():
        pair = layers[0]
        eye = torch.eye(pair[1].in_features, dtype=torch.bfloat16)  # the dequantized weight, from torch's kernel on
        xr = x[pair[1].in_features][:1]                                # an identity (exact in fp32 sums)
        exact = xr.double() @ torch_kernel(pair)(eye).double()  # (1, out): bf16 weights as torch's
        for name, kernel, env in kernels:
            with env_set(INT4_AMX_ENV, env):
                out = kernel(pair)(xr).double()
            print(f"{name:13s} one row vs float64: relative L2 {float((out - exact).norm() / exact.norm()):.2e}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            calls = {name: (env, [(kernel(pair), x[pair[1].in_features][:rows])
                                  for pair in (layers if rows == 1 else layers[:4])]) for name, kernel, env in kernels}
            best = {name: (float("inf"), float("inf")) for name in calls}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for name, (env, pairs) in calls.items():
                        with env_set(INT4_AMX_ENV, env):
                            c0, t0 = time.process_time(), time.perf_counter()
                            for kernel, xr in pairs:
                                kernel(xr)
                            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                        best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
            nbytes = stored if rows == 1 else sum(ours.stored_bytes for _, ours in layers[:4])
            cells = "  ".join(f"{name} {nbytes / c / 1e9:5.1f} GB/CPU-s {nbytes / w / 1e9:5.1f} GB/s ({w * 1e3:.2f} ms)"
                              for name, (c, w) in best.items())
            ours = kernels[-1][0]
            ratios = ", ".join(f"{best[name][0] / best[ours][0]:.2f}x {name}" for name in best if name != ours)
            print(f"{threads} thread(s), {rows:2d} row(s): {cells}  {ours} (CPU time) {ratios}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
