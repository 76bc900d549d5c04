"""Where the eager one-token decode step's time goes beyond the weight reads, in one process, alternating.

On the 134M Llama of benchmarks/generate.py (fp32, column-major weights as `optimize_for_decoding` picks here),
at each of `--threads`, it times side by side:

- `eager`: `GPT.decode` of one token with `kv_len` (what a short `litllm generate` runs), then argmax;
- `matmuls only`: the step's 49 `F.linear` calls on ready inputs and nothing else (the floor an eager step could reach);
- `jit trace+freeze`: the same step (`kv_len=None`, the whole cache: a trace fixes every shape) traced with
  `torch.jit.trace` and `torch.jit.freeze`d, which runs its aten ops without Python (checked bit for bit against
  eager on the whole cache first); and `torch.jit.optimize_for_inference` of it.

First it counts the aten ops the eager step calls from Python (and all of them, nested ones included, under the
profiler). It prints the median wall and CPU time per step and each one's speed over `eager` (thread counts alternate
within each round too, so their ratio holds on a machine shared with other jobs). torch's NNC fuser, which would
fuse the traced step's elementwise ops on the CPU, needs the LLVM backend that torch's CPU wheels lack (it is
tried, and reported when missing).

    python benchmarks/decode_overhead.py                   # 1 and 2 threads: ~1 minute on 2 quiet cores
    python benchmarks/decode_overhead.py --threads 1 --rounds 20

(On cores that other jobs keep busy, a 2-thread step can be 10x slower and the default run take 8 minutes.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, build_checkpoint  # noqa: E402


class Step(torch.nn.Module):
    """One decode step on the whole cache, a module `torch.jit.trace` can take."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.decode(idx, input_pos)


def jit_steps(model, token: torch.Tensor) -> dict:
    """{name: traced step} and the seconds each took to build."""
    steps = {}
    start = time.perf_counter()
    frozen = torch.jit.freeze(torch.jit.trace(Step(model).eval(), (token, torch.tensor([[40]])), check_trace=False))
    steps["jit trace+freeze"] = (frozen, time.perf_counter() - start)
    start = time.perf_counter()
    steps["jit optimize_for_inference"] = (torch.jit.optimize_for_inference(frozen), time.perf_counter() - start)
    try:
        torch._C._jit_override_can_fuse_on_cpu(True)
        start = time.perf_counter()
        fused = torch.jit.freeze(torch.jit.trace(Step(model).eval(), (token, torch.tensor([[40]])), check_trace=False))
        for pos in range(3):  # the profiling executor fuses after a few runs
            fused(token, torch.tensor([[40 + pos]]))
        steps["jit NNC fuser"] = (fused, time.perf_counter() - start)
    except RuntimeError as e:
        print(f"jit NNC fuser: not available here ({e})")
    finally:
        torch._C._jit_override_can_fuse_on_cpu(False)
    return steps


def count_ops(step) -> tuple[int, int]:
    """(aten ops called from Python, aten ops in all) of one call of `step` under inference mode, as the engine runs
    it (under no_grad alone Python calls more of them: views and inference tensors go through autograd's layers)."""
    from torch.profiler import profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):  # sees the ops Python calls, not those they call in turn
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode():
        with Count() as top:
            step()
        with profile() as prof:
            step()
    return top.calls, sum(1 for e in prof.events() if e.name.startswith("aten::"))


def cached_logits(model, step, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1, vocab) logits of a prefill then n greedy steps of `step` on a fresh cache."""
    model.set_kv_cache(1, 128)
    out = [model.decode(prompt, torch.arange(prompt.size(1))[None], kv_len=prompt.size(1))[0, -1]]
    for i in range(n):
        out.append(step(out[-1].argmax().view(1, 1), torch.tensor([[prompt.size(1) + i]]))[0, -1])
    return torch.stack(out)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    from litllm.inference import load_for_inference, pick_decode_threads
    from litllm.cpu_layout import optimize_for_decoding

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), args)
        model = load_for_inference(Path(tmp), device="cpu", precision="32-true")
    optimize_for_decoding(model, layout="column-major")
    prompt, token = torch.arange(1, 33)[None], torch.zeros(1, 1, dtype=torch.long)
    reference = cached_logits(model, lambda i, p: model.decode(i, p), prompt, 8)
    jitted = jit_steps(model, token)
    for name, (step, seconds) in jitted.items():
        equal = torch.equal(reference, cached_logits(model, step, prompt, 8))
        print(f"{name}: built in {seconds:.1f}s, logits bit-for-bit those of eager on the whole cache: {equal}")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def matmuls_only(pos: int) -> None:
        for m, x in zip(linears, inputs):
            F.linear(x, m.weight, m.bias)

    steps = {"eager": lambda pos: model.decode(token, torch.tensor([[pos]]), kv_len=pos + 1).argmax(-1),
             "matmuls only": matmuls_only}
    for name, (step, _) in jitted.items():
        steps[name] = lambda pos, step=step: step(token, torch.tensor([[pos]])).argmax(-1)
    model.set_kv_cache(1, 128)
    model.decode(prompt, torch.arange(32)[None], kv_len=32)
    position = torch.tensor([[40]])
    steps["eager"](40)  # (a first step makes what later ones reuse)
    top, nested = count_ops(lambda: model.decode(token, position, kv_len=41).argmax(-1))
    print(f"eager step: {top} aten ops called from Python, {nested} in all (profiler, nested ones counted)")
    runs = [(n, name) for n in args.threads for name in steps]
    times = {run: ([], []) for run in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for n, name in (runs if r % 2 else list(reversed(runs))):
            torch.set_num_threads(n)
            for pos in range(48, 56):
                w, c = time.perf_counter(), time.process_time()
                steps[name](pos)
                if r:
                    times[(n, name)][0].append(time.perf_counter() - w)
                    times[(n, name)][1].append(time.process_time() - c)
    median = {run: (statistics.median(w), statistics.median(c)) for run, (w, c) in times.items()}
    for n, name in runs:
        (w, c), (ew, ec) = median[(n, name)], median[(n, "eager")]
        print(f"{n} thread(s) {name:>27s}: {1e3 * w:7.2f} ms/step wall ({ew / w:.2f}x eager), "
              f"{1e3 * c:7.2f} CPU-ms/step ({ec / c:.2f}x)")
    if len(args.threads) > 1:
        (w1, _), (w2, _) = median[(args.threads[0], "eager")], median[(args.threads[-1], "eager")]
        print(f"eager at {args.threads[-1]} threads / at {args.threads[0]}: {w1 / w2:.2f}x faster (wall)")
    torch.set_num_threads(max(args.threads))
    print(f"pick_decode_threads from {max(args.threads)} threads, now: {pick_decode_threads(model)}")


if __name__ == "__main__":
    main()
