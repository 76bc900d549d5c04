"""Speculative decoding speed: a 12-layer target with a 2-layer draft vs the target alone, side by side.

The target is a Llama-shaped litllm GPT with random weights from litllm's training init
(`GPT.reset_parameters`: output projections scaled down with depth) and Gemma's scaled embeddings
(x * sqrt(n_embd)), so that, as in a trained model, its next token depends on the context but
follows largely from the recent tokens (without the scaling a random 12-layer model's choice is
a hash of the whole context that no small draft can learn in minutes). The draft is 2 layers of the same width: the target's embedding,
final norm and head, its first and last block, then trained for `--train_steps` steps on the
target's own greedy continuations of random prompts (teacher forcing: it learns to predict what the
target says), the cheap kind of draft one makes for a model that has no small sibling. Both decode on litllm's engines the way `litllm generate` does (the faster CPU
weight layout and thread count); the held-out prompts are decoded greedily four ways, alternating `--repeats`
times, and the outputs are checked to be identical:
- eager: `litllm.engine.Engine` (the target alone) and `litllm.speculative.SpeculativeEngine` (target + draft),
  as `--compile false` decodes;
- compiled (`--compile true`, on copies of both models: a compiled step swaps in its own CPU layouts): the target
  alone on its compiled decode step (`litllm.generate.decode_engine`), and target + draft on the draft's compiled
  decode step and the target's compiled verify step of k + 1 tokens (`litllm.generate.speculative_engine`), on the
  thread count timed on the compiled steps (`pick_compiled_threads`), as the commands pick. Steps are saved in
  litllm's compile cache (`$TORCHINDUCTOR_CACHE_DIR`): a second run loads them. `--no_compiled` skips these.

    python benchmarks/speculative.py --threads 1           # 12 + 2 layers, 512 wide, 100 training steps
    python benchmarks/speculative.py --n_layer 4 --train_steps 20 --new_tokens 32   # a quick run

Prints the acceptance rate, tokens/s of each and the ratios (speculative over plain, eager and compiled; compiled
speculative over eager speculative). The machine may be shared: figures are noisy, the ratios (all measured in
alternation in one process) less so.

`--serve`: the same target and trained draft, saved as model folders, served by `litllm serve` without and with
`--draft_model` (both eager, `--compile false`; `--max_batch_size` = the held-out prompts, so the speculative
server's batch engine checks every row's proposals at once); the held-out prompts are streamed by as many clients
at once (greedy), `--serve_repeats` times per server: aggregate tokens/s of each (best run), their ratio, and
the acceptance ratio the speculative server reports on `/metrics`.

    python benchmarks/speculative.py --serve         # ~4 minutes on a quiet 2-core machine
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from generate import timed  # benchmarks/generate.py


def build_target(args):
    from litllm.config import Config
    from litllm.model import GPT

    config = Config(name="bench-llama", block_size=2048, vocab_size=args.vocab_size, padding_multiple=64,
                    n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_query_groups=args.n_head,
                    intermediate_size=args.intermediate_size, norm_class_name="RMSNorm", norm_bias=False,
                    mlp_class_name="GatedMLP", activation="silu", scale_embeddings=True)
    torch.manual_seed(0)
    target = GPT(config)
    target.reset_parameters()
    n_params = sum(p.numel() for p in target.parameters())
    print(f"target: Llama-shaped GPT, {n_params / 1e6:.1f}M parameters, {args.n_layer} layers, n_embd {args.n_embd}, fp32")
    return target.eval().requires_grad_(False)


def greedy_continuations(model, prompts: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """(N, P + n): each prompt followed by the model's n greedy tokens (a continuous batch of `batch` rows)."""
    from litllm.engine import Engine, Request

    out = {i: [] for i in range(len(prompts))}
    with Engine(model, None, batch, prompts.size(1) + n) as engine:
        ids = {engine.add(Request(p.tolist(), n)): i for i, p in enumerate(prompts)}
        while engine.has_unfinished:
            for o in engine.step():
                out[ids[o.request_id]] += o.token_ids
    return torch.cat([prompts, torch.tensor([out[i] for i in range(len(prompts))])], 1)


def make_draft(target, n_layer: int):
    """A GPT of `n_layer` blocks holding copies of the target's embedding, head, final norm and its first
    (and last) blocks."""
    from litllm.config import Config
    from litllm.model import GPT

    config = Config(**{**target.config.__dict__, "n_layer": n_layer})
    draft = GPT(config)
    picks = list(range(n_layer - 1)) + [target.config.n_layer - 1]
    state = {}
    for name, value in target.state_dict().items():
        if name.startswith("blocks."):
            index, rest = name.split(".", 2)[1:]
            if int(index) in picks:
                state[f"blocks.{picks.index(int(index))}.{rest}"] = value.clone()
        else:
            state[name] = value.clone()
    draft.load_state_dict(state, strict=False)  # the rope buffers are not saved
    return draft


def train_draft(target, draft, data: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    """Teach the draft the target's greedy choice at every position of the target's own continuations
    (cross-entropy against the target's argmax: what speculative decoding asks the draft to guess)."""
    with torch.no_grad():
        labels = torch.cat([target(rows).argmax(-1) for rows in data.split(8)])  # (N, T)
    draft.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=g)
        loss = draft(data[rows], targets=labels[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    draft.eval().requires_grad_(False)
    return losses


def acceptance(target, draft, prompts: torch.Tensor, args) -> float:
    """The draft's acceptance rate decoding `prompts` greedily with the target."""
    from litllm.engine import Request
    from litllm.speculative import SpeculativeEngine

    with SpeculativeEngine(target, draft, None, prompts.size(1) + args.new_tokens,
                           num_speculative_tokens=args.num_speculative_tokens) as engine:
        for prompt in prompts:
            engine.add(Request(prompt.tolist(), args.new_tokens))
        while engine.has_unfinished:
            engine.step()
    return engine.acceptance_rate


def save_folders(target, draft, vocab_size: int, out: Path) -> dict[str, Path]:
    """The target and the draft as model folders (a word tokenizer each, as benchmarks/serve.py writes)."""
    from serve import write_word_tokenizer  # benchmarks/serve.py

    from litllm.model_folder import save_model_folder

    folders = {"target": out / "target", "draft": out / "draft"}
    for name, model in (("target", target), ("draft", draft)):
        save_model_folder(model, folders[name])
        write_word_tokenizer(folders[name], vocab_size)
    return folders


def acceptance_from_metrics(url: str) -> float:
    """The speculative server's `litllm_spec_decode_acceptance_ratio` gauge (`url`: its .../v1 address)."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=60).text
    line = next(line for line in text.splitlines() if line.startswith("litllm_spec_decode_acceptance_ratio "))
    return float(line.split()[1])


def serve_figures(folders: dict[str, Path], prompts: list[list[int]], args) -> dict[str, dict]:
    """Aggregate tokens/s of `litllm serve` without and with `--draft_model` over the held-out prompts, each sent by
    its own client at once, best of `args.serve_repeats` runs per server; the acceptance ratio of the second."""
    from serve import run_clients, start_server  # benchmarks/serve.py

    settings = argparse.Namespace(clients=len(prompts), max_seq_length=args.prompt_tokens + args.new_tokens,
                                  device=None, precision=None)
    servers = {"serve": ("--compile", "false"),
               "serve --draft_model": ("--compile", "false", "--draft_model", str(folders["draft"]),
                                       "--num_speculative_tokens", str(args.num_speculative_tokens))}
    figures = {}
    for name, flags in servers.items():
        with open(folders["target"].parent / f"{len(figures)}.log", "w") as log:
            proc, url = start_server(folders["target"], len(prompts), settings, log, *flags)
            try:
                runs = [run_clients(url, prompts, args.new_tokens) for _ in range(args.serve_repeats)]
                figures[name] = max(runs, key=lambda run: run["tokens_per_s"])
                if "--draft_model" in flags:
                    figures[name]["acceptance"] = acceptance_from_metrics(url)
            finally:
                proc.terminate()
                proc.wait(60)
    return figures


def print_serve_figures(figures: dict[str, dict], n_prompts: int) -> None:
    plain, spec = figures["serve"], figures["serve --draft_model"]
    print(f"litllm serve, {n_prompts} clients at once (--max_batch_size {n_prompts}), greedy, both eager; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'server':22s}{'tokens/s':>10s}{'TTFT p50 s':>12s}")
    for name, f in figures.items():
        print(f"{name:22s}{f['tokens_per_s']:10.1f}{f['ttft_p50']:12.2f}")
    print(f"serve --draft_model / serve: {spec['tokens_per_s'] / plain['tokens_per_s']:.2f}x aggregate tokens/s; "
          f"acceptance ratio (the server's /metrics) {spec['acceptance']:.0%}")


def compiled_engines(target, draft, threads: int, length: int, args) -> dict:
    """"compiled plain" (the target's compiled decode step, on the thread count timed on it) and "compiled
    speculative" (the draft's compiled decode step, the target's compiled verify step, on that count too)."""
    from litllm.compile_decode import pick_compiled_threads
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.generate import decode_engine, speculative_engine

    optimize_for_decoding(target)
    optimize_for_decoding(draft)
    t0 = time.perf_counter()
    plain = decode_engine(target, None, 1, length, threads, compile=True)
    plain.threads = pick_compiled_threads(plain)
    print(f"compiled plain: its decode step ({plain.step_source}) took {time.perf_counter() - t0:.0f} s, "
          f"decodes on {plain.threads} thread(s)")
    t0 = time.perf_counter()
    spec = speculative_engine(target, draft, None, length, plain.threads, args.num_speculative_tokens, compile=True)
    drafting, checking = spec.engines[1], spec.engines[0]
    print(f"compiled speculative: the draft's decode step ({drafting.step_source}) and the target's verify step "
          f"({checking.step_source}) took {time.perf_counter() - t0:.0f} s; both on {spec.threads} thread(s)")
    return {"compiled plain": plain, "compiled speculative": spec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--intermediate_size", type=int, default=1376)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--draft_layers", type=int, default=2)
    parser.add_argument("--num_speculative_tokens", type=int, default=4)
    parser.add_argument("--train_sequences", type=int, default=32,
                        help="target continuations the draft learns from (and twice as many random sequences)")
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--eval_prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; "
                        "decoding may pick fewer, as litllm's commands do)")
    parser.add_argument("--no_compiled", action="store_true", help="time the eager engines only")
    parser.add_argument("--serve", action="store_true", help="also time `litllm serve` without and with --draft_model")
    parser.add_argument("--serve_repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:

    from litllm.engine import Engine, Request
    from litllm.inference import pick_decode_threads
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.speculative import SpeculativeEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    target = build_target(args)
    draft = make_draft(target, args.draft_layers)

    g = torch.Generator().manual_seed(0)
    n_eval = args.eval_prompts
    prompts = torch.randint(0, args.vocab_size, (args.train_sequences + 2 * n_eval, args.prompt_tokens), generator=g)
    validation, held_out = prompts[-2 * n_eval: -n_eval], prompts[-n_eval:]
    t0 = time.perf_counter()
    data = greedy_continuations(target, prompts[: args.train_sequences], args.new_tokens, batch=8)
    # and random sequences of the same length, so that the draft sees the target's choices in many contexts
    data = torch.cat([data, torch.randint(0, args.vocab_size, (2 * len(data), data.size(1)), generator=g)])
    print(f"target continuations and random sequences to learn from: {tuple(data.shape)} "
          f"in {time.perf_counter() - t0:.0f} s")
    untrained_state = {k: v.clone() for k, v in draft.state_dict().items()}
    untrained = acceptance(target, draft, validation, args)
    t0 = time.perf_counter()
    losses = train_draft(target, draft, data, args.train_steps, batch=8, lr=args.lr)
    trained = acceptance(target, draft, validation, args)
    if losses:
        print(f"draft ({args.draft_layers} layers) trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s: "
              f"loss {losses[0]:.2f} -> {statistics.mean(losses[-10:]):.2f}; acceptance on validation prompts "
              f"{untrained:.0%} before, {trained:.0%} after")
    if trained < untrained:  # keep the better draft (chosen on validation prompts, measured on held-out ones)
        draft.load_state_dict(untrained_state)
        print("the untrained draft agrees more: benchmarking it")

    folders = save_folders(target, draft, args.vocab_size, tmp) if args.serve else None  # as loaded, before layouts
    twins = None if args.no_compiled else (copy.deepcopy(target), copy.deepcopy(draft))  # for the compiled steps
    layout = optimize_for_decoding(target)
    optimize_for_decoding(draft)
    threads = pick_decode_threads(target)
    eval_prompts = [p.tolist() for p in held_out]
    n = args.new_tokens
    length = args.prompt_tokens + n

    speculative_engines = []

    def decode_all(engine):
        tokens = []
        for prompt in eval_prompts:
            engine.add(Request(prompt, n))
            while engine.has_unfinished:
                for out in engine.step():
                    tokens += out.token_ids
        return tokens

    def eager_plain():
        with Engine(target, None, 1, length, threads=threads) as engine:
            return decode_all(engine)

    def eager_speculative():
        with SpeculativeEngine(target, draft, None, length, num_speculative_tokens=args.num_speculative_tokens,
                               threads=threads) as engine:
            speculative_engines.append(engine)
            return decode_all(engine)

    runners = {"eager plain": eager_plain, "eager speculative": eager_speculative}
    compiled = {} if twins is None else compiled_engines(*twins, threads, length, args)
    for name, engine in compiled.items():
        runners[name] = lambda engine=engine: decode_all(engine)
    reference = eager_plain()  # also the warm-up
    same = {name: run() == reference for name, run in runners.items() if name != "eager plain"}
    runs = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            runs[name].append(timed(run))
    rates = {"eager speculative": statistics.mean(e.acceptance_rate for e in speculative_engines)}
    if "compiled speculative" in compiled:
        rates["compiled speculative"] = compiled["compiled speculative"].acceptance_rate
    for engine in compiled.values():
        engine.close()
    total = n * len(eval_prompts)
    print(f"threads: {threads} eager, {layout} weights; {len(eval_prompts)} held-out prompts of {args.prompt_tokens} "
          f"tokens, {n} new tokens each, greedy, fp32; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"target {args.n_layer} layers, draft {args.draft_layers} layers, {args.num_speculative_tokens} proposed "
          f"tokens per step; same tokens as eager plain: {same}; acceptance rate on the held-out prompts: "
          + ", ".join(f"{name} {rate:.0%}" for name, rate in rates.items()))
    # tokens per CPU-second of this process: what a loaded machine disturbs less than the wall clock
    print(f"{'':22s}{'tokens/s best':>14s}{'median':>8s}{'tokens/CPU-s best':>19s}")
    best = {}
    for name, times in runs.items():
        walls, cpus = [w for w, _ in times], [c for _, c in times]
        best[name] = total / min(walls)
        print(f"{name:22s}{best[name]:14.1f}{total / statistics.median(walls):8.1f}{total / min(cpus):19.1f}")
    print(f"speculative / plain, eager: {best['eager speculative'] / best['eager plain']:.2f}x (best runs)")
    if compiled:
        print(f"speculative / plain, compiled: {best['compiled speculative'] / best['compiled plain']:.2f}x; "
              f"compiled speculative / eager speculative: "
              f"{best['compiled speculative'] / best['eager speculative']:.2f}x; "
              f"compiled speculative / eager plain: {best['compiled speculative'] / best['eager plain']:.2f}x")
    if folders is not None:
        print_serve_figures(serve_figures(folders, eval_prompts, args), len(eval_prompts))


if __name__ == "__main__":
    main()
