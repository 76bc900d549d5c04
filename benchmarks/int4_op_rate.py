"""How fast litllm's int4 decode op multiplies `torchao.int4wo` weights against torch's CPU int4 kernel (issue #27).

Times `litllm_cpu::int4_rows_linear` (bf16 activations, the uint4 weights repacked 32 outputs x 2 inputs a line,
AVX512-BF16 dot products; `litllm.quantize.Int4RowsLinear`) and torch's `_weight_int4pack_mm_for_cpu` (what torchao's
CPU `Int4OpaqueTensor` calls) on the same torchao-quantized weights: one decode token's Linears of
benchmarks/generate.py's 134M Llama (12 layers of 768 -> 2304, 768 -> 768, 768 -> 4096, 2048 -> 768; 85M weights,
~45 MB as int4 with their scales: held in a large L3) and one layer at a prompt's 32 rows, each kernel called directly (no
layer's Python around it), alternating within each of `--rounds` rounds; prints GB of int4 weights (values, scales and zeros) per CPU-second and per wall second, best
rounds, and first how far each is from the float64 product of the dequantized weights.

    python benchmarks/int4_op_rate.py --threads 1 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import time

import litllm  # noqa: F401  (before torch, as litllm's commands: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch
import torch.nn as nn

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
    args = parser.parse_args()
    from litllm.cpu_ops import int4_rows_op

    if int4_rows_op() is None:
        raise SystemExit("litllm's int4 op does not run here (needs AVX512-BF16 and its library)")
    g = torch.Generator().manual_seed(0)
    layers = [both_layers(o, i, g) for _ in range(args.layers) for o, i in SHAPES]
    stored = sum(ours.stored_bytes for _, ours in layers)
    print(f"{len(layers)} Linears, {sum(o * i for o, i in SHAPES) * args.layers / 1e6:.0f}M int4 weights, "
          f"{stored / 1e6:.1f} MB with scales and zeros; load average {os.getloadavg()[0]:.1f}")
    x = {i: torch.randn(32, i, generator=g).bfloat16() for _, i in SHAPES}
    with torch.no_grad():
        theirs, ours = layers[0]
        w = ours.packed  # the dequantized weight, from torch's kernel on an identity (exact in fp32 sums)
        eye = torch.eye(ours.in_features, dtype=torch.bfloat16)
        for name, layer in (("torch", theirs), ("litllm", ours)):
            exact = x[ours.in_features][:1].double() @ theirs(eye).double()  # (1, out): bf16 weights as torch's
            out = layer(x[ours.in_features][:1]).double()
            print(f"{name:7s} one row vs float64: relative L2 {float((out - exact).norm() / exact.norm()):.2e}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in (1, 32):
            calls = {name: [(kernel(pair), x[pair[1].in_features][:rows]) for pair in (layers if rows == 1 else layers[:4])]
                     for name, kernel in (("torch", torch_kernel), ("litllm", litllm_kernel))}
            best = {name: (float("inf"), float("inf")) for name in calls}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for name, pairs in calls.items():
                        c0, t0 = time.process_time(), time.perf_counter()
                        for kernel, xr in pairs:
                            kernel(xr)
                        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                        best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
            nbytes = stored if rows == 1 else sum(ours.stored_bytes for _, ours in layers[:4])
            cells = "  ".join(f"{name} {nbytes / c / 1e9:5.1f} GB/CPU-s {nbytes / w / 1e9:5.1f} GB/s ({w * 1e3:.2f} ms)"
                              for name, (c, w) in best.items())
            ratio = best["torch"][1] / best["litllm"][1]
            print(f"{threads} thread(s), {rows:2d} row(s): {cells}  litllm {ratio:.2f}x torch (wall)")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
