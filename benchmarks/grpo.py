"""GRPO with LoRA: `litllm finetune_grpo` vs TRL's `GRPOTrainer` + PEFT LoRA, same model, prompts, G, length, precision.

Builds the random Llama-style checkpoint of `benchmarks/dpo.py` (`--layers`, `--width`, `--vocab`; BPE tokenizer
trained on the spot) and uses its pairs' prompts (~seq/4 random words). Each side runs in a fresh process for
`--steps` optimizer steps of `--prompts` prompts x `--generations` completions of up to `--new` tokens (sampling at
temperature 1, no top-k/top-p), LoRA r=8 on q and v (no dropout), beta 0 (no reference pass), loss dapo, AdamW lr
1e-5, one reward function (the share of the letter 'e' in the completion; cheap, the same on both sides):

- step time: median seconds per optimizer step after the first two (litllm: around `train_step`, which includes the
  rollout; TRL: `on_step_begin` -> `on_step_end`, which includes its generation);
- completion tokens per second of step time (both), and litllm's rollout-only tokens/s (`rollout/tokens_per_sec`);
- peak memory: `torch.cuda.max_memory_allocated` on a GPU; on CPU the process's RSS high-water mark at the end, and
  the same above the RSS measured before the model was loaded.

    python benchmarks/grpo.py [--device cuda] [--steps 6] [--prompts 2] [--generations 4] [--new 64] [--layers 4]
        [--width 256] [--vocab 8000] [--sides litllm,trl] [--workdir /tmp/grpo-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import build_model, chosen_sides, run_sides  # noqa: E402  (the DPO benchmark's random model and runner)

REWARD = '''
def e_share(prompts, completions, **kwargs):
    return [c.count("e") / max(1, len(c)) for c in completions]
'''

WORKER = """
import json, resource, statistics, sys, time
from pathlib import Path
import torch
side, folder, out, device = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
steps, prompts, G, new = map(int, sys.argv[5:9])
sys.path.insert(0, str(folder.parent))
from bench_reward import e_share

def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

times, tokens = [], []
records = [json.loads(line) for line in (folder.parent / "prompts.jsonl").read_text().splitlines()]
if side == "trl":
    import peft, transformers, trl
    from datasets import Dataset
    baseline = rss_mib()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(); self.t0 = time.perf_counter()
        def on_step_end(self, args, state, control, **kwargs):
            sync(); times.append(time.perf_counter() - self.t0)

    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=prompts * G, gradient_accumulation_steps=1,
                          num_generations=G, max_completion_length=new, temperature=1.0, beta=0.0, loss_type="dapo",
                          max_steps=steps, learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant",
                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu",
                          bf16=device == "cuda", gradient_checkpointing=False, dataloader_num_workers=0,
                          disable_dropout=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[e_share], args=args, train_dataset=Dataset.from_list(records),
                              processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = [m * prompts * G for m in lengths]
    rollout = None
else:
    import lightning.fabric  # noqa: F401  (imports count in the baseline)
    from litllm import finetune
    from litllm.data import Prompts
    from litllm.train import loop
    from litllm.train.args import EvalArgs, TrainArgs
    from litllm.train.loggers import read_csv_rows
    baseline = rss_mib()
    real_step = loop.train_step

    def timed_step(*args, **kwargs):
        sync(); t0 = time.perf_counter()
        result = real_step(*args, **kwargs)
        sync(); times.append(time.perf_counter() - t0)
        return result

    loop.train_step = timed_step
    finetune.finetune_grpo(
        folder, out_dir=out, accelerator=device, precision="bf16-true" if device == "cuda" else "32-true", devices=1,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True, lora_value=True, beta=0.0, loss_type="dapo",
        reward=[f"{folder.parent / 'bench_reward.py'}:e_share"], num_generations=G, max_new_tokens=new, temperature=1.0,
        data=Prompts(json_path=folder.parent / "prompts.jsonl", prompt_style="default", val_split_fraction=0.0),
        train=TrainArgs(global_batch_size=prompts, micro_batch_size=prompts, max_steps=steps, lr_warmup_steps=0,
                        save_interval=None, log_interval=1),
        eval=EvalArgs(interval=10**9, final_validation=False), logger_name="csv",
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5, "weight_decay": 0.0}},
    )
    rows = [r for r in read_csv_rows(out / "logs" / "csv" / "metrics.csv") if r.get("completions/mean_length")]
    tokens = [float(r["completions/mean_length"]) * prompts * G for r in rows]
    rollout = statistics.median(float(r["rollout/tokens_per_sec"]) for r in rows[2:] or rows)
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mib()
step_s = statistics.median(times[2:] or times)
print(json.dumps({"step_s": step_s, "tokens_per_s": statistics.median(tokens[2:] or tokens) / step_s,
                  "rollout_tokens_per_s": rollout, "peak": peak,
                  "above_baseline": peak if device == "cuda" else peak - baseline, "steps": len(times)}))
"""

LABELS = {"litllm": "litllm finetune_grpo (LoRA r=8 q,v)", "trl": "TRL GRPOTrainer + PEFT LoRA (r=8 q,v)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--new", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--seq", type=int, default=128, help="prompts are ~seq/4 words")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--sides", default="litllm,trl")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sides = chosen_sides(parser, args.sides, LABELS)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    folder = workdir / "model"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    build_model(folder, env, max(32, args.steps * args.prompts * 2), args.seq, args.layers, args.width, args.vocab)
    pairs = json.loads((workdir / "pairs.json").read_text())
    (workdir / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p["prompt"]}) for p in pairs))
    (workdir / "bench_reward.py").write_text(REWARD)
    results = run_sides(sides, LABELS, WORKER, folder, workdir, env, args.device, args.steps, args.prompts,
                        args.generations, args.new)

    unit = "GPU MiB (max allocated)" if args.device == "cuda" else "MiB (peak RSS; above: minus RSS before the model)"
    print(f"\n{args.steps} steps x {args.prompts} prompts x {args.generations} completions of <= {args.new} tokens, "
          f"{args.layers} layers x {args.width} wide, vocab {args.vocab}, device {args.device}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}; memory in {unit}")
    header = f"{'':40s} {'step s':>8s} {'speedup':>8s} {'tok/s':>8s} {'rollout tok/s':>14s} {'peak':>7s} {'above':>7s}"
    print(header)
    print("-" * len(header))
    ref = results.get("trl")
    for side, r in results.items():
        speedup = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        rollout = f"{r['rollout_tokens_per_s']:.0f}" if r["rollout_tokens_per_s"] else "-"
        print(f"{LABELS[side]:40s} {r['step_s']:8.3f} {speedup:>8s} {r['tokens_per_s']:8.0f} {rollout:>14s} "
              f"{r['peak']:7.0f} {r['above_baseline']:7.0f}")


if __name__ == "__main__":
    main()
