"""Check a GGUF export in llama.cpp itself against litllm: tokenizer ids and text, greedy tokens, prompt logits.

The llama.cpp tests of tests/test_gguf.py use these helpers on tiny models; run it as a script on your own
model folder (needs `pip install llama-cpp-python`):

    python tests/llama_cpp_check.py checkpoints/meta-llama/Llama-3.2-1B-Instruct --outtype f16
    python tests/llama_cpp_check.py out/lora/final --gguf model.gguf      # an existing export

It prints one line per check and exits 1 if llama.cpp and litllm disagree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

STRINGS = [
    "Hello world", " leading space", "two  spaces and\ttab", "digits 1234567 3.14159 -42",
    "café naïve 東京 🙂", "line\nbreak\n\n  indented", "it's we'll THEY'RE", "",
]


def llama_cpp_model(path: Path, lora: Path | None = None, n_ctx: int = 64):
    """llama.cpp on the file as benchmarks/gguf.py loads it: without its extra weight buffers (llama.cpp's AMX
    repack of q8_0/q4_0 weights segfaults on a prompt in llama-cpp-python 0.3.36 on AMX CPUs; the check is of the
    file, which its plain CPU kernels read as well)."""
    import importlib.util

    # by path: benchmarks/gguf.py would shadow the `gguf` package on sys.path
    spec = importlib.util.spec_from_file_location("gguf_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gguf.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.llama_cpp_model(path, n_ctx, 2, logits_all=True, seed=0, lora_path=str(lora) if lora else None)


def litllm_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """`litllm generate`'s engine, greedy."""
    from litllm.engine import generate_ids
    from litllm.model import GPT

    return generate_ids(GPT.from_checkpoint(folder).eval(), prompt_ids, n)


def llama_cpp_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from llama.cpp (the argmax of its logits, one token per step; no stop token)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def llama_cpp_detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own `llama_detokenize` (Llama.detokenize joins pieces and keeps SentencePiece's leading space)."""
    import ctypes

    import llama_cpp

    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64
    while True:  # a negative result is the size it needs
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buf, size, False, False)
        if n >= 0:
            return buf.raw[:n].decode()
        size = -n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="the litllm model folder")
    parser.add_argument("--gguf", type=Path, default=None, help="an existing export (default: export one now)")
    parser.add_argument("--outtype", default="f16")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args()
    import torch

    from litllm.gguf_export import convert_to_gguf
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer

    path = args.gguf
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="litllm-gguf-check-")) / f"model-{args.outtype}.gguf"
        convert_to_gguf(args.checkpoint_dir, path, outtype=args.outtype)
    tok = Tokenizer(args.checkpoint_dir)
    prompt = tok.encode(args.prompt).tolist()
    llm = llama_cpp_model(path, n_ctx=len(prompt) + args.new_tokens + 8)
    failures = 0
    for text in STRINGS:
        ids = tok.encode(text, bos=False).tolist()
        same = llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        same = same and llama_cpp_detokenize(llm, ids) == tok.decode(ids)
        failures += not same
        print(f"{'ok  ' if same else 'DIFF'} tokenizer {text!r}")
    ours, theirs = litllm_greedy(args.checkpoint_dir, prompt, args.new_tokens), llama_cpp_greedy(llm, prompt, args.new_tokens)
    failures += ours != theirs
    print(f"{'ok  ' if ours == theirs else 'DIFF'} greedy tokens: litllm {tok.decode(ours)!r}, llama.cpp {tok.decode(theirs)!r}")
    llm.reset()
    llm.eval(prompt)
    with torch.no_grad():
        want = GPT.from_checkpoint(args.checkpoint_dir).eval()(torch.tensor([prompt]))[0].float()
    diff = (torch.from_numpy(llm.scores[: len(prompt)].copy()) - want).abs().max().item()
    print(f"info prompt logits: largest difference {diff:.2e} ({args.outtype} in llama.cpp vs litllm's fp32)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
