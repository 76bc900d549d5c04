"""torchao.int8wo's output head in int8 or in fp32: greedy agreement with the fp32 model, logit error, and the head's
CPU time per decoded token, beside torchao.int8dq's (whose int8 head shipped first) and bf16 torchao.int4wo's (whose
head is int8wo's, or bf16 with `skip=("lm_head",)`).

Part 1, every family of the test suite (tests/hf_models.py: tiny random-weight models, pessimistic: their logits are
nearly flat, so any rounding flips near-ties; see benchmarks/bf16_agreement.py): `--prompts` random prompts decode
`--new_tokens` greedy tokens on the eager engine, each quantized model beside the fp32 one: the share of prompts
whose tokens all equal fp32's, the mean share kept before the first difference, and the share of first tokens equal.

Part 2, benchmarks/generate.py's random Llama (~134M parameters; its fp32 head is 98 of int8wo's 184 MB a token):
per model, the first greedy token (of `--long_tokens`) that leaves fp32's path for each of `--long_prompts` prompts,
and teacher-forced on fp32's greedy tokens the median relative L2 error of the logits and how often their argmax is
fp32's (for each int8 head, the same against its model with the head unquantized too); then one row through the head
alone, best CPU-ms of `--repeats` alternating rounds: fp32 `F.linear`, the int8 head as int8wo's eager decode runs it
(litllm's C++ op where its library is built, `Int8PackedLinear._eager_rows`), the same without the op
(`Int8Words._eager_step`) and torch's bf16 kernel (`_weight_int8pack_mm`, bf16 logits).

    python benchmarks/int8wo_head.py                       # all families, 8 prompts x 32 tokens; the Llama, 2 x 128
    python benchmarks/int8wo_head.py --families llama qwen2 --long_prompts 0
    python benchmarks/int8wo_head.py --families --heads "int4wo@bf16, bf16 head" "int4wo@bf16, int8 head"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import litllm  # noqa: F401  (before torch, as litllm's commands: litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bf16_agreement import agreement, greedy  # noqa: E402

HEAD_CHOICES = {  # row label -> (mode, skip, the model's dtype)
    "int8wo, fp32 head": ("torchao.int8wo", ("lm_head",), torch.float32),
    "int8wo, int8 head": ("torchao.int8wo", None, torch.float32),
    "int8dq, fp32 head": ("torchao.int8dq", ("lm_head",), torch.float32),
    "int8dq, int8 head": ("torchao.int8dq", None, torch.float32),
    "int4wo@bf16, bf16 head": ("torchao.int4wo", ("lm_head",), torch.bfloat16),
    "int4wo@bf16, int8 head": ("torchao.int4wo", None, torch.bfloat16),
}


def quantized(folder: Path, mode: str, skip, dtype: torch.dtype):
    from litllm.model import GPT
    from litllm.quantize import quantize_model

    return quantize_model(GPT.from_checkpoint(folder).to(dtype).eval(), mode, "cpu", skip=skip)


def unquantized_head_twin(label: str, labels) -> Optional[str]:
    """The row of the same model with its head unquantized, for an int8 head's row ("int8wo, int8 head" -> "int8wo,
    fp32 head"); None for other rows or where it was not run."""
    model, _, head = label.partition(", ")
    return next((other for other in labels if other != label and other.startswith(f"{model}, ")), None) \
        if head == "int8 head" else None


def families(args) -> None:
    from tiny_checkpoints import make_converted_checkpoint
    from hf_models import VOCAB

    from litllm.model import GPT

    prompts = torch.randint(3, VOCAB, (args.prompts, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prompts = prompts.tolist()
    print(f"part 1: {args.prompts} random prompts of {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens "
          "each, eager engine; rows equal / prefix kept / first token equal, against fp32")
    print(f"{'family':16s}" + "".join(f"{label:>24s}" for label in args.heads))
    totals = {label: [] for label in args.heads}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = make_converted_checkpoint(Path(tmp) / family, family=family, seed=3)
            exact = greedy(GPT.from_checkpoint(folder).eval(), prompts, args.new_tokens)
            cells = []
            for label in args.heads:
                row = agreement(exact, greedy(quantized(folder, *HEAD_CHOICES[label]), prompts, args.new_tokens))
                totals[label].append(row)
                cells.append(f"{row[0]:.0%} / {row[1]:.0%} / {row[2]:.0%}")
            print(f"{family:16s}" + "".join(f"{c:>24s}" for c in cells), flush=True)
    means = [[statistics.mean(t[i] for t in totals[label]) for i in range(3)] for label in args.heads]
    print(f"{'mean':16s}" + "".join(f"{f'{m[0]:.0%} / {m[1]:.0%} / {m[2]:.0%}':>24s}" for m in means))


@torch.inference_mode()
def forced_logits(model, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    """The logits (vocab,) after the prompt and after each forced token (KV-cached eager decode)."""
    from litllm.engine import Engine

    with Engine(model, None, 1, len(prompt) + len(forced) + 1) as engine:
        engine._set_caches(engine._slot_caches[0])
        rows = [engine._prefill_logits(torch.tensor(prompt), 0, len(prompt), False)[-1]]
        for i, token in enumerate(forced[:-1]):
            pos = len(prompt) + i
            out = engine.model.decode(torch.tensor([[token]]), input_pos=torch.tensor([pos]), kv_len=pos + 1)
            rows.append(out[0, -1, : engine.vocab_size])
        engine._set_caches(engine._caches)
    return rows


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def head_cpu_ms(head, weight: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best CPU-ms of one row through the head, per way of computing it (alternating rounds)."""
    row = torch.randn(1, head.in_features)
    ways = {"fp32 F.linear": lambda: torch.nn.functional.linear(row, weight),
            "int8, eager decode (op)": lambda: head._eager_rows(row),
            "int8, _eager_step": lambda: head._eager_step(row),
            "int8, bf16 kernel": lambda: torch._weight_int8pack_mm(row.bfloat16(), head.weight, head.scales)}
    if head._rows_op(build=False) is None:
        del ways["int8, eager decode (op)"]
    times = {name: [] for name in ways}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, way in ways.items():
                c0 = time.process_time()
                for _ in range(5):
                    way()
                times[name].append((time.process_time() - c0) / 5)
    return {name: 1e3 * min(ts) for name, ts in times.items()}


def llama(args) -> None:
    from generate import add_tokenizer, build_checkpoint

    from litllm.model import GPT

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder, args)
        add_tokenizer(folder)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 2000, (args.long_prompts, 32), generator=g).tolist()
        fp32 = GPT.from_checkpoint(folder).eval()
        exact = greedy(fp32, prompts, args.long_tokens)
        forced = [forced_logits(fp32, p, e) for p, e in zip(prompts, exact)]
        print(f"part 2: the benchmark Llama, {args.long_prompts} prompts of 32 tokens, {args.long_tokens} greedy "
              f"tokens; threads {torch.get_num_threads()}")
        rows, ms = {}, {}  # label -> (greedy tokens, teacher-forced logits per prompt)
        for label in args.heads:
            model = quantized(folder, *HEAD_CHOICES[label])
            rows[label] = (greedy(model, prompts, args.long_tokens),
                           [[row.float() for row in forced_logits(model, p, e)] for p, e in zip(prompts, exact)])
            print(f"{label}: " + closeness(rows[label], (exact, forced), "fp32's", args.long_tokens), flush=True)
            twin = unquantized_head_twin(label, rows)
            if twin is not None:
                print(f"{label}: " + closeness(rows[label], rows[twin], f"{twin}'s", args.long_tokens), flush=True)
            if label == "int8wo, int8 head":
                ms = head_cpu_ms(model.lm_head, fp32.lm_head.weight, args.repeats)
        if ms:
            print("the head, one row, best CPU-ms: " + ", ".join(f"{name} {t:.2f}" for name, t in ms.items()))


def closeness(row, reference, name: str, n: int) -> str:
    """Where a row's greedy tokens leave the reference's, and its logits teacher-forced on fp32's tokens beside the
    reference's: median relative L2 error, share of equal argmaxes. row, reference: (tokens, logits) per prompt."""
    errors, agree = [], []
    for logits, expected in zip(row[1], reference[1]):
        for a, b in zip(logits, expected):
            errors.append(float((a - b).norm() / b.norm()))
            agree.append(float(a.argmax() == b.argmax()))
    leaves = ", ".join(str(first_divergence(t, e)) for t, e in zip(row[0], reference[0]))
    return (f"greedy leaves {name} path at token {leaves} of {n}; teacher-forced logits "
            f"{statistics.median(errors):.2%} off {name} (median), argmax as {name} {statistics.mean(agree):.1%}")


def main() -> None:
    from generate import add_model_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--families", nargs="*", default=None, help="default: every family of tests/hf_models.py")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=12)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--long_prompts", type=int, default=2, help="part 2's prompts (0: no part 2)")
    parser.add_argument("--long_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--heads", nargs="*", default=list(HEAD_CHOICES), choices=list(HEAD_CHOICES), metavar="ROW",
                        help=f"the rows to run (default: all): {', '.join(map(repr, HEAD_CHOICES))}")
    args = parser.parse_args()
    if args.families is None:
        from hf_models import FAMILIES

        args.families = list(FAMILIES)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    if args.families:
        families(args)
    if args.long_prompts:
        llama(args)
    print(f"load average after {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
