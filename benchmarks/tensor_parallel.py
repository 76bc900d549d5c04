"""Tensor-parallel decoding (`--devices N`) beside one device, in one process run: tokens/s, weights and KV
cache per device, and whether both give the same greedy tokens.

The model is a random-weight Llama (benchmarks/generate.py's `build_checkpoint`, with the tests' small BPE
tokenizer; nothing downloaded). This
process is rank 0 of the N-rank run (`LLM.load(devices=N)`: it starts ranks 1..N-1 itself) and also holds
the one-device model; the two alternate `--repeats` times and the medians are printed with their ratio.

    python benchmarks/tensor_parallel.py --device cuda --devices 2 --precision bf16-true   # a >= 2-GPU machine
    python benchmarks/tensor_parallel.py --device cpu --devices 2 --n_layer 4 --new_tokens 16   # the code path

On GPUs tensor parallelism pays off when a step's weight reads dominate its all-reduces (large models, few
rows); on a CPU over gloo the ranks share the same memory bandwidth and each all-reduce costs milliseconds,
so there it only shows the memory split, never a speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import train_bpe_tokenizer  # noqa: E402  (a small BPE tokenizer trained on the spot)
from generate import add_model_args, build_checkpoint  # noqa: E402


def decode_rate(llm, prompt: str, new_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    text = llm.generate(prompt, max_new_tokens=new_tokens, apply_prompt_style=False)
    return new_tokens / (time.perf_counter() - t0), text


def main() -> None:
    from litllm import LLM
    from litllm.engine import Engine
    from litllm.parallel.plan import local_bytes
    from litllm.parallel.runtime import size_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_model_args(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_checkpoint(folder, args)
        train_bpe_tokenizer(folder)
        one = LLM.load(folder, device=args.device, precision=args.precision)
        sharded = LLM.load(folder, device=args.device, precision=args.precision, devices=args.devices)
        prompt = "The quick brown fox jumps over the lazy dog. " * 4
        rates: dict[str, list[float]] = {"1 device": [], f"{args.devices} devices": []}
        texts = {}
        decode_rate(one, prompt, 4), decode_rate(sharded, prompt, 4)  # warm-up
        for _ in range(args.repeats):
            for name, llm in (("1 device", one), (f"{args.devices} devices", sharded)):
                rate, texts[name] = decode_rate(llm, prompt, args.new_tokens)
                rates[name].append(rate)
        held = {}
        for name, llm in (("1 device", one), (f"{args.devices} devices", sharded)):
            with Engine(llm.model, llm.tokenizer, 1, 2048):
                held[name] = local_bytes(llm.model)
    base = statistics.median(rates["1 device"])
    for name, values in rates.items():
        rate = statistics.median(values)
        b = held[name]
        print(f"tokens/s on {name}: {rate:.1f} (x{rate / base:.2f}), weights per device {size_text(b['weights'])} "
              f"(x{b['weights'] / held['1 device']['weights']:.2f}), KV cache (1 x 2048) per device "
              f"{size_text(b['kv_cache'])} (x{b['kv_cache'] / held['1 device']['kv_cache']:.2f})")
    print(f"tokens/s check: the same greedy tokens on 1 and {args.devices} devices: {len(set(texts.values())) == 1}")


if __name__ == "__main__":
    main()
