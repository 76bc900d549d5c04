"""Training-step throughput: litllm beside transformers, same model, batch, dtype and optimizer.

    python benchmarks/train_throughput.py                  # the default 6-layer Llama, fp32, CPU
    python benchmarks/train_throughput.py --compile        # litllm's blocks under torch.compile too
    python benchmarks/train_throughput.py --unfused_norms  # also litllm without its fused norms and RoPE
    python benchmarks/train_throughput.py --cpu_time       # one thread, CPU time: steadier on a loaded machine
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --n_layer 12 --n_embd 768

Each side runs `forward -> cross-entropy -> backward -> AdamW step -> zero_grad` on the same random
batch from the same initial weights. The two are measured alternately (round-robin) so that load
from other processes hits both alike; the median step time is reported, and the ratio of the best steps.
Achieved FLOP/s uses the analytic 6N + 12·L·H·Q·T FLOPs per token (`litllm.train.flops`) and is compared with
this machine's matmul peak, measured here with a large GEMM (on the steps' clock: CPU time with `--cpu_time`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import unittest.mock

import torch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5,
                        clock=time.perf_counter) -> float:
    """Best FLOP/s of an n x n x n matmul (the machine's practical GEMM peak), timed by `clock` (the steps')."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(args, device, dtype):
    import transformers

    from litllm.config import Config
    from litllm.model import GPT

    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.n_embd, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_query_groups,
        max_position_embeddings=args.seq_length, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype)
    config = Config(
        name="bench-llama", hf_model_type="llama", block_size=args.seq_length, vocab_size=args.vocab_size,
        padded_vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        n_query_groups=args.n_query_groups, intermediate_size=args.intermediate_size, norm_class_name="RMSNorm",
        mlp_class_name="GatedMLP", activation="silu", norm_eps=1e-5,
    )
    with torch.device(device):
        lit = GPT(config).to(dtype)
    lit.load_state_dict(_hf_to_litllm(hf.state_dict(), config))
    return config, lit, hf


def _hf_to_litllm(sd: dict, config) -> dict:
    """Map the HF Llama weights onto litllm's names (fused qkv [q|k|v], fused fc [gate|up])."""
    out = {"wte.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.norm_1.weight"] = sd[p + "input_layernorm.weight"]
        out[f"blocks.{i}.norm_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]]
        )
        out[f"blocks.{i}.attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"blocks.{i}.mlp.fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[f"blocks.{i}.mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def make_step(model, loss_fn, lr: float = 3e-4):
    from litllm.train.optimizer import build_optimizer

    # the same optimizer construction for both: AdamW, fused (one kernel over every parameter, CPU or GPU)
    optimizer = build_optimizer({"class_path": "AdamW", "init_args": {"lr": lr}}, model.parameters())

    def step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def litllm_loss(model, x, y):
    return model(x, targets=y)


def unfused_norms_loss(model, x, y):
    """litllm's loss with the model's own norm and RoPE code (no `litllm.fused_norms` kernels)."""
    from litllm import fused_norms

    with unittest.mock.patch.object(fused_norms, "ops_ready", lambda: False):
        return model(x, targets=y)


def hf_loss(model, x, y):
    # labels already shifted: plain token-mean cross-entropy over the logits, as litllm computes it
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_query_groups", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=1536)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile litllm's blocks (as --compile does)")
    parser.add_argument("--compile_hf", action="store_true", help="torch.compile transformers' decoder layers too")
    parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak-FLOP/s GEMM")
    parser.add_argument("--unfused_norms", action="store_true",
                        help="also time litllm's step without `litllm.fused_norms` (a copy of the model, alternating)")
    parser.add_argument("--cpu_time", action="store_true",
                        help="one thread, timed in this process's CPU time, which load from other jobs hardly changes")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    clock = time.process_time if args.cpu_time else time.perf_counter

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from litllm.train.flops import flops_per_token

    config, lit, hf = build_pair(args, device, dtype)
    if args.compile:
        for block in lit.blocks:
            block.compile()
    if args.compile_hf:
        for layer in hf.model.layers:
            layer.compile()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    with torch.no_grad():  # same weights -> same loss (a check that the comparison is like for like)
        l_lit, l_hf = litllm_loss(lit, x, y).item(), hf_loss(hf, x, y).item()
    sides = {"litllm": make_step(lit, litllm_loss), "transformers": make_step(hf, hf_loss)}
    if args.unfused_norms:
        sides["litllm unfused"] = make_step(copy.deepcopy(lit), unfused_norms_loss)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.steps + 2):
        for name, step in sides.items():
            _sync(device)
            start = clock()
            step(x, y)
            _sync(device)
            if i >= 2:  # warm-up (and compilation) excluded
                times[name].append(clock() - start)

    peak = measure_matmul_peak(device, dtype, args.peak_n, clock=clock)
    tokens_per_step = args.batch_size * args.seq_length
    fpt = flops_per_token(config, args.seq_length)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(
        f"model: {args.n_layer} layers, dim {args.n_embd}, heads {args.n_head}/{args.n_query_groups}, MLP "
        f"{args.intermediate_size}, vocab {args.vocab_size}; batch {args.batch_size} x {args.seq_length}, "
        f"{args.dtype}, AdamW, {device}{f' ({threads} threads)' if threads else ''}, "
        f"timed in {'CPU' if args.cpu_time else 'wall-clock'} time"
    )
    print(f"initial loss: litllm {l_lit:.5f}, transformers {l_hf:.5f}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s")
    result = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        tps = tokens_per_step / median
        result[name] = tps
        achieved = fpt * tps
        print(
            f"{name:13s} {median * 1e3:8.1f} ms/step  {tps:9.0f} tokens/s  {achieved / 1e9:7.1f} GFLOP/s "
            f"({achieved / peak:.0%} of peak){'  [compiled]' if (name == 'litllm' and args.compile) or (name == 'transformers' and args.compile_hf) else ''}"
        )
    best = {name: min(ts) for name, ts in times.items()}
    print(f"litllm / transformers: {result['litllm'] / result['transformers']:.2f}x "
          f"(best steps: {best['transformers'] / best['litllm']:.2f}x)")
    if args.unfused_norms:
        print(f"litllm unfused norms / transformers: {result['litllm unfused'] / result['transformers']:.2f}x")


if __name__ == "__main__":
    main()
