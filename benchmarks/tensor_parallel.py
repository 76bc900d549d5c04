"""Tensor-parallel decoding (`--devices N`) beside one device, in one process run: tokens/s, weights and KV
cache per device, and whether both give the same greedy tokens.

The model is a random-weight Llama (benchmarks/generate.py's `build_checkpoint`, with the tests' small BPE
tokenizer; nothing downloaded). This
process is rank 0 of the N-rank run (`LLM.load(devices=N)`: it starts ranks 1..N-1 itself) and also holds
the one-device model; the two alternate `--repeats` times and the medians are printed with their ratio.

    python benchmarks/tensor_parallel.py --device cuda --devices 2 --precision bf16-true   # a >= 2-GPU machine
    python benchmarks/tensor_parallel.py --device cpu --devices 2 --n_layer 4 --new_tokens 16   # the code path
    python benchmarks/tensor_parallel.py --device cpu --devices 2 --n_layer 4 --n_embd 512 --n_head 8 \
        --intermediate_size 1536 --vocab_size 8000 --new_tokens 32 --profile   # + where rank 0's time goes

`--compiled` also times the N ranks' decode eager against compiled (`--compile true`: each rank compiles its own
step, collectives inside): one engine of each on the sharded model, alternating `--repeats` times, greedy; it
prints decode tokens/s (the steps after a request's first token) and rank 0's CPU milliseconds per decoded token,
medians and best, their ratio, and whether both gave the same tokens.

    python benchmarks/tensor_parallel.py --device cpu --devices 2 --n_layer 4 --n_embd 512 --n_head 8 \
        --intermediate_size 1536 --vocab_size 8000 --new_tokens 64 --repeats 5 --compiled

`--startup` times instead the first token of `litllm generate --devices N` in fresh processes (32-bit weights, the
`--startup` rows of benchmarks/generate.py): `--compile true` with an empty compile cache (each rank compiles its
step ahead of time and saves it), the default `--compile` with the saved steps there (each rank loads its own),
`--compile false`, and `--compile true` with inductor's kernels cached but the steps removed (compiled again).

    python benchmarks/tensor_parallel.py --device cpu --devices 2 --n_layer 4 --n_embd 512 --n_head 8 \
        --intermediate_size 1536 --vocab_size 8000 --startup

`--profile` then decodes once more under torch.profiler and once traced and splits rank 0's milliseconds per
token into the collectives (the gloo/NCCL operations' own spans), the math (aten ops' self time) and the rest
(Python: the model's, the engine's, DTensor's where it is used; waiting), and says how much of the wall was spent
inside DTensor's calls (the share of a run traced with sys.setprofile, applied to the plain wall: an upper bound,
and 0 since the ranks decode on plain tensors).

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
from tiny_checkpoints import train_bpe_tokenizer  # noqa: E402  (a small BPE tokenizer trained on the spot)
from generate import add_model_args, build_checkpoint, print_startup  # noqa: E402


def decode_rate(llm, prompt: str, new_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    text = llm.generate(prompt, max_new_tokens=new_tokens, apply_prompt_style=False)
    return new_tokens / (time.perf_counter() - t0), text


COLLECTIVE_PREFIXES = ("gloo:", "nccl:")


def profile_rate(llm, prompt: str, new_tokens: int) -> dict[str, float]:
    """Rank 0's milliseconds per decoded token: wall = collectives + aten math + Python and the rest; and of
    that wall, the time inside DTensor's calls (its Python with the ops and collectives it issues)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompt, max_new_tokens=new_tokens, apply_prompt_style=False)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    comm = sum(e.cpu_time_total for e in events if e.key.startswith(COLLECTIVE_PREFIXES)) / 1e6
    math = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    share = dtensor_share(lambda: llm.generate(prompt, max_new_tokens=new_tokens, apply_prompt_style=False))
    ms = {"wall": wall, "collectives": comm, "math": math, "Python and the rest": wall - comm - math,
          "inside DTensor calls (of the wall)": share * wall}
    return {name: 1000 * value / new_tokens for name, value in ms.items()}


def dtensor_share(run) -> float:
    """The share of `run()`'s time spent inside torch.distributed.tensor's Python (outermost calls only: its
    nested calls, ops it dispatches included, count once), traced with sys.setprofile: an upper bound."""
    inside = {"depth": 0, "since": 0.0, "total": 0.0}

    def tracer(frame, event, arg):
        if event not in ("call", "return") or "torch/distributed/tensor/" not in frame.f_code.co_filename:
            return
        if event == "call":
            if inside["depth"] == 0:
                inside["since"] = time.perf_counter()
            inside["depth"] += 1
        else:
            inside["depth"] -= 1
            if inside["depth"] == 0:
                inside["total"] += time.perf_counter() - inside["since"]

    t0 = time.perf_counter()
    sys.setprofile(tracer)
    try:
        run()
    finally:
        sys.setprofile(None)
    return inside["total"] / (time.perf_counter() - t0)


def engine_rate(engine, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """One greedy request on `engine`: (decode tokens/s, rank 0's CPU ms per decoded token, the tokens), timed over
    the steps after its first token (the prefill's)."""
    from litllm.engine import Request, Sampling

    engine.add(Request(prompt_ids, new_tokens, Sampling(0.0, None, 1.0, 0)))
    tokens: list[int] = []
    wall = cpu = 0.0
    while engine.has_unfinished:
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine.step()
        if tokens:  # the first step prefilled
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        tokens += [t for o in out for t in o.token_ids]
    steps = len(tokens) - 1
    return steps / wall, 1000 * cpu / steps, tokens


def compiled_vs_eager(llm, prompt: str, new_tokens: int, repeats: int) -> None:
    """The sharded model's decode, eager and compiled (each rank's own step), alternating; see the module doc."""
    from litllm.generate import decode_engine

    ids = llm.tokenizer.encode(prompt).tolist()
    length = len(ids) + new_tokens
    t0 = time.perf_counter()
    engines = {"eager": decode_engine(llm.model, llm.tokenizer, 1, length, llm.threads, False),
               "compiled": decode_engine(llm.model, llm.tokenizer, 1, length, llm.threads, True)}
    print(f"compiled the ranks' decode step in {time.perf_counter() - t0:.1f} s "
          f"({engines['compiled'].step_source})")
    rates: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    tokens = {}
    for name, engine in engines.items():  # warm-up
        engine_rate(engine, ids, 4)
    for _ in range(repeats):
        for name, engine in engines.items():
            rate, ms, tokens[name] = engine_rate(engine, ids, new_tokens)
            rates[name].append(rate)
            cpu[name].append(ms)
    for engine in engines.values():
        engine.close()
    base = statistics.median(rates["eager"])
    for name in engines:
        rate = statistics.median(rates[name])
        print(f"decode tokens/s on {llm.model.tp_size} ranks, {name}: median {rate:.1f} (x{rate / base:.2f}), "
              f"best {max(rates[name]):.1f}; rank 0 CPU ms/token median {statistics.median(cpu[name]):.2f}, "
              f"best {min(cpu[name]):.2f}")
    print(f"compiled check: the same greedy tokens eager and compiled: {tokens['eager'] == tokens['compiled']}")


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
    parser.add_argument("--profile", action="store_true", help="also split rank 0's time per token (see above)")
    parser.add_argument("--compiled", action="store_true", help="also time the ranks' compiled decode (see above)")
    parser.add_argument("--startup", action="store_true", help="time `generate --devices N`'s first token instead")
    add_model_args(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_checkpoint(folder, args)
        train_bpe_tokenizer(folder)
        if args.startup:
            print_startup(folder, args.repeats, ("--device", args.device, "--devices", str(args.devices)))
            return
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
        profiles = {name: profile_rate(llm, prompt, args.new_tokens)
                    for name, llm in (("1 device", one), (f"{args.devices} devices", sharded))} if args.profile else {}
        if args.compiled:
            compiled_vs_eager(sharded, prompt, args.new_tokens, args.repeats)
        held = {}
        for name, llm in (("1 device", one), (f"{args.devices} devices", sharded)):
            with Engine(llm.model, llm.tokenizer, 1, 2048):
                held[name] = local_bytes(llm.model)
    base = statistics.median(rates["1 device"])
    for name, values in rates.items():
        rate = statistics.median(values)
        b = held[name]
        print(f"tokens/s on {name}: median {rate:.1f} (x{rate / base:.2f}), best {max(values):.1f}, weights per device "
              f"{size_text(b['weights'])} "
              f"(x{b['weights'] / held['1 device']['weights']:.2f}), KV cache (1 x 2048) per device "
              f"{size_text(b['kv_cache'])} (x{b['kv_cache'] / held['1 device']['kv_cache']:.2f})")
    for name, ms in profiles.items():
        print(f"ms per token on {name} (rank 0, profiled): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print(f"tokens/s check: the same greedy tokens on 1 and {args.devices} devices: {len(set(texts.values())) == 1}")


if __name__ == "__main__":
    main()
