"""The Python parts of benchmarks/gpu_check.sh (one CUDA GPU). Each prints `key: value` lines.

    python benchmarks/gpu_check.py mfu [--compile]       # bf16 pretraining MFU, TinyLlama-1.1B shapes, FSDP on 1 device
    python benchmarks/gpu_check.py memory METHOD          # peak of a real step vs `litllm estimate` (Llama-3.2-1B shapes)

METHOD: pretrain, lora or qlora. Both run the training loop's own pieces (make_fabric, prepare_model,
train_step) on random tokens; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _batches(n: int, B: int, T: int, vocab: int):
    return [{"input_ids": torch.randint(0, vocab, (B, T)), "labels": torch.randint(0, vocab, (B, T))} for _ in range(n)]


def mfu(compile: bool, steps: int = 8, B: int = 4, T: int = 2048) -> None:
    from litllm.config import Config
    from litllm.train.fabric import make_fabric
    from litllm.train.flops import device_peak_flops, flops_per_token
    from litllm.train.loop import Method, prepare_model, train_step

    config = Config.from_name("TinyLlama-1.1B-Chat-v1.0")  # TinyLlama-1.1B shapes
    fabric = make_fabric(devices=1, strategy="fsdp", precision="bf16-mixed", accelerator="cuda")
    fabric.launch()
    with torch.device("meta"):
        from litllm.model import GPT

        model = GPT(config)
    model.max_seq_length = T
    model = prepare_model(fabric, model, Method(), compile=compile)
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    for _ in range(3):  # warm-up (and compilation)
        train_step(fabric, model, opt, _batches(1, B, T, config.vocab_size), 1.0, -100)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(fabric, model, opt, _batches(1, B, T, config.vocab_size), 1.0, -100)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    achieved = flops_per_token(config, T) * B * T / seconds
    peak = device_peak_flops(fabric.device, "bf16-mixed")
    print(f"mfu_tinyllama_1.1b_bf16_fsdp1_compile_{compile}: {achieved / peak:.3f} "
          f"({achieved / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f}; {seconds * 1000:.0f} ms/step, B={B}, T={T}, "
          f"peak mem {torch.cuda.max_memory_allocated() / 1e9:.1f} GB)")


def memory(method: str, B: int = 4, T: int = 512) -> None:
    from litllm.config import Config
    from litllm.estimate import TrainPlan, peak_memory
    from litllm.lora import LoRASettings, lora_method
    from litllm.model import GPT
    from litllm.train.fabric import make_fabric
    from litllm.train.loop import Method, prepare_model, train_step

    config = Config.from_name("Llama-3.2-1B")
    quantize = "bnb.nf4" if method == "qlora" else None
    name = "pretrain" if method == "pretrain" else "lora"
    lora = LoRASettings(r=8, alpha=16, query=True, value=True) if name == "lora" else None
    precision = "bf16-true"
    plan = TrainPlan(config=config, method=name, lora=lora, quantize=quantize, precision=precision,
                     micro_batch_size=B, seq_length=T, global_batch_size=2 * B)
    estimated = peak_memory(plan)

    fabric = make_fabric(devices=1, strategy="single", precision=precision, accelerator="cuda")
    fabric.launch()
    with fabric.init_module():
        model = GPT(config)
    model.max_seq_length = T
    train_method = Method(name="pretrain") if name == "pretrain" else lora_method(
        lora, quantize=quantize, device=fabric.device, param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    model = prepare_model(fabric, model, train_method)
    opt = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    train_step(fabric, model, opt, _batches(2, B, T, config.vocab_size), 1.0, -100)  # creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(fabric, model, opt, _batches(2, B, T, config.vocab_size), 1.0, -100)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    ratio = estimated["total"] / measured
    print(f"peak_{method}_llama-3.2-1b_bf16-true_mb{B}x{T}: measured {measured / 1e9:.3f} GB, estimate "
          f"{estimated['total'] / 1e9:.3f} GB, ratio {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.1 else 'OUTSIDE'} 10%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    m = sub.add_parser("mfu")
    m.add_argument("--compile", action="store_true")
    mem = sub.add_parser("memory")
    mem.add_argument("method", choices=["pretrain", "lora", "qlora"])
    args = parser.parse_args()
    if args.part == "mfu":
        mfu(args.compile)
    else:
        memory(args.method)


if __name__ == "__main__":
    main()
