"""Peak memory and throughput of full finetuning vs LoRA vs QLoRA, side by side, on one ~110M model.

Builds a random Llama-style checkpoint (12 layers, 768 wide, 32k vocabulary, tied head: ~110M
parameters) with a BPE tokenizer trained on the spot, and a JSON set whose records all fill
`--seq` tokens. Then each method runs the real command (`litllm.finetune.finetune_*`) for `--steps`
optimizer steps in a fresh process, and reports:

- train peak: the process's peak memory up to the end of the last training step (before `final/`
  is written): RSS high-water mark on CPU, `torch.cuda.max_memory_allocated` on a GPU;
- command peak: the same over the whole command, including writing the merged `final/` folder;
- tokens/s: the loop's steady-state throughput (median over the steps after the first two).

A `transformers + peft` LoRA row (the same model as a HF Llama, a plain AdamW loop, same batches)
puts the LoRA numbers next to the Hugging Face stack's. Ratios are relative to full finetuning.

    python benchmarks/finetune_memory.py [--device cuda] [--steps 8] [--seq 256] [--micro 2]
        [--methods full,lora,qlora,hf_peft_lora] [--workdir /tmp/finetune-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import json, random, sys
from pathlib import Path
import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

folder, n_records = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
words = ["model", "data", "train", "token", "layer", "weight", "loss", "batch", "memory", "speed", "the", "a",
         "of", "and", "to", "in", "is", "for", "with", "on", "learning", "rate", "gradient", "update"]
text = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n_records)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
folder.mkdir(parents=True, exist_ok=True)
tok.save(str(folder / "tokenizer.json"))
(folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
torch.manual_seed(0)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(config)
model.save_pretrained(folder)
from litllm.convert import convert_to_litllm
convert_to_litllm(folder)
records = [{"instruction": "Continue:", "output": t} for t in text]
(folder.parent / "data.json").write_text(json.dumps(records))
print(sum(p.numel() for p in model.parameters()))
"""

WORKER = """
import json, resource, statistics, sys, time
from pathlib import Path
import torch
method, folder, out, device, steps, seq, micro = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], \\
    int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
import lightning_fabric  # noqa: F401  (imports count in the baseline)
from litllm.data import JSON
from litllm.train.args import EvalArgs, TrainArgs

def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def gpu_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

baseline = rss_mib()
marks = {}
precision = "bf16-true" if device == "cuda" else "32-true"
data = JSON(json_path=folder.parent / "data.json", val_split_fraction=0.0, prompt_style="default",
            mask_prompt=False, long_records="truncate")
train = TrainArgs(global_batch_size=micro, micro_batch_size=micro, max_steps=steps, lr_warmup_steps=1,
                  save_interval=None, max_seq_length=seq, log_interval=1)
evals = EvalArgs(interval=10**9, final_validation=False)

if method == "hf_peft_lora":
    import peft, transformers
    from litllm.tokenizer import Tokenizer
    tokenizer = Tokenizer(folder)
    data.connect(tokenizer, batch_size=micro, max_seq_length=seq)
    data.setup()
    loader = data.train_dataloader()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    speeds, it = [], iter(loader)
    for step in range(steps):
        batch = next(it)
        t0 = time.perf_counter()
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = model(input_ids=ids).logits  # labels are already shifted: plain token-level CE
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        speeds.append(ids.numel() / (time.perf_counter() - t0))
    marks["train_peak"] = gpu_mib() or rss_mib()
    tokens_per_sec = statistics.median(speeds[2:] or speeds)
else:
    import litllm.train.checkpoints as ckpt
    from litllm import finetune
    real_save_final = ckpt.CheckpointWriter.save_final

    def save_final(self):
        marks["train_peak"] = gpu_mib() or rss_mib()
        return real_save_final(self)

    ckpt.CheckpointWriter.save_final = save_final
    kwargs = dict(out_dir=out, accelerator=device, precision=precision, data=data, train=train, eval=evals,
                  devices=1, logger_name="csv")
    if method == "full":
        finetune.finetune_full(folder, **kwargs)
    else:
        finetune.finetune_lora(folder, quantize="bnb.nf4" if method == "qlora" else None, **kwargs)
    import csv
    rows = list(csv.DictReader(open(next(out.glob("logs/**/metrics.csv")))))
    speeds = [float(r["tokens_per_sec"]) for r in rows if r.get("tokens_per_sec")]
    tokens_per_sec = statistics.median(speeds[2:] or speeds)
print(json.dumps({"baseline": baseline, "train_peak": marks["train_peak"], "command_peak": gpu_mib() or rss_mib(),
                  "tokens_per_sec": tokens_per_sec}))
"""

LABELS = {
    "full": "litllm finetune_full",
    "lora": "litllm finetune_lora (r=8, q,v)",
    "qlora": "litllm finetune_lora --quantize bnb.nf4",
    "hf_peft_lora": "transformers + peft LoRA (r=8, q,v)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--methods", default="full,lora,qlora,hf_peft_lora")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(LABELS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; expected some of {', '.join(LABELS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    folder = workdir / "model"
    env_path = {"PYTHONPATH": str(ROOT)}
    import os

    env = dict(os.environ, **env_path)
    if not (folder / "lit_model.safetensors").is_file():
        print(f"Building a random ~110M Llama-style model in {folder} ...", file=sys.stderr)
        made = subprocess.run([sys.executable, "-c", MAKE, str(folder), str(max(64, args.steps * args.micro * 2))],
                              capture_output=True, text=True, env=env)
        if made.returncode:
            sys.exit(made.stderr[-3000:])
    results = {}
    for method in methods:
        out = workdir / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"Running {LABELS[method]} ...", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, method, str(folder), str(out), args.device, str(args.steps), str(args.seq),
             str(args.micro)],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode:
            print(f"  failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                  file=sys.stderr)
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    unit = "GPU MiB (max allocated)" if args.device == "cuda" else "MiB (peak RSS)"
    print(f"\n{args.steps} steps x {args.micro} samples x {args.seq} tokens, device {args.device}; memory in {unit}")
    base = results.get("full")
    header = f"{'method':42s} {'train peak':>11s} {'ratio':>6s} {'above base':>11s} {'ratio':>6s} " \
             f"{'cmd peak':>9s} {'tokens/s':>9s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    for method, r in results.items():
        above = r["train_peak"] - (0 if args.device == "cuda" else r["baseline"])

        def ratio(value: float, ref: float) -> str:
            return f"{value / ref:6.2f}" if ref else "     -"

        ref_peak = base["train_peak"] if base else 0
        ref_above = (base["train_peak"] - (0 if args.device == "cuda" else base["baseline"])) if base else 0
        ref_speed = base["tokens_per_sec"] if base else 0
        print(f"{LABELS[method]:42s} {r['train_peak']:11.0f} {ratio(r['train_peak'], ref_peak)} {above:11.0f} "
              f"{ratio(above, ref_above)} {r['command_peak']:9.0f} {r['tokens_per_sec']:9.0f} "
              f"{ratio(r['tokens_per_sec'], ref_speed)}")
    if args.device == "cpu":
        print("'above base' subtracts the process's RSS after importing torch, lightning and litllm.")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
