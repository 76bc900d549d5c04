"""GRPO's log-prob pass with each prompt run once per group against row by row, forward + backward, in one process.

`completion_logps` scores B prompts x G completions: row by row (each of the B x G rows its prompt, then its
completion) or packed (`litllm.grpo.prefix`: each prompt once, its G completions after it). Both run on the same random
Llama-style model (the shape of `benchmarks/grpo.py`'s: `--layers`, `--width`, `--vocab`, 4 heads, 1 KV group), fp32,
LoRA r=8 on q and v (gradients to the adapters only, as `finetune_grpo --method lora`) or every weight (`--full`),
on the same random prompts of `--prompt` tokens and completions of up to `--new` tokens (lengths varying by up to a
quarter), `--rounds` alternating A/B rounds; prints each side's median seconds and CPU seconds, their ratios, whether
`worth_sharing` picks the packed pass at this shape, and the largest log-prob and gradient differences.

    python benchmarks/grpo_prompt_sharing.py [--prompts 2] [--generations 4] [--prompt 40] [--new 64] [--layers 4]
        [--width 256] [--vocab 8000] [--rounds 10] [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="longest completion's tokens")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="gradients to every weight (default: LoRA on q and v)")
    args = parser.parse_args()

    import torch

    from litllm.config import Config
    from litllm.grpo.loss import completion_logps
    from litllm.grpo.prefix import shared_prompt_logps, worth_sharing
    from litllm.grpo.rollout import pack
    from litllm.lora import add_lora, is_lora_parameter
    from litllm.model import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config(name="bench", block_size=args.prompt + args.new + 8, vocab_size=args.vocab, padding_multiple=512,
                    n_layer=args.layers, n_embd=args.width, n_head=4, n_query_groups=1,
                    intermediate_size=args.width * 11 // 4, norm_class_name="RMSNorm", mlp_class_name="GatedMLP",
                    activation="silu")
    model = GPT(config)
    model.reset_parameters()
    if not args.full:
        add_lora(model, r=8, alpha=16, dropout=0.0)
        for name, p in model.named_parameters():
            p.requires_grad_(is_lora_parameter(name))
            if ".lora_B." in name:
                torch.nn.init.normal_(p, std=0.02)  # (a trained adapter: B = 0 would zero the A gradients)
    G, g = args.generations, torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist() for _ in range(args.prompts)]
    lengths = torch.randint(args.new - args.new // 4, args.new + 1, (args.prompts * G,), generator=g).tolist()
    completions = [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lengths]
    input_ids, prompt_lens, mask = pack(prompts, completions, G)
    passes = {"row by row": lambda: completion_logps(model, input_ids, mask, prompt_lens, 1.0),
              "prompt once": lambda: shared_prompt_logps(model, model, input_ids, mask, prompt_lens, 1.0, G)}
    wall: dict[str, list[float]] = {k: [] for k in passes}
    cpu: dict[str, list[float]] = {k: [] for k in passes}
    results = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in (list(passes) if r % 2 else list(passes)[::-1]):
            model.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            logps = passes[name]()
            logps.sum().backward()
            if r:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results[name] = (logps.detach(), grads)
    (a, ga), (b, gb) = results.values()
    print(f"{args.prompts} prompts of {args.prompt} tokens x {G} completions of {min(lengths)}-{max(lengths)} tokens, "
          f"{args.layers} layers x {args.width} wide, vocab {args.vocab}, fp32, {'full' if args.full else 'LoRA q,v'}, "
          f"{args.threads} thread(s), {args.rounds} rounds (medians)")
    for name in passes:
        print(f"  {name:12s} {statistics.median(wall[name]):7.4f} s  {statistics.median(cpu[name]):7.4f} CPU s")
    ratio = [x / y for x, y in zip(wall["row by row"], wall["prompt once"])]
    cpu_ratio = [x / y for x, y in zip(cpu["row by row"], cpu["prompt once"])]
    print(f"  speed-up of the prompt once: median {statistics.median(ratio):.2f}x (CPU time "
          f"{statistics.median(cpu_ratio):.2f}x); worth_sharing picks it here: "
          f"{worth_sharing(config, mask, prompt_lens, G)}")
    print(f"  largest difference: log-probs {(a - b).abs().max().item():.2e}, gradients "
          f"{max((x - y).abs().max().item() for x, y in zip(ga, gb)):.2e}")


if __name__ == "__main__":
    main()
