"""One eager decode step of this checkout's model beside another revision's, in one process, alternating.

The step a short `litllm generate` runs (`GPT.decode` of one token on the KV cache, then the argmax)
on the 134M Llama of benchmarks/generate.py (fp32, column-major weights as `optimize_for_decoding` picks on the
CPUs this was measured on). The other revision's `litllm/model.py` is read with `git show` and loaded beside this
one (it imports the rest of litllm from this checkout), given the same weights, and both decode the same prompt:
the script checks that their cached logits are bit-for-bit equal, then alternates `--rounds` rounds of 8 steps
each and prints the median time per step (wall and CPU) and the ratio. Timing both in one process makes the ratio
hold on a machine shared with other jobs, where separate runs differ by 20%.

    python benchmarks/eager_step.py                          # against main, fp32, torch's thread count
    python benchmarks/eager_step.py --baseline HEAD~2 --precision bf16-true --threads 1
    python benchmarks/eager_step.py --layouts onednn-packed packed-bf16 --precision bf16-true --threads 1
    python benchmarks/eager_step.py --baseline main --precision bf16-true --threads 1 --layout packed-bf16

`--layouts A B`: this checkout's model twice, in two CPU weight layouts (`optimize_for_decoding`'s `layout`), instead
of two revisions (their logits then differ within the summation order: the script prints by how much).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, build_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def baseline_model_module(revision: str, folder: Path):
    """`litllm/model.py` of `revision`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:litllm/model.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "baseline_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cached_logits(model, prompt: list[int], n: int) -> torch.Tensor:
    """(n + 1, vocab) logits of a prefill then n greedy one-token steps on a fresh KV cache."""
    model.set_kv_cache(1, len(prompt) + n + 8)
    out = [model.decode(torch.tensor([prompt]), torch.arange(len(prompt))[None], kv_len=len(prompt))[0, -1]]
    for i in range(n):
        pos = len(prompt) + i
        out.append(model.decode(out[-1].argmax().view(1, 1), torch.tensor([[pos]]), kv_len=pos + 1)[0, -1])
    return torch.stack(out)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--layout", default="column-major",
                        help="the weight layout of both revisions' models (`optimize_for_decoding`'s `layout`)")
    parser.add_argument("--layouts", nargs=2, metavar="LAYOUT", default=None,
                        help="compare this checkout's model in these two weight layouts, not two revisions")
    args = parser.parse_args()
    from litllm.inference import load_for_inference
    from litllm.cpu_layout import optimize_for_decoding

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder, args)
        mine = load_for_inference(folder, device="cpu", precision=args.precision)
        if args.layouts:
            models = {layout: load_for_inference(folder, device="cpu", precision=args.precision)
                      for layout in args.layouts}
        else:
            baseline = baseline_model_module(args.baseline, folder)
            with torch.device("meta"):
                theirs = baseline.GPT(mine.config)
            theirs.load_state_dict(mine.state_dict(), strict=False, assign=True)
            theirs.build_rope_cache(torch.device("cpu"))
            theirs.eval()
            models = {args.baseline: theirs, "this checkout": mine}
    for name, model in models.items():
        optimize_for_decoding(model, layout=name if args.layouts else args.layout)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = list(range(1, 33))
    logits = [cached_logits(model, prompt, 16) for model in models.values()]
    print(f"cached logits bit-for-bit equal: {torch.equal(*logits)}; the prefill's largest difference "
          f"{(logits[0][0].float() - logits[1][0].float()).abs().max():.3g} of {logits[0][0].float().abs().max():.3g},"
          f" the first step's {(logits[0][1].float() - logits[1][1].float()).abs().max():.3g}; greedy tokens equal: "
          f"{torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))}")
    times = {name: ([], []) for name in models}
    token = torch.zeros(1, 1, dtype=torch.long)
    for r in range(args.rounds):
        for name in (list(models) if r % 2 else list(reversed(models))):
            for pos in range(48, 56):
                w, c = time.perf_counter(), time.process_time()
                models[name].decode(token, torch.tensor([[pos]]), kv_len=pos + 1).argmax(-1)
                times[name][0].append(time.perf_counter() - w)
                times[name][1].append(time.process_time() - c)
    median = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}
    for name, (w, c) in median.items():
        print(f"{name:>16s}: {1e3 * w:7.2f} ms/step wall, {1e3 * c:7.2f} CPU-ms/step")
    (bw, bc), (mw, mc) = median.values()
    first, second = models
    print(f"{second} / {first}: {bw / mw:.2f}x faster (wall), {bc / mc:.2f}x (CPU time); "
          f"{torch.get_num_threads()} threads, {args.precision}")


if __name__ == "__main__":
    main()
