"""The engine's sampling work per batched decode step (issue #27, serving), one process, alternating.

`litllm.engine.sampling_probs` (the nucleus found among the top_k survivors or a growing window of the largest
probabilities) against the one it replaced, which sorted the whole vocabulary of every row for top_p
(`sort_nucleus_probs`, kept as tests/test_sampling_probs.py's reference), on the same logits, and each row's draw
(`torch.multinomial` of one row with its own generator, as `Engine._pick` does: not changed).

The logits are N(0, spread^2) rows of `--vocab` tokens: spread 1 leaves a wide nucleus at temperature 0.7 (~14000 of
32000 tokens for top_p 0.9: the whole row must be ranked), 3 a few dozen to hundreds, 6 a handful (peaked rows, as a
trained model's often are); the nucleus sizes are printed. CPU ms per call (the process's CPU time), best and median
over rounds, and old / new.

`--engine`: instead, whole `Engine.step()`s of a small random Llama (vocab 32000, 2 layers of 128, eager) decoding
`--rows` seeded requests at once with top_k 50 / top_p 0.9 / both, `sampling_probs` as now or the sort's, alternating:
CPU ms per step, and the tokens of both (they must be the same).

    python benchmarks/sampling.py                                  # rows 1 4 8, spreads 1 3 6, 1 thread
    python benchmarks/sampling.py --rows 4 --spread 3 --rounds 9 --threads 2
    python benchmarks/sampling.py --engine --rows 4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_sampling_probs import sort_nucleus_probs  # noqa: E402

from litllm.engine import sampling_probs  # noqa: E402

SETTINGS = [(50, 0.9), (None, 0.9), (50, 1.0), (None, 1.0)]  # (top_k, top_p)


def cpu_ms(fn, calls: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def draws(probs: torch.Tensor, generators: list[torch.Generator]) -> None:
    for i, generator in enumerate(generators):
        torch.multinomial(probs[i: i + 1], 1, generator=generator)


def engine_steps(rows: int, settings, new_tokens: int, sort: bool) -> tuple[float, list[list[int]]]:
    """CPU seconds per decode `step()` of `rows` seeded requests with `settings` (temperature, top_k, top_p), with the
    sort's `sampling_probs` where `sort`, and the requests' tokens."""
    from litllm import engine as engine_module
    from litllm.config import Config
    from litllm.engine import Engine, Request, Sampling
    from litllm.model import GPT

    torch.manual_seed(0)
    config = Config(name="sampling", block_size=256, vocab_size=32000, padding_multiple=64, n_layer=2, n_embd=128,
                    n_head=4, n_query_groups=4, intermediate_size=256, norm_class_name="RMSNorm",
                    mlp_class_name="GatedMLP", activation="silu")
    model = GPT(config).eval()
    saved = engine_module.sampling_probs
    engine_module.sampling_probs = sort_nucleus_probs if sort else saved
    try:
        with Engine(model, None, rows, 16 + new_tokens) as engine:
            temperature, top_k, top_p = settings
            ids = [engine.add(Request(list(range(1 + i, 17 + i)), new_tokens,
                                      Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=i)))
                   for i in range(rows)]
            tokens: dict[int, list[int]] = {i: [] for i in ids}
            for out in engine.step():  # the prefill and first tokens
                tokens[out.request_id] += out.token_ids
            start, steps = time.process_time(), 0
            while engine.has_unfinished:
                for out in engine.step():
                    tokens[out.request_id] += out.token_ids
                steps += 1
            return (time.process_time() - start) / steps, list(tokens.values())
    finally:
        engine_module.sampling_probs = saved


def engine_main(args) -> None:
    print("| rows | top_k | top_p | step CPU ms, sort (old) | step CPU ms, now | old / new (best, median) "
          "| same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for rows in args.rows:
        for top_k, top_p in SETTINGS[:2] + [(50, 1.0)]:
            settings = (args.temperature, top_k, top_p)
            times: dict[bool, list[float]] = {True: [], False: []}
            tokens = {}
            for _ in range(args.rounds):
                for sort in (True, False):
                    seconds, tokens[sort] = engine_steps(rows, settings, args.new_tokens, sort)
                    times[sort].append(seconds * 1e3)
            old, new = times[True], times[False]
            print(f"| {rows} | {top_k} | {top_p:g} | {min(old):.2f} / {statistics.median(old):.2f} | {min(new):.2f} / "
                  f"{statistics.median(new):.2f} | {min(old) / min(new):.2f}x, "
                  f"{statistics.median(old) / statistics.median(new):.2f}x | {tokens[True] == tokens[False]} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--spread", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true", help="whole engine steps (a small random Llama) instead")
    parser.add_argument("--new_tokens", type=int, default=40, help="--engine: tokens each request decodes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), vocab {args.vocab}, temperature {args.temperature}; "
          f"load average {open('/proc/loadavg').read().split()[:3]}")
    if args.engine:
        engine_main(args)
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
        return
    print("| rows | spread | top_k | top_p | nucleus (mean kept) | sort (old) ms | sampling_probs ms | old / new "
          "(best, median) | draws ms | kept by one only |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        for spread in args.spread:
            logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(0)) * spread
            generators = [torch.Generator().manual_seed(i) for i in range(rows)]
            for top_k, top_p in SETTINGS:
                setting = (args.temperature, top_k, top_p)
                probs = sampling_probs(logits, *setting)
                differ = int(((probs > 0) != (sort_nucleus_probs(logits, *setting) > 0)).sum())  # kept by one only
                times: dict[str, list[float]] = {"old": [], "new": [], "draws": []}
                for _ in range(args.rounds):
                    times["old"].append(cpu_ms(lambda: sort_nucleus_probs(logits, *setting), args.calls))
                    times["new"].append(cpu_ms(lambda: sampling_probs(logits, *setting), args.calls))
                    times["draws"].append(cpu_ms(lambda: draws(probs, generators), args.calls))
                best = {name: min(t) for name, t in times.items()}
                median = {name: statistics.median(t) for name, t in times.items()}
                kept = (probs > 0).sum(dim=-1).float().mean().item()
                print(f"| {rows} | {spread:g} | {top_k} | {top_p:g} | {kept:.0f} | {best['old']:.2f} / "
                      f"{median['old']:.2f} | {best['new']:.2f} / {median['new']:.2f} | "
                      f"{best['old'] / best['new']:.2f}x, {median['old'] / median['new']:.2f}x | "
                      f"{best['draws']:.2f} / {median['draws']:.2f} | {differ} |", flush=True)
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
