"""MoE speed: a small Qwen3-MoE, litllm beside transformers, same weights, one process run.

    python benchmarks/moe.py                       # 16 experts top-2, hidden 256, 4 layers, fp32, CPU
    python benchmarks/moe.py --n_expert 8 --hidden 512 --repeats 5
    python benchmarks/moe.py --compile             # also litllm's training step with each block compiled
    python benchmarks/moe.py --cpu_time            # one thread, CPU time: steadier on a loaded machine
    python benchmarks/moe.py --profile 25          # also where each side's train step spends its time, op by op
    python benchmarks/moe.py --cpu_time --floor    # also each step's shared kernels (CPU time) and the rest
    python benchmarks/moe.py --unfused_loss        # also litllm's step without the fused head + loss
    python benchmarks/moe.py --unfused_norms       # also litllm's step without the fused norms, qk-norm and RoPE
    python benchmarks/moe.py --unfused_experts     # also litllm's step with the experts' module calls (no fused path)
    python benchmarks/moe.py --unfused_routing     # also litllm's step with the routing's aten ops (no fused routing)

Times (1) a training step, forward -> cross-entropy (+ the router load-balancing loss, weight
`--router_aux_loss_coef`, default Qwen3-MoE's 0.001, as a finetune has it) -> backward -> AdamW step -> zero_grad,
on one random batch, and (2) greedy decoding at batch 1 (a prompt, then `--new_tokens` tokens: litllm's engine as
`litllm generate` runs it against `transformers.generate`). The weights are a random transformers checkpoint converted with
`litllm convert_to_litllm`. Repeats alternate between the two so that load from other users of the machine hits
both alike; the best run of each is compared (also the median). Also prints the share of the experts' FLOPs
that were useful: the routed tokens' expert FLOPs over the expert FLOPs litllm actually computed (counted by
hooks on the experts) in the training forward, the prefill and one decode step. `--profile N`: the N ops with
the most self time in either side's train step (torch.profiler, steps alternating, medians), side by side, the
share of each step that the kernels both sides run on the same shapes take (matmuls, the attention kernel,
log_softmax + NLL, fused AdamW), and the ratio a litllm step of those kernels alone would reach: the most any
saving elsewhere in litllm can give. The profiler times ops in wall-clock time, which a loaded machine stretches;
`--floor` measures that ceiling in CPU time instead: every matmul (grouped ones included), attention-kernel and
fused-AdamW call of one step of each side is recorded with its arguments and replayed alone, alternating with the
whole steps, so each step splits into those kernels and the rest. `--floor` then prints the matmuls grouped by role
(attention, router, experts forward / input gradient / weight gradient, head + loss) side by side, each call timed
where the step runs it (`timed_matmuls`): a replayed call runs on copies of its operands in whatever cache state the
replay leaves, which for litllm's fused head + loss (four chunks through one reused buffer, `out=`) costs ~6 ms
more than in the step, and for transformers' one (N, V) matmul ~5 ms less. Timed one by one, litllm's experts'
matmuls (320 calls a step, transformers' 24 grouped ones) read high: this timing runs Python between them, which the
op does not, so the table also prints litllm's experts' ops timed whole, matmuls and all, in steps of their own.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
import unittest.mock
from pathlib import Path
from typing import Optional

import torch


def build_checkpoint(folder: Path, args) -> None:
    import transformers

    from litllm.convert import convert_to_litllm

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.n_layer, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.hidden // 8, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.expert_size, num_experts=args.n_expert, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, max_position_embeddings=4096, bos_token_id=0, eos_token_id=None,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder)
    convert_to_litllm(folder)


def expert_flops_share(model, run) -> float:
    """Routed tokens' expert FLOPs / expert FLOPs computed, while `run()` runs (hooks count expert input rows)."""
    from litllm.model import MoE

    computed, routed = [0], [0]
    hooks = []
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        for expert in moe.experts:
            hooks.append(expert.register_forward_hook(lambda m, a, o: computed.__setitem__(0, computed[0] + a[0].shape[0])))
        hooks.append(moe.register_forward_pre_hook(
            lambda m, a: routed.__setitem__(0, routed[0] + a[0].numel() // a[0].size(-1) * m.config.n_expert_per_token)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return routed[0] / computed[0]


SHARED_KERNELS = {
    "matmuls": lambda op: op in ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel": lambda op: "scaled_dot_product" in op and op.startswith("aten::_"),
    "log_softmax + nll": lambda op: op.startswith(("aten::_log_softmax", "aten::nll_loss")),
    "AdamW": lambda op: op.startswith("aten::_fused_adam"),
}
"""The kernels both sides run on the same shapes (the same FLOPs and memory traffic), by profiler op name."""


FLOOR_KERNELS = {
    "matmuls": ("mm", "addmm", "bmm", "addmv", "_grouped_mm"),
    "attention kernel": ("_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_flash_attention_for_cpu_backward"),
    "AdamW": ("_fused_adamw_",),
}
"""`--floor`'s kernels by aten op name: both sides run them on the same shapes (transformers' CPU `_grouped_mm` is a
loop of mm over the same blocks litllm's experts multiply)."""


def record_kernels(step) -> list:
    """(kind, op, args, kwargs) of each `FLOOR_KERNELS` call one run of `step()` makes, its tensors copied."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kinds = {name: kind for kind, names in FLOOR_KERNELS.items() for name in names}

    def copy(a):
        if isinstance(a, torch.Tensor):
            return a.detach().clone()
        return type(a)(copy(x) for x in a) if isinstance(a, (list, tuple)) else a

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kind = kinds.get(func.overloadpacket.__name__)
            if kind is not None:
                calls.append((kind, func, copy(args), {k: copy(v) for k, v in kwargs.items()}))
            if func.namespace == "litllm_cpu":  # litllm's C++ ops (the fused experts) call matmuls inside: record them
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            return func(*args, **kwargs)

    calls = []
    with Recorder():
        step()
    return calls


def matmul_role(op, args, inside: str, dims: dict) -> tuple:
    """(role, operands) of one matmul call: what it computes in the step, from the op that made it and its shapes
    (dims: "N" the step's tokens, "V" the vocabulary, "E" the experts, "widths" the model's other matmul widths; a
    dimension that is none of them is an expert's block of routed rows, "m"), and its operands' shapes, "t" marking
    a transposed (column-major) one, the layout MKL is handed."""
    name = op.overloadpacket.__name__
    mats = [a for a in args[name in ("addmm", "addmv"):] if isinstance(a, torch.Tensor) and a.dim() >= 2][:2]

    def is_transposed(t) -> bool:
        return t.dim() == 2 and t.stride(-2) == 1 and t.stride(-1) != 1 and t.size(-1) > 1

    # in litllm's experts' op the first operand's rows (its columns when transposed: a weight gradient) and what they
    # meet in the second are an expert's block, whatever their number
    experts_op = inside.startswith("moe_experts")
    block = {(0, 1), (1, 0)} if experts_op and is_transposed(mats[0]) else {(0, 0)} if experts_op else set()

    def dim(d: int, where=None) -> str:
        if where in block:
            return "m"
        return next((k for k in ("N", "V", "E") if d == dims[k]), str(d) if d in dims["widths"] else "m")

    def shape(i: int, t) -> str:
        return "x".join(dim(d, (i, j)) for j, d in enumerate(t.shape)) + ("t" if is_transposed(t) else "")

    operands = f"{name} " + " @ ".join(shape(i, t) for i, t in enumerate(mats))
    inner = dim(mats[0].size(-1), (0, 1))
    # (a weight's gradient contracts over the tokens, and autograd and litllm hand MKL the gradient transposed)
    grad = "weight grad" if inner in ("N", "m") or is_transposed(mats[0]) else ""
    if name == "_grouped_mm":
        role = "experts (grouped_mm)"
    elif experts_op:
        role = "experts " + ("fwd" if inside.endswith("forward") else "bwd " + (grad or "input grad"))
    else:
        shapes = [dim(d) for t in mats for d in t.shape]
        where = ("head + loss" if "V" in shapes else "router" if "E" in shapes else
                 "experts (module calls)" if "m" in shapes else "attention")
        role = where + (" " + grad if grad else "")
    return role, operands


def timed_matmuls(step, dims: dict, whole_ops: bool = False) -> dict:
    """{(role, operands): [CPU seconds of each call]} of the matmuls one run of `step()` makes, each timed where the
    step runs it (its operands in whatever cache state the step leaves them), grouped by `matmul_role`. whole_ops:
    time each of litllm's experts' ops whole instead (its matmuls with its gathers and elementwise passes, no Python
    between its matmuls), under the role "experts op whole"."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = set(FLOOR_KERNELS["matmuls"])

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if whole_ops and func.namespace == "litllm_cpu" and func.overloadpacket.__name__.startswith("moe_experts"):
                start = time.process_time()
                out = func(*args, **kwargs)
                seconds[("experts op whole", func.overloadpacket.__name__)].append(time.process_time() - start)
                return out
            if func.namespace == "litllm_cpu":  # time the matmuls inside litllm's C++ ops too
                inside.append(func.overloadpacket.__name__)
                try:
                    with self:
                        return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                finally:
                    inside.pop()
            if func.overloadpacket.__name__ not in matmuls:
                return func(*args, **kwargs)
            start = time.process_time()
            out = func(*args, **kwargs)
            seconds[matmul_role(func, args, inside[-1], dims)].append(time.process_time() - start)
            return out

    seconds, inside = collections.defaultdict(list), [""]
    with Timer():
        step()
    return seconds


def matmul_breakdown(steps: dict, repeats: int, dims: dict) -> None:
    """Print each side's matmuls (`steps`: name -> step function) grouped by `matmul_role`, timed in the step
    (`timed_matmuls`; CPU time, the median over `repeats` steps, sides alternating), side by side."""
    times = {name: collections.defaultdict(list) for name in steps}  # key -> each step's seconds in that group
    calls = {name: {} for name in steps}
    whole = collections.defaultdict(list)  # litllm's experts' ops timed whole, in steps of their own
    for i in range(repeats):
        for name in (list(steps) if i % 2 else list(steps)[::-1]):
            for key, seconds in timed_matmuls(steps[name], dims).items():
                times[name][key].append(sum(seconds))
                calls[name][key] = len(seconds)
        for key, seconds in timed_matmuls(steps[list(steps)[0]], dims, whole_ops=True).items():
            if key[0] == "experts op whole":
                whole[key[1]].append(sum(seconds))
    med = {n: {k: statistics.median(v) * 1e3 for k, v in t.items()} for n, t in times.items()}
    names = list(steps)
    print(f"matmuls by role (CPU time, ms per step, each call timed in the step, median of {repeats}; N {dims['N']} "
          f"tokens, m an expert's rows, t a transposed operand):")
    print(f"{'role':30s}{'operands':36s}" + "".join(f"{n:>14s}{'calls':>6s}" for n in names))
    for key in sorted(set().union(*times.values())):
        print(f"{key[0]:30s}{key[1][:36]:36s}" + "".join(
            f"{med[n][key]:14.1f}{calls[n][key]:6d}" if key in med[n] else f"{'':20s}" for n in names))
    roles = sorted({key[0] for t in times.values() for key in t})
    for role in roles + ["all"]:
        print(f"{'  total ' + role:66s}" + "".join(
            f"{sum(v for k, v in med[n].items() if role in ('all', k[0])):14.1f}{'':6s}" for n in names))
    if whole:
        # the Python this timing runs between two of the op's matmuls (320 a step) costs them cache and time that the
        # op alone does not pay: the op timed whole bounds its matmuls' true time from above
        ops = " + ".join(f"{op.removeprefix('moe_experts_')} {statistics.median(v) * 1e3:.1f}" for op, v in whole.items())
        inner = sum(v for k, v in med[names[0]].items() if k[0].startswith("experts"))
        print(f"{names[0]}'s experts' ops timed whole (matmuls, gathers, SwiGLU, combine; no Python between their "
              f"matmuls): {ops} = {sum(statistics.median(v) for v in whole.values()) * 1e3:.1f} ms, against "
              f"{inner:.1f} for their matmuls timed one by one above")


def floor_steps(steps: dict, repeats: int, dims: Optional[dict] = None) -> None:
    """Print each side's step (CPU time, median of `repeats`, alternating) split into the `FLOOR_KERNELS` replayed
    alone and the rest, and the ratio a litllm step of nothing but those kernels would reach."""
    calls = {name: record_kernels(step) for name, step in steps.items()}
    times = {name: collections.defaultdict(list) for name in steps}
    for i in range(repeats):
        for name in (list(steps) if i % 2 else list(steps)[::-1]):
            times[name]["step"].append(timed(steps[name], time.process_time))
            for kind in FLOOR_KERNELS:
                replay = [(op, a, kw) for k, op, a, kw in calls[name] if k == kind]
                times[name][kind].append(timed(lambda: [op(*a, **kw) for op, a, kw in replay], time.process_time))
    print(f"train step in CPU time (ms, median of {repeats}), split into the kernels both sides run on the same "
          f"shapes, replayed alone, and the rest:")
    kernels = {}
    for name in steps:
        med = {k: statistics.median(v) * 1e3 for k, v in times[name].items()}
        kernels[name] = sum(med[k] for k in FLOOR_KERNELS)
        print(f"{name:14s} step {med['step']:6.1f} = " + " + ".join(f"{k} {med[k]:.1f}" for k in FLOOR_KERNELS)
              + f" + the rest {med['step'] - kernels[name]:.1f}")
    names = list(steps)
    if len(names) >= 2:  # the first side against the last (transformers)
        hf_step = statistics.median(times[names[-1]]["step"]) * 1e3
        print(f"ceiling of {names[0]} / {names[-1]} (a step of nothing but those kernels): "
              f"{hf_step / kernels[names[0]]:.2f}x; 1.3x leaves {names[0]} {hf_step / 1.3 - kernels[names[0]]:.1f} ms "
              f"for the rest")
    if dims is not None:
        matmul_breakdown({name: steps[name] for name in (names[0], names[-1])}, repeats, dims)


def profile_steps(steps: dict, repeats: int, top: int) -> None:
    """Print the `top` ops by self time per train step of each side (`steps`: name -> step function),
    profiling one step of each at a time, alternating, and the share the `SHARED_KERNELS` take."""
    samples = {name: collections.defaultdict(list) for name in steps}  # op -> its ms in each profiled step
    calls = {name: collections.defaultdict(int) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            for event in prof.key_averages():
                samples[name][event.key].append(event.self_cpu_time_total / 1e3)
                calls[name][event.key] += event.count
    # the profiler times ops in wall-clock time: the median over the steps, not the mean, so that a step another
    # job preempted (a loaded machine) moves no op's figure (an op absent from some steps counts 0 there)
    per_op = {name: {op: statistics.median(ms + [0.0] * (repeats - len(ms))) for op, ms in ops.items()}
              for name, ops in samples.items()}
    names = list(steps)
    print(f"self time per train step (ms; profiled, so slower than unprofiled), median of {repeats} steps each:")
    print(f"{'op':58s}" + "".join(f"{n:>14s}{'calls':>7s}" for n in names))
    keys = sorted(set().union(*per_op.values()), key=lambda k: -max(per_op[n].get(k, 0.0) for n in names))
    for key in keys[:top]:
        print(f"{key[:58]:58s}" + "".join(f"{per_op[n].get(key, 0.0):14.1f}{calls[n][key] // repeats:7d}" for n in names))
    totals, shared = {}, {}
    for n in names:
        totals[n] = sum(per_op[n].values())
        parts = {part: sum(v for k, v in per_op[n].items() if is_part(k)) for part, is_part in SHARED_KERNELS.items()}
        shared[n] = sum(parts.values())
        print(f"{n}: {totals[n]:.0f} ms profiled; " + ", ".join(f"{p} {v / totals[n]:.0%}" for p, v in parts.items())
              + f", the rest {1 - shared[n] / totals[n]:.0%}")
    if len(names) == 2:
        # the most the first side can gain on the second: a step of the shared kernels alone, which take the same time
        # on both sides -- taken from the second side's own shares, as a loaded machine moves two runs of even the same
        # kernels apart more than it moves the shares within one step
        print(f"ceiling of {names[0]} / {names[1]} (a step of nothing but the kernels both run): "
              f"{totals[names[1]] / shared[names[1]]:.2f}x")



def timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_expert", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert_size", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--router_aux_loss_coef", type=float, default=0.001,
                        help="the load-balancing loss's weight in both sides' training loss (default: Qwen3-MoE's, "
                             "which `litllm finetune` uses by default; 0: the LM loss alone)")
    parser.add_argument("--compile", action="store_true",
                        help="also time litllm's step with each block torch.compile'd (what `--compile` does)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N ops that take most of either side's train step (torch.profiler)")
    parser.add_argument("--unfused_loss", action="store_true",
                        help="also time litllm's step with the head and the chunked loss unfused (no "
                             "`linear_cross_entropy`), alternating with the others")
    parser.add_argument("--unfused_norms", action="store_true",
                        help="also time litllm's step with the norms, qk-norm and RoPE unfused (no `litllm.fused_norms` "
                             "kernels), alternating with the others")
    parser.add_argument("--unfused_experts", action="store_true",
                        help="also time litllm's step with each expert a module call (no `fused_sparse_experts`), "
                             "alternating with the others")
    parser.add_argument("--unfused_routing", action="store_true",
                        help="also time litllm's step with the routing, the experts' sort and the load-balancing "
                             "loss's terms as aten ops (no `litllm.fused_routing`), alternating with the others")
    parser.add_argument("--floor", action="store_true",
                        help="also split each side's train step (CPU time) into the kernels both run on the same "
                             "shapes, replayed alone, and the rest")
    parser.add_argument("--cpu_time", action="store_true",
                        help="one thread, timed in this process's CPU time, which load from other jobs hardly changes")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)

    import transformers

    from litllm.engine import Engine, Request
    from litllm.inference import load_for_inference, pick_decode_threads
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.model import GPT
    from litllm.train.optimizer import build_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder, args)
        hf_train = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        lit_train = GPT.from_checkpoint(folder).train()
        lit_compiled = GPT.from_checkpoint(folder).train() if args.compile else None
        lit = load_for_inference(folder, device="cpu", precision="32-true")
        optimize_for_decoding(lit)
        lit_threads = pick_decode_threads(lit)
    experts_impl = hf.config._experts_implementation

    # ---------------------------------------------------------------- training step
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab_size, (args.batch, args.seq), generator=g)
    targets = torch.cat([idx[:, 1:], torch.full((args.batch, 1), -100)], dim=1)
    # each side's default AdamW: fused (one kernel over every parameter), as `litllm.train.optimizer.build_optimizer`
    # sets it up and as transformers' Trainer does (`optim="adamw_torch_fused"`)
    opts = {"litllm": build_optimizer({"class_path": "AdamW", "init_args": {"lr": 1e-4}}, lit_train.parameters()),
            "transformers": torch.optim.AdamW(hf_train.parameters(), lr=1e-4, fused=True)}

    def lit_step(model=lit_train, opt=opts["litllm"]):
        model(idx, targets=targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the load-balancing loss in both sides' training loss, as a finetune of a Qwen3-MoE checkpoint has it: litllm adds
    # it wherever the checkpoint has a weight, transformers where the call asks for the router logits
    router_logits = args.router_aux_loss_coef > 0

    def hf_step():
        hf_train(idx, labels=idx, output_router_logits=router_logits).loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    def lit_step_unfused():  # the head, then the chunked loss, as before `linear_cross_entropy`
        with unittest.mock.patch.object(GPT, "_fused_loss_applies", lambda self, x: False):
            lit_step()

    def lit_step_unfused_norms():  # the model's own norm and RoPE code, as before `litllm.fused_norms`
        from litllm import fused_norms

        with unittest.mock.patch.object(fused_norms, "ops_ready", lambda: False):
            lit_step()

    def lit_step_unfused_experts():  # each expert a module call, as before `fused_sparse_experts`
        from litllm.model import MoE

        with unittest.mock.patch.object(MoE, "_fused_experts_apply", lambda self, x: False):
            lit_step()

    def lit_step_unfused_routing():  # softmax, topk, the sort and the loss's terms as aten ops, as before
        from litllm import fused_routing

        with unittest.mock.patch.object(fused_routing, "ops_ready", lambda: False):
            lit_step()

    # same weights, same loss, on the path the step takes (with gradients: litllm's fused head + loss on the CPU)
    same_loss = abs(lit_train(idx, targets=targets).item()
                    - hf_train(idx, labels=idx, output_router_logits=router_logits).loss.item())
    train_share = expert_flops_share(lit_train, lambda: lit_train(idx, targets=targets))

    # ---------------------------------------------------------------- greedy decoding
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=g)
    n = args.new_tokens
    engine = Engine(lit, None, 1, prompt.numel() + n, threads=lit_threads)

    def lit_decode():
        engine.add(Request(prompt.tolist(), n))
        tokens = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
        return tokens

    @torch.inference_mode()
    def hf_decode():
        out = hf.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, prompt.numel():].tolist()

    same_tokens = lit_decode() == hf_decode()
    lit.set_kv_cache(1, prompt.numel() + 1)
    with torch.no_grad():
        prefill_share = expert_flops_share(lit, lambda: lit(prompt[None], input_pos=torch.arange(prompt.numel())))
        decode_share = expert_flops_share(lit, lambda: lit(prompt[None, :1], input_pos=torch.tensor([prompt.numel()])))
    lit.clear_kv_cache()

    runs = {name: [] for name in ("litllm train", "transformers train", "litllm decode", "transformers decode")}
    lit_step(), hf_step()  # warm-up (optimizer state)
    if lit_compiled is not None:
        for block in lit_compiled.blocks:
            block.compile()
        compiled_opt = build_optimizer({"class_path": "AdamW", "init_args": {"lr": 1e-4}}, lit_compiled.parameters())
        start = time.perf_counter()
        lit_step(lit_compiled, compiled_opt)  # compiles
        print(f"compiling litllm's blocks took {time.perf_counter() - start:.0f} s")
        runs["litllm train compiled"] = []
    if args.unfused_loss:
        runs["litllm train unfused"] = []
    if args.unfused_norms:
        runs["litllm train unfused_norms"] = []
    if args.unfused_experts:
        runs["litllm train unfused_experts"] = []
    if args.unfused_routing:
        runs["litllm train unfused_routing"] = []
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.repeats):  # alternate, so that other processes' load hits both alike
        runs["transformers train"].append(timed(hf_step, clock))
        runs["litllm train"].append(timed(lit_step, clock))
        if lit_compiled is not None:
            runs["litllm train compiled"].append(timed(lambda: lit_step(lit_compiled, compiled_opt), clock))
        if args.unfused_loss:
            runs["litllm train unfused"].append(timed(lit_step_unfused, clock))
        if args.unfused_norms:
            runs["litllm train unfused_norms"].append(timed(lit_step_unfused_norms, clock))
        if args.unfused_experts:
            runs["litllm train unfused_experts"].append(timed(lit_step_unfused_experts, clock))
        if args.unfused_routing:
            runs["litllm train unfused_routing"].append(timed(lit_step_unfused_routing, clock))
        runs["transformers decode"].append(timed(hf_decode, clock))
        runs["litllm decode"].append(timed(lit_decode, clock))

    tokens = {"train": args.batch * args.seq, "decode": n}
    print(f"Qwen3-MoE {args.n_layer} layers, hidden {args.hidden}, {args.n_expert} experts top-{args.top_k} of size "
          f"{args.expert_size}, fp32, CPU: {torch.get_num_threads()} threads (litllm decodes with {lit_threads}), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; transformers experts: {experts_impl}; "
          f"timed in {'CPU' if args.cpu_time else 'wall-clock'} time")
    print(f"same training loss: {same_loss:.1e} apart; same greedy tokens: {same_tokens}")
    print(f"train step: batch {args.batch} x {args.seq}; decoding: prompt {args.prompt_tokens}, {n} new tokens, batch 1")
    print(f"{'':22s}{'tokens/s best':>14s}{'median':>10s}")
    best = {}
    for name, times in runs.items():
        kind = name.split()[1]
        best[name] = tokens[kind] / min(times)
        print(f"{name:22s}{best[name]:14.1f}{tokens[kind] / statistics.median(times):10.1f}")
    for name in (n for n in runs if n.startswith("litllm")):
        kind = name.split()[1]
        median = statistics.median(runs[f"transformers {kind}"]) / statistics.median(runs[name])
        print(f"{name} / transformers {kind}: {best[name] / best[f'transformers {kind}']:.2f}x best of {args.repeats}, "
              f"{median:.2f}x median")
    print(f"useful share of litllm's expert FLOPs: training forward {train_share:.0%}, prefill {prefill_share:.0%}, "
          f"decode step {decode_share:.0%} (k / n_expert = {args.top_k / args.n_expert:.0%})")
    if args.profile:
        profile_steps({"litllm": lit_step, "transformers": hf_step}, args.repeats, args.profile)
    if args.floor:
        unfused_norms = {"litllm unfused_norms": lit_step_unfused_norms} if args.unfused_norms else {}
        unfused_experts = {"litllm unfused_experts": lit_step_unfused_experts} if args.unfused_experts else {}
        unfused_routing = {"litllm unfused_routing": lit_step_unfused_routing} if args.unfused_routing else {}
        cfg = lit_train.config
        dims = {"N": args.batch * args.seq, "V": args.vocab_size, "E": args.n_expert,
                "widths": {args.hidden, args.expert_size, 2 * args.expert_size, cfg.n_head * cfg.head_size,
                           cfg.n_query_groups * cfg.head_size, (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size}}
        floor_steps({"litllm": lit_step, **unfused_norms, **unfused_experts, **unfused_routing, "transformers": hf_step}, args.repeats, dims)


if __name__ == "__main__":
    main()
