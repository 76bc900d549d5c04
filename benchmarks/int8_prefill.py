"""int8 prefill: the first token's rounding, greedy agreement with fp32, and prefill speed, before and after.

On benchmarks/generate.py's random Llama (~134M parameters, fp32), for `torchao.int8dq` and `torchao.int8wo`:
- `kernels` (before): the whole prompt through the eager kernels (fbgemm's 7-bit activation rows for int8dq,
  `_weight_int8pack_mm`'s bf16 ones for int8wo), as the engine prefilled before;
- `step, fp32 GEMM`: the engine's prefill (`Engine._prefill_logits`, within `step_rounding`): the prompt's rows as
  the compiled step rounds them (`Int8Words._eager_step`), an fp32 GEMM on the int8 weights converted per call
  (`LITLLM_INT8_PROMPT=0`, and where the op's library is not there);
- `step` (now): the same arithmetic through litllm's multi-row op on AVX-512 VNNI CPUs
  (`litllm.cpu_ops.int8_prompt_op`: the weights read once for many rows, int8dq's products by vpdpbusd); its
  library is built first where it is not there yet.
It prints the relative L2 error of the last prompt row's logits against fp32's, that of 32 decode steps
teacher-forced on fp32's greedy tokens (eager kernels vs the step's rounding, `step_rounding`) and how often their
argmax is fp32's, the first greedy token that leaves fp32's path (eager engine; with every eager step within
`step_rounding` or the kernels; `--compiled`: the compiled engine; llama.cpp q8_0 where llama_cpp imports), and the
prefill tokens/s of a `--prefill_tokens` prompt and the time to the first token of the `--prompt_tokens` one (the
sides alternate `--repeats` times; best and median wall, best per CPU-second).

    python benchmarks/int8_prefill.py                     # 32-token prompt, 32 greedy tokens, 512-token prefill
    python benchmarks/int8_prefill.py --compiled --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, add_tokenizer, build_checkpoint, gguf_rows  # noqa: E402
from generate import greedy_tokens as greedy  # noqa: E402

MODES = ("torchao.int8dq", "torchao.int8wo")


@contextmanager
def fp32_gemm_step():
    """The engine's prefill with the step's rounding through an fp32 GEMM on weights converted per call."""
    from litllm.cpu_ops import INT8_PROMPT_ENV

    before = os.environ.get(INT8_PROMPT_ENV)
    os.environ[INT8_PROMPT_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[INT8_PROMPT_ENV]
        else:
            os.environ[INT8_PROMPT_ENV] = before


@contextmanager
def kernels_only():
    """The engine as it prefilled before: every prompt row through the eager kernels."""
    import litllm.engine
    from litllm.quantize import Int8DynamicLinear, Int8PackedLinear

    classes = (Int8DynamicLinear, Int8PackedLinear)
    saved = litllm.engine.step_rounding, [cls.eager_step_rows for cls in classes]
    litllm.engine.step_rounding = nullcontext
    for cls in classes:
        cls.eager_step_rows = None
    try:
        yield
    finally:
        litllm.engine.step_rounding = saved[0]
        for cls, rows in zip(classes, saved[1]):
            cls.eager_step_rows = rows


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


@torch.inference_mode()
def teacher_forced(engine, prompt: list[int], forced: list[int], decode_rounding) -> list[torch.Tensor]:
    """Logits (vocab,) of the last prompt row (the engine's prefill) and after each forced token (eager decode
    within `decode_rounding`)."""
    engine._set_caches(engine._slot_caches[0])
    try:
        ids = torch.tensor(prompt)
        rows = [engine._prefill_logits(ids, 0, len(prompt), False)[-1]]
        with decode_rounding():
            for i, token in enumerate(forced):
                pos = len(prompt) + i
                out = engine.model.decode(torch.tensor([[token]]), input_pos=torch.tensor([pos]), kv_len=pos + 1)
                rows.append(out[0, -1, : engine.vocab_size])
    finally:
        engine._set_caches(engine._caches)
    return rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--forced_steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the random prompt (0: benchmarks/generate.py's)")
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compiled", action="store_true", help="greedy of the compiled engines too (compiles)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args)


def run(folder: Path, args) -> None:
    from litllm.engine import Engine
    from litllm.inference import load_for_inference
    from litllm.quantize import step_rounding
    from litllm.cpu_ops import int8_prompt_op, row_split_op

    build_checkpoint(folder, args)
    add_tokenizer(folder)
    print(f"threads {torch.get_num_threads()}, load average {open('/proc/loadavg').read().split()[:3]}")
    prompt = torch.randint(0, 2000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n = args.new_tokens
    length = max(len(prompt) + n, args.prefill_tokens + 1)
    fp32 = Engine(load_for_inference(folder, precision="32-true"), None, 1, length)
    reference = greedy(fp32, prompt, n)
    exact = teacher_forced(fp32, prompt, reference[: args.forced_steps], nullcontext)
    gaps = [float(row.topk(2).values.diff().abs()) for row in exact[:4]]
    print("fp32's top-two logit gap at its greedy tokens 0-3 (near-ties flip on any rounding): "
          + ", ".join(f"{g:.3f}" for g in gaps))
    try:
        import llama_cpp  # noqa: F401

        q8_greedy, _ = gguf_rows(folder, folder, ["q8_0"], length, torch.get_num_threads())["llama.cpp q8_0"]
        print(f"llama.cpp q8_0: greedy leaves fp32's path at token {first_divergence(q8_greedy(prompt, n), reference)}"
              f" of {n}")
    except ImportError:
        print("llama_cpp is not importable: no q8_0 row")
    long_prompt = torch.randint(0, 2000, (args.prefill_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    op = int8_prompt_op() if row_split_op() is not None else None  # built here once where it is not yet
    sides = {"kernels (before)": kernels_only, "step, fp32 GEMM": fp32_gemm_step}
    sides.update({"step, op (now)": nullcontext} if op is not None else {})
    print(f"the multi-row op: {'litllm_cpu::int8_prompt_linear' if op else 'not here (no AVX-512 VNNI or no build)'}")
    for mode in MODES:
        model = load_for_inference(folder, precision="32-true", quantize=mode)
        engine = Engine(model, None, 1, length)
        for side, ctx in sides.items():
            with ctx():
                decode_rounding = nullcontext if side.startswith("kernels") else step_rounding
                rows = teacher_forced(engine, prompt, reference[: args.forced_steps], decode_rounding)
                tokens = greedy(engine, prompt, n)
                with decode_rounding():  # the eager decode steps too (within step_rounding: as the compiled step)
                    all_tokens = greedy(engine, prompt, n)
            steps = [rel(a, b) for a, b in zip(rows[1:], exact[1:])]
            agree = statistics.mean(float(a.argmax() == b.argmax()) for a, b in zip(rows, exact))
            print(f"{mode} {side}: last prompt row's logits {rel(rows[0], exact[0]):.2%} off fp32's; decode steps "
                  f"({'eager kernels' if decode_rounding is nullcontext else 'step rounding'}) median "
                  f"{statistics.median(steps):.2%}, argmax as fp32's at {agree:.0%} of {len(rows)} teacher-forced rows;"
                  f" greedy leaves fp32's path at token {first_divergence(tokens, reference)} of {n} (eager), "
                  f"{first_divergence(all_tokens, reference)} (every step so)")
        times = {side: ([], []) for side in sides}  # (long prefill, first token) (wall, CPU) each
        for _ in range(args.repeats):  # the sides alternate
            for side, ctx in sides.items():
                with ctx():
                    for ids, ts in zip((long_prompt, prompt), times[side]):
                        w0, c0 = time.perf_counter(), time.process_time()
                        greedy(engine, ids, 1)
                        ts.append((time.perf_counter() - w0, time.process_time() - c0))
        base = min(w for w, _ in times["step, fp32 GEMM"][1])
        for side, (long_ts, first_ts) in times.items():
            walls, m = [w for w, _ in long_ts], args.prefill_tokens
            first = min(w for w, _ in first_ts)
            print(f"{mode} {side}: {m}-token prefill {m / min(walls):.0f} tok/s best, "
                  f"{m / statistics.median(walls):.0f} median, {m / min(c for _, c in long_ts):.0f} per CPU-s; "
                  f"first token of {len(prompt)} {first * 1e3:.1f} ms best ({base / first:.2f}x fp32 GEMM's), "
                  f"{statistics.median(w for w, _ in first_ts) * 1e3:.1f} median, "
                  f"{min(c for _, c in first_ts) * 1e3:.1f} CPU-ms")
        if args.compiled:
            engine.close()
            compiled = Engine(model, None, 1, length, compile=True)
            tokens = greedy(compiled, prompt, n)
            print(f"{mode} compiled: greedy leaves fp32's path at token {first_divergence(tokens, reference)} of {n}")
            compiled.close()
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
