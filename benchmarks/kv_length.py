"""What a compiled CPU decode step reads of a long KV cache: its step at a few positions of a `--cache`-position cache
(4096: `litllm chat`'s whole context window), attending over the filled part only (litllm's saved step: the attended
length a dynamic dimension, `litllm.compile_decode.attended_length`) beside the step compiled before it, at static
shapes over the whole cache, per format and thread count, in one process (alternating rounds): tokens/s (best and
median of the rounds) and CPU ms a token.

    python benchmarks/kv_length.py                                  # 134M Llama, bf16 and int8wo, 1 and 2 threads
    python benchmarks/kv_length.py --quantize none --threads 2      # fp32
    python benchmarks/kv_length.py --n_layer 2 --positions 100      # a quick look
    python benchmarks/kv_length.py --batch 4 --quantize none@bf16-true   # a server's batched step, rows spread out

Rows per format and thread count, at each of `--positions` (the newest position; with `--batch` B rows, row i at
position * (i + 1) // B, as a server's rows sit at their own lengths):
- `filled`: litllm's step, over the first `attended_length(position + 1)` positions of the `--cache` cache;
- `whole`: the step over the whole cache, compiled at static shapes (as every step was before; saved in a
  compile cache of its own, `--static_cache`), which reads `--cache` positions at every position;
- `eager`: the eager step of the same engine shape (it reads the filled positions: `kv_len`).
And, once per format and thread count, the dynamic step's kernels against static ones at the same attended length:
`filled@<short>` (litllm's step on the `--cache` cache at `--short` positions) beside `whole@<short>` (a static step
compiled for a `--short`-position cache). The build time of each step is printed as it is made (compiled, or loaded
from the cache on a second run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import env_set  # noqa: E402
from generate import add_model_args, kept_checkpoint  # noqa: E402


@contextlib.contextmanager
def static_steps(folder: Path):
    """Steps built in this block are compiled at static shapes (the attended length fixed at the whole cache, as
    litllm compiled them before `attended_length`) and saved under `folder`, apart from litllm's own."""
    export = torch.export.export

    def static_export(*args, dynamic_shapes=None, **kwargs):
        return export(*args, **kwargs)

    torch.export.export = static_export
    try:
        with env_set("TORCHINDUCTOR_CACHE_DIR", str(folder)):
            yield
    finally:
        torch.export.export = export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--quantize", nargs="+", default=["none@bf16-true", "torchao.int8wo"],
                        help="MODE[@PRECISION] per format, as benchmarks/generate.py's --quantize")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=int, default=4096, help="KV-cache positions of the engine")
    parser.add_argument("--positions", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--short", type=int, default=256, help="the attended length of the kernel-speed check")
    parser.add_argument("--batch", type=int, default=1, help="KV-cache rows every step decodes")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no_eager", action="store_true", help="skip the eager rows")
    parser.add_argument("--static_cache", type=Path, default=Path(tempfile.gettempdir()) / "litllm_kv_length_static",
                        help="the compile cache of the static (whole-cache) steps")
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is kept (default: a "
                        "folder per size under the system's temp dir, reused)")
    parser.add_argument("--layout", default="row-major", help="the CPU weight layout (`optimize_for_decoding`'s "
                        "`layout`; default row-major, as the compiled steps take it: not timed on a loaded machine)")
    args = parser.parse_args()

    from litllm.compile_decode import enable_compile_cache
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine, threads_for
    from litllm.inference import load_for_inference

    enable_compile_cache()  # (litllm's own steps: $TORCHINDUCTOR_CACHE_DIR, else litllm's cache folder)
    args.context_window = max(args.cache, 2048)  # (`build_checkpoint`'s model, its window long enough)
    folder = kept_checkpoint(args, args.folder or Path(tempfile.gettempdir())
                             / f"litllm_kv_length_{args.n_layer}x{args.n_embd}x{args.context_window}")
    rows = {}  # (label, format, threads, position) -> (engine, kv_len, position)
    for spec in args.quantize:
        mode, _, precision = spec.partition("@")
        model = load_for_inference(folder, "cpu", precision or "32-true", None if mode == "none" else mode)
        optimize_for_decoding(model, layout=args.layout)
        for n in args.threads:
            built = {}
            for name, length, static in (("filled", args.cache, False), ("whole", args.cache, True),
                                         (f"whole@{args.short}", args.short, True)):
                t0 = time.perf_counter()
                with static_steps(args.static_cache) if static else contextlib.nullcontext():
                    built[name] = engine = Engine(model, None, args.batch, length, threads=n, compile=True)
                print(f"{spec} {n} thread(s) {name}: step {engine.step_source} in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            eager = None if args.no_eager else Engine(model, None, args.batch, args.cache, threads=n)
            for p in args.positions:
                rows[("filled", spec, n, p)] = (built["filled"], p + 1, p)
                rows[("whole", spec, n, p)] = (built["whole"], None, p)
                if eager is not None:
                    rows[("eager", spec, n, p)] = (eager, p + 1, p)
            rows[(f"filled@{args.short}", spec, n, args.short - 1)] = (built["filled"], args.short, args.short - 1)
            rows[(f"whole@{args.short}", spec, n, args.short - 1)] = (built[f"whole@{args.short}"], None,
                                                                    args.short - 1)
    runs = {key: [] for key in rows}
    with torch.inference_mode():
        for r in range(args.rounds):  # alternating: the machine's load hits every row alike
            order = list(rows.items())[r % len(rows):] + list(rows.items())[: r % len(rows)]
            for key, (engine, kv_len, position) in order:
                engine._set_caches(engine._caches)  # (engines of one model: each step on its own cache)
                spread = torch.arange(1, args.batch + 1)[:, None]  # (B, 1): the last row at `position`
                engine._pos.copy_(position * spread // args.batch)
                with threads_for(key[2]):
                    engine._decode(engine._tokens, engine._pos, kv_len)  # warm-up
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(args.steps):
                        engine._decode(engine._tokens, engine._pos, kv_len)
                    runs[key].append(((time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; cache "
          f"{args.cache} positions, {args.batch} row(s), {args.rounds} rounds of {args.steps} steps")
    print(f"{'format':<18}{'threads':>8}{'position':>10}{'step':>14}{'best tok/s':>12}{'median':>10}"
          f"{'CPU ms/tok':>12}{'filled/whole':>14}")
    for (label, spec, n, p), times in runs.items():
        wall = sorted(w for w, _ in times)
        cpu = statistics.median(c for _, c in times)
        whole = runs.get(("whole" if "@" not in label else f"whole@{args.short}", spec, n, p))
        ratio = "" if whole is None or label.startswith("whole") else \
            f"{statistics.median(c for _, c in whole) / cpu:.2f}x"
        print(f"{spec:<18}{n:>8}{p:>10}{label:>14}{1 / wall[0]:>12.1f}{1 / statistics.median(wall):>10.1f}"
              f"{1e3 * cpu:>12.2f}{ratio:>14}")
    print("filled/whole: the whole-cache step's median CPU time a token over this row's (same position; "
          f"filled@{args.short}: over whole@{args.short}'s)")


if __name__ == "__main__":
    main()
