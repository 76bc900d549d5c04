"""One-row int8 matmul kernels on the CPU: what one decode step's matmuls cost with each, side by side.

The weights are those of benchmarks/generate.py's 134M Llama (12 blocks of q, k, v, o 768x768, gate and up
2048x768, down 768x2048, and the 32000x768 output head; random values), each its own tensor so that a step
streams them from memory as a real one does. Each kernel multiplies one activation row by all of them; the
kernels alternate `--repeats` times on `--threads` (each count in turn), and the median step is shown with
the weight bytes it read per second, its speed and CPU time against litllm's int8 kernel (the CPU-time ratio is
less disturbed by other load on a shared machine) and its error against the fp32 matmul:

- `fp32 linear`, `bf16 linear`: unquantized weights (torch's CPU GEMV);
- `int8pack_mm, bf16 act.`: torch's `_weight_int8pack_mm` on int8 rows with one scale each, activations
  rounded to bf16 (litllm's `torchao.int8wo` on the CPU, `Int8PackedLinear`);
- `int8pack_mm, fp32 act.`: the same kernel on fp32 activations (its unvectorized path);
- `fbgemm W8A8 dynamic`: torch's `quantized::linear_dynamic` (its packed weights are torch's deprecated quantized
  tensors): activations quantized to 8 bits per call (one scale per row; 7 on CPUs without VNNI), int8 dot
  products (VNNI), as llama.cpp's q8_0 does per block of 32; litllm's `torchao.int8dq` on the CPU
  (`Int8DynamicLinear`, eager);
- `torchao int8dq layer`: torchao's own `Int8DynamicActivationInt8WeightConfig` layer on the CPU (eager
  activation quantization, `torch._int_mm`), what `torchao.int8dq` would run without the fbgemm kernel;
- `inductor int8 words`: what litllm's compiled `torchao.int8dq` step runs (`int8_words_linear`: activations rounded
  to int8 per block of 32 as llama.cpp's q8_0 rounds them, then int8 weights times them in torch ops, 4 int8 weights
  per fp32-typed word, which inductor compiles into its own vectorized reduction), all of a part's matmuls compiled
  as one function, as in the step (compiling it takes a minute or two; `--no_compiled` leaves it out);
- `inductor words, fp32 act.`: the same reduction on unrounded fp32 activations, what litllm's compiled fp32
  `torchao.int8wo` step runs where the CPU has no AVX-512 VNNI;
- `VNNI op, int8 act.`: litllm's C++ op (`litllm.cpu_ops.int8_rows_op`, AVX-512 VNNI CPUs only), what the
  compiled int8dq step calls there instead: the same arithmetic, int8 x int8 products by vpdpbusd. Tried and slower here: inductor's reduction
  over the int8 weights as int8 (`x @ w.float()`, ~10x slower than fbgemm: its int8 and int32 vector loads go
  through a stack copy) or as int32 words (~4x), and oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`,
  ~3x slower on an AVX2 CPU with the activation quantized eagerly).

    python benchmarks/int8_matmul.py                      # 1 and 2 threads, 5 rounds: well under a minute
    python benchmarks/int8_matmul.py --threads 1 --no_head --no_compiled

The head rows (32000x768) matter: `torchao.int8wo` keeps the head in the model's dtype (98 of the 134M model's
184 MB per token), while llama.cpp's q8_0 stores it in 8 bits too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _int8_weights import int8_rows, random_weight, row_words

BLOCK_SHAPES = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]  # (out, in) of one Llama block
HEAD_SHAPE = (32000, 768)


def fbgemm_packed(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
    """The same int8 rows as litllm's `torchao.int8dq` CPU layer (None where this torch has no such op)."""
    from litllm.quantize import Int8DynamicLinear

    try:
        return Int8DynamicLinear(q, scale, None)
    except (RuntimeError, AttributeError):
        return None


def torchao_int8dq(w: torch.Tensor):
    """torchao's own W8A8-dynamic layer of `w` (None without torchao)."""
    from litllm.errors import LitLLMError
    from litllm.quantize import _torchao_quantization

    try:
        ao = _torchao_quantization()
    except LitLLMError:  # no torchao: the row is left out
        return None
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    ao.quantize_(layer, ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return layer


def compiled_words(layers: list[dict], int8dq: bool):
    """An `inductor int8 words` row: one compiled function multiplying a row by every layer as litllm's compiled
    int8dq step (`int8dq`: activations rounded per block of 32) or fp32 int8wo step (fp32 activations) does
    (`int8_words_linear`), or None where the layers have no fbgemm copy to match."""
    from litllm.compile_decode import CPU_COMPILE_OPTIONS
    from litllm.quantize import ACTIVATION_BLOCK, _int8_words, int8_words_linear

    if any(L["packed"] is None for L in layers):
        return None
    # inductor's layout (`_int8_words`), which `prepare_compiled` does not make on an AVX-512 VNNI CPU (the op's rows)
    weights = [(_int8_words(L["q"]), L["scale"], ACTIVATION_BLOCK if int8dq else None) for L in layers]

    def step(xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [int8_words_linear(xs[w.shape[1] * 4], w, s, None, block) for w, s, block in weights]

    return torch.compile(step, dynamic=False, options=CPU_COMPILE_OPTIONS)


def make_layers(shapes: list[tuple[int, int]]) -> list[dict]:
    layers = []
    for out_f, in_f in shapes:
        w = random_weight(out_f, in_f)
        q, scale = int8_rows(w)
        layers.append(dict(w=w, wb=w.bfloat16(), q=q, scale=scale, scale_bf16=scale.bfloat16(),
                           packed=fbgemm_packed(w, q, scale), ao=torchao_int8dq(w)))
    return layers


def kernels(layers: list[dict], xs: dict[int, torch.Tensor], compiled: bool) -> dict:
    """{name: step() -> list of outputs}: one activation row times every layer."""
    xb = {k: v.bfloat16() for k, v in xs.items()}
    found = {
        "fp32 linear": lambda: [torch.nn.functional.linear(xs[L["w"].shape[1]], L["w"]) for L in layers],
        "bf16 linear": lambda: [torch.nn.functional.linear(xb[L["w"].shape[1]], L["wb"]) for L in layers],
        "int8pack_mm, bf16 act.": lambda: [torch._weight_int8pack_mm(xb[L["q"].shape[1]], L["q"], L["scale_bf16"])
                                           for L in layers],
        "int8pack_mm, fp32 act.": lambda: [torch._weight_int8pack_mm(xs[L["q"].shape[1]], L["q"], L["scale"])
                                           for L in layers],
    }
    if all(L["packed"] is not None for L in layers):
        found["fbgemm W8A8 dynamic"] = lambda: [L["packed"](xs[L["w"].shape[1]]) for L in layers]
    if all(L["ao"] is not None for L in layers):
        found["torchao int8dq layer"] = lambda: [L["ao"](xs[L["w"].shape[1]]) for L in layers]
    from litllm.cpu_ops import int8_rows_op

    op = int8_rows_op()
    if op is not None:  # AVX-512 VNNI: the op litllm's compiled int8 steps call here (row-major words)
        for L in layers:
            L["rows"] = row_words(L["q"])
        found["VNNI op, int8 act."] = lambda: [op(xs[L["q"].shape[1]], L["rows"], L["scale"], 32) for L in layers]
    for name, int8dq in (("inductor int8 words", True), ("inductor words, fp32 act.", False)):
        step = compiled_words(layers, int8dq) if compiled else None
        if step is not None:
            found[name] = lambda step=step: step(xs)
    return found


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o.float() - r).norm() ** 2) for o, r in zip(outs, refs))
    return (num / sum(float(r.norm() ** 2) for r in refs)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_head", action="store_true", help="the 12 blocks only")
    parser.add_argument("--no_compiled", action="store_true", help="leave out the compiled row (its compile time)")
    args = parser.parse_args()
    torch.manual_seed(0)
    parts = {"12 blocks": make_layers(BLOCK_SHAPES * 12)}
    if not args.no_head:
        parts["head"] = make_layers([HEAD_SHAPE])
    xs = {n: torch.randn(1, n) for n in (768, 2048)}
    for part, layers in parts.items():
        calls = kernels(layers, xs, not args.no_compiled)
        refs = calls["fp32 linear"]()
        errors = {name: relative_error(call(), refs) for name, call in calls.items()}
        int8_mb = sum(L["q"].numel() for L in layers) / 1e6
        for threads in args.threads:
            torch.set_num_threads(threads)
            times, cpu = {name: [] for name in calls}, {name: [] for name in calls}
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.repeats):  # alternate, so that other load on the machine hits all alike
                for name, call in calls.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    call()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            base = statistics.median(times["int8pack_mm, bf16 act."])
            base_cpu = statistics.median(cpu["int8pack_mm, bf16 act."])
            print(f"\n{part}, one row, {threads} thread(s), median of {args.repeats} (int8 weights: {int8_mb:.0f} MB)")
            print(f"{'kernel':24s}{'ms':>9s}{'weight GB/s':>13s}{'vs litllm int8':>16s}{'CPU ms':>9s}{'CPU-time ratio':>16s}"
                  f"{'rel. error':>12s}")
            for name, ts in times.items():
                t = statistics.median(ts)
                bytes_read = {"fp32 linear": 4, "bf16 linear": 2}.get(name, 1) * int8_mb * 1e6
                c = statistics.median(cpu[name])
                print(f"{name:24s}{t * 1e3:9.2f}{bytes_read / t / 1e9:13.1f}{base / t:15.2f}x{c * 1e3:9.2f}"
                      f"{base_cpu / c:15.2f}x{errors[name]:12.4f}")


if __name__ == "__main__":
    main()
