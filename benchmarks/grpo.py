"""GRPO with LoRA: `litllm finetune_grpo` vs TRL's `GRPOTrainer` + PEFT LoRA, same model, prompts, G, length, precision.

Builds the random Llama-style checkpoint of `benchmarks/dpo.py` (`--layers`, `--width`, `--vocab`; BPE tokenizer
trained on the spot) and uses its pairs' prompts (~seq/4 random words). Each side runs in a fresh process for
`--steps` optimizer steps of `--prompts` prompts x `--generations` completions of up to `--new` tokens (sampling at
temperature 1, no top-k/top-p), LoRA r=8 on q and v (no dropout), beta 0 (no reference pass), loss dapo, AdamW lr
1e-5, one reward function (the share of the letter 'e' in the completion; cheap, the same on both sides):

- step time: median seconds per optimizer step after the first two (litllm: around `train_step`, which includes the
  rollout; TRL: `on_step_begin` -> `on_step_end`, which includes its generation), and the CPU seconds of the process
  in the same steps (all threads; less sensitive than wall time to a machine other jobs load);
- phases inside a step, timed on both sides around the functions that do the same work: rollout (litllm
  `sample_completions` on its engine, TRL `_generate` on `transformers.generate`), rewards, forward (every per-token
  log-prob pass), backward, optimizer, other (the rest of the step);
- completion tokens per second of step time and of the rollout phase;
- peak memory: `torch.cuda.max_memory_allocated` on a GPU; on CPU the process's RSS high-water mark at the end, and
  the same above the RSS measured before the model was loaded;
- `--rounds` runs of each side, the order alternating (litllm, TRL, TRL, litllm, ...), and the litllm/TRL ratios of
  each round with their median and best: on a shared machine the load drifts between runs.
- litllm's rollouts decode on the compiled decode step (`--compile_rollouts true`; `auto`: as `finetune_grpo`
  decides, which for these 6 steps x 64 tokens is a saved step only, else eager): the benchmark's own cache folder (`--workdir`/torch_compile), so its first litllm run
  compiles the step (and saves it) and the later runs load it; the seconds this took and the first two steps' times
  (left out of the medians) are printed for every run.

    python benchmarks/grpo.py [--device cuda] [--steps 6] [--prompts 2] [--generations 4] [--new 64] [--layers 4]
        [--width 256] [--vocab 8000] [--rounds 2] [--threads N] [--sides litllm,trl] [--workdir /tmp/grpo-bench]
        [--compile_rollouts true|auto|false]

On a CPU that other processes keep busy, pass `--threads 1`: each parallel region then waits for no descheduled
thread (with two threads both sides ran 10-15x slower here than with one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker import WARMUP_STEPS, StepTimer, median_run, ratios, rss_mib, run_sides, trl_side, worker_main  # noqa: E402
from dpo import build_model, chosen_sides  # noqa: E402  (the DPO benchmark's random model)

REWARD = '''
def e_share(prompts, completions, **kwargs):
    return [c.count("e") / max(1, len(c)) for c in completions]
'''

def run_trl(timer: StepTimer, folder: Path, out: Path, device: str, steps: str, prompts: str, G: str, new: str) -> dict:
    """TRL's GRPOTrainer + PEFT LoRA; phases: rollout (`_generate`), rewards, forward (every per-token log-prob
    pass), backward, optimizer."""
    import torch
    import trl
    from datasets import Dataset

    steps, prompts, G, new = int(steps), int(prompts), int(G), int(new)
    sys.path.insert(0, str(folder.parent))
    from bench_reward import e_share

    records = [json.loads(line) for line in (folder.parent / "prompts.jsonl").read_text().splitlines()]
    baseline = rss_mib()
    model, tokenizer, lora, step_timer = trl_side(timer, folder, device)
    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=prompts * G, gradient_accumulation_steps=1,
                          num_generations=G, max_completion_length=new, temperature=1.0, beta=0.0, loss_type="dapo",
                          max_steps=steps, learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant",
                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu",
                          bf16=device == "cuda", gradient_checkpointing=False, dataloader_num_workers=0,
                          disable_dropout=True)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[e_share], args=args, train_dataset=Dataset.from_list(records),
                              processing_class=tokenizer, peft_config=lora, callbacks=[step_timer])
    for name, phase in (("_generate", "rollout"), ("_calculate_rewards", "rewards"),
                        ("_get_per_token_logps_and_entropies", "forward")):
        timer.wrap(trainer, name, phase)
    timer.wrap(trainer.accelerator, "backward", "backward")
    timer.wrap(torch.optim.AdamW, "step", "optimizer")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return timer.result(baseline, [m * prompts * G for m in lengths])


def run_litllm(timer: StepTimer, folder: Path, out: Path, device: str, steps: str, prompts: str, G: str,
               new: str, compile_rollouts: str = "auto") -> dict:
    """litllm's finetune_grpo; phases: rollout (`sample_completions`), rewards, forward (every `completion_logps`),
    backward, optimizer."""
    import lightning_fabric
    import torch

    from litllm import finetune
    from litllm.data import Prompts
    from litllm.grpo import method, rollout
    from litllm.train import loop
    from litllm.train.args import EvalArgs, TrainArgs
    from litllm.train.loggers import read_csv_rows

    steps, prompts, G, new = int(steps), int(prompts), int(G), int(new)
    baseline = rss_mib()
    timer.wrap_step(loop, "train_step")
    timer.wrap(method, "sample_completions", "rollout")
    timer.wrap(method.GRPOLoss, "score", "rewards")
    timer.wrap(method, "completion_logps", "forward")
    timer.wrap(lightning_fabric.Fabric, "backward", "backward")
    timer.wrap(torch.optim.AdamW, "step", "optimizer")
    engines, build = [], rollout.rollout_engine

    def rollout_engine(*args, **kwargs):  # how each rollout's decode step was made: (source, seconds)
        engine = build(*args, **kwargs)
        engines.append((getattr(engine, "step_source", "eager") if engine._compiled else "eager",
                        engine.compile_seconds or 0.0))
        return engine

    rollout.rollout_engine = rollout_engine
    finetune.finetune_grpo(
        folder, out_dir=out, accelerator=device, precision="bf16-true" if device == "cuda" else "32-true", devices=1,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True, lora_value=True, beta=0.0, loss_type="dapo",
        reward=[f"{folder.parent / 'bench_reward.py'}:e_share"], num_generations=G, max_new_tokens=new, temperature=1.0,
        data=Prompts(json_path=folder.parent / "prompts.jsonl", prompt_style="default", val_split_fraction=0.0),
        train=TrainArgs(global_batch_size=prompts, micro_batch_size=prompts, max_steps=steps, lr_warmup_steps=0,
                        save_interval=None, log_interval=1),
        eval=EvalArgs(interval=10**9, final_validation=False), logger_name="csv",
        compile_rollouts={"auto": None, "true": True, "false": False}[compile_rollouts],
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5, "weight_decay": 0.0}},
    )
    rows = [r for r in read_csv_rows(out / "logs" / "csv" / "metrics.csv") if r.get("completions/mean_length")]
    return {**timer.result(baseline, [float(r["completions/mean_length"]) * prompts * G for r in rows]),
            "rollout_steps": engines[:WARMUP_STEPS]}


def run_litllm_eager(timer: StepTimer, folder: Path, out: Path, device: str, *args: str) -> dict:
    """litllm's finetune_grpo with `--compile_rollouts false` (`--sides litllm,litllm_eager,trl`: the compiled
    rollout against the eager one)."""
    return run_litllm(timer, folder, out, device, *args[:4], "false")


LABELS = {"litllm": "litllm finetune_grpo (LoRA r=8 q,v)", "trl": "TRL GRPOTrainer + PEFT LoRA (r=8 q,v)",
          "litllm_eager": "litllm, eager rollouts"}


PHASES = ("rollout", "rewards", "forward", "backward", "optimizer", "other")


def main() -> None:
    if "--worker" in sys.argv:
        return worker_main(globals())
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
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, the order alternating")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of both sides (OMP_NUM_THREADS; default: torch's, one per core)")
    parser.add_argument("--sides", default="litllm,trl", help="of litllm, trl, litllm_eager")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compile_rollouts", default="true", choices=["auto", "true", "false"],
                        help="litllm's --compile_rollouts (auto: its default: compiled where it pays, else a saved step)")
    args = parser.parse_args()
    sides = chosen_sides(parser, args.sides, LABELS)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    folder = workdir / "model"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "torch_compile"))  # the first litllm run compiles
    build_model(folder, env, max(32, args.steps * args.prompts * 2), args.seq, args.layers, args.width, args.vocab)
    pairs = json.loads((workdir / "pairs.json").read_text())
    (workdir / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p["prompt"]}) for p in pairs))
    (workdir / "bench_reward.py").write_text(REWARD)
    results = run_sides(Path(__file__).resolve(), sides, LABELS, folder, workdir, env,
                        [args.device, args.steps, args.prompts, args.generations, args.new], args.rounds,
                        {"litllm": [args.compile_rollouts]})
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    """Per side: the median-step-time run's step time, phases, tokens/s and memory; then litllm/TRL ratios per round."""
    unit = "GPU MiB (max allocated)" if args.device == "cuda" else "MiB (peak RSS; above: minus RSS before the model)"
    print(f"\n{args.steps} steps x {args.prompts} prompts x {args.generations} completions of <= {args.new} tokens, "
          f"{args.layers} layers x {args.width} wide, vocab {args.vocab}, device {args.device}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, {args.rounds} round(s); seconds are medians over steps "
          f"after the first {WARMUP_STEPS}, of the run with the median step time; memory in {unit}")
    header = (f"{'':38s} {'step s':>7s} {'cpu s':>7s} " + " ".join(f"{p:>9s}" for p in PHASES)
              + f" {'tok/s':>7s} {'rollout tok/s':>13s} {'peak':>6s} {'above':>6s}")
    print(header)
    print("-" * len(header))
    for side, runs in results.items():
        r = median_run(runs)
        rollout = f"{r['rollout_tokens_per_s']:.0f}" if r.get("rollout_tokens_per_s") else "-"
        print(f"{LABELS[side]:38s} {r['step_s']:7.3f} {r['step_cpu_s']:7.3f} " + " ".join(f"{r['phases'].get(p, 0.0):9.3f}" for p in PHASES)
              + f" {r['tokens_per_s']:7.0f} {rollout:>13s} {r['peak']:6.0f} {r['above_baseline']:6.0f}")
    print(f"\nthe first {WARMUP_STEPS} steps of every run (left out of the medians), seconds:")
    for side, runs in results.items():
        for i, r in enumerate(runs):
            made = "".join(f", its rollout's decode step {source} in {seconds:.3f} s" if source != "eager" else
                           ", eager rollout" for source, seconds in r.get("rollout_steps", [])[:1])
            print(f"  {side:7s} run {i + 1}: {' '.join(f'{t:.2f}' for t in r.get('first_steps_s', []))}{made}")
    if "litllm" in results and "litllm_eager" in results:
        print("\nlitllm compiled vs eager rollouts, per round (> 1: the compiled one faster):")
        for name, key in (("step time speed-up", lambda r: r["step_s"]),
                          ("step CPU time speed-up", lambda r: r["step_cpu_s"]),
                          ("rollout CPU time speed-up", lambda r: r["phases"].get("rollout cpu") or float("nan"))):
            values = ratios(results, "litllm_eager", "litllm", key)
            rounds = " ".join(f"{v:.2f}" for v in values)
            print(f"  {name:30s} median {statistics.median(values):5.2f}x  rounds: {rounds}")
    if "litllm" not in results or "trl" not in results:
        return
    print("\nlitllm vs TRL, per round (> 1: litllm faster / uses less memory):")
    for name, key in (("step time speed-up", lambda r: r["step_s"]),
                      ("step CPU time speed-up", lambda r: r["step_cpu_s"]),
                      ("rollout speed-up", lambda r: r["phases"].get("rollout") or float("nan")),
                      ("rollout CPU time speed-up", lambda r: r["phases"].get("rollout cpu") or float("nan")),
                      ("rest of the step speed-up", lambda r: r["step_s"] - (r["phases"].get("rollout") or 0.0)),
                      ("peak memory, TRL / litllm", lambda r: r["peak"])):
        values = ratios(results, "trl", "litllm", key)
        print(f"  {name:30s} median {statistics.median(values):5.2f}x  best {max(values):5.2f}x  "
              f"rounds: {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
