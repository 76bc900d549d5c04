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
