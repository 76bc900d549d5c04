"""Write tutorials/resource_tables.md: `litllm estimate` of every config_hub recipe on 24, 40 and 80 GB GPUs.

Every figure is an ESTIMATE (fake-tensor step + MemTracker, see litllm/estimate.py), not a measurement.
For each recipe, as written (its devices, micro-batch, sequence length, precision): the peak memory per
device and its breakdown, and for each GPU class whether it fits, else the first change that makes it
fit; time per 1,000 optimizer steps at 40% MFU on that class's bf16 peak. Two extra rows estimate the
configurations LitGPT publishes figures for (Llama 2 7B, LoRA and QLoRA, bf16-true, micro-batch 1).

    python benchmarks/resource_tables.py [--out tutorials/resource_tables.md] [--only llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from litllm.estimate import estimate_training, peak_memory  # noqa: E402
from litllm.estimate_cli import gpu_peak_flops, parse_command, training_plan  # noqa: E402

GPUS = [  # (column, memory in bytes, the PEAK_FLOPS key for its bf16 peak)
    ("24 GB (A10G)", 24 * 10**9, "A10G"),
    ("40 GB (A100)", 40 * 10**9, "A100"),
    ("80 GB (H100)", 80 * 10**9, "H100"),
]
# LitGPT's published peaks (config_hub/finetune/README.md of Lightning-AI/litgpt): Llama 2 7B on Alpaca2k,
# bf16-true, micro-batch 1, one A100 40GB; LoRA r=8 on query+value, max_seq_length 512 as in its recipes
LITGPT = [
    ("Llama-2-7b-hf LoRA (LitGPT: 21.3 GB)", 21.3e9, ["finetune_lora", "checkpoints/meta-llama/Llama-2-7b-hf"]),
    ("Llama-2-7b-hf QLoRA nf4-dq (LitGPT: 14.1 GB)", 14.1e9,
     ["finetune_lora", "checkpoints/meta-llama/Llama-2-7b-hf", "--quantize", "bnb.nf4-dq"]),
]
LITGPT_FLAGS = ["--precision", "bf16-true", "--train.micro_batch_size", "1", "--train.global_batch_size", "16",
                "--train.max_seq_length", "512", "--lora_r", "8", "--lora_alpha", "16", "--devices", "1"]


def recipes(only: str | None):
    for path in sorted((ROOT / "config_hub/finetune").glob("*/*.yaml")):
        command = "finetune_full" if path.stem == "full" else "finetune_lora"
        if only is None or only in str(path):
            yield path.relative_to(ROOT), command, ["--config", str(path)]
    for path in sorted((ROOT / "config_hub/pretrain").glob("*.yaml")):
        if only is None or only in str(path):
            yield path.relative_to(ROOT), "pretrain", ["--config", str(path)]


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def cheapest_fix(plan, memory: int, cache: dict) -> str:
    """The first of: a smaller micro-batch, activation checkpointing, both, more FSDP devices, that fits."""
    candidates = []
    if plan.micro_batch_size > 1:
        candidates.append(("micro-batch 1", dict(micro_batch_size=1)))
    if not plan.activation_checkpointing:
        candidates.append(("activation checkpointing", dict(activation_checkpointing=True)))
        if plan.micro_batch_size > 1:
            candidates.append(("micro-batch 1 + act. ckpt", dict(micro_batch_size=1, activation_checkpointing=True)))
    for n in (2, 4, 8):
        if n > plan.world_size and plan.global_batch_size % (n * plan.micro_batch_size) == 0:
            candidates.append((f"FSDP on {n} GPUs", dict(world_size=n, strategy="fsdp")))
    for label, overrides in candidates:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = peak_memory(plan, **overrides)["total"]
        if cache[key] <= memory:
            return f"with {label}: {gb(cache[key])}"
    return "no single change fits"


def row(name: str, command: str, argv: list[str]) -> tuple[str, float]:
    kwargs, _ = parse_command(command, argv)
    plan = training_plan(command, kwargs)
    start = time.perf_counter()
    est = estimate_training(plan, command, fixes=False)
    b = est.breakdown
    setup = (f"{plan.method}{'+' + plan.quantize if plan.quantize else ''}, {plan.precision}, {plan.world_size} dev, "
             f"mb {plan.micro_batch_size} x {plan.seq_length}{', AC' if plan.activation_checkpointing else ''}")
    cells = [f"`{name}`", setup, f"**{gb(est.peak_memory_bytes)}**",
             " / ".join(gb(b[k]) for k in ("weights", "gradients", "optimizer_state")),
             gb(b["activations"] + b["logits_and_loss"] + b["temporaries"])]
    cache: dict = {}
    for _, memory, key in GPUS:
        fits = est.peak_memory_bytes <= memory
        seconds = est.flops_per_step * (4 / 3 if plan.activation_checkpointing else 1) / (
            0.4 * gpu_peak_flops(key, "bf16-true") * plan.world_size)
        cells.append(f"fits; {seconds * 1000 / 3600:.2f} h" if fits else cheapest_fix(plan, memory, cache))
    return "| " + " | ".join(cells) + " |", est.peak_memory_bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tutorials/resource_tables.md"))
    parser.add_argument("--only", default=None, help="only recipes whose path contains this")
    args = parser.parse_args()

    header = ("| recipe | as run | peak/device GB | weights / grads / optimizer GB | activations + logits + temp GB | "
              + " | ".join(f"{name}: fits? time per 1k steps" for name, _, _ in GPUS) + " |")
    lines = [
        "# Resource tables (estimates)",
        "",
        "**Every number on this page is an estimate by `litllm estimate`** (the training step run on fake tensors",
        "under torch's MemTracker; bitsandbytes weights and FSDP shares by formula; see `litllm/estimate.py` and",
        "[oom.md](oom.md)), not a measurement. Generated by `python benchmarks/resource_tables.py`.",
        "",
        "Each recipe is estimated as written (its devices, micro-batch, sequence length, precision). Peak memory is",
        "what PyTorch's allocator holds for tensors at the step's peak; add ~0.5-1 GB for the CUDA context and",
        "allocator fragmentation. A GPU column shows `fits` and the time per 1,000 optimizer steps at 40% MFU of",
        "that GPU's bf16 dense peak (litllm/train/flops.py), or, when it does not fit, the first change that does",
        "(and its new peak). Recipes whose `checkpoint_dir` isn't downloaded are estimated from the preset of the",
        "same name; `devices: auto` counts as 1 device (no GPU was visible). No GPU was available when this page",
        "was generated: there are no measured columns yet",
        "(`benchmarks/gpu_check.sh` measures LoRA/QLoRA peaks on a GPU against the estimate).",
        "",
        header,
        "|" + "---|" * (5 + len(GPUS)),
    ]
    for path, command, argv in recipes(args.only):
        try:
            line, _, seconds = row(str(path), command, argv)
        except Exception as e:  # one bad recipe must not hide the others
            line, seconds = f"| `{path}` | error: {type(e).__name__}: {e} |", 0.0
        print(f"{path}: {seconds:.1f}s", file=sys.stderr)
        lines.append(line)

    lines += [
        "",
        "## Compared with LitGPT's published figures",
        "",
        "LitGPT publishes measured peaks for Llama 2 7B on one A100 40GB (bf16-true, micro-batch 1, Alpaca2k).",
        "The rows below estimate the same configurations with litllm (LoRA r=8 on query and value, max_seq_length",
        "512). LitGPT's figures are `torch.cuda.max_memory_allocated` of whole runs: they include the longest",
        "sample's step and framework overheads, and its LoRA/QLoRA code is not litllm's, so agreement is expected",
        "in magnitude, not to the last GB. The QLoRA estimate is half LitGPT's figure; no GPU has checked it yet",
        "(`benchmarks/gpu_check.sh` measures litllm's own LoRA/QLoRA peaks against the estimate).",
        "",
        "| configuration | LitGPT measured GB | litllm estimate GB | weights / grads / optimizer GB | activations + logits + temp GB |",
        "|---|---|---|---|---|",
    ]
    for name, published, argv in LITGPT:
        kwargs, _ = parse_command(argv[0], argv[1:] + LITGPT_FLAGS)
        plan = training_plan(argv[0], kwargs)
        est = estimate_training(plan, argv[0], fixes=False)
        b = est.breakdown
        lines.append(f"| {name} | {gb(published)} | **{gb(est.peak_memory_bytes)}** | "
                     + " / ".join(gb(b[k]) for k in ("weights", "gradients", "optimizer_state"))
                     + f" | {gb(b['activations'] + b['logits_and_loss'] + b['temporaries'])} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
