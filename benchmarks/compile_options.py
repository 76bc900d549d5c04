"""The compiled decode step of the 134M Llama under several inductor CPU settings, in one process, alternating.

Each `--options` dict replaces what `litllm.compile_decode.cpu_compile_options` picks for one Engine (compiled, or loaded from
the saved steps of the same settings); bf16 rows multiply by `OneRowLinear` (as every compiled 16-bit step does,
`litllm.cpu_layout.one_row_linears`), `--fp32` adds an fp32 row per setting. Steps are compiled afresh in a private
cache (~1 minute each). Each row first decodes 32 greedy tokens after a 32-token prompt and says whether they equal
eager bf16's;
then `--rounds` rounds alternate the rows and it prints the median and best CPU-ms per token (CPU time: a loaded
machine disturbs it least) and the best wall time.

    python benchmarks/compile_options.py --fp32      # settings 4 and 10 (before / after issue #27), 1 thread
    python benchmarks/compile_options.py --options "{'realize_cpu_opcount_threshold': 5}" "{}"
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_args, add_tokenizer, build_checkpoint  # noqa: E402


@torch.inference_mode()
def main() -> None:
    import litllm.compile_decode as compile_decode
    from litllm.engine import Engine, Request
    from litllm.inference import load_for_inference
    from litllm.cpu_layout import optimize_for_decoding

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--options", nargs="+", default=["{'realize_cpu_opcount_threshold': 4}",
                                                         "{'realize_cpu_opcount_threshold': 10}"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--fp32", action="store_true", help="an fp32 row per setting too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, min(2000, args.vocab_size), (32,), generator=torch.Generator().manual_seed(0)).tolist()

    def decode(engine) -> list[int]:
        engine.add(Request(prompt, args.new_tokens))
        tokens = []
        while engine.has_unfinished:
            tokens += [t for out in engine.step() for t in out.token_ids]
        return tokens

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # a private cache: every step is compiled here
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "compile_cache")
        build_checkpoint(folder, args)
        add_tokenizer(folder)
        models = {"bf16": load_for_inference(folder, device="cpu", precision="bf16-true")}
        optimize_for_decoding(models["bf16"])  # the compiled step takes its weights as OneRowLinears whatever it picks
        if args.fp32:
            models["fp32"] = load_for_inference(folder, device="cpu", precision="32-true")
            optimize_for_decoding(models["fp32"])
        length = len(prompt) + args.new_tokens
        with Engine(models["bf16"], None, 1, length, threads=args.threads) as eager:
            reference = decode(eager)
        engines = {}
        for precision, model in models.items():
            for options in args.options:
                settings = ast.literal_eval(options)
                compile_decode.cpu_compile_options = lambda model, settings=settings: settings
                t0 = time.perf_counter()
                engine = Engine(model, None, 1, length, threads=args.threads, compile=True)
                tokens = decode(engine)
                same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
                print(f"{precision} {options}: {getattr(engine, 'step_source', 'compiled')} in "
                      f"{time.perf_counter() - t0:.0f} s" + (f"; {same} of {len(reference)} greedy tokens equal "
                                                             "eager bf16's" if precision == "bf16" else ""))
                engines[f"{precision} {options}"] = engine
        cpu: dict = {name: [] for name in engines}
        wall: dict = {name: [] for name in engines}
        for r in range(args.rounds):
            names = list(engines)[r % len(engines):] + list(engines)[: r % len(engines)]  # rotate who goes first
            for name in names:
                c0, w0 = time.process_time(), time.perf_counter()
                decode(engines[name])
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    n = args.new_tokens
    print(f"{'row':52s}{'CPU-ms/token median':>20s}{'best':>8s}{'wall-ms best':>14s}")
    for name in engines:
        print(f"{name:52s}{statistics.median(cpu[name]) / n * 1e3:20.1f}{min(cpu[name]) / n * 1e3:8.1f}"
              f"{min(wall[name]) / n * 1e3:14.1f}")


if __name__ == "__main__":
    main()
