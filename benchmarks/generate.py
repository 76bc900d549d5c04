"""Greedy decoding speed: litllm vs transformers `generate`, side by side, and the memory-bandwidth bound.

Both run the same converted model (a ~125M-parameter Llama with random weights, fp32, batch 1, KV
cache), the same prompt and the same number of new tokens. Decoding one token reads every weight
once (the embedding only reads one row), so tokens/s can't exceed
    measured read bandwidth / bytes of weights read per token;
the script measures this machine's read bandwidth itself and prints each side's fraction of that bound.

    python benchmarks/generate.py                      # defaults: 32-token prompt, 128 new tokens
    python benchmarks/generate.py --threads 1          # both sides on one thread
    python benchmarks/generate.py --n_layer 4 --new_tokens 32   # a quick run
    python benchmarks/generate.py --model_size large --no_transformers --quantize none@bf16-true torchao.int8wo
        # ~594M parameters: every format's weights (int8 ~530 MB) outgrow a 260 MiB L3, so each reads from DRAM
    python benchmarks/generate.py --no_compile --quantize torchao.int8wo torchao.int4wo@bf16-true none@bf16-true
    python benchmarks/generate.py --cache_length 4096 --quantize none@bf16-true torchao.int8wo --llama_cpp f16 q8_0
        # litllm's engines and llama.cpp's context at `litllm chat`'s 4096-position window

litllm runs as `litllm generate` does: on its decode engine (`litllm.engine.Engine`, one row), with the
faster CPU weight layout and thread count for decoding (`optimize_for_decoding`, `pick_decode_threads`);
transformers runs with torch's defaults. `litllm compiled` is the same engine with its decode step
`torch.compile`d (static shapes, no host sync in the step; `--no_compile` skips it).
`--quantize MODE[@PRECISION] ...` adds a litllm row per entry, loaded as `litllm generate --quantize MODE
--precision PRECISION` loads (`none` = unquantized, default precision 32-true); its bound counts the bytes
its quantized weights really hold (packed values, scales, zero points); `ROW:KERNEL` loads and compiles the row on
another kernel (`kernel_environment`: `torchao.int4wo@bf16-true:torch`, `torchao.int8wo:rows`).
litllm is imported before torch, as its commands do, so OpenMP's spin-wait is bounded (`litllm.bound_omp_spin`) for
every row, llama.cpp's too (its ggml runs on the same libgomp); `GOMP_SPINCOUNT=300000` restores GNU OpenMP's default.
Figures on a shared machine are noisy: the two alternate `--repeats` times; best and median runs
are shown, and tokens per CPU-second (less sensitive to other processes). The main table's tokens/s are new tokens
over the whole call, the prompt's prefill included; a second table splits each litllm and llama.cpp row into its
time to the first token (the prefill) and its decode steps alone (the tokens/s to set beside the compiled step
alone, benchmarks/decode_threads.py; the per-token budget of the engine around it: benchmarks/engine_overhead.py),
and the last table gives both sides' decode tokens/s and their ratio too.

Beside llama.cpp (`--llama_cpp f32 f16 q8_0 q8_0+repack`, the default when `llama_cpp` is importable:
llama-cpp-python built from source): the same model exported with `litllm convert_to_gguf` in each format decodes
greedily, one token per `eval` as litllm's engine does, on the threads litllm picked, in the same alternation.
Plain rows run without llama.cpp's extra weight buffers; `OUTTYPE+repack` rows with them (llama.cpp's default,
`--repack`: on this AMX CPU its AMX layout, whose multi-row matmul crashes this build, so those rows evaluate the
prompt one token at a time too; see benchmarks/gguf.py). Each row's bound counts the bytes its format holds; the
last table pairs each litllm format with llama.cpp's (fp32 / f32, bf16 / f16, torchao.int8wo / q8_0,
torchao.int8dq / q8_0, torchao.int4wo@bf16-true / q4_0), from the fastest row of each side (eager or compiled, plain or +repack).
`--startup`: time to the first token of `litllm generate` (a fresh process: import, load, compile) with
`--compile true` and an empty compile cache (it compiles the step and saves it), with the default `--compile` and
the saved step there (a short run loads it by default), with `--compile false`, and with inductor's kernels cached
but no saved step (compiled again); wall and CPU seconds, medians (the two fast rows alternate `--repeats` rounds).
`--speculative`: runs benchmarks/speculative.py (a 12-layer target, a 2-layer draft trained briefly on its
outputs) and prints its rows.

    python benchmarks/generate.py --quantize none@bf16-true torchao.int8wo --startup --speculative
    python benchmarks/generate.py --startup_only --repeats 2     # the start-up rows alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import litllm  # noqa: F401  (before torch, as litllm's commands: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch


def read_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 7, device: str = "cpu", clock=time.perf_counter) -> float:
    """Bytes/s at which this machine (or GPU) reads memory with torch's threads (a sum over a tensor larger than
    caches); the median of `repeats` timings, so one lucky or disturbed run doesn't decide it. `clock=time.process_time`:
    bytes per CPU-second of this process instead (on a loaded machine, what the cores read while they ran)."""
    x = torch.rand(n_bytes // 4, dtype=torch.float32, device=device)
    x.sum()  # touch the pages
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        x.sum()
        sync()
        times.append(clock() - t0)
    return n_bytes / statistics.median(times)


def build_checkpoint(folder: Path, args) -> int:
    """Save a random HF Llama and convert it; return the bytes of weights one decode step reads."""
    import transformers

    from litllm.convert import convert_to_litllm

    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.n_embd, num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head, num_key_value_heads=args.n_head, intermediate_size=args.intermediate_size,
        max_position_embeddings=getattr(args, "context_window", 2048), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    convert_to_litllm(folder)
    n_params = sum(p.numel() for p in model.parameters())
    per_token = n_params - model.model.embed_tokens.weight.numel()  # the embedding lookup reads one row
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters, {args.n_layer} layers, n_embd {args.n_embd}, fp32")
    return per_token * 4


def kept_checkpoint(args, folder: Optional[Path] = None) -> Path:
    """`folder`, else a folder per model size under the system's temp dir (benchmarks/decode_threads.py's), holding
    `build_checkpoint`'s model: built on the first call, reused afterwards."""
    folder = folder or Path(tempfile.gettempdir()) / f"litllm_decode_threads_{args.n_layer}x{args.n_embd}"
    if not any(folder.glob("lit_model.*")):
        folder.mkdir(parents=True, exist_ok=True)
        build_checkpoint(folder, args)
    return folder


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The size of the Llama `build_checkpoint` makes (default: ~134M parameters)."""
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--intermediate_size", type=int, default=2048)
    parser.add_argument("--vocab_size", type=int, default=32000)


def add_tokenizer(folder: Path) -> None:
    """A small trained SentencePiece-style tokenizer in the folder (tests/tiny_checkpoints.py's), for `litllm
    generate` and the GGUF export (llama.cpp pads the vocabulary up to the model's embedding rows)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_checkpoints import train_bpe_tokenizer

    train_bpe_tokenizer(folder, vocab_size=2000, byte_fallback=True)


def gguf_bench():
    """benchmarks/gguf.py, which owns the llama.cpp loader and greedy loop, as a module (imported by path: on
    sys.path its name would shadow the `gguf` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gguf_bench", Path(__file__).resolve().parent / "gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gguf_package():
    """The `gguf` package (imported once, so `litllm.gguf_export` finds it too), not benchmarks/gguf.py, which a
    script of this folder has on sys.path under the same name."""
    import sys

    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # benchmarks/gguf.py would shadow it
    try:
        import gguf
    finally:
        sys.path[:] = saved
    return gguf


def gguf_weight_bytes(path: Path) -> int:
    """Bytes a decode step reads from a GGUF file's weights (all but the embedding, of which it reads one row)."""
    return sum(t.n_bytes for t in gguf_package().GGUFReader(path).tensors if t.name != "token_embd.weight")


def gguf_rows(folder: Path, out: Path, outtypes: list[str], n_ctx: int, threads: int) -> dict:
    """{"llama.cpp q8_0": (greedy(prompt, n) -> tokens, bytes of weights read per token), ...} for each
    `--llama_cpp` entry; `OUTTYPE+repack`: llama.cpp with its extra weight buffers (AMX on this CPU), which crash
    a multi-row eval here, so it evaluates the prompt one token at a time (see gguf.py's `llama_cpp_model`)."""
    gguf_package()
    bench = gguf_bench()

    from litllm.gguf_export import convert_to_gguf

    rows = {}
    for spec in outtypes:
        outtype, repack = spec.removesuffix(bench.REPACK), spec.endswith(bench.REPACK)
        path = out / f"model-{outtype}.gguf"
        if not path.is_file():
            convert_to_gguf(folder, path, outtype=outtype)
        per_token = gguf_weight_bytes(path)
        llm = bench.llama_cpp_model(path, n_ctx, threads, repack=repack)
        greedy = (lambda prompt, n, marks=None, llm=llm, repack=repack:
                  bench.llama_cpp_greedy(llm, prompt, n, one_row=repack, marks=marks))
        rows[f"llama.cpp {spec}"] = (greedy, per_token)
    return rows


STARTUP_RUNS = (  # (row, --compile, remove the saved compiled steps first)
    ("compiled, empty cache (compiles, saves the step)", "true", False),
    ("default --compile, saved step (loads it)", None, False),
    ("eager (--compile false)", "false", False),
    ("compiled, no saved step, kernels cached (compiles again)", "true", True),
)


def startup_latency(folder: Path, repeats: int,
                    extra: tuple[str, ...] = ()) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds from starting `litllm generate` (1 new token; `extra`: more flags, e.g. `--devices 2`) to
    its exit, per run, in a fresh compile cache: compiled with it empty (the step compiles and is saved,
    `litllm.compile_decode`), with the default `--compile` and the saved step there (loaded by default), eager, and
    compiled with inductor's kernels cached but no saved step (compiled again). Rows that compile run once; the
    others alternate, `repeats` rounds."""
    import resource
    import shutil
    import subprocess
    import sys

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    from litllm.compile_decode import STEPS_FOLDER

    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in STARTUP_RUNS}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        env.pop("LITLLM_COMPILE", None)

        def run(name: str, compile: Optional[str], unsave: bool) -> None:
            if unsave:
                shutil.rmtree(Path(cache) / STEPS_FOLDER, ignore_errors=True)
            flag = [] if compile is None else ["--compile", compile]
            t0, c0 = time.perf_counter(), children_cpu()
            proc = subprocess.run([sys.executable, "-m", "litllm", "generate", str(folder), "--prompt", "Hello",
                                   "--max_new_tokens", "1", "--temperature", "0", "--precision", "32-true", *flag,
                                   *extra],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"the run '{name}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            times[name].append((time.perf_counter() - t0, children_cpu() - c0))
            if ("loads it" in name) != ("Loaded the saved compiled decode step" in proc.stderr):
                print(f"warning: the run '{name}' did {'not ' * ('loads it' in name)}load a saved step")

        compiling = [r for r in STARTUP_RUNS if "compiles" in r[0]]
        run(*compiling[0])
        for _ in range(repeats):  # alternating: the machine's load changes alike for each row
            for row in STARTUP_RUNS:
                if row not in compiling:
                    run(*row)
        for row in compiling[1:]:
            run(*row)
    return times


def print_startup(folder: Path, repeats: int, extra: tuple[str, ...] = ()) -> None:
    medians = {}
    for name, runs in startup_latency(folder, repeats, extra).items():
        medians[name] = wall, cpu = tuple(statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"litllm generate {' '.join(extra)}, 1 token, fresh process, {name}: {wall:.1f} s ({cpu:.1f} CPU-s), "
              f"median of {len(runs)}")
    (loaded_wall, loaded_cpu), (eager_wall, eager_cpu) = medians[STARTUP_RUNS[1][0]], medians[STARTUP_RUNS[2][0]]
    print(f"saved step loaded by default vs eager: {loaded_wall - eager_wall:+.2f} s "
          f"({loaded_cpu - eager_cpu:+.2f} CPU-s)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def linear_bytes(model) -> int:
    """Bytes of the model's Linear weights and biases as stored (a torchao tensor subclass: its inner tensors)."""
    from litllm.quantize import Int4RowsLinear, Int8DynamicLinear, Int8PackedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, (Int8DynamicLinear, Int4RowsLinear)):  # int8dq: packed weights opaque to Python
            total += module.stored_bytes
        elif isinstance(module, (torch.nn.Linear, Int8PackedLinear)):
            for t in (module.weight, module.bias, getattr(module, "scales", None)):
                if t is None:
                    continue
                inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
                total += sum(getattr(t, name).nbytes for name in inner) if inner else t.nbytes
    return total


def greedy_tokens(engine, prompt: list[int], n: int, marks: Optional[list] = None) -> list[int]:
    """The `n` tokens an engine (`litllm.engine.Engine`, greedy) generates after `prompt`. `marks`: gets (the clock
    once the first token is out, the decode steps that follow, the CPU clock) appended (`timed_split`)."""
    from litllm.engine import Request

    engine.add(Request(prompt, n))
    tokens = []
    while engine.has_unfinished:
        for out in engine.step():
            # the first step on an idle engine ends with the prefill's first token (as llama.cpp's row marks it), so
            # the n - 1 steps that follow are the decode steps, not part of the first token
            if marks is not None and not marks and out.token_ids:
                marks.append((time.perf_counter(), n - 1, time.process_time()))
            tokens += out.token_ids
    return tokens


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def timed_split(fn) -> tuple[float, float, Optional[float], Optional[float], Optional[float]]:
    """`timed` of one call `fn(marks)`, then the seconds to its first token, the seconds a decode step after it and
    the CPU seconds of this process a decode step after it, all three None where `fn` marks nothing (transformers'
    `generate`). The first token takes the prompt's prefill: a decode step's time is what to set beside the step alone
    (benchmarks/decode_threads.py)."""
    marks: list[tuple[float, int, float]] = []
    w0 = time.perf_counter()
    wall, cpu = timed(lambda: fn(marks))
    cpu_end = time.process_time()
    if not marks or marks[0][1] < 1:
        return wall, cpu, None, None, None
    (first, steps, first_cpu), = marks
    return wall, cpu, first - w0, (w0 + wall - first) / steps, (cpu_end - first_cpu) / steps


MODEL_SIZES = {
    "default": {},  # add_model_args' defaults: its int8 and bf16 weights fit a large L3 cache (260 MiB on some Xeons)
    # ~594M parameters, 528M read per token: int8 ~530 MB, bf16 ~1.06 GB, fp32 ~2.1 GB, 1.9x, 3.9x and 7.7x a 260 MiB
    # L3: every format reads its weights from DRAM, so its fraction of the bound says how close it runs to it
    "large": dict(n_layer=9, n_embd=2048, n_head=16, intermediate_size=5632),
}
"""`--model_size`: the Llama's size; explicit `--n_layer`... flags override its fields."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--model_size", choices=sorted(MODEL_SIZES), default="default",
                        help="large: ~594M parameters, every format's weights larger than a 260 MiB L3 cache")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_length", type=int, default=None,
                        help="KV-cache positions of litllm's engines and llama.cpp's n_ctx (default: the prompt and "
                             "new tokens; e.g. 4096, `litllm chat`'s whole window: what a long cache costs each)")
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled decode steps")
    parser.add_argument("--quantize", nargs="*", default=[], metavar="MODE[@PRECISION]",
                        help="extra litllm rows, e.g. torchao.int8wo torchao.int4wo@bf16-true none@bf16-true "
                             "(ROW:torch: int4wo on torch's kernel, loaded with LITLLM_INT4_ROWS=0; ROW:rows: int8's "
                             "compiled step on the row-major ops, LITLLM_INT8_PACKED=0; ROW:keep_head: the output head "
                             "left unquantized, as skip=('lm_head',) leaves it)")
    parser.add_argument("--llama_cpp", nargs="*", default=None, metavar="OUTTYPE",
                        help="llama.cpp rows (GGUF outtypes, OUTTYPE+repack: with llama.cpp's AMX/repacked weight "
                             "buffers; default f32 f16 q8_0 q8_0+repack when llama_cpp is importable)")
    parser.add_argument("--no_transformers", action="store_true", help="skip the transformers row")
    parser.add_argument("--startup", action="store_true", help="time `litllm generate`'s first token (compile cache)")
    parser.add_argument("--startup_only", action="store_true", help="only the --startup rows (no decode table)")
    parser.add_argument("--speculative", action="store_true", help="run benchmarks/speculative.py too")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp rows: CPU only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both (default: torch's choice; litllm may pick fewer, as its commands do)")
    args = parser.parse_args()
    parser.set_defaults(**MODEL_SIZES[args.model_size])  # the size's fields as defaults: explicit flags still win
    return parser.parse_args()


FORMATS = {"fp32": ("litllm", "f32"), "bf16": ("none@bf16-true", "f16"), "int8": ("torchao.int8wo", "q8_0"),
           "int8dq": ("torchao.int8dq", "q8_0"), "int4": ("torchao.int4wo@bf16-true", "q4_0")}
"""litllm's format -> (its row, llama.cpp's outtype of the same width; its `+repack` row too where it ran)."""


def load_rows(folder: Path, args, weight_bytes: int) -> tuple[dict, dict, str, Callable]:
    """({row: (model, threads)}, {row: bytes read per token}, fp32 layout, `load(row)`: another copy of a row's
    model, as loaded) for litllm fp32 and each --quantize."""
    from unittest import mock

    from litllm import quantize
    from litllm.inference import load_for_inference, pick_decode_threads
    from litllm.cpu_layout import optimize_for_decoding

    # the path `litllm generate` takes: load, pick the faster CPU weight layout and thread count
    def load(row: str):
        # `ROW:KERNEL`: another kernel's environment (`kernel_environment`); `ROW:keep_head`: the head unquantized
        row, _, variant = row.partition(":")
        mode, _, precision = ("none" if row == "litllm" else row).partition("@")
        heads = quantize.QUANTIZES_HEAD - {mode} if variant == "keep_head" else quantize.QUANTIZES_HEAD
        with (mock.patch.dict(os.environ, kernel_environment(variant)),  # restored after
              mock.patch.object(quantize, "QUANTIZES_HEAD", heads)):
            return load_for_inference(folder, device=args.device, precision=precision or "32-true",
                                      quantize=None if mode == "none" else mode)

    lit = load("litllm")
    fp32_linear_bytes = linear_bytes(lit)
    layout = optimize_for_decoding(lit)
    models = {"litllm": (lit, pick_decode_threads(lit))}
    row_bytes = {"transformers": weight_bytes, "litllm": weight_bytes}
    for spec in args.quantize:
        model = load(spec)
        row_bytes[spec] = weight_bytes - fp32_linear_bytes + linear_bytes(model)
        optimize_for_decoding(model)
        models[spec] = (model, pick_decode_threads(model))

    def load_optimized(row: str):
        model = load(row)
        optimize_for_decoding(model)
        return model

    return models, row_bytes, layout, load_optimized


def kernel_environment(kernel: str) -> dict[str, str]:
    """The environment a `--quantize ROW:KERNEL` row loads and compiles under: `torch`, int4wo on torch's kernel
    (`LITLLM_INT4_ROWS=0`); `rows`, int8's compiled step on the row-major ops (`LITLLM_INT8_PACKED=0`: as before the
    packed one), e.g. `torchao.int8wo:rows` beside `torchao.int8wo`, alternating in one run; `keep_head` changes no
    environment (its head is left unquantized by `load_rows`)."""
    from litllm.cpu_ops import INT4_ROWS_ENV, INT8_PACKED_ENV

    return {"": {}, "keep_head": {}, "torch": {INT4_ROWS_ENV: "0"}, "rows": {INT8_PACKED_ENV: "0"}}[kernel]


def make_engines(models: dict, row_bytes: dict, length: int, compile: bool, decode, reference, load) -> dict:
    """An engine per litllm row, and with `compile` a compiled twin ("<row> compiled", compiled here) on the thread
    count timed on its compiled step (`pick_compiled_threads`). The twin decodes its own copy of the model (`load`):
    a compiled engine swaps modules for its CPU layouts (`OneRowLinear`...), which would also change the eager row's."""
    from unittest import mock

    from litllm.compile_decode import pick_compiled_threads
    from litllm.engine import Engine

    engines = {}
    for name, (model, threads) in models.items():
        engines[name] = Engine(model, None, 1, length, threads=threads)
        tokens = decode(engines[name])  # warm-up; a quantized model may pick other tokens
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        print(f"{name}: the first {agree} of {len(reference)} greedy tokens equal the fp32 reference's")
        if compile:
            engines[name].close()
            twin = f"{name} compiled"
            t0 = time.perf_counter()
            with mock.patch.dict(os.environ, kernel_environment(name.partition(":")[2])):  # its layout: at compile
                engines[twin] = Engine(load(name), None, 1, length, threads=threads, compile=True)  # compiles or loads
            engines[twin].threads = pick_compiled_threads(engines[twin])  # as the commands do: timed compiled
            row_bytes[twin] = row_bytes[name]
            twin_tokens = decode(engines[twin])
            how = getattr(engines[twin], "step_source", "compiled")
            # a quantized step may round otherwise than the eager kernels (int8: tutorials/inference.md)
            twin_agree = next((i for i, (a, b) in enumerate(zip(twin_tokens, reference)) if a != b), len(reference))
            print(f"{twin}: the decode step ({how}) took {time.perf_counter() - t0:.0f} s, decodes on "
                  f"{engines[twin].threads} thread(s) (eager: {threads}); same tokens as eager: "
                  f"{twin_tokens == tokens}; the first {twin_agree} equal the fp32 reference's")
    return engines


def print_table(runs: dict, row_bytes: dict, bandwidth: float, n: int, cpu_bandwidth: float = None) -> dict[str, float]:
    """The tokens/s table; returns each row's best tokens/s. `cpu_bandwidth` (bytes per CPU-second, at litllm's
    thread count): adds each row's fraction of the bound per CPU-second, which a loaded machine disturbs less."""
    # best: the run least disturbed by other processes; per CPU-second: work efficiency, less sensitive to load
    width = max(14, *(len(name) + 2 for name in runs))
    print(f"{'':{width}s}{'tokens/s best':>14s}{'median':>8s}{'MB/token':>10s}{'of bound':>10s}{'tokens/CPU-s':>14s}"
          + (f"{'of bound/CPU-s':>16s}" if cpu_bandwidth else ""))
    best = {}
    for name, times in runs.items():
        walls = [w for w, *_ in times]
        best[name] = n / min(walls)
        per_cpu = n / min(c for _, c, *_ in times)
        of_bound = best[name] / (bandwidth / row_bytes[name])
        print(f"{name:{width}s}{best[name]:14.1f}{n / statistics.median(walls):8.1f}{row_bytes[name] / 1e6:10.0f}"
              f"{of_bound:10.0%}{per_cpu:14.1f}" + (f"{per_cpu * row_bytes[name] / cpu_bandwidth:16.0%}"
                                                    if cpu_bandwidth else ""))
    return best


def print_decode_split(runs: dict, row_bytes: dict, bandwidth: float, cpu_bandwidth: float = None) -> dict[str, float]:
    """Each row's time to its first token (the prompt's prefill; included in the table's tokens/s) and its decode steps
    alone (tokens/s of the steps after the first token: what compares with the step alone, decode_threads.py; with
    `cpu_bandwidth`, also their fraction of the bound per CPU-second, as `print_table`'s); returns each row's best
    decode tokens/s."""
    width = max(14, *(len(name) + 2 for name in runs))
    best = {}
    print(f"{'':{width}s}{'first token ms':>15s}{'decode tok/s best':>18s}{'median':>8s}{'of bound':>10s}"
          + (f"{'of bound/CPU-s':>16s}" if cpu_bandwidth else ""))
    for name, times in runs.items():
        steps = [t[3] for t in times if t[3] is not None]
        if steps:
            best[name] = decode = 1 / min(steps)
            per_cpu = 1 / min(t[4] for t in times if t[4] is not None)
            print(f"{name:{width}s}{1e3 * statistics.median(t[2] for t in times):15.1f}{decode:18.1f}"
                  f"{1 / statistics.median(steps):8.1f}{decode / (bandwidth / row_bytes[name]):10.0%}"
                  + (f"{per_cpu * row_bytes[name] / cpu_bandwidth:16.0%}" if cpu_bandwidth else ""))
    return best


def print_ratios(best: dict, row_bytes: dict, bandwidth: float, decode: Optional[dict] = None) -> None:
    """litllm / transformers, each extra row / litllm fp32, and litllm / llama.cpp per number format (with `decode`,
    each side's best decode tokens/s and their ratio too: the prefill left out)."""
    for name in best:
        if name.startswith("litllm") and "transformers" in best:
            print(f"{name} / transformers: {best[name] / best['transformers']:.2f}x (best runs)")
    print(f"{'format':8s}{'litllm row':>32s}{'tok/s':>8s}{'of bound':>10s}{'llama.cpp':>12s}{'tok/s':>8s}"
          f"{'of bound':>10s}{'litllm/llama.cpp':>18s}" + (f"{'decode tok/s':>14s}{'ratio':>7s}" if decode else ""))
    for fmt, (row, outtype) in FORMATS.items():
        candidates = [name for name in best if name in (row, f"{row} compiled")]
        if not candidates:
            continue
        mine = max(candidates, key=best.get)
        theirs = [name for name in best if name in (f"llama.cpp {outtype}", f"llama.cpp {outtype}+repack")]
        other = max(theirs, key=best.get) if theirs else f"llama.cpp {outtype}"
        outtype = other.removeprefix("llama.cpp ")
        line = f"{fmt:8s}{mine:>32s}{best[mine]:8.1f}{best[mine] * row_bytes[mine] / bandwidth:10.0%}"
        if other in best:
            line += (f"{outtype:>12s}{best[other]:8.1f}{best[other] * row_bytes[other] / bandwidth:10.0%}"
                     f"{best[mine] / best[other]:17.2f}x")
            if decode and mine in decode and other in decode:
                line += f"{decode[mine]:7.1f} /{decode[other]:6.1f}{decode[mine] / decode[other]:6.2f}x"
        else:
            line += f"{outtype:>12s}  (not run)"
        print(line)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llama_cpp is None and args.device != "cpu":
        print("llama.cpp rows: CPU only here (llama-cpp-python is built for the CPU): skipped")
        args.llama_cpp = []
    if args.llama_cpp is None:
        try:
            import llama_cpp  # noqa: F401

            args.llama_cpp = ["f32", "f16", "q8_0", "q8_0+repack"]
        except ImportError:
            print("llama_cpp is not importable (pip install llama-cpp-python): the llama.cpp rows are skipped")
            args.llama_cpp = []
    with tempfile.TemporaryDirectory() as tmp:
        run_all(Path(tmp), args)


def run_all(folder: Path, args) -> None:
    import transformers

    args.context_window = max(2048, args.cache_length or 0)  # (`build_checkpoint`'s window)
    weight_bytes = build_checkpoint(folder, args)
    add_tokenizer(folder)
    if args.startup_only:
        print_startup(folder, args.repeats)
        return
    prompt = torch.randint(0, 2000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    models, row_bytes, layout, load = load_rows(folder, args, weight_bytes)
    lit_threads = models["litllm"][1]

    def decode(engine):
        return greedy_tokens(engine, prompt, n)

    hf = None if args.no_transformers else transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32).to(args.device).eval()

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(torch.tensor([prompt], device=args.device),
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=args.device),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    from litllm.engine import Engine

    with Engine(models["litllm"][0], None, 1, len(prompt) + n, threads=lit_threads) as engine:
        reference = decode(engine)
    if hf is not None:
        print(f"litllm fp32 and transformers: same tokens: {run_hf() == reference}")
    length = args.cache_length or len(prompt) + n
    engines = make_engines(models, row_bytes, length, not args.no_compile, decode, reference, load)
    calls = {name: (lambda marks, e=engine: greedy_tokens(e, prompt, n, marks)) for name, engine in engines.items()}
    if hf is not None:
        calls = {"transformers": lambda marks: run_hf(), **calls}
    for name, (greedy, per_token) in gguf_rows(folder, folder / "gguf", args.llama_cpp,
                                               args.cache_length or len(prompt) + n + 8, lit_threads).items():
        row_bytes[name] = per_token
        tokens = greedy(prompt, n)  # warm-up
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), n)
        print(f"{name}: the first {agree} of {n} greedy tokens equal litllm fp32's")
        calls[name] = lambda marks, g=greedy: g(prompt, n, marks)
    bandwidth = read_bandwidth(device=args.device)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(args.repeats):  # alternate them so that load from other users of the machine hits all alike
        for name, call in calls.items():
            runs[name].append(timed_split(call))
    bandwidth = statistics.median([bandwidth, read_bandwidth(device=args.device), read_bandwidth(device=args.device)])
    cpu_bandwidth = None
    if args.device == "cpu":
        from litllm.engine import threads_for

        with threads_for(lit_threads):
            cpu_bandwidth = read_bandwidth(clock=time.process_time)
    print(f"device: {args.device}; threads: litllm {lit_threads} (picked), llama.cpp {lit_threads}, transformers {torch.get_num_threads()};"
          f" prompt {args.prompt_tokens} tokens, {n} new tokens, greedy, batch 1, KV cache {length} positions,"
          f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; litllm fp32 layout: {layout}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s; fp32 weights read per token: {weight_bytes / 1e6:.0f} MB"
          f" -> bound {bandwidth / weight_bytes:.1f} tokens/s")
    if cpu_bandwidth:
        print(f"read bandwidth per CPU-second ({lit_threads} thread(s)): {cpu_bandwidth / 1e9:.1f} GB -> bound "
              f"{cpu_bandwidth / weight_bytes:.1f} fp32 tokens per CPU-second")
    best = print_table(runs, row_bytes, bandwidth, n, cpu_bandwidth)
    print_ratios(best, row_bytes, bandwidth, print_decode_split(runs, row_bytes, bandwidth, cpu_bandwidth))
    if args.startup:
        print_startup(folder, args.repeats)
    if args.speculative:
        import subprocess
        import sys

        script = Path(__file__).resolve().parent / "speculative.py"
        extra = ["--threads", str(args.threads)] if args.threads else []
        subprocess.run([sys.executable, str(script), *extra], check=True)


if __name__ == "__main__":
    main()
