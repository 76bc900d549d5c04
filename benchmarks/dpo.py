"""DPO with LoRA: `litllm finetune_dpo` vs TRL's `DPOTrainer` + PEFT LoRA, same model, batch and precision.

Builds a random Llama-style checkpoint (`--layers`, `--width`, `--vocab`) with a BPE tokenizer trained
on the spot, and preference pairs of random words (prompt ~ seq/4 words, replies ~ seq/2 and seq/3
words; `--seq` bounds prompt + reply for both). Each side runs in a fresh process, for `--steps`
optimizer steps of `--micro` pairs (LoRA r=8 on q and v, no dropout, DPO beta 0.1, AdamW lr 5e-5,
no activation checkpointing, the reference = the model with its adapter off on both sides):

- step time: median seconds per optimizer step after the first two (litllm: around `train_step`;
  TRL: `on_step_begin` -> `on_step_end`, a `TrainerCallback`);
- peak memory: `torch.cuda.max_memory_allocated` on a GPU; on CPU the process's RSS high-water mark at
  the end of training, and the same above the RSS measured before the model was loaded.

    python benchmarks/dpo.py [--device cuda] [--steps 10] [--seq 256] [--micro 2] [--layers 4] [--width 256]
        [--vocab 8000] [--sides litllm,trl] [--workdir /tmp/dpo-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker import StepTimer, rss_mib, run_sides, trl_side, worker_main  # noqa: E402  (the workers' shared timing)

MAKE = """
import json, random, sys
from pathlib import Path
import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

folder, n_pairs, seq, layers, width, vocab = Path(sys.argv[1]), *map(int, sys.argv[2:7])
rng = random.Random(0)
words = ["model", "data", "train", "token", "layer", "weight", "loss", "batch", "memory", "speed", "the", "a",
         "of", "and", "to", "in", "is", "for", "with", "on", "learning", "rate", "gradient", "update"]
def text(n):
    return " ".join(rng.choice(words) for _ in range(n))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([text(400) for _ in range(64)], trainers.BpeTrainer(
    vocab_size=500, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
folder.mkdir(parents=True, exist_ok=True)
tok.save(str(folder / "tokenizer.json"))
(folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                          "pad_token": "</s>"}))
config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 11 // 4,
                                  num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                                  num_key_value_heads=max(1, width // 256), max_position_embeddings=max(2048, seq),
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
torch.manual_seed(0)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(config)
model.save_pretrained(folder)
from litllm.convert import convert_to_litllm
convert_to_litllm(folder)
pairs = [{"prompt": text(seq // 4), "chosen": text(seq // 2), "rejected": text(seq // 3)} for _ in range(n_pairs)]
(folder.parent / "pairs.json").write_text(json.dumps(pairs))
print(sum(p.numel() for p in model.parameters()))
"""

def run_trl(timer: StepTimer, folder: Path, out: Path, device: str, steps: str, seq: str, micro: str) -> dict:
    """TRL's DPOTrainer + PEFT LoRA, a step timed `on_step_begin` -> `on_step_end` (a `TrainerCallback`)."""
    import torch
    import trl
    from datasets import Dataset

    steps, seq, micro = int(steps), int(seq), int(micro)
    baseline = rss_mib()
    model, tokenizer, lora, step_timer = trl_side(timer, folder, device)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=1,
                         max_steps=steps, learning_rate=5e-5, weight_decay=0.0, lr_scheduler_type="constant",
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu",
                         bf16=device == "cuda", gradient_checkpointing=False, max_length=seq, beta=0.1,
                         dataloader_num_workers=0, disable_dropout=True)
    pairs = json.loads((folder.parent / "pairs.json").read_text())
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                             peft_config=lora, callbacks=[step_timer])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return timer.result(baseline)


def run_litllm(timer: StepTimer, folder: Path, out: Path, device: str, steps: str, seq: str, micro: str) -> dict:
    """litllm's finetune_dpo, a step timed around the loop's `train_step`."""
    import lightning_fabric  # noqa: F401  (imports count in the baseline)

    from litllm import finetune
    from litllm.data import Preference
    from litllm.train import loop
    from litllm.train.args import EvalArgs, TrainArgs

    steps, seq, micro = int(steps), int(seq), int(micro)
    baseline = rss_mib()
    timer.wrap_step(loop, "train_step")
    finetune.finetune_dpo(
        folder, out_dir=out, accelerator=device, precision="bf16-true" if device == "cuda" else "32-true", devices=1,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True, lora_value=True, beta=0.1,
        data=Preference(json_path=folder.parent / "pairs.json", prompt_style="default", val_split_fraction=0.0),
        train=TrainArgs(global_batch_size=micro, micro_batch_size=micro, max_steps=steps, lr_warmup_steps=0,
                        save_interval=None, max_seq_length=seq, log_interval=1),
        eval=EvalArgs(interval=10**9, final_validation=False), logger_name="csv",
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-5, "weight_decay": 0.0}},
    )
    return timer.result(baseline)


LABELS = {"litllm": "litllm finetune_dpo (LoRA r=8 q,v)", "trl": "TRL DPOTrainer + PEFT LoRA (r=8 q,v)"}


def chosen_sides(parser: argparse.ArgumentParser, sides: str, labels: dict[str, str]) -> list[str]:
    """The `--sides` list, each one of `labels` (else a parser error)."""
    chosen = [s.strip() for s in sides.split(",")]
    if set(chosen) - set(labels):
        parser.error(f"unknown sides {sorted(set(chosen) - set(labels))}; expected some of {', '.join(labels)}")
    return chosen


def build_model(folder: Path, env: dict, records: int, seq: int, layers: int, width: int, vocab: int) -> None:
    """The random Llama-style model in `folder` and pairs.json beside it (MAKE), unless already there."""
    if (folder / "lit_model.safetensors").is_file():
        return
    print(f"Building a random Llama-style model in {folder} ...", file=sys.stderr)
    made = subprocess.run([sys.executable, "-c", MAKE, str(folder), str(records), str(seq), str(layers), str(width),
                           str(vocab)], capture_output=True, text=True, env=env)
    if made.returncode:
        sys.exit(made.stderr[-3000:])
    print(f"  {int(made.stdout.split()[-1]):,} parameters", file=sys.stderr)


def main() -> None:
    if "--worker" in sys.argv:
        return worker_main(globals())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2, help="pairs per step (2x rows: chosen + rejected)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--sides", default="litllm,trl")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sides = chosen_sides(parser, args.sides, LABELS)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    folder = workdir / "model"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    build_model(folder, env, max(32, args.steps * args.micro * 2), args.seq, args.layers, args.width, args.vocab)
    runs = run_sides(Path(__file__).resolve(), sides, LABELS, folder, workdir, env,
                     [args.device, args.steps, args.seq, args.micro])
    results = {side: r[0] for side, r in runs.items()}

    unit = "GPU MiB (max allocated)" if args.device == "cuda" else "MiB (peak RSS; above: minus RSS before the model)"
    print(f"\n{args.steps} steps x {args.micro} pairs, prompt + reply <= {args.seq} tokens, {args.layers} layers x "
          f"{args.width} wide, vocab {args.vocab}, device {args.device}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}; memory in {unit}")
    header = f"{'':40s} {'step s':>8s} {'speedup':>8s} {'peak':>9s} {'above':>9s}"
    print(header)
    print("-" * len(header))
    ref = results.get("trl")
    for side, r in results.items():
        speedup = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        print(f"{LABELS[side]:40s} {r['step_s']:8.3f} {speedup:>8s} {r['peak']:9.0f} {r['above_baseline']:9.0f}")


if __name__ == "__main__":
    main()
