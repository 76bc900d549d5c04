"""The compiled CPU decode step at 1 and 2 (or `--threads`) torch threads, per format, in one process: tokens/s
(best and median of alternating rounds), CPU ms per token, the CPU time of the two busiest threads (does the second
one work, or spin?), and the machine's read bandwidth at each thread count (does a second thread raise the bound?).

    python benchmarks/decode_threads.py                                  # 134M Llama, fp32, bf16, int8wo, int8dq
    python benchmarks/decode_threads.py --n_layer 2 --quantize none      # a quick look
    GOMP_SPINCOUNT=300000 python benchmarks/decode_threads.py            # GNU OpenMP's default spin, for comparison
    python benchmarks/decode_threads.py --quantize none@bf16-true --one_row_kernel mv   # bf16, beside the kernel before
    python benchmarks/decode_threads.py --baked      # also steps with the thread count baked in (one compile per count)
    OMP_NUM_THREADS=1 python benchmarks/decode_threads.py --threads 1 --dynamic   # the 1-thread budget's step
        # (litllm's, its count baked in) against the one that reads the count when it runs (cpp.dynamic_threads)
    python benchmarks/decode_threads.py --quantize none --no_row_split   # fp32: row-split op vs F.linear (MKL GEMV)
    python benchmarks/decode_threads.py --quantize none --row_split_blas  # fp32: the op's AVX-512 kernel vs MKL's GEMV
    python benchmarks/decode_threads.py --quantize torchao.int8dq torchao.int8wo --no_int8_rows  # C++ ops vs inductor
    python benchmarks/decode_threads.py --quantize torchao.int8wo --no_int8_rows --fp32_head  # int8wo now and before
    python benchmarks/decode_threads.py --quantize none@bf16-true --no_packed_bf16  # packed bf16 op vs inductor's mv
    python benchmarks/decode_threads.py --quantize torchao.int8wo --batch 4 --int8_amx  # int8wo's AMX vs VNNI kernel
    python benchmarks/decode_threads.py --quantize none --inductor cpp.min_chunk_size=512  # litllm's inductor
        # settings with these on top (here inductor's default, before litllm's SERIAL_KERNEL_OPTIONS), beside them

litllm is imported before torch, as its commands do, so OpenMP's spin-wait is bounded (`litllm.bound_omp_spin`);
set `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` to run under another policy. Steps compile once per format and thread
(the 12-layer model: ~1-2 min each; one step serves every thread count, its kernels take torch's count when they
run: `litllm.compile_decode.cpu_compile_options`) into the usual compile cache and are loaded from there afterwards. Last, the thread count litllm's commands
pick for each compiled step (`pick_compiled_threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, build_checkpoint, read_bandwidth  # noqa: E402


def thread_ticks() -> dict[str, int]:
    """CPU clock ticks (user + system) each thread of this process has used so far."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def patched(module, name: str, value):
    """`module.<name>` set to `value` for a block (None: left as it is; `litllm.utils.temporarily`)."""
    from litllm.utils import temporarily

    return temporarily(functools.partial(getattr, module, name), functools.partial(setattr, module, name), value)


def step_options(extra: dict):
    """litllm's CPU steps compiled with inductor's settings changed by `extra` (saved under their own key), for
    comparison with the steps litllm compiles: `baked(n)`, `DYNAMIC`."""
    from litllm import compile_decode

    options = compile_decode.cpu_compile_options
    changed = lambda model: {  # noqa: E731
        **{k: v for k, v in options(model).items() if k not in ("cpp.threads", "cpp.dynamic_threads")}, **extra}
    return patched(compile_decode, "cpu_compile_options", changed if extra else None)


def baked(n: int) -> dict:
    """`n` threads baked into a step's kernels (inductor's `cpp.threads`: `num_threads(n)` on every region; serial
    kernels at 1)."""
    return {"cpp.threads": n}


DYNAMIC = {"cpp.dynamic_threads": True}
"""Kernels that read the thread count when they run, a parallel region per reduction (what litllm compiled under a
1-thread budget before it baked the count in, and still compiles under other budgets below the core count)."""


def inductor_settings(pairs: list[str]) -> dict:
    """`--inductor`'s KEY=VALUE pairs as inductor settings (values read as Python literals where they are)."""
    import ast

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor: expected KEY=VALUE, got {pair!r}")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def one_row_kernel(kernel):
    """With `kernel` ("mv", "fp32-row"): compiled 16-bit steps built with that one-row kernel
    (`litllm.cpu_layout.one_row_kernel`, what this CPU's capability picks otherwise; saved under its own key)."""
    from litllm import cpu_layout

    capability = {None: None, "fp32-row": cpu_layout.FP32_ROW_CAPABILITIES[0]}.get(kernel, "(not fp32-row)")
    return patched(cpu_layout, "CPU_CAPABILITY", capability)


def no_row_split(off: bool):
    """With `off`: compiled fp32 steps keep `F.linear` (MKL's one-thread GEMV) instead of the row-split op
    (`litllm.row_split`; saved under their own key), for comparison."""
    from litllm import compile_decode

    return patched(compile_decode, "wants_row_split", (lambda: False) if off else None)


def row_split_blas(on: bool):
    """With `on`: compiled fp32 steps' row-split op multiplies every chunk by MKL's GEMV, not litllm's AVX-512 kernel
    (`litllm.row_split.row_split_kernel`, `$LITLLM_ROW_SPLIT=blas`; saved under their own key), for comparison."""
    from litllm.row_split import ENV

    return env_set(ENV, "blas" if on else None)


def no_int8_rows(off: bool):
    """With `off`: compiled int8 steps keep inductor's int8 reduction instead of litllm's C++ ops (int8dq's VNNI one,
    `litllm.cpu_ops.int8_rows_op`; int8wo's, `int8wo_rows_op`; `$LITLLM_INT8_ROWS`; saved under their own key), for
    comparison."""
    from litllm.cpu_ops import INT8_ROWS_ENV

    return env_off(INT8_ROWS_ENV, off)


def no_packed_bf16(off: bool):
    """With `off`: compiled bf16 steps keep row-major weights and inductor's `mv` (`OneRowLinear`) instead of oneDNN's
    packed bytes and the AVX512-BF16 op (`litllm.packed_bf16.packed_bf16_op`, `$LITLLM_PACKED_BF16`), for comparison."""
    from litllm.packed_bf16 import PACKED_BF16_ENV

    return env_off(PACKED_BF16_ENV, off)


def env_off(variable: str, off: bool):
    """`$variable` set to 0 for a block where `off`, as it was afterwards."""
    return env_set(variable, "0" if off else None)


@contextlib.contextmanager
def env_set(variable: str, value):
    """`$variable` set to `value` for a block (None: left as it is), as it was afterwards."""
    before = os.environ.get(variable)
    if value is not None:
        os.environ[variable] = value
    try:
        yield
    finally:
        os.environ.pop(variable, None) if before is None else os.environ.__setitem__(variable, before)


def checkpoint_folder(args) -> Path:
    """The random checkpoint of `args`' size (`add_model_args`) in `args.folder`, else in a folder per size under the
    system's temp dir; built there the first time, reused afterwards."""
    import tempfile

    folder = args.folder or Path(tempfile.gettempdir()) / f"litllm_decode_threads_{args.n_layer}x{args.n_embd}"
    if not any(folder.glob("lit_model.*")):
        folder.mkdir(parents=True, exist_ok=True)
        build_checkpoint(folder, args)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--quantize", nargs="+", default=["none", "none@bf16-true", "torchao.int8wo", "torchao.int8dq"],
                        help="MODE[@PRECISION] per row, as benchmarks/generate.py's --quantize")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--length", type=int, default=256, help="KV-cache length of the compiled step")
    parser.add_argument("--baked", action="store_true", help="also rows '<format> baked': steps compiled with the "
                        "thread count baked in (inductor's `cpp.threads`: `num_threads(n)` on every region), one per count")
    parser.add_argument("--dynamic", action="store_true", help="also rows '<format> dynamic': steps compiled with "
                        "`cpp.dynamic_threads` (one step for every count)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE", help="also rows '<format> "
                        "KEY=VALUE...': steps compiled with these inductor settings on top of litllm's, e.g. "
                        "cpp.min_chunk_size=4096 (saved under their own key)")
    parser.add_argument("--one_row_kernel", choices=["mv", "fp32-row"], default=None,
                        help="also rows '<format> <kernel>' for 16-bit formats: steps whose one-row matmuls take that "
                        "kernel (litllm.cpu_layout.one_row_kernel), beside the one this CPU picks")
    parser.add_argument("--no_row_split", action="store_true", help="also rows '<format> F.linear': fp32 steps "
                        "compiled without the row-split op (`litllm.row_split`), on a model loaded again")
    parser.add_argument("--row_split_blas", action="store_true", help="also rows '<format> blas': fp32 steps whose "
                        "row-split op runs MKL's GEMV on every chunk, not litllm's AVX-512 kernel")
    parser.add_argument("--no_int8_rows", action="store_true", help="also rows '<format> inductor' for int8dq and "
                        "int8wo: steps with inductor's int8 reduction, not litllm's C++ ops (`litllm.row_split`)")
    parser.add_argument("--fp32_head", action="store_true", help="also rows '<format> fp32 head' for int8wo: its "
                        "output head left unquantized, as int8wo loaded before it quantized it (with --no_int8_rows: "
                        "'inductor fp32 head' too, int8wo's step before)")
    parser.add_argument("--no_packed_bf16", action="store_true", help="also rows '<format> mv' for bf16: steps on "
                        "row-major weights through inductor's mv, not oneDNN's packed ones "
                        "(`litllm.packed_bf16.packed_bf16_op`)")
    parser.add_argument("--batch", type=int, default=1, help="KV-cache rows every step decodes (a batched server's "
                        "step: each matmul multiplies this many activation rows)")
    parser.add_argument("--int8_amx", action="store_true", help="also rows '<format> amx' and '<format> vnni' for "
                        "int8wo: its step with LITLLM_INT8_AMX=1 (AMX tiles from one row) and =0 (VNNI) while it runs "
                        "(the op reads it each call: the same compiled step)")
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint is kept (default: a "
                        "folder per size under the system's temp dir, reused)")
    parser.add_argument("--layout", default=None, help="force this CPU weight layout (`optimize_for_decoding`'s "
                        "`layout`, e.g. row-major) instead of timing one: on a loaded machine the timed pick varies")
    args = parser.parse_args()

    from litllm import quantize
    from litllm.compile_decode import pick_compiled_threads
    from litllm.cpu_ops import INT8_AMX_ENV
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine, threads_for
    from litllm.inference import load_for_inference

    folder = checkpoint_folder(args)
    engines, layouts = {}, {}
    for spec in args.quantize:
        mode, _, precision = spec.partition("@")
        variants = [(spec, lambda n: {}, None, False, False, False)] \
            + ([(f"{spec} baked", baked, None, False, False, False)] if args.baked else []) \
            + ([(f"{spec} dynamic", lambda n: DYNAMIC, None, False, False, False)] if args.dynamic else []) \
            + ([(f"{spec} {' '.join(args.inductor)}", lambda n: {**inductor_settings(args.inductor)}, None, False,
                 False, False)] if args.inductor else []) \
            + ([(f"{spec} F.linear", lambda n: {}, None, True, False, False)] if args.no_row_split else []) \
            + ([(f"{spec} blas", lambda n: {}, None, False, False, False)] if args.row_split_blas and mode == "none"
               and precision in ("", "32-true") else []) \
            + ([(f"{spec} inductor", lambda n: {}, None, False, True, False)]
               if args.no_int8_rows and "int8" in mode else []) \
            + ([(f"{spec} mv", lambda n: {}, None, False, False, True)] if args.no_packed_bf16 and "bf16" in precision
               else [])
        if args.one_row_kernel and "16" in precision:
            variants.append((f"{spec} {args.one_row_kernel}", lambda n: {}, args.one_row_kernel, False, False, False))
        if args.fp32_head and mode == "torchao.int8wo":  # the head unquantized, as int8wo loaded before
            variants += [(f"{label} fp32 head", *rest) for label, *rest in variants
                         if label in (spec, f"{spec} inductor")]
        for label, extra, kernel, off, inductor, row_major in variants:
            # loaded per variant: a compiled step's unpacking changes the model's Linears
            heads = quantize.QUANTIZES_HEAD - {mode} if "fp32 head" in label else None
            with patched(quantize, "QUANTIZES_HEAD", heads):
                model = load_for_inference(folder, "cpu", precision or "32-true", None if mode == "none" else mode)
            weights = f"{spec} fp32 head" if "fp32 head" in label else spec  # one pick per format and head
            layout = layouts[weights] = optimize_for_decoding(model, layout=layouts.get(weights, args.layout))
            for n in args.threads:
                t0 = time.perf_counter()
                with step_options(extra(n)), one_row_kernel(kernel), no_row_split(off), no_int8_rows(inductor), \
                        no_packed_bf16(row_major), row_split_blas(label == f"{spec} blas"):
                    engine = Engine(model, None, args.batch, args.length, threads=n, compile=True)
                print(f"{label} {n} thread(s): step {engine.step_source} in {time.perf_counter() - t0:.1f} s "
                      f"(layout {layout})", flush=True)
                engines[(label, n)] = engine
                if args.int8_amx and label == spec and mode == "torchao.int8wo":
                    engines[(f"{spec} amx", n)] = engines[(f"{spec} vnni", n)] = engine
    runs = {key: [] for key in engines}
    ticks = {key: [0, 0] for key in engines}
    with torch.inference_mode():
        for r in range(args.rounds):  # alternating: the machine's load hits every row alike
            # each round starts at the next row (the row timed first in a round came out ahead more often than not)
            order = list(engines.items())[r % len(engines):] + list(engines.items())[: r % len(engines)]
            for (spec, n), engine in order:
                amx = {"amx": "1", "vnni": "0"}.get(spec.rpartition(" ")[2]) if args.int8_amx else None
                with threads_for(n), env_set(INT8_AMX_ENV, amx):
                    engine._decode(engine._tokens, engine._pos, None)  # warm-up
                    before, t0, c0 = thread_ticks(), time.perf_counter(), time.process_time()
                    for _ in range(args.steps):
                        engine._decode(engine._tokens, engine._pos, None)
                    wall, cpu, after = time.perf_counter() - t0, time.process_time() - c0, thread_ticks()
                runs[(spec, n)].append((wall / args.steps, cpu / args.steps))
                used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
                ticks[(spec, n)] = [ticks[(spec, n)][0] + used[0], ticks[(spec, n)][1] + used[1]]
    hz = os.sysconf("SC_CLK_TCK")
    for n in args.threads:
        with threads_for(n):
            print(f"read bandwidth at {n} thread(s): {read_bandwidth() / 1e9:.1f} GB/s")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; GOMP_SPINCOUNT "
          f"{os.environ.get('GOMP_SPINCOUNT')}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{'format':<24}{'threads':>8}{'best tok/s':>12}{'median':>10}{'CPU ms/tok':>12}{'2 busiest threads, CPU s':>28}")
    for (spec, n), times in runs.items():
        wall = [w for w, _ in times]
        cpu = statistics.median([c for _, c in times])
        busy = ", ".join(f"{t / hz:.2f}" for t in ticks[(spec, n)])
        print(f"{spec:<24}{n:>8}{1 / min(wall):>12.1f}{1 / statistics.median(wall):>10.1f}{1e3 * cpu:>12.1f}{busy:>28}")
    # what litllm's commands pick for each compiled step (`pick_compiled_threads`, at torch's thread budget)
    picks = {spec: pick_compiled_threads(engines[(spec, max(args.threads))]) for spec in args.quantize}
    print(f"pick_compiled_threads (budget {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{spec} {n}" for spec, n in picks.items()))


if __name__ == "__main__":
    main()
