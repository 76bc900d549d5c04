"""`serve --draft_model`'s draft catch-up: one eager forward over the n tokens the draft missed, or n runs of its
compiled one-token step, side by side.

With `--compile` the speculative batch engine (`litllm.speculative.SpeculativeBatchEngine`) runs its rounds' draft
steps on the draft's compiled one-token step, loaded per slot (`litllm.compile_decode.slot_steps`). Before a round,
the draft reads the tokens it has not seen: 1 (the model's own token), 2 after a fully accepted round (also its
last proposal), more after the engine's plain batched steps (a request waiting or prefilling, one asking for
logprobs: one token each), and a new request's whole prompt. Up to `CATCH_UP_STEPS` tokens take the compiled
step once per token; longer catch-ups take one eager forward (a GEMM over the tokens, the way prompts prefill).
This times both ways on one slot of a draft shaped as `benchmarks/speculative.py`'s (2 layers, 512 wide,
4096-token vocabulary, fp32, random weights: the time does not depend on them), at a cache position like a
running request's, for each catch-up length, alternating, `--repeats` times, and prints the best (and median)
of each and the ratio of the bests (eager / compiled: above 1, the compiled steps are faster).

    python benchmarks/draft_catch_up.py                # compiles the draft's step once (saved: a rerun loads it)
    python benchmarks/draft_catch_up.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speculative import build_target  # benchmarks/speculative.py


def catch_up_timings(draft, lengths: list[int], start: int, cache: int, repeats: int,
                     width: int) -> dict[int, dict]:
    """{n: {"eager": seconds, "compiled": seconds, "wide": seconds}} of `repeats` alternating runs of a catch-up of
    n tokens at positions start.. of one slot of `cache` positions: one eager forward, n compiled one-token steps,
    or ceil(n / `width`) runs of a compiled step of `width` tokens (the verify step's graph on the draft)."""
    from litllm.compile_decode import _DecodeStep, _verify_kind, _VerifyStep, slot_steps

    draft.set_kv_cache(1, cache)
    slot = [block.attn.kv_cache.rows(0, 1) for block in draft.blocks]
    tokens, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    (step,) = slot_steps(draft, [slot], _DecodeStep(draft), {"tokens": tokens, "pos": pos})
    wide_tokens, wide_pos = torch.zeros(1, width, dtype=torch.long), torch.arange(width)[None]
    (wide,) = slot_steps(draft, [slot], _VerifyStep(draft), {"tokens": wide_tokens, "pos": wide_pos},
                         _verify_kind(width))
    print(f"draft steps (one token, {width} tokens) compiled or loaded in {time.perf_counter() - t0:.1f} s")

    def eager(n: int) -> None:  # SpeculativeBatchEngine._draft_logits' eager forward (one chunk)
        for block, c in zip(draft.blocks, slot):
            block.attn.kv_cache = c
        ids = torch.randint(0, draft.config.vocab_size, (1, n))
        draft.decode(ids, input_pos=torch.arange(start, start + n), kv_len=start + n)

    def compiled(n: int) -> None:  # its compiled one-token steps
        for i in range(n):
            tokens[0, 0], pos[0, 0] = i, start + i
            step(tokens, pos)

    def compiled_wide(n: int) -> None:  # its compiled step of `width` tokens, the last chunk padded
        for begin in range(0, n, width):
            chunk = list(range(begin, min(n, begin + width)))
            wide_tokens.copy_(torch.tensor(chunk + chunk[-1:] * (width - len(chunk)))[None])
            wide_pos.copy_(torch.arange(start + begin, start + begin + width)[None])
            wide(wide_tokens, wide_pos)

    ways = {"eager": eager, "compiled": compiled, "wide": compiled_wide}
    results = {}
    with torch.inference_mode():
        for n in lengths:
            times = {way: [] for way in ways}
            for fn in ways.values():  # warm-up
                fn(n)
            for _ in range(repeats):
                for way, fn in ways.items():
                    t0 = time.perf_counter()
                    fn(n)
                    times[way].append(time.perf_counter() - t0)
            results[n] = times
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--intermediate_size", type=int, default=1376)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 32, 64])
    parser.add_argument("--start", type=int, default=64, help="the cache position the catch-up starts at")
    parser.add_argument("--cache", type=int, default=256, help="the slot's KV-cache length (the compiled shape)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=int, default=5, help="the wide compiled step's tokens (k + 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, catch-up at position {args.start} of "
          f"{args.cache}, best and median of {args.repeats}")
    draft = build_target(args)  # (printed as the target: the draft's shape)
    results = catch_up_timings(draft, args.lengths, args.start, args.cache, args.repeats, args.width)
    print(f"| tokens | eager forward, ms best (median) | compiled one-token steps | compiled {args.width}-token steps "
          "| eager / one-token (best) | eager / wide (best) |")
    print("|---|---|---|---|---|---|")
    for n, times in results.items():
        eager, compiled, wide = (f"{min(times[w]) * 1e3:.2f} ({statistics.median(times[w]) * 1e3:.2f})"
                                 for w in ("eager", "compiled", "wide"))
        best = min(times["eager"])
        print(f"| {n} | {eager} | {compiled} | {wide} | {best / min(times['compiled']):.2f}x | "
              f"{best / min(times['wide']):.2f}x |")


if __name__ == "__main__":
    main()
