"""`litllm serve` under load: continuous batching vs one request at a time, and the batch-1 bandwidth bound.

A ~125M-parameter Llama (random weights, fp32) is served twice on this machine, first with
`--max_batch_size 16`, then with `--max_batch_size 1` (one request at a time, as LitGPT serves).
Each time 16 clients stream a completion at once, each from a prompt of a different length
(8 to 128 tokens) and each asking for 64 new tokens. Printed for both: aggregate tokens/s
(completion tokens of all clients / wall time from the first request to the last answer),
p50 / p99 time to first token, and their ratio. For scale, the memory-bandwidth bound of batch-1
decoding (measured read bandwidth / bytes of weights one token reads; see benchmarks/generate.py):
a server decoding one row at a time can't beat it, a batched one can.

    python benchmarks/serve.py                        # the default setting
    python benchmarks/serve.py --n_layer 4 --clients 8 --new_tokens 16   # a quick run
    python benchmarks/serve.py --device cuda --precision bf16-true       # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def _generate_benchmark():
    """benchmarks/generate.py as a module: its checkpoint builder and bandwidth probe are reused."""
    spec = importlib.util.spec_from_file_location("generate_benchmark", BENCHMARKS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one word per id and no EOS: the server needs a tokenizer to decode,
    and without EOS every answer has exactly the tokens it asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))


def start_server(folder: Path, batch: int, args, log) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "litllm", "serve", str(folder), "--port", "0", "--max_batch_size", str(batch),
           "--max_queue", str(args.clients), "--max_seq_length", str(args.max_seq_length)]
    if args.device:
        cmd += ["--device", args.device]
    if args.precision:
        cmd += ["--precision", args.precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if line.startswith("Serving "):
            return proc, line.split(" at ")[1].split()[0]
    raise SystemExit(f"the server did not start (see {log.name})")


def stream_one(url: str, prompt: list[int], new_tokens: int, result: dict) -> None:
    """One client: stream a completion; record time to first token, end time and completion tokens."""
    import httpx

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    result["start"] = time.perf_counter()
    with httpx.stream("POST", url + "/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and "first" not in result:
                result["first"] = time.perf_counter()
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
    result["end"] = time.perf_counter()


def run_clients(url: str, prompts: list[list[int]], new_tokens: int) -> dict:
    stream_one(url, prompts[0][:8], 4, {})  # warm-up (first-call allocations), not timed
    results = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_one, args=(url, p, new_tokens, r)) for p, r in zip(prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    ttft = sorted(r["first"] - r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": end - start, "tokens_per_s": tokens / (end - start),
            "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99)}


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench = _generate_benchmark()
    bench.add_model_args(parser)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="--max_batch_size of the batched server")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None)
    args = parser.parse_args()

    import torch

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        weight_bytes = bench.build_checkpoint(folder, args)
        write_word_tokenizer(folder, args.vocab_size)
        # prompts of different lengths, 8 to 128 tokens, as token ids (no tokenizer in the way)
        lengths = [8 + round(i * 120 / max(1, args.clients - 1)) for i in range(args.clients)]
        prompts = [torch.randint(0, args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
        figures = {}
        for batch in (args.batch, 1):
            with open(Path(tmp) / f"server-{batch}.log", "w") as log:
                proc, url = start_server(folder, batch, args, log)
                try:
                    figures[batch] = run_clients(url, prompts, args.new_tokens)
                finally:
                    proc.terminate()
                    proc.wait(60)
        load = os.getloadavg()[0]
        bound = None
        if (args.device or "cpu") == "cpu":
            bound = bench.read_bandwidth() / weight_bytes

    print(f"{args.clients} clients at once, prompts of {lengths[0]}-{lengths[-1]} tokens, {args.new_tokens} new "
          f"tokens each, greedy; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'server':22s}{'tokens/s':>10s}{'wall s':>8s}{'TTFT p50 s':>12s}{'TTFT p99 s':>12s}")
    for batch, f in figures.items():
        print(f"{f'--max_batch_size {batch}':22s}{f['tokens_per_s']:10.1f}{f['seconds']:8.1f}"
              f"{f['ttft_p50']:12.2f}{f['ttft_p99']:12.2f}")
    speedup = figures[args.batch]["tokens_per_s"] / figures[1]["tokens_per_s"]
    print(f"continuous batching / one at a time: {speedup:.2f}x aggregate tokens/s")
    if bound is not None:
        print(f"batch-1 memory-bandwidth bound: {bound:.1f} tokens/s ({weight_bytes / 1e6:.0f} MB of weights per "
              f"token); batch 1 reached {figures[1]['tokens_per_s'] / bound:.0%} of it, batch {args.batch} "
              f"{figures[args.batch]['tokens_per_s'] / bound:.1f}x it")


if __name__ == "__main__":
    main()
