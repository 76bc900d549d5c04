"""Greedy decoding speed: litllm vs transformers `generate`, side by side, and the memory-bandwidth bound.

Both run the same converted model (a ~125M-parameter Llama with random weights, fp32, batch 1, KV
cache), the same prompt and the same number of new tokens. Decoding one token reads every weight
once (the embedding only reads one row), so tokens/s can't exceed
    measured read bandwidth / bytes of weights read per token;
the script measures this machine's read bandwidth itself and prints each side's fraction of that bound.

    python benchmarks/generate.py                      # defaults: 32-token prompt, 128 new tokens
    python benchmarks/generate.py --threads 1          # both sides on one thread
    python benchmarks/generate.py --n_layer 4 --new_tokens 32   # a quick run
    python benchmarks/generate.py --no_compile --quantize torchao.int8wo torchao.int4wo@bf16-true none@bf16-true

litllm runs as `litllm generate` does: on its decode engine (`litllm.engine.Engine`, one row), with the
faster CPU weight layout and thread count for decoding (`optimize_for_decoding`, `pick_decode_threads`);
transformers runs with torch's defaults. `litllm compiled` is the same engine with its decode step
`torch.compile`d (static shapes, no host sync in the step; `--no_compile` skips it).
`--quantize MODE[@PRECISION] ...` adds a litllm row per entry, loaded as `litllm generate --quantize MODE
--precision PRECISION` loads (`none` = unquantized, default precision 32-true); its bound counts the bytes
its quantized weights really hold (packed values, scales, zero points).
Figures on a shared machine are noisy: the two alternate `--repeats` times; best and median runs
are shown, and tokens per CPU-second (less sensitive to other processes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def read_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes/s at which this machine reads memory with torch's threads (a sum over a tensor larger than
    caches); the median of `repeats` timings, so one lucky or disturbed run doesn't decide it."""
    x = torch.rand(n_bytes // 4, dtype=torch.float32)
    x.sum()  # touch the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times)


def build_checkpoint(folder: Path, args) -> int:
    """Save a random HF Llama and convert it; return the bytes of weights one decode step reads."""
    import transformers

    from litllm.convert import convert_to_litllm

    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.n_embd, num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head, num_key_value_heads=args.n_head, intermediate_size=args.intermediate_size,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    convert_to_litllm(folder)
    n_params = sum(p.numel() for p in model.parameters())
    per_token = n_params - model.model.embed_tokens.weight.numel()  # the embedding lookup reads one row
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters, {args.n_layer} layers, n_embd {args.n_embd}, fp32")
    return per_token * 4


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The size of the Llama `build_checkpoint` makes (default: ~134M parameters)."""
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--intermediate_size", type=int, default=2048)
    parser.add_argument("--vocab_size", type=int, default=32000)


def linear_bytes(model) -> int:
    """Bytes of the model's Linear weights and biases as stored (a torchao tensor subclass: its inner tensors)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for t in (module.weight, module.bias):
                if t is None:
                    continue
                inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
                total += sum(getattr(t, name).nbytes for name in inner) if inner else t.nbytes
    return total


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled decode step")
    parser.add_argument("--quantize", nargs="*", default=[], metavar="MODE[@PRECISION]",
                        help="extra litllm rows, e.g. torchao.int8wo torchao.int4wo@bf16-true none@bf16-true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both (default: torch's choice; litllm may pick fewer, as its commands do)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from litllm.engine import Engine, Request
    from litllm.inference import load_for_inference, optimize_for_decoding, pick_decode_threads

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weight_bytes = build_checkpoint(folder, args)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # the path `litllm generate` takes: load, pick the faster CPU weight layout and thread count
        lit = load_for_inference(folder, device="cpu", precision="32-true")
        fp32_linear_bytes = linear_bytes(lit)
        layout = optimize_for_decoding(lit)
        lit_threads = pick_decode_threads(lit)
        row_bytes = {"transformers": weight_bytes, "litllm": weight_bytes, "litllm compiled": weight_bytes}
        extra = {}  # row name -> (model, threads)
        for spec in args.quantize:
            mode, _, precision = spec.partition("@")
            model = load_for_inference(folder, device="cpu", precision=precision or "32-true",
                                       quantize=None if mode == "none" else mode)
            row_bytes[spec] = weight_bytes - fp32_linear_bytes + linear_bytes(model)
            optimize_for_decoding(model)
            extra[spec] = (model, pick_decode_threads(model))

    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    engines = {"litllm": Engine(lit, None, 1, prompt.numel() + n, threads=lit_threads)}
    for spec, (model, threads) in extra.items():
        engines[spec] = Engine(model, None, 1, prompt.numel() + n, threads=threads)

    def decode(engine):
        engine.add(Request(prompt.tolist(), n))
        tokens = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
        return tokens

    def run_litllm():
        return decode(engines["litllm"])

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(
            prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=0,
        )
        return out[0, prompt.numel():].tolist()

    reference = run_hf()
    same = run_litllm() == reference  # also the warm-up of both
    runs: dict[str, list[tuple[float, float]]] = {"transformers": [], "litllm": []}
    for spec in extra:
        tokens = decode(engines[spec])  # warm-up; a quantized model may pick other tokens
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        print(f"{spec}: the first {agree} of {n} greedy tokens equal transformers' fp32 ones")
        runs[spec] = []
    if not args.no_compile:
        engines["litllm compiled"] = Engine(lit, None, 1, prompt.numel() + n, threads=lit_threads, compile=True)
        t0 = time.perf_counter()
        same_compiled = decode(engines["litllm compiled"]) == run_hf()  # compiles
        print(f"compiling the decode step took {time.perf_counter() - t0:.0f} s; same tokens: {same_compiled}")
        runs["litllm compiled"] = []
    bandwidth = read_bandwidth()
    bound = bandwidth / weight_bytes
    # alternate them so that load from other users of the machine hits all alike
    for _ in range(args.repeats):
        runs["transformers"].append(timed(run_hf))
        for name, engine in engines.items():
            runs[name].append(timed(lambda: decode(engine)))
    bandwidth = statistics.median([bandwidth, read_bandwidth(), read_bandwidth()])
    bound = bandwidth / weight_bytes

    print(f"threads: {torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, {n} new tokens, greedy, batch 1,"
          f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"same tokens: {same}; litllm: {layout} weights, {lit_threads} thread(s) chosen for decoding"
          f" (transformers: torch's {torch.get_num_threads()})")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s; weights read per token: {weight_bytes / 1e6:.0f} MB"
          f" -> bound {bound:.1f} tokens/s")
    # best: the run least disturbed by other processes; per CPU-second: work efficiency, less sensitive to load
    width = max(14, *(len(name) + 2 for name in runs))
    print(f"{'':{width}s}{'tokens/s best':>14s}{'median':>8s}{'MB/token':>10s}{'of bound':>10s}{'tokens/CPU-s':>14s}")
    best = {}
    for name, times in runs.items():
        walls = [w for w, _ in times]
        best[name] = n / min(walls)
        per_cpu = n / min(c for _, c in times)
        of_bound = best[name] / (bandwidth / row_bytes[name])
        print(f"{name:{width}s}{best[name]:14.1f}{n / statistics.median(walls):8.1f}{row_bytes[name] / 1e6:10.0f}"
              f"{of_bound:10.0%}{per_cpu:14.1f}")
    for name in engines:
        print(f"{name} / transformers: {best[name] / best['transformers']:.2f}x (best runs)")
    for spec in extra:
        print(f"{spec} / litllm fp32: {best[spec] / best['litllm']:.2f}x (best runs)")


if __name__ == "__main__":
    main()
