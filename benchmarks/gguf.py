"""GGUF export and llama.cpp decoding: `litllm convert_to_gguf` against llama.cpp's own `convert_hf_to_gguf.py`
on the same model, then decode tokens/s of the exported files in llama.cpp beside litllm's engine.

The model is a random Llama (~90M parameters by default, fp32 safetensors) with a small trained
SentencePiece-style tokenizer (tests/tiny_checkpoints.py), saved as a HF folder and converted to litllm. Each
export runs in a fresh process that prints its own peak RSS; llama.cpp's converter is the script
vendored in llama-cpp-python's source distribution:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    python benchmarks/gguf.py --llama_cpp_src llama_cpp_python-*/vendor/llama.cpp

Decoding: a short prompt, then `--new_tokens` greedy tokens, batch 1, `--threads` threads on both sides
(default 1: on a shared machine llama.cpp's spinning OpenMP threads slow it tenfold at 2), prompt included in
the time; litllm runs as `litllm generate` does (its engine and decode weight layout), fp32. With
`--llama_cpp_src`, llama.cpp's own export of each format decodes too and must give the same greedy tokens. Without
`llama_cpp` importable (pip install llama-cpp-python), the decode rows are skipped. The table is printed
at the end; a shared machine makes every figure noisy (best of `--repeats` runs is shown).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
MAKE = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from tiny_checkpoints import train_bpe_tokenizer
from litllm.convert import convert_to_litllm
from tokenizers import Tokenizer
folder, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from pathlib import Path
from typing import Optional
train_bpe_tokenizer(Path(folder), vocab_size=2000, byte_fallback=True)
n_vocab = Tokenizer.from_file(folder + "/tokenizer.json").get_vocab_size()
config = transformers.LlamaConfig(vocab_size=n_vocab, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
                                  num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 128,
                                  max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
torch.manual_seed(0)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(config)
model.save_pretrained(folder)
# the litllm folder: the same files converted (without HF's weights, which convert_hf_to_gguf would also read)
import shutil
lit = sys.argv[4]
shutil.copytree(folder, lit)
convert_to_litllm(lit)
Path(lit, "model.safetensors").unlink()
"""
PEAK = "\nimport resource; print('PEAK_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
LITLLM_EXPORT = """
import sys
from litllm.gguf_export import convert_to_gguf
convert_to_gguf(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
"""
LLAMA_CPP_EXPORT = """
import os, runpy, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))  # its `conversion` package
sys.argv = [script, sys.argv[2], "--outfile", sys.argv[3], "--outtype", sys.argv[4]]
runpy.run_path(script, run_name="__main__")
"""


def run_job(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `code` in a fresh interpreter."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + PEAK, *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"job failed:\n{done.stderr[-3000:]}")
    peak = float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_MIB")))
    return seconds, peak


def litllm_decode(folder: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    from litllm.engine import generate_ids, threads_for
    from litllm.inference import load_for_decoding

    model, _ = load_for_decoding(folder, "cpu", "32-true")  # threads: --threads, as llama.cpp's
    with threads_for(threads):
        generate_ids(model, prompt, 4)  # warm-up
        t0 = time.perf_counter()
        out = generate_ids(model, prompt, new_tokens)
        seconds = time.perf_counter() - t0
    assert len(out) == new_tokens, "stopped early"
    return new_tokens / seconds


REPACK = "+repack"
"""An `--llama_cpp` outtype suffix (generate.py): llama.cpp with its extra weight buffers, one row per eval."""


def llama_cpp_model(path: Path, n_ctx: int, threads: int, repack: bool = False, **options):
    """A llama.cpp model, by default without its extra weight buffers (`use_extra_bufts`, llama.cpp's `--repack`:
    AMX / repacked weight layouts). In llama-cpp-python 0.3.36 built with GGML_NATIVE on this AMX CPU, the AMX
    buffer takes q8_0 (and q4_0) weights and its matmul of more than one row (a prompt) segfaults at the tile-config
    load (`ldtilecfg` in `ggml_backend_amx_mul_mat`), llama.cpp's own q8_0 file too; one row at a time it runs its
    avx512-vnni kernel, which works: `repack=True` models decode with `llama_cpp_greedy(..., one_row=True)`.
    `options`: more of `llama_cpp.Llama`'s arguments (`logits_all`, `lora_path`, ...; tests/llama_cpp_check.py)."""
    import llama_cpp
    import llama_cpp.llama

    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    try:
        # n_threads_batch (the prompt's threads) defaults to every core, whatever n_threads says: set both, so that
        # llama.cpp prefills on the thread count litllm gets too
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                               **options)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


def llama_cpp_greedy(llm, prompt: list[int], n: int, one_row: bool = False, marks: Optional[list] = None) -> list[int]:
    """n greedy tokens after `prompt`, one `eval` per new token (as litllm's engine decodes), from an empty
    context; `one_row`: the prompt one token per `eval` too (a repacked model, see `llama_cpp_model`). `marks`: gets
    (the clock once the prompt is in, the evals that follow, the CPU clock) appended (benchmarks/generate.py's `timed`)."""
    import numpy as np

    llm.reset()
    for chunk in ([[t] for t in prompt] if one_row else [prompt]):
        llm.eval(chunk)
    if marks is not None:
        marks.append((time.perf_counter(), n, time.process_time()))
    tokens = []
    for _ in range(n):
        # the last token's logits (without logits_all, llama-cpp-python 0.3 no longer copies them into `scores`)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tokens.append(int(np.argmax(logits)))
        llm.eval(tokens[-1:])
    return tokens


def llama_cpp_decode(path: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, list[int]]:
    """(tokens/s, the tokens) of a greedy generate in llama.cpp, prompt included (as `litllm_decode` times it)."""
    llm = llama_cpp_model(path, len(prompt) + new_tokens + 8, threads)
    llama_cpp_greedy(llm, prompt, 4)  # warm-up
    t0 = time.perf_counter()
    tokens = llama_cpp_greedy(llm, prompt, new_tokens)
    return new_tokens / (time.perf_counter() - t0), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama_cpp_src", type=Path, default=None, help="llama.cpp source folder (convert_hf_to_gguf.py)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="both sides; on a shared machine llama.cpp's spinning threads slow it badly at 2+")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--decode_only", action="store_true", help="reuse --workdir's exports; measure decoding only")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="litllm-gguf-bench-"))
    hf, model = work / "hf", work / "litllm"
    if not (model / "lit_model.safetensors").is_file():
        run_job(MAKE.format(tests=str(ROOT / "tests")), str(hf), str(args.layers), str(args.width), str(model))
    weights_mb = (hf / "model.safetensors").stat().st_size / 2**20
    print(f"model: {args.layers} layers x {args.width}, {weights_mb:.0f} MiB fp32 ({work})")

    rows = []
    for outtype in ("f32", "f16", "q8_0"):
        out = work / f"litllm-{outtype}.gguf"
        if args.decode_only:
            rows.append((outtype, out.stat().st_size / 2**20, None, None))
            continue
        lit = min(run_job(LITLLM_EXPORT, str(model), str(out), outtype) for _ in range(args.repeats))
        ref = None
        if args.llama_cpp_src:
            ref_out = work / f"llama_cpp-{outtype}.gguf"
            script = str(args.llama_cpp_src / "convert_hf_to_gguf.py")
            ref = min(run_job(LLAMA_CPP_EXPORT, script, str(hf), str(ref_out), outtype) for _ in range(args.repeats))
        rows.append((outtype, out.stat().st_size / 2**20, lit, ref))

    print("\nexport (best of %d; fresh process each; peak RSS includes the interpreter and imports)" % args.repeats)
    print(f"{'outtype':8} {'file MiB':>9} {'litllm s':>9} {'litllm MiB':>11} {'llama.cpp s':>12} {'llama.cpp MiB':>14} {'time ratio':>11} {'mem ratio':>10}")
    for outtype, size, lit, ref in rows if not args.decode_only else []:
        (ls, lm), (rs, rm) = lit, ref if ref else (float("nan"), float("nan"))
        print(f"{outtype:8} {size:9.1f} {ls:9.1f} {lm:11.0f} {rs:12.1f} {rm:14.0f} {ls / rs:11.2f} {lm / rm:10.2f}")

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama_cpp doesn't import: decode rows skipped (pip install llama-cpp-python)")
        return
    from litllm.tokenizer import Tokenizer

    prompt = Tokenizer(model).encode("The quick brown fox jumps over the lazy dog. Pack my box")[:16].tolist()
    print(f"\ndecode tokens/s ({args.new_tokens} greedy tokens after a {len(prompt)}-token prompt, "
          f"{args.threads} threads, best of {args.repeats})")
    lit_tps = max(litllm_decode(model, prompt, args.new_tokens, args.threads) for _ in range(args.repeats))
    print(f"{'litllm generate (fp32)':28} {lit_tps:8.1f}")
    for outtype, size, _, _ in rows:
        runs = [llama_cpp_decode(work / f"litllm-{outtype}.gguf", prompt, args.new_tokens, args.threads)
                for _ in range(args.repeats)]
        tps, tokens = max(runs)
        line = f"{'llama.cpp ' + outtype + f' ({size:.0f} MiB)':28} {tps:8.1f}   x{tps / lit_tps:.2f} litllm"
        theirs = work / f"llama_cpp-{outtype}.gguf"  # llama.cpp's own export of the same model
        if theirs.is_file():
            same = llama_cpp_decode(theirs, prompt, args.new_tokens, args.threads)[1] == tokens
            line += f"; llama.cpp's own {outtype} export: {'the same' if same else 'OTHER'} greedy tokens"
        print(line)


if __name__ == "__main__":
    main()
