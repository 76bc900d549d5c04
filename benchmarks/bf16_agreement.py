"""How exact is bf16 decoding? Greedy agreement of litllm in bf16 with litllm in fp32, per model family.

For every family of the test suite (tests/hf_models.py: tiny random-weight models with each family's real
structure) the same converted folder is loaded in fp32 and in bf16 (`--precision bf16-true`) and decodes `--new_tokens` greedy tokens from `--prompts` random prompts on
the engine. Printed per family: the share of prompts whose bf16 tokens equal the fp32 ones exactly, the
mean share of tokens before the first difference, and the share of first tokens that agree.

Random tiny models are a pessimistic case: their next-token logits are nearly flat, so a rounding error
flips the argmax far more often than in a trained model, whose top token usually leads by a wide margin.
`--families llama qwen2 ...` limits the run.

    python benchmarks/bf16_agreement.py                 # all families, 8 prompts, 32 new tokens
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    from litllm.engine import Engine, Request

    with Engine(model, None, len(prompts), max(map(len, prompts)) + n) as engine:
        ids = {engine.add(Request(p, n)): i for i, p in enumerate(prompts)}
        out = [[] for _ in prompts]
        while engine.has_unfinished:
            for o in engine.step():
                out[ids[o.request_id]] += o.token_ids
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float, float]:
    """(share of rows equal, mean share of each row before the first difference, share of first tokens equal)."""
    prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) / len(r) for r, s in zip(a, b)]
    return (sum(r == s for r, s in zip(a, b)) / len(a), sum(prefix) / len(prefix),
            sum(r[0] == s[0] for r, s in zip(a, b)) / len(a))


def main() -> None:
    from tiny_checkpoints import make_converted_checkpoint
    from hf_models import FAMILIES, VOCAB

    from litllm.inference import load_for_inference
    from litllm.cpu_layout import optimize_for_decoding

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=12)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, VOCAB, (args.prompts, args.prompt_tokens), generator=g).tolist()
    print(f"{args.prompts} random prompts of {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens each; "
          "bf16 vs fp32 litllm on tiny random-weight models (pessimistic, see the docstring)")
    print(f"{'family':20s}{'rows equal':>12s}{'prefix kept':>13s}{'first token':>13s}")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = make_converted_checkpoint(Path(tmp) / family, family=family, seed=3)
            runs = {}
            for precision in ("32-true", "bf16-true"):
                model = load_for_inference(folder, device="cpu", precision=precision)
                optimize_for_decoding(model)
                runs[precision] = greedy(model, prompts, args.new_tokens)
            row = agreement(runs["32-true"], runs["bf16-true"])
            totals.append(row)
            print(f"{family:20s}{row[0]:12.0%}{row[1]:13.0%}{row[2]:13.0%}")
    mean = [sum(t[i] for t in totals) / len(totals) for i in range(3)]
    print(f"{'mean':20s}{mean[0]:12.0%}{mean[1]:13.0%}{mean[2]:13.0%}")


if __name__ == "__main__":
    main()
