"""Time to the first token (the prompt's prefill and the first greedy token), litllm beside llama.cpp, per format.

On benchmarks/generate.py's random Llama (~134M parameters, kept under the temp dir as benchmarks/decode_threads.py
keeps it), a `--prompt_tokens` prompt, batch 1, `--threads` threads on both sides (llama.cpp's prompt threads too,
`n_threads_batch`): litllm's engine prefills as a run's first `step()` does, up to the first token (no decode step),
with each format's weights laid out as the eager step takes them (`optimize_for_decoding`) and as a compiled run's
engine holds them (`litllm.compile_decode.unpack_weights`: 16-bit `OneRowLinear`s upcast to fp32 per call on AVX2,
int8 layers' plain weights; the prefill itself is eager in both); llama.cpp evaluates the whole prompt from an empty
context (`reset`, then one `eval`) and takes the last row's argmax. Every row alternates `--repeats` times in one
process; best and median wall ms and median CPU ms (this process's, llama.cpp's threads included) are printed, the
CPU time being what a loaded machine disturbs least. The first tokens of all rows are checked against fp32's.

    python benchmarks/prefill.py                         # 2 threads (torch's default here), 32-token prompt
    python benchmarks/prefill.py --threads 1 --repeats 9
    python benchmarks/prefill.py --compare_gemm          # each litllm row with the other prompt GEMM too (oneDNN, MKL)
    python benchmarks/prefill.py --formats int8dq int8wo --compare_int8_prompt  # int8 rows: the op vs an fp32 GEMM
    python benchmarks/prefill.py --formats bf16 --row_major_bf16   # the compiled layout's packed bf16 vs row-major
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, as litllm's commands)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, add_tokenizer, gguf_bench, gguf_rows, greedy_tokens, kept_checkpoint  # noqa: E402

FORMATS = {"fp32": ("none", "32-true", "f32"), "bf16": ("none", "bf16-true", "f16"),
           "int8dq": ("torchao.int8dq", "32-true", "q8_0"), "int8wo": ("torchao.int8wo", "32-true", "q8_0")}
"""format -> (litllm --quantize mode, precision, llama.cpp outtype)."""


def with_env(name: str, value: str, call):
    """`call` with the environment variable `name` set to `value` (restored after each call)."""
    def run(prompt: list[int]) -> int:
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return call(prompt)
        finally:
            os.environ.pop(name) if before is None else os.environ.__setitem__(name, before)
    return run


def with_prompt_gemm(gemm: str, call):
    """`call` with `litllm.cpu_layout.prompt_gemm` forced to `gemm` ("blas": `F.linear`, "onednn")."""
    from litllm.cpu_layout import PROMPT_GEMM_ENV

    return with_env(PROMPT_GEMM_ENV, gemm, call)


def litllm_rows(folder: Path, fmt: str, length: int, threads: int, other_gemm: Optional[str] = None,
                int8_gemm: bool = False, row_major_bf16: bool = False, forced_layout: Optional[str] = None) -> dict:
    from litllm.compile_decode import unpack_weights
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine
    from litllm.inference import load_for_inference
    from litllm.packed_bf16 import PACKED_BF16_ENV

    mode, precision, _ = FORMATS[fmt]
    rows = {}
    layouts = ("eager", "compiled") + (("compiled, row-major",) if row_major_bf16 and fmt == "bf16" else ())
    eager_layout = None
    for layout in layouts:
        model = load_for_inference(folder, precision=precision, quantize=None if mode == "none" else mode)
        eager_layout = optimize_for_decoding(model, layout=eager_layout or forced_layout)  # timed once per format
        if layout == "compiled":
            unpack_weights(model)
        elif layout == "compiled, row-major":  # as before litllm.packed_bf16.BlockedBf16Linear: OneRowLinears
            os.environ[PACKED_BF16_ENV] = "0"
            try:
                unpack_weights(model)
            finally:
                os.environ.pop(PACKED_BF16_ENV)
        engine = Engine(model, None, 1, length, threads=threads)
        name = f"litllm {fmt} ({layout} layout{f': {eager_layout}' if layout == 'eager' else ''})"
        rows[name] = lambda prompt, e=engine: greedy_tokens(e, prompt, 1)[0]
        if other_gemm:
            rows[f"{name[:-1]}, {other_gemm})"] = with_prompt_gemm(other_gemm, rows[name])
        if int8_gemm and mode.startswith("torchao.int8"):
            from litllm.cpu_ops import INT8_PROMPT_ENV

            rows[f"{name[:-1]}, fp32 GEMM)"] = with_env(INT8_PROMPT_ENV, "0", rows[name])
    return rows


def llama_cpp_row(folder: Path, outtype: str, length: int, threads: int):
    import numpy as np

    gguf_rows(folder, folder / "gguf", [outtype], length, threads)  # exports the file once
    llm = gguf_bench().llama_cpp_model(folder / "gguf" / f"model-{outtype}.gguf", length, threads)

    def first(prompt: list[int]) -> int:
        llm.reset()  # eval then drops every cached position: the whole prompt is evaluated again
        llm.eval(prompt)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="both sides (default: torch's thread count)")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--layout", default=None, help="the eager layout (`optimize_for_decoding`'s `layout`, e.g. "
                        "onednn-packed) instead of timing one: on a loaded machine the timed pick varies")
    parser.add_argument("--row_major_bf16", action="store_true", help="a bf16 row of the compiled layout as it was "
                        "before oneDNN-packed `BlockedBf16Linear`s: row-major `OneRowLinear`s "
                        "(`$LITLLM_PACKED_BF16=0`)")
    parser.add_argument("--compare_gemm", action="store_true",
                        help="a row of each litllm row with the other prompt GEMM (`litllm.cpu_layout.prompt_gemm`)")
    parser.add_argument("--compare_int8_prompt", action="store_true",
                        help="a row of each litllm int8 row with its prompt's fp32 GEMM on weights converted per "
                             "call (`LITLLM_INT8_PROMPT=0`), not litllm's multi-row int8 op (`int8_prompt_op`)")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    folder = kept_checkpoint(args)
    if not (folder / "tokenizer.json").is_file():
        add_tokenizer(folder)
    prompt = torch.randint(0, 2000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    length = len(prompt) + 8
    from litllm.cpu_layout import prompt_gemm

    gemm = prompt_gemm()
    other = {"onednn": "blas", "blas": "onednn"}[gemm] if args.compare_gemm else None
    if any(fmt.startswith("int8") for fmt in args.formats):
        from litllm.cpu_ops import row_split_op

        row_split_op()  # the op library (int8 prompts' op, `int8_prompt_op`) built first where it is not there yet
    calls = {}
    for fmt in args.formats:
        calls.update(litllm_rows(folder, fmt, length, threads, other, int8_gemm=args.compare_int8_prompt,
                                 row_major_bf16=args.row_major_bf16, forced_layout=args.layout))
    try:
        import llama_cpp  # noqa: F401

        for outtype in dict.fromkeys(FORMATS[fmt][2] for fmt in args.formats):
            calls[f"llama.cpp {outtype}"] = llama_cpp_row(folder, outtype, length, threads)
    except ImportError:
        print("llama_cpp is not importable (pip install llama-cpp-python): no llama.cpp rows")
    firsts = {name: call(prompt) for name, call in calls.items()}  # warm-up
    for _ in range(2):
        for call in calls.values():
            call(prompt)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            w0, c0 = time.perf_counter(), time.process_time()
            call(prompt)
            runs[name].append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
    reference = next(iter(firsts.values()))
    print(f"{len(prompt)}-token prompt, {threads} thread(s) on both sides, best of {args.repeats}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; first token = the first row's: "
          + ", ".join(f"{name}: {firsts[name] == reference}" for name in calls) + f"; litllm's prompt GEMM: {gemm}")
    print(f"{'':44s}{'wall ms best':>13s}{'median':>8s}{'CPU ms median':>15s}")
    for name, times in runs.items():
        wall, cpu = sorted(w for w, _ in times), statistics.median(c for _, c in times)
        print(f"{name:44s}{wall[0]:13.1f}{statistics.median(wall):8.1f}{cpu:15.1f}")


if __name__ == "__main__":
    main()
