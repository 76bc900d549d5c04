"""Per-token budget of the decode engine around its compiled CPU step (issue #27), one process, alternating.

For each format (`--quantize`, as benchmarks/generate.py's) and thread count, on ONE compiled engine of
benchmarks/generate.py's shapes (1 row, KV cache of prompt + new tokens), each round times:

- `step alone`: the compiled step called back to back (`engine._decode`, as benchmarks/decode_threads.py does);
- `engine`: `greedy_tokens` as benchmarks/generate.py runs it (add a request, `step()` until done), split into its
  first `step()` (the prompt's prefill and first token), the later `step()`s (one token each) and, within those,
  the time spent in the compiled step itself; what is left is the engine's own per-token work.

It prints ms per token (median over rounds, wall and CPU), the engine's decode tokens/s as a fraction of the step
alone's, and what benchmarks/generate.py's figure (new tokens / whole call, prefill included) makes of them.
`--before`: also rows "<format> before" on the same engines, with the engine's per-token and prefill work as before
issue #27's cuts (greedy picks by torch's argmax; 16-bit prefill GEMMs in 16 bits), in the same alternation.

    python benchmarks/engine_overhead.py                       # bf16 and int8dq, 1 and 2 threads
    python benchmarks/engine_overhead.py --quantize none@bf16-true --threads 2 --rounds 5
    python benchmarks/engine_overhead.py --before --rounds 5     # before/after #27's cuts, alternating
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, kept_checkpoint  # noqa: E402


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def as_before(before: bool):
    """With `before`: the engine's greedy pick by torch's argmax and 16-bit multi-row matmuls in 16 bits (the code
    before issue #27's cuts), restored afterwards."""
    from litllm import cpu_layout, engine

    saved = engine.greedy, cpu_layout.upcast_16_bit_gemm
    if before:
        engine.greedy, cpu_layout.upcast_16_bit_gemm = (lambda logits: logits.argmax(dim=-1)), (lambda weight: False)
    try:
        yield
    finally:
        engine.greedy, cpu_layout.upcast_16_bit_gemm = saved


def run_round(engine, prompt: list[int], n: int) -> dict[str, tuple[float, float]]:
    """{part: (wall, CPU) seconds} of one greedy generation of n tokens on `engine`, and of n steps alone."""
    from litllm.engine import Request, threads_for

    inner = [0.0, 0.0]
    decode = engine._decode

    def timed_decode(*args):
        w, c = clocks()
        out = decode(*args)
        w2, c2 = clocks()
        inner[0] += w2 - w
        inner[1] += c2 - c
        return out

    out: dict[str, tuple[float, float]] = {}
    with torch.inference_mode(), threads_for(engine.threads):
        decode(engine._tokens, engine._pos, None)  # warm-up
        w, c = clocks()
        for _ in range(n):
            decode(engine._tokens, engine._pos, None)
        w2, c2 = clocks()
    out["step alone"] = ((w2 - w) / n, (c2 - c) / n)
    engine._decode = timed_decode
    try:
        engine.add(Request(prompt, n))
        w0, c0 = clocks()
        engine.step()  # prefill + first token
        w1, c1 = clocks()
        inner[:] = [0.0, 0.0]
        steps = 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        w2, c2 = clocks()
    finally:
        engine._decode = decode
    out["engine step()"] = ((w2 - w1) / steps, (c2 - c1) / steps)
    out["  in the compiled step"] = (inner[0] / steps, inner[1] / steps)
    out["  the engine's own"] = (out["engine step()"][0] - out["  in the compiled step"][0],
                                 out["engine step()"][1] - out["  in the compiled step"][1])
    out["first step() (prefill)"] = (w1 - w0, c1 - c0)
    out["generate.py (whole call / n)"] = ((w2 - w0) / n, (c2 - c0) / n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--quantize", nargs="+", default=["none@bf16-true", "torchao.int8dq"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", action="store_true", help="also rows as before issue #27's cuts (alternating)")
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is kept (default: a "
                        "folder per size under the system's temp dir, reused; benchmarks/decode_threads.py's)")
    args = parser.parse_args()

    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine
    from litllm.inference import load_for_inference

    folder = kept_checkpoint(args, args.folder)
    prompt = torch.randint(0, 2000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    length = args.prompt_tokens + args.new_tokens  # benchmarks/generate.py's engines
    engines = {}
    for spec in args.quantize:
        mode, _, precision = spec.partition("@")
        model = load_for_inference(folder, "cpu", precision or "32-true", None if mode == "none" else mode)
        optimize_for_decoding(model)
        t0 = time.perf_counter()
        engines[spec] = Engine(model, None, 1, length, compile=True)
        print(f"{spec}: step {engines[spec].step_source} in {time.perf_counter() - t0:.1f} s", flush=True)
    variants = ["", " before"] if args.before else [""]
    runs: dict[tuple[str, int], list[dict]] = {(spec + v, n): [] for spec in engines for n in args.threads
                                               for v in variants}
    for _ in range(args.rounds):  # alternating: the machine's load hits every row alike
        for (name, n), rounds in runs.items():
            engine = engines[name.removesuffix(" before")]
            engine.threads = n
            with as_before(name.endswith(" before")):
                rounds.append(run_round(engine, prompt, args.new_tokens))
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, KV cache {length}; medians of {args.rounds} rounds (best in brackets)")
    for (spec, n), rounds in runs.items():
        print(f"{spec}, {n} thread(s):{'ms wall':>20s}{'CPU ms':>10s}{'tok/s':>10s}")
        for part in rounds[0]:
            wall = [r[part][0] for r in rounds]
            cpu = statistics.median(r[part][1] for r in rounds)
            rate = f"{1 / statistics.median(wall):10.1f}" if part in ("step alone", "engine step()",
                                                                      "generate.py (whole call / n)") else ""
            print(f"  {part:<30s}{1e3 * statistics.median(wall):8.2f} ({1e3 * min(wall):6.2f}){1e3 * cpu:9.2f}{rate}")
        ratios = []
        for i, clock in ((0, "wall"), (1, "CPU")):  # CPU time: what a loaded machine disturbs less
            alone, eng, whole = (statistics.median(r[part][i] for r in rounds)
                                 for part in ("step alone", "engine step()", "generate.py (whole call / n)"))
            ratios.append(f"{clock}: engine decode / step alone {alone / eng:.1%}, generate.py's figure / step alone "
                          f"{alone / whole:.1%}")
        print("  " + "; ".join(ratios))


if __name__ == "__main__":
    main()
