"""Where a compiled CPU decode step's time goes at 1 and 2 threads (issue #27): litllm's C++ matmul ops against the
rest of the step, in one process, thread counts alternating.

For each format it times `--steps` decode steps of the compiled step (AOTInductor, as `benchmarks/generate.py`'s
compiled rows, `--length` 96: its 32-token prompt and 64 new tokens) plainly, then the same steps under
`torch.profiler`, which records each call of a `litllm_cpu::` op or of aten's matmuls (`MATMULS`: the calls the step
makes through AOTInductor's proxy executor or fallbacks) with its wall time on the calling thread. It prints per token
(per step with `--batch`), best round (lowest step wall) and median:

- `step`: wall us (and CPU us of the process: at 2 threads it includes the worker's spin between regions);
- `ops`: the op calls and the sum of their wall time (each call's fork/join and the calling thread's rounding of its
  activations included) and the GB/s of weights they read in the token's own order (qkv, proj, gate/up, down x
  layers, head), beside the machine's read rate of as many bytes (`read_bandwidth` on a tensor the size of the
  weights, which a large L3 holds) at the same thread count;
- `rest`: the profiled step less its ops: inductor's kernels between them (attention over the KV cache, which the
  step reads whole: its bytes are printed, norms, SiLU, residuals), the proxy executor's calls and allocations.

    python benchmarks/decode_split.py                                   # int8dq and bf16 int4wo, 1 and 2 threads
    python benchmarks/decode_split.py --quantize torchao.int8wo --rounds 9
    python benchmarks/decode_split.py --quantize none torchao.int8wo torchao.int8dq --threads 1 --batch 4 \
        --scatter_kv_write                                            # a batched step, and its KV writes as before

`--batch B`: the step decodes B KV-cache rows, each at its own position (a batched server's or a speculative verify's
step; the benchmark's rows sit at staggered positions); `--scatter_kv_write` adds rows '<format> scatter', steps whose
per-row KV-cache writes are `scatter_` as before `KVCache.update` took `index_put_` (inductor copied each layer's cache
twice around a scatter_; tutorials/inference_measurements.md#batchstep-s34); `--fp32_mm_rows` adds rows '<format> mm',
steps whose several fp32 rows multiply by aten's mm as before the row-split op took up to 8
(tutorials/inference_measurements.md#fp32rows-s35).

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
from decode_threads import checkpoint_folder, patched  # noqa: E402
from generate import add_model_args, linear_bytes, read_bandwidth  # noqa: E402


MATMULS = ("aoti_torch_cpu_mm_out", "aoti_torch_cpu_addmm_out", "aten::mm", "aten::addmm")
"""aten's matmuls a step may call (through AOTInductor's fallback): counted with litllm's ops (an fp32 step's several
rows multiply by aten's mm through AOTInductor's C shim, its one row by litllm's row-split op)."""


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
    ops = [e for e in prof.events() if e.name.startswith("litllm_cpu::") or e.name in MATMULS]
    op_wall = sum(e.cpu_time_total for e in ops) / 1e6  # us on the calling thread: the call's wall
    return wall / steps, cpu / steps, profiled / steps, op_wall / steps, len(ops) // steps


def scatter_kv_write(update):
    """`KVCache.update` (`update`) with per-row positions (B, T) written as before batchstep-s34: scatter_ along the
    positions (what a one-row step writes is left to `update`)."""
    def scatter_update(self, input_pos, k, v, kv_len=None):
        if input_pos.dim() == 1 or k.size(0) == 1:
            return update(self, input_pos, k, v, kv_len)
        index = input_pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (B, nkv, T, hs)
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k, self.v

    return scatter_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--quantize", nargs="+", default=["torchao.int8dq", "torchao.int4wo@bf16-true"],
                        help="MODE[@PRECISION] per row, as benchmarks/generate.py's --quantize")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--length", type=int, default=96, help="KV-cache length of the compiled step")
    parser.add_argument("--batch", type=int, default=1, help="KV-cache rows every step decodes")
    parser.add_argument("--scatter_kv_write", action="store_true", help="also rows '<format> scatter': steps whose "
                        "per-row KV-cache writes are scatter_ along the positions, as before (saved apart)")
    parser.add_argument("--fp32_mm_rows", action="store_true", help="also rows '<format> mm': steps whose several "
                        "fp32 rows multiply by aten's mm, as before the row-split op took up to 8 (saved apart)")
    parser.add_argument("--layout", default=None, help="the fp32 weights' layout (`optimize_for_decoding`'s, e.g. "
                        "row-major: what `--fp32_mm_rows` compares on); default: the timed pick, which may differ "
                        "between the rows of one run")
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is kept (default: a "
                        "folder per size under the system's temp dir, reused; benchmarks/decode_threads.py's)")
    args = parser.parse_args()

    from litllm import compile_decode
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine, threads_for
    from litllm.inference import load_for_inference
    from litllm.model import KVCache
    from litllm.row_split import RowSplitLinear

    folder, steps, weights, cache = checkpoint_folder(args), {}, {}, {}
    labels = [(spec, "") for spec in args.quantize] + [
        (f"{spec} {old}", old) for spec in args.quantize for old, wanted in
        (("scatter", args.scatter_kv_write), ("mm", args.fp32_mm_rows)) if wanted and args.batch > 1]
    for label, old in labels:
        mode, _, precision = label.split()[0].partition("@")
        model = load_for_inference(folder, "cpu", precision or "32-true", None if mode == "none" else mode)
        weights[label] = linear_bytes(model)
        optimize_for_decoding(model, layout=args.layout)
        with patched(KVCache, "update", scatter_kv_write(KVCache.update) if old == "scatter" else None), \
                patched(RowSplitLinear, "max_rows", 1 if old == "mm" else None), \
                patched(compile_decode, "STEP_CODE", f"{compile_decode.STEP_CODE} {old}" if old else None):
            engine = Engine(model, None, args.batch, args.length, threads=max(args.threads), compile=True)
        print(f"{label}: step {engine.step_source}", flush=True)
        engine._pos.copy_(torch.arange(args.batch)[:, None] * (args.length // (2 * args.batch)))  # staggered rows
        cache[label] = sum(t.nbytes for c in engine._caches for t in (c.k, c.v))
        steps[label] = (lambda engine: lambda: engine._decode(engine._tokens, engine._pos, None))(engine)
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
                  f"({weights[spec] / ops / 1e9 if ops else 0:.1f} GB/s of weights); "
                  f"rest {1e6 * (profiled - ops):.0f} us "
                  f"(KV cache {cache[spec] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
