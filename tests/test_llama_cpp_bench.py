"""The llama.cpp side of benchmarks/gguf.py and benchmarks/generate.py (one loader and greedy loop, gguf.py's):
its greedy tokens are llama.cpp's real ones, and its `+repack` rows (llama.cpp's extra AMX/repacked weight
buffers, fed one row per eval) decode what the plain rows decode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A benchmarks/ script as a module (by path: benchmarks/gguf.py would shadow the `gguf` package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see tutorials/deploy.md)")
    from litllm.gguf_export import convert_to_gguf

    out = tmp_path_factory.mktemp("gguf")
    for outtype in ("f32", "q8_0"):
        convert_to_gguf(tiny_checkpoint, out / f"{outtype}.gguf", outtype=outtype)
    return {outtype: out / f"{outtype}.gguf" for outtype in ("f32", "q8_0")}


def test_benchmark_greedy_is_llama_cpps_and_litllms(tiny_checkpoint, exports):
    """gguf.py's greedy loop reads the logits llama.cpp computed (llama-cpp-python 0.3 leaves `scores` empty
    without logits_all): on the f32 export it gives litllm's greedy tokens, the prompt whole or one row at a time."""
    from litllm.engine import generate_ids
    from litllm.model import GPT

    bench = load_benchmark("gguf")
    prompt = [5, 17, 42, 99, 7, 3]
    want = generate_ids(GPT.from_checkpoint(tiny_checkpoint).eval(), prompt, 10)
    llm = bench.llama_cpp_model(exports["f32"], 32, 1)
    assert bench.llama_cpp_greedy(llm, prompt, 10) == want
    assert bench.llama_cpp_greedy(llm, prompt, 10, one_row=True) == want


def test_repacked_rows_decode_as_the_plain_rows(tiny_checkpoint, exports):
    """generate.py's `q8_0+repack` row (llama.cpp's extra buffers, one row per eval) and its plain `q8_0` row
    decode the same tokens from the same file; the row names and bytes per token follow `--llama_cpp`."""
    import gguf

    generate = load_benchmark("generate")
    folder = exports["q8_0"].parent
    (folder / "model-q8_0.gguf").write_bytes(exports["q8_0"].read_bytes())  # gguf_rows' name for the export
    rows = generate.gguf_rows(tiny_checkpoint, folder, ["q8_0", "q8_0+repack"], 32, 1)
    assert list(rows) == ["llama.cpp q8_0", "llama.cpp q8_0+repack"]
    stored = sum(t.n_bytes for t in gguf.GGUFReader(exports["q8_0"]).tensors if t.name != "token_embd.weight")
    assert rows["llama.cpp q8_0"][1] == rows["llama.cpp q8_0+repack"][1] == stored
    prompt = [5, 17, 42, 99, 7, 3]
    (plain, _), (repacked, _) = rows.values()
    assert repacked(prompt, 10) == plain(prompt, 10)


def test_llama_cpps_own_q8_0_export_decodes_as_litllms(tiny_checkpoint, exports, tmp_path):
    """llama.cpp's `convert_hf_to_gguf.py --outtype q8_0` on the same HF model and `litllm convert_to_gguf`'s q8_0
    decode the same greedy tokens in llama.cpp, plain and repacked (where LLAMA_CPP_SRC names llama.cpp's sources,
    e.g. llama_cpp_python-*/vendor/llama.cpp, as for test_gguf.py's converter test)."""
    import os
    import subprocess
    import sys

    from test_gguf import CONVERTER

    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set LLAMA_CPP_SRC to llama.cpp's source folder (convert_hf_to_gguf.py) to compare with it")
    theirs = tmp_path / "llama_cpp-q8_0.gguf"
    converter = CONVERTER.replace('"--outtype", "f32"', '"--outtype", "q8_0"')
    assert converter != CONVERTER
    subprocess.run([sys.executable, "-c", converter, src, str(tiny_checkpoint), str(theirs)], check=True,
                   capture_output=True)
    bench = load_benchmark("gguf")
    prompt = [5, 17, 42, 99, 7, 3]
    for repack in (False, True):
        ours, reference = (bench.llama_cpp_greedy(bench.llama_cpp_model(path, 32, 1, repack=repack), prompt, 10,
                                                  one_row=repack) for path in (exports["q8_0"], theirs))
        assert ours == reference, repack


def test_benchmark_llama_cpp_prefills_on_the_threads_it_decodes_with(exports):
    """llama-cpp-python's `n_threads_batch` (the prompt's threads) defaults to every core whatever `n_threads` is:
    the benchmark sets both, so that a `--threads 1` prefill is one thread's on both sides (issue #27)."""
    llm = load_benchmark("gguf").llama_cpp_model(exports["f32"], 32, 1)
    assert (llm.n_threads, llm.n_threads_batch, llm.context_params.n_threads_batch) == (1, 1, 1)


def test_first_token_mark_is_the_prefill_alone(tiny_checkpoint):
    """generate.py's first-token time ends once the prefill has sampled the first token (the first Output, on an idle
    engine), before the decode step for the second (which counts among the n - 1 decode steps), with the CPU clock
    then (the decode steps' CPU time)."""
    import time

    from litllm.engine import Engine
    from litllm.model import GPT

    generate = load_benchmark("generate")
    prompt, n = [5, 17, 42, 99, 7, 3], 6
    with Engine(GPT.from_checkpoint(tiny_checkpoint).eval(), None, 1, 16) as engine:
        want = generate.greedy_tokens(engine, prompt, n)
        decodes = []
        decode = engine._decode
        engine._decode = lambda *args: decodes.append(time.perf_counter()) or decode(*args)
        marks = []
        assert generate.greedy_tokens(engine, prompt, n, marks) == want
    (first, steps, first_cpu), = marks
    assert steps == n - 1 == len(decodes)  # tokens 2..n, one decode step each
    assert first < decodes[0] and 0 < first_cpu <= time.process_time()  # the CPU clock marked too


def test_large_model_size_outgrows_the_cache_and_yields_to_explicit_sizes(monkeypatch):
    """generate.py's `--model_size large` sets a Llama whose int8 weights read per token (1 byte each) are 1.9x a
    260 MiB L3 cache (so every format's bound is DRAM's); explicit size flags win; without it the sizes are as before."""
    import sys

    generate = load_benchmark("generate")

    def parsed(*flags):
        monkeypatch.setattr(sys, "argv", ["generate.py", *flags])
        return generate.parse_args()

    default, large = parsed(), parsed("--model_size", "large")
    assert (default.n_layer, default.n_embd, default.intermediate_size) == (12, 768, 2048)
    per_layer = 4 * large.n_embd**2 + 3 * large.n_embd * large.intermediate_size  # q, k, v, o; gate, up, down
    read_per_token = large.n_layer * per_layer + large.vocab_size * large.n_embd  # the head; the embedding: one row
    assert read_per_token > 1.9 * 260 * 2**20
    assert parsed("--n_layer", "2", "--model_size", "large").n_layer == 2
    assert parsed("--model_size", "large", "--n_embd", "64").n_embd == 64
