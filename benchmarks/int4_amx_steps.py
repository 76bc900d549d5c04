"""What the int4 op's AMX-BF16 tiles save a bf16 `torchao.int4wo` model's steps (issue #27): its compiled decode step
of each `--batch` row count (benchmarks/decode_split.py's 134M Llama and step: KV-cache length 96, rows at staggered
positions) and its eager forward over a 32-token prompt, with the op's tiles (`LITLLM_INT4_AMX=1`: from one row) and
its AVX-512 kernel (`=0`) alternating in one process (the op reads the switch each call); CPU ms per step or prompt,
best and median of `--rounds`, and in how many rounds the tiles took less CPU.

    python benchmarks/int4_amx_steps.py --batch 1 4 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import litllm  # noqa: F401  (before torch: bounds OpenMP's spin-wait, litllm.bound_omp_spin)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import checkpoint_folder, env_set  # noqa: E402
from generate import add_model_args  # noqa: E402

KERNELS = {"avx512": "0", "amx": "1"}
"""The int4 op's kernels by their `$LITLLM_INT4_AMX` setting."""


def alternate(run, rounds: int) -> dict[str, list[float]]:
    """CPU seconds of `run()` per kernel, the kernels alternating (each round starts with the other)."""
    cpu = {kernel: [] for kernel in KERNELS}
    for r in range(rounds):
        for kernel in list(KERNELS)[::1 if r % 2 else -1]:
            with env_set("LITLLM_INT4_AMX", KERNELS[kernel]):
                c0 = time.process_time()
                run()
                cpu[kernel].append(time.process_time() - c0)
    return cpu


def report(label: str, cpu: dict[str, list[float]], per: int = 1) -> None:
    cells = ", ".join(f"{kernel} {min(t) / per * 1e3:.2f} / {statistics.median(t) / per * 1e3:.2f}"
                      for kernel, t in cpu.items())
    faster = sum(a < b for a, b in zip(cpu["amx"], cpu["avx512"]))
    ratio = statistics.median(b / a for a, b in zip(cpu["amx"], cpu["avx512"]))
    print(f"{label}: CPU ms best / median: {cells}; amx less CPU in {faster} of {len(cpu['amx'])} rounds, "
          f"median {ratio:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4], help="KV-cache rows of each compiled step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    parser.add_argument("--folder", type=Path, default=None, help="the random checkpoint's folder (default: "
                        "benchmarks/decode_threads.py's, reused)")
    args = parser.parse_args()

    from litllm.cpu_layout import optimize_for_decoding
    from litllm.engine import Engine, threads_for
    from litllm.inference import load_for_inference

    model = load_for_inference(checkpoint_folder(args), "cpu", "bf16-true", "torchao.int4wo")
    optimize_for_decoding(model)
    prompt, length = torch.randint(0, model.config.padded_vocab_size, (1, 32)), 96
    with torch.inference_mode(), threads_for(args.threads):
        cpu = alternate(lambda: model(prompt, input_pos=torch.arange(prompt.size(1))), args.rounds)
        report(f"32-token prompt, eager, {args.threads} thread(s)", cpu)
        for batch in args.batch:
            engine = Engine(model, None, batch, length, threads=args.threads, compile=True)
            engine._pos.copy_(torch.arange(batch)[:, None] * (length // (2 * batch)))  # staggered rows
            step = lambda: engine._decode(engine._tokens, engine._pos, None)  # noqa: E731
            step()  # warm-up
            cpu = alternate(lambda: [step() for _ in range(args.steps)], args.rounds)
            report(f"compiled step, {batch} row(s), {args.threads} thread(s), per step", cpu, args.steps)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
