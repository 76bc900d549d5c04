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

Beside llama.cpp's own server (`--llama_server PATH` to its `llama-server` binary; skipped with a note where absent):
for each `--formats` pair (litllm's format = llama.cpp's GGUF type: `fp32=f32 bf16=f16 int8wo=q8_0`), the same model,
exported by `litllm convert_to_gguf`, is served by both at once, litllm with `--max_batch_size --batch` and
llama.cpp with as many slots (`-np`, continuous batching `-cb`, `-c` = slots x `--max_seq_length`), both on
`--threads` threads (litllm: OMP_NUM_THREADS, from which it may still pick fewer; llama.cpp: `-t` and `-tb`). The
same streaming clients send the same token-id prompts to `/v1/completions` (greedy, `max_tokens`; llama.cpp with
`ignore_eos` and without its prompt cache, so both decode exactly `--new_tokens` tokens from a full prefill: the
token counts are checked), `--client_counts` clients at once, the two servers alternating over `--rounds` rounds.
Printed per format and client count: aggregate completion tokens/s, tokens per CPU-second of the server process
(what its cores did, less sensitive to other load), p50/p99 time to first token, the median client's decode
tokens/s (after its first token), and litllm / llama.cpp ratios (best and median of the rounds), and how many decode
steps litllm ran over how many KV-cache rows (its /metrics). `--baseline PATH`: a third server, `litllm serve` of the
litllm source tree at PATH (a checkout of main), in the same alternation, and litllm / baseline ratios.

    python benchmarks/serve.py --llama_server /tmp/llama-build/bin/llama-server --max_seq_length 512 \
        --formats fp32=f32 bf16=f16 --client_counts 1 4 16 --rounds 3 --threads 1

llama-server, built from the llama.cpp vendored in llama-cpp-python's source distribution (the version whose
Python binding benchmarks/generate.py compares; ~10 min on 2 cores):

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d sdist && tar xzf sdist/*.tar.gz -C sdist
    cmake -G Ninja -S sdist/llama_cpp_python-0.3.36/vendor/llama.cpp -B llama-build -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
    ninja -C llama-build -j2 llama-server      # -> llama-build/bin/llama-server
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


def start_server(folder: Path, batch: int, args, log, *flags: str, env=None,
                 checkout: Optional[Path] = None) -> tuple[subprocess.Popen, str]:
    """`litllm serve` on `folder` (of the litllm in `checkout`, another source tree, where given: run from there, as
    `python -m` puts the working directory first on sys.path): (process, base URL) once it serves."""
    cmd = [sys.executable, "-m", "litllm", "serve", str(folder), "--port", "0", "--max_batch_size", str(batch),
           "--max_queue", str(max(args.clients, *args.client_counts)), "--max_seq_length", str(args.max_seq_length),
           *flags]
    if args.device:
        cmd += ["--device", args.device]
    if args.precision and "--precision" not in flags:
        cmd += ["--precision", args.precision]
    if checkout is not None:
        env = {**(env or os.environ), "PYTHONPATH": str(checkout)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=checkout)
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
    # after the first token: this client's own decode rate (what a streaming user sees)
    result["decode_rate"] = (result["tokens"] - 1) / max(result["end"] - result["first"], 1e-9)


def run_clients(url: str, prompts: list[list[int]], new_tokens: int, warm_up: int = 8, extra=None,
                pid: Optional[int] = None) -> dict:
    """All `prompts` streamed at once, one client thread each; `pid`: the server process whose CPU seconds to count."""
    stream_one(url, prompts[0][:warm_up], 4, {}, extra)  # warm-up (first-call allocations; the shared prefix)
    results = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_one, args=(url, p, new_tokens, r, extra))
               for p, r in zip(prompts, results)]
    cpu_start = pid and process_cpu_seconds(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = pid and process_cpu_seconds(pid) - cpu_start
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    ttft = sorted(r["first"] - r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "per_client": [r["tokens"] for r in results], "seconds": end - start,
            "tokens_per_s": tokens / (end - start), "tokens_per_cpu_s": pid and tokens / cpu,
            "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99),
            "decode_rate": statistics.median(r["decode_rate"] for r in results)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (/proc/PID/stat, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: the 14th and 15th


def spread_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """`count` prompt lengths spread evenly from `shortest` to `longest` tokens (one client: `shortest`)."""
    return [shortest + round(i * (longest - shortest) / max(1, count - 1)) for i in range(count)]


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# litllm's formats (`--formats`' left sides) as serve flags; each is paired with a GGUF type for llama.cpp
LITLLM_FORMATS = {"fp32": ("--precision", "32-true"), "bf16": ("--precision", "bf16-true"),
                  "int8wo": ("--quantize", "torchao.int8wo")}
# what llama.cpp's requests add: exactly max_tokens tokens (no EOS stop; litllm's word tokenizer has none), and a full
# prefill each time (its default reuses a slot's earlier prompt, and every round sends the same prompts)
LLAMA_SERVER_BODY = {"ignore_eos": True, "cache_prompt": False}


def start_llama_server(binary: Path, gguf: Path, args, log) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server on `gguf` with litllm's slots, positions per slot and threads: (process, base URL) once its
    /health answers 200 (the model loaded)."""
    import socket

    import httpx

    with socket.socket() as probe:  # a free port (llama-server takes no port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(args.batch), "-cb",
           "-c", str(args.batch * args.max_seq_length), "-t", str(args.threads), "-tb", str(args.threads),
           "--cache-ram", "0", "--no-webui", *args.llama_server_flags]  # no prompt cache in host memory either
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode} (see {log.name})")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"llama-server did not answer /health in 600 s (see {log.name})")


def decode_steps(url: str) -> dict[str, float]:
    """The server's decode steps by the KV-cache rows they decoded (`litllm_decode_steps` in /metrics): which compiled
    steps ran."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {line.split('rows="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("litllm_decode_steps{")}


def gguf_source(folder: Path, tmp: Path) -> Path:
    """`folder`'s model with a SentencePiece-style tokenizer (the GGUF export needs one; llama.cpp pads its vocabulary up
    to the model's embedding rows): the same weight files, linked."""
    source = tmp / "gguf-source"
    source.mkdir()
    for file in folder.iterdir():
        if not file.name.startswith("tokenizer"):
            (source / file.name).symlink_to(file)
    _generate_benchmark().add_tokenizer(source)
    return source


def compare_llama_server(args, folder: Path, tmp: Path, prompts_for) -> None:
    """litllm serve and llama-server on the same model in each `--formats` pair, the same clients, alternating."""
    binary = Path(args.llama_server)
    if not binary.is_file():
        print(f"note: no llama-server at {binary}: the comparison with llama.cpp's server is skipped (its docstring "
              "says how to build it)")
        return
    from litllm.gguf_export import convert_to_gguf

    bench = _generate_benchmark()
    bench.gguf_package()  # (imported before convert_to_gguf imports it: not benchmarks/gguf.py)
    source = gguf_source(folder, tmp)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # litllm's candidates: this count and fewer
    figures: dict[tuple[str, int, str], list[dict]] = {}  # (format pair, clients, server) -> one dict per round
    steps: dict[str, dict[str, float]] = {}  # format pair -> litllm's decode steps by rows, over all rounds
    bounds = {}
    for pair in args.formats:
        ours, theirs = pair.split("=")
        gguf = tmp / f"model-{theirs}.gguf"
        convert_to_gguf(source, gguf, outtype=theirs)
        bounds[pair] = bench.gguf_weight_bytes(gguf)
        with open(tmp / f"litllm-{ours}.log", "w") as log, open(tmp / f"llama-{theirs}.log", "w") as llama_log:
            litllm, litllm_url = start_server(folder, args.batch, args, log, *LITLLM_FORMATS[ours], env=env)
            llama, llama_url, baseline = None, None, None
            try:
                llama, llama_url = start_llama_server(binary, gguf, args, llama_log)
                servers = {f"litllm {ours}": (litllm_url, litllm.pid, None),
                           f"llama.cpp {theirs}": (llama_url, llama.pid, LLAMA_SERVER_BODY)}
                if args.baseline:
                    baseline, url = start_server(folder, args.batch, args, log, *LITLLM_FORMATS[ours], env=env,
                                                 checkout=Path(args.baseline).resolve())
                    servers[f"baseline {ours}"] = (url, baseline.pid, None)
                for _ in range(args.rounds):
                    for clients in args.client_counts:
                        for name, (url, pid, extra) in servers.items():
                            f = run_clients(url, prompts_for(clients), args.new_tokens, extra=extra, pid=pid)
                            if f["per_client"] != [args.new_tokens] * clients:
                                raise SystemExit(f"{name}: completion tokens {f['per_client']}, expected "
                                                 f"{args.new_tokens} each")
                            figures.setdefault((pair, clients, name), []).append(f)
                steps[pair] = decode_steps(litllm_url)
            finally:
                for proc in (litllm, llama, baseline):
                    if proc is not None:
                        proc.terminate()
                        proc.wait(60)
    load = os.getloadavg()
    bandwidth = bench.read_bandwidth()
    print(f"litllm serve vs llama-server, --max_batch_size / -np {args.batch}, {args.max_seq_length} positions per "
          f"slot, {args.threads} thread(s), {args.new_tokens} new tokens per client, greedy, prompts of 8-128 tokens; "
          f"{args.rounds} rounds alternating; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"{'format':14s}{'clients':>8s} {'server':18s}{'tok/s best':>11s}{'median':>8s}{'tok/CPU-s':>10s}"
          f"{'TTFT p50':>9s}{'TTFT p99':>9s}{'client tok/s':>13s}")
    for pair in args.formats:
        ours, theirs = pair.split("=")
        for clients in args.client_counts:
            medians = {}
            names = [f"litllm {ours}", f"llama.cpp {theirs}"] + ([f"baseline {ours}"] if args.baseline else [])
            for name in names:
                runs = figures[(pair, clients, name)]
                medians[name] = m = {key: statistics.median(r[key] for r in runs)
                                     for key in ("tokens_per_s", "tokens_per_cpu_s", "ttft_p50", "ttft_p99",
                                                 "decode_rate")}
                m["best"] = max(r["tokens_per_s"] for r in runs)
                print(f"{pair:14s}{clients:8d} {name:18s}{m['best']:11.1f}{m['tokens_per_s']:8.1f}"
                      f"{m['tokens_per_cpu_s']:10.1f}{m['ttft_p50']:9.2f}{m['ttft_p99']:9.2f}{m['decode_rate']:13.1f}")
            a, b, *base = medians.values()
            print(f"{'':23s}litllm / llama.cpp: tok/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x (best "
                  f"{a['best'] / b['best']:.2f}x), tok/CPU-s {a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x, "
                  f"client tok/s {a['decode_rate'] / b['decode_rate']:.2f}x, TTFT p50 "
                  f"{a['ttft_p50'] / b['ttft_p50']:.2f}x (lower: litllm's first token sooner)")
            for c in base:
                print(f"{'':23s}litllm / baseline: tok/s {a['tokens_per_s'] / c['tokens_per_s']:.2f}x (best "
                      f"{a['best'] / c['best']:.2f}x), tok/CPU-s {a['tokens_per_cpu_s'] / c['tokens_per_cpu_s']:.2f}x, "
                      f"TTFT p50 {a['ttft_p50'] / c['ttft_p50']:.2f}x")
        print(f"{'':23s}litllm's decode steps by rows decoded (all rounds): {steps[pair]}")
        print(f"{'':23s}batch-1 bandwidth bound of {theirs}: {bandwidth / bounds[pair]:.1f} tok/s "
              f"({bounds[pair] / 1e6:.0f} MB of weights per token, read at {bandwidth / 1e9:.1f} GB/s)")


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
    parser.add_argument("--llama_server", default=None,
                        help="compare with llama.cpp's server: the path of its llama-server binary")
    parser.add_argument("--formats", nargs="+", default=["fp32=f32", "bf16=f16"],
                        help="LITLLM=GGUF pairs for --llama_server (litllm: fp32, bf16, int8wo; GGUF: f32, f16, q8_0, ...)")
    parser.add_argument("--client_counts", type=int, nargs="+", default=[1, 4, 16],
                        help="clients at once, each count in turn (--llama_server)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the alternation (--llama_server)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each server (--llama_server)")
    parser.add_argument("--llama_server_flags", nargs="*", default=[], help="more llama-server flags (--llama_server)")
    parser.add_argument("--baseline", default=None,
                        help="a third server beside them (--llama_server): `litllm serve` of the litllm source tree at "
                             "this path (e.g. a checkout of main), for a before/after ratio")
    args = parser.parse_args()
    if args.shared_prefix:
        args.max_seq_length = max(args.max_seq_length, args.shared_prefix + 24 + args.new_tokens)

    import torch

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        weight_bytes = bench.build_checkpoint(folder, args)
        write_word_tokenizer(folder, args.vocab_size)
        if args.llama_server:
            def prompts_for(clients: int) -> list[list[int]]:  # 8 to 128 tokens, the same each round
                g = torch.Generator().manual_seed(clients)
                return [torch.randint(0, args.vocab_size, (n,), generator=g).tolist()
                        for n in spread_lengths(clients, 8, 128)]

            compare_llama_server(args, folder, Path(tmp), prompts_for)
            return
        # prompts of different lengths, 8 to 128 tokens, as token ids (no tokenizer in the way)
        lengths = spread_lengths(args.clients, 8, 128)
        runs = {f"--max_batch_size {b}": (b,) for b in (args.batch, 1)}  # label -> (batch, extra serve flags)
        warm_up = 8
        if args.shared_prefix:
            lengths = spread_lengths(args.clients, 8, 24)
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
