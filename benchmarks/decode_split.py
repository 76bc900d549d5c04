"""Where a compiled CPU decode step's time goes at 1 and 2 threads (issue #27): litllm's C++ matmul ops against the
rest of the step, in one process, thread counts alternating.

For each format it times `--steps` decode steps of the compiled step (AOTInductor, as `benchmarks/generate.py`'s
compiled rows, `--length` 96: its 32-token prompt and 64 new tokens) plainly, then the same steps under
`torch.profiler`, which records each call of a `litllm_cpu::` op (the calls the step makes through AOTInductor's
proxy executor) with its wall time on the calling thread. It prints per token, best round (lowest step wall) and
median:

- `step`: wall us (and CPU us of the process: at 2 threads it includes the worker's spin between regions);
- `ops`: the op calls and the sum of their wall time (each call's fork/join and the calling thread's rounding of its
  activations included) and the GB/s of weights they read in the token's own order (qkv, proj, gate/up, down x
  layers, head), beside the machine's read rate of as many bytes (`read_bandwidth` on a tensor the size of the
  weights, which a large L3 holds) at the same thread count;
- `rest`: the profiled step less its ops: inductor's kernels between them (attention over the KV cache, which the
  step reads whole: its bytes are printed, norms, SiLU, residuals), the proxy executor's calls and allocations.

    python benchmarks/decode_split.py                                   # int8dq and bf16 int4wo, 1 and 2 threads
    python benchmarks/decode_split.py --quantize torchao.int8wo --rounds 9

The profiler adds ~1-2 us a recorded call: the profiled step's wall is printed beside the plain one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import checkpoint_folder  # noqa: E402
from generate import add_model_args, linear_bytes, read_bandwidth  # noqa: E402


def split(step, steps: int) -> tuple[float, float, float, float, int]:
    """(step wall s, step CPU s, profiled step wall s, the ops' wall s, op calls) per step, over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = time.perf_counter() - t0
    ops = [e for e in prof.events() if e.name.startswith("litllm_cpu::")]
    op_wall = sum(e.cpu_time_total for e in ops) / 1e6  # us on the calling thread: the call's wall
    return wall / steps, cpu / steps, profiled / steps, op_wall / steps, len(ops) // steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--quantize", nargs="+", default=["torchao.int8dq", "torchao.int4wo@bf16-true"],
                        help="MODE[@PRECISION] per row, as benchmarks/generate.py's --quantize")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--length", type=int, default=96, help="KV-cache length of the compiled step")
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is kept (default: a "
                        "folder per size under the system's temp dir, reused; benchmarks/decode_threads.py's)")
    args = parser.parse_args()

    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine, threads_for
    from litllm.inference import load_for_inference

    folder, steps, weights, cache = checkpoint_folder(args), {}, {}, {}
    for spec in args.quantize:
        mode, _, precision = spec.partition("@")
        model = load_for_inference(folder, "cpu", precision or "32-true", None if mode == "none" else mode)
        weights[spec] = linear_bytes(model)
        optimize_for_decoding(model)
        engine = Engine(model, None, 1, args.length, threads=max(args.threads), compile=True)
        print(f"{spec}: step {engine.step_source}", flush=True)
        cache[spec] = sum(t.nbytes for c in engine._caches for t in (c.k, c.v))
        steps[spec] = (lambda engine: lambda: engine._decode(engine._tokens, engine._pos, None))(engine)
    runs = {(spec, n): [] for spec in steps for n in args.threads}
    with torch.inference_mode():
        for r in range(args.rounds):
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]  # each round starts at the next row
            for spec, n in order:
                with threads_for(n):
                    steps[spec]()  # warm-up (a thread count just changed)
                    runs[(spec, n)].append(split(steps[spec], args.steps))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for n in args.threads:
        with threads_for(n):
            rates = {spec: read_bandwidth(weights[spec]) / 1e9 for spec in steps}
        print(f"read rate at {n} thread(s), a tensor the size of each format's weights: "
              + ", ".join(f"{spec} ({weights[spec] / 1e6:.0f} MB) {rate:.1f} GB/s" for spec, rate in rates.items()))
    for (spec, n), rows in runs.items():
        for label, (wall, cpu, profiled, ops, calls) in (
                ("best", min(rows)), ("median", [statistics.median(col) for col in zip(*rows)])):
            print(f"{spec} {n} thread(s) {label:6s}: step {1e6 * wall:.0f} us (CPU {1e6 * cpu:.0f}; profiled "
                  f"{1e6 * profiled:.0f}); ops {calls:.0f} calls {1e6 * ops:.0f} us "
                  f"({weights[spec] / ops / 1e9:.1f} GB/s of weights); rest {1e6 * (profiled - ops):.0f} us "
                  f"(KV cache {cache[spec] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
