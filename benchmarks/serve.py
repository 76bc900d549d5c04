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

With `--shared_prefix 1000`, the prefix cache instead: the 16 clients' prompts are one 1,000-token system
prompt followed by a short question each (8 to 24 tokens), sent once the server has answered one request with
that system prompt (as a chat UI's earlier turns leave it); the batched server runs with `--prefix_caching
true`, then `false`, and the TTFT and tokens/s ratios are printed. With `--response_format`, the batched server
answers the same requests with and without a `json_schema` response_format (a string property longer than the
answer, so both produce exactly `--new_tokens` tokens): the cost of grammar-constrained decoding.
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
from typing import Optional

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

    words = [f"w{i}" for i in range(vocab_size - len(JSON_WORDS))] + JSON_WORDS
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))


# JSON's punctuation, each character on its own too (a grammar's mask allows a token that starts a valid continuation:
# with no single-character tokens, it could get stuck); </s>: the EOS of --response_format
JSON_WORDS = ["{", "}", '"', ":", " ", ",", "t", "e", "x", ": ", "text", '{"text": "', "</s>"]


def start_server(folder: Path, batch: int, args, log, *flags: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "litllm", "serve", str(folder), "--port", "0", "--max_batch_size", str(batch),
           "--max_queue", str(args.clients), "--max_seq_length", str(args.max_seq_length), *flags]
    if args.device:
        cmd += ["--device", args.device]
    if args.precision:
        cmd += ["--precision", args.precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if line.startswith("Serving "):
            return proc, line.split(" at ")[1].split()[0]
    raise SystemExit(f"the server did not start (see {log.name})")


def stream_one(url: str, prompt: list[int], new_tokens: int, result: dict, extra: Optional[dict] = None) -> None:
    """One client: stream a completion; record time to first token, end time and completion tokens."""
    import httpx

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    result["start"] = time.perf_counter()
    with httpx.stream("POST", url + "/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the server answered an error: {chunk['error']['message']}")
            if chunk["choices"] and "first" not in result:
                result["first"] = time.perf_counter()
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
    result["end"] = time.perf_counter()


def run_clients(url: str, prompts: list[list[int]], new_tokens: int, warm_up: int = 8, extra=None) -> dict:
    stream_one(url, prompts[0][:warm_up], 4, {}, extra)  # warm-up (first-call allocations; the shared prefix)
    results = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_one, args=(url, p, new_tokens, r, extra))
               for p, r in zip(prompts, results)]
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
    parser.add_argument("--shared_prefix", type=int, default=0,
                        help="measure the prefix cache: prompts share a system prompt of this many tokens")
    parser.add_argument("--response_format", action="store_true",
                        help="measure constrained decoding: the same requests with and without a json_schema")
    args = parser.parse_args()
    if args.shared_prefix:
        args.max_seq_length = max(args.max_seq_length, args.shared_prefix + 24 + args.new_tokens)

    import torch

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        weight_bytes = bench.build_checkpoint(folder, args)
        write_word_tokenizer(folder, args.vocab_size)
        # prompts of different lengths, 8 to 128 tokens, as token ids (no tokenizer in the way)
        lengths = [8 + round(i * 120 / max(1, args.clients - 1)) for i in range(args.clients)]
        runs = {f"--max_batch_size {b}": (b,) for b in (args.batch, 1)}  # label -> (batch, extra serve flags)
        warm_up = 8
        if args.shared_prefix:
            lengths = [8 + round(i * 16 / max(1, args.clients - 1)) for i in range(args.clients)]
            runs = {f"--prefix_caching {on}": (args.batch, "--prefix_caching", on) for on in ("true", "false")}
            warm_up = args.shared_prefix + 4
        formats = {}
        if args.response_format:
            schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4 * args.new_tokens}},
                      "required": ["text"]}
            runs = {label: (args.batch,) for label in ("json_schema", "free text")}
            (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))  # grammars need one
            formats = {"json_schema": {"response_format": {"type": "json_schema",
                                                           "json_schema": {"name": "t", "schema": schema}}}}
        system = torch.randint(0, args.vocab_size, (args.shared_prefix,), generator=generator).tolist()
        prompts = [system + torch.randint(0, args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
        figures = {}
        for label, (batch, *flags) in runs.items():
            with open(Path(tmp) / f"server-{len(figures)}.log", "w") as log:
                proc, url = start_server(folder, batch, args, log, *flags)
                try:
                    figures[label] = run_clients(url, prompts, args.new_tokens, warm_up, formats.get(label))
                finally:
                    proc.terminate()
                    proc.wait(60)
        load = os.getloadavg()[0]
        bound = None
        if (args.device or "cpu") == "cpu":
            bound = bench.read_bandwidth() / weight_bytes

    shared = f"a shared {args.shared_prefix}-token system prompt + " if args.shared_prefix else ""
    print(f"{args.clients} clients at once, prompts of {shared}{lengths[0]}-{lengths[-1]} tokens, {args.new_tokens} "
          f"new tokens each, greedy; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'server':24s}{'tokens/s':>10s}{'wall s':>8s}{'TTFT p50 s':>12s}{'TTFT p99 s':>12s}")
    for label, f in figures.items():
        print(f"{label:24s}{f['tokens_per_s']:10.1f}{f['seconds']:8.1f}{f['ttft_p50']:12.2f}{f['ttft_p99']:12.2f}")
    if args.response_format:
        on, off = figures["json_schema"], figures["free text"]
        assert on["tokens"] == off["tokens"], (on["tokens"], off["tokens"])
        print(f"constrained / free: {on['tokens_per_s'] / off['tokens_per_s']:.2f}x aggregate tokens/s")
        return
    if args.shared_prefix:
        on, off = figures["--prefix_caching true"], figures["--prefix_caching false"]
        print(f"prefix cache on / off: TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.2f}x better, aggregate tokens/s "
              f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x")
        return
    batched, single = figures[f"--max_batch_size {args.batch}"], figures["--max_batch_size 1"]
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]
    print(f"continuous batching / one at a time: {speedup:.2f}x aggregate tokens/s")
    if bound is not None:
        print(f"batch-1 memory-bandwidth bound: {bound:.1f} tokens/s ({weight_bytes / 1e6:.0f} MB of weights per "
              f"token); batch 1 reached {single['tokens_per_s'] / bound:.0%} of it, batch {args.batch} "
              f"{batched['tokens_per_s'] / bound:.1f}x it")


if __name__ == "__main__":
    main()
