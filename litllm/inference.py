"""Loading a model for decoding, what every inference command shares (`generate`, `chat`, `serve`, `LLM`,
`evaluate`): the weights (`--precision`, `--quantize`, `--device`), the model folder's tokenizer, prompt
style and default stops, the CPU weight layout and thread count that decode fastest here, and how many
tokens a request may generate in the context window.

Decoding itself (sampling, stops, the KV-cache loop with continuous batching) is `litllm.engine`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from litllm.engine import default_stops
from litllm.errors import LitLLMError
from litllm.precision import DECODE_PRECISIONS


# ---------------------------------------------------------------------- context window
def fit_max_new_tokens(requested: Optional[int], default: int, room: int, window: int, flag: str = "--max_new_tokens",
                       say=None) -> int:
    """How many tokens to generate when `room` of the `window`-token context is free.

    A value the user gave must fit (clear error otherwise); the default is reduced to fit, and
    `say` (default: print to stderr) is told so in one line.
    """
    if requested is not None:
        if requested > room:
            raise LitLLMError(
                f"{flag} {requested} does not fit: only {room} of the {window}-token context window are left"
            )
        return requested
    if default > room:
        (say or _say)(f"{flag}: the default {default} is reduced to {room} to fit the {window}-token context window")
        return room
    return default


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def check_prompt_fits(prompt_len: int, window: int) -> None:
    if prompt_len >= window:
        raise LitLLMError(
            f"the prompt has {prompt_len} tokens but the model's context window is {window}: shorten the prompt"
        )


# ---------------------------------------------------------------------- CPU weight layout
class PackedLinear(torch.nn.Module):
    """A Linear whose weight oneDNN has reordered into its own blocked layout (CPU inference only).

    One-row matmuls (decoding) stream the weight from memory; oneDNN's kernel on its packed layout
    does that up to ~2x faster than the BLAS call `F.linear` makes on some CPUs. The packed weight
    is an opaque `mkldnn` tensor kept out of the state dict: the module is for generation, not
    for saving, moving between devices or training. `unpack_column_major`: `unpacked` gives an fp32 weight
    column-major (the layout `optimize_for_decoding` found faster than row-major for a one-row `F.linear` here).
    """

    def __init__(self, linear: torch.nn.Linear, unpack_column_major: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.unpack_column_major = unpack_column_major and linear.weight.dtype not in ONE_ROW_DTYPES
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def unpacked(self) -> torch.nn.Linear:
        """The plain Linear again (`to_dense` undoes oneDNN's reorder exactly): what a compiled step multiplies by
        (a `OneRowLinear` for 16-bit weights; column-major with `unpack_column_major`)."""
        cls = OneRowLinear if self.packed_weight.dtype in ONE_ROW_DTYPES else torch.nn.Linear
        linear = cls(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(self.packed_weight.to_dense(), requires_grad=False)
        linear.bias = self.bias
        return _column_major(linear) if self.unpack_column_major else linear


class OneRowLinear(torch.nn.Linear):
    """A Linear that multiplies one row by `torch.mv`; more rows go through `F.linear` as usual.

    For the compiled decode step of 16-bit weights on the CPU (`one_row_linears`): inductor lowers a one-row
    `F.linear` to the same oneDNN matmul as eager (bf16: ~7 GB/s of weight read on an AMX Xeon, slower than fp32;
    14 on a 2-core AVX2 EPYC), but decomposes `mv` into its own vectorized reduction that accumulates in fp32 and
    streams bf16 weights faster (~1.8x there, 20 GB/s here; benchmarks/one_row_matmul.py). Eager, `torch.mv` is
    no faster than `PackedLinear`, which stays the eager pick.
    """

    one_row = True  # how litllm.compile_decode.cpu_compile_options tells a step over these (its own settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1))  # (out,)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


ONE_ROW_DTYPES = (torch.bfloat16, torch.float16)
"""Weight dtypes a compiled CPU step multiplies through `OneRowLinear` (`one_row_linears`)."""


def becomes_one_row(module) -> bool:
    """Does a compiled CPU step multiply by `module` through a `OneRowLinear` (`one_row_linears`)? Plain row-major
    16-bit Linears on the CPU do (oneDNN-packed ones unpack so); so do OneRowLinears already. Column-major ones (the
    eager pick where it timed `F.linear` faster so) keep `F.linear`: inductor's `mv` reduction reads rows."""
    if getattr(module, "one_row", False):
        return True
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and type(weight) is torch.nn.Parameter and weight.device.type == "cpu"
            and weight.dtype in ONE_ROW_DTYPES and weight.is_contiguous())


def one_row_linears(model) -> None:
    """Every plain row-major 16-bit CPU Linear of `model` (`becomes_one_row`; a head tied to the embedding too) as a
    `OneRowLinear` on the same tensors, for a compiled step: on the CPU a one-row `F.linear` of 16-bit weights
    is oneDNN's or BLAS's unpacked matmul, slower than inductor's own reduction of `torch.mv` on every CPU
    measured (AVX2 and AMX, benchmarks/one_row_matmul.py)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and becomes_one_row(child):
                one_row = OneRowLinear(child.in_features, child.out_features, bias=False, device="meta")
                one_row.weight, one_row.bias = child.weight, child.bias  # the same Parameters: ties stay
                setattr(module, name, one_row)


def _column_major(linear: torch.nn.Linear) -> torch.nn.Linear:
    # same values and shape; the transpose F.linear multiplies by becomes contiguous
    linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return linear


LAYOUTS = {"column-major": _column_major, "onednn-packed": PackedLinear,
           "onednn-packed+column-major": lambda linear: PackedLinear(linear, unpack_column_major=True)}
"""How `optimize_for_decoding` lays Linears out. The eager step of "onednn-packed+column-major" is oneDNN's packed
one; a compiled step (which takes plain weights, `PackedLinear.unpacked`) multiplies by fp32 ones column-major."""
TIMED_LAYOUTS = ("column-major", "onednn-packed")
"""The layouts `optimize_for_decoding` times (the others differ only in what a compiled step multiplies by)."""


def _layout_works(name: str, linear: torch.nn.Linear) -> bool:
    """Can this layout run here (oneDNN ops present) and give the same numbers?"""
    if name.startswith("onednn-packed") and not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    probe = torch.nn.Linear(linear.in_features, 16, bias=True, dtype=linear.weight.dtype)
    x = torch.randn(3, 2, linear.in_features, dtype=linear.weight.dtype)
    try:
        expected = probe(x)
        got = LAYOUTS[name](probe)(x)
    except Exception:  # an op missing from this torch build
        return False
    # another summation order: fp32 differs in its last bits, bf16/fp16 (8/11-bit mantissas) in its last ones
    tol = 1e-3 if linear.weight.dtype == torch.float32 else 2e-2
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol)


@torch.inference_mode()
def optimize_for_decoding(model, min_gain: float = 1.1, layout: Optional[str] = None) -> str:
    """On the CPU, lay Linear weights out in whichever way makes one-token matmuls fastest here.

    Decoding multiplies one activation row by each weight matrix, a pass over memory whose speed
    depends on the BLAS, the kernel and the CPU. Candidates: as loaded (row-major, `F.linear`),
    column-major (`F.linear` then multiplies by a contiguous transpose; 1.1-1.6x faster than
    row-major with MKL on AMD EPYC), and oneDNN's packed layout (`PackedLinear`; up to ~2x). Each is
    timed on (up to 128 MB of) the largest layer (interleaved, medians); the fastest replaces every plain
    Linear whose weight isn't shared with the embedding, one layer at a time, if it beats the
    loaded layout by `min_gain`. Values are unchanged; only the summation order differs.
    `layout` forces one (`LAYOUTS` or "row-major") without timing. A compiled step multiplies by packed weights
    unpacked (`PackedLinear.unpacked`; 16-bit ones through `OneRowLinear`); fp32 ones column-major
    ("onednn-packed+column-major") where column-major beat row-major by `min_gain` too: the compiled step's
    `F.linear` is the same BLAS call as eager's (MKL's: 1.5x faster column-major on a 2-core AVX2 AMD EPYC).
    Returns the layout in use: "row-major", "column-major", "onednn-packed", "onednn-packed+column-major", or
    "unchanged" (GPU).
    """
    import torch.nn as nn

    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if packed:  # already done
        return "onednn-packed+column-major" if packed[0].unpack_column_major else "onednn-packed"
    linears = [
        (name, m) for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight is not model.wte.weight
        and type(m.weight) is nn.Parameter  # not a quantized tensor subclass (torchao): its kernel decides
    ]
    if not linears:
        return "unchanged"
    if not linears[0][1].weight.is_contiguous():
        return "column-major"  # already done
    largest = max((m for _, m in linears), key=lambda m: m.weight.numel())
    if layout is not None:
        if layout != "row-major" and not (layout in LAYOUTS and _layout_works(layout, largest)):
            raise LitLLMError(
                f"weight layout {layout!r} is not available here (expected one of row-major, {', '.join(LAYOUTS)})"
            )
        return _apply_layout(model, linears, layout)
    # time on (up to) 128 MB of the largest weight's rows: bigger than caches, small enough to copy
    w = largest.weight.detach()
    w = w[: max(1, min(w.size(0), (128 << 20) // (w.size(1) * w.element_size())))]
    candidates = {"row-major": torch.nn.Linear(w.size(1), w.size(0), bias=False, device="meta")}
    candidates["row-major"].weight = nn.Parameter(w)
    for name in TIMED_LAYOUTS:
        if _layout_works(name, largest):
            copy = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
            copy.weight = nn.Parameter(w)
            candidates[name] = LAYOUTS[name](copy)
    x = torch.randn(1, 1, w.size(1), dtype=w.dtype)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(7):
        for name, layer in candidates.items():
            t0 = time.perf_counter()
            layer(x)
            times[name].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = min(median, key=median.get)
    del candidates
    if best == "row-major" or median["row-major"] < min_gain * median[best]:
        return "row-major"
    if best == "onednn-packed" and w.dtype == torch.float32 and "column-major" in median \
            and median["column-major"] * min_gain < median["row-major"]:
        best = "onednn-packed+column-major"  # what a compiled step's F.linear reads faster
    return _apply_layout(model, linears, best)


def _apply_layout(model, linears, layout: str) -> str:
    if layout == "row-major":
        return layout
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LAYOUTS[layout](linear))
    return layout


@torch.inference_mode()
def pick_decode_threads(model, budget_s: float = 3.0, min_gain: float = 1.1) -> int:
    """On the CPU, the torch thread count that decodes fastest here (the current one unless fewer win).

    Each decoding step runs a few dozen short parallel regions; when other processes keep the cores
    busy, every region waits for its slowest thread to be scheduled again, and 2 threads can be 10x
    slower than 1. This times real one-token steps (interleaved, medians) with the current count,
    half of it and 1, within `budget_s`, and returns the fastest (fewer threads only if `min_gain`
    faster). It does not change the setting: apply it with `torch.set_num_threads` or `threads_for`.
    """
    current = torch.get_num_threads()
    if model.wte.weight.device.type != "cpu" or current == 1:
        return current
    candidates = sorted({current, max(1, current // 2), 1}, reverse=True)
    device = model.wte.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {n: [] for n in candidates}
    start = time.perf_counter()
    model.set_kv_cache(1, 8)
    try:
        model.decode(token, torch.tensor([0], device=device))  # warm-up, not timed
        for rep in range(5):
            for n in candidates:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                model.decode(token, torch.tensor([rep], device=device))
                times[n].append(time.perf_counter() - t0)
            if rep >= 1 and time.perf_counter() - start > budget_s:  # big models: fewer samples
                break
    finally:
        model.clear_kv_cache()
        torch.set_num_threads(current)
    median = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best = current
    for n in candidates[1:]:
        if median[n] * min_gain < median[best]:
            best = n
    return best


# ---------------------------------------------------------------------- loading
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: Optional[str], device: str) -> torch.dtype:
    """`--precision` -> dtype; default (`default_decode_precision`): bf16 on a GPU that supports it, else fp32."""
    precision = precision or default_decode_precision(device)
    if precision not in DECODE_PRECISIONS:
        raise LitLLMError(f"--precision: expected one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    return DECODE_PRECISIONS[precision]


def default_decode_precision(device: str) -> str:
    """`--precision`'s default: `$LITLLM_PRECISION` if set, else bf16-true on a GPU that supports it, else 32-true.

    Not bf16 on CPUs with AMX/AVX512-BF16 units: measured there (benchmarks/generate.py, tutorials/inference.md)
    bf16 decodes ~1.2x fp32 (1 thread, loaded machine; not yet measured quietly at 2 threads), not the 2x its bytes
    would allow: torch's one-row bf16 kernels read ~0.9x fp32's bytes per second (benchmarks/one_row_matmul.py);
    and it agrees with fp32 less (benchmarks/bf16_agreement.py)."""
    from litllm.precision import PRECISION_ENV

    if os.environ.get(PRECISION_ENV):
        if os.environ[PRECISION_ENV] not in DECODE_PRECISIONS:
            raise LitLLMError(f"${PRECISION_ENV}: expected one of {', '.join(DECODE_PRECISIONS)}, "
                              f"got {os.environ[PRECISION_ENV]!r}")
        return os.environ[PRECISION_ENV]
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def load_for_inference(
    checkpoint_dir: Path,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """Load a converted model folder for generation: dtype, optional quantization (`litllm.quantize`), eval mode.

    Folders written by `finetune_adapter(_v2)` (with an `adapter.yaml`) load with their adapter modules.
    """
    from litllm.adapter import load_adapter_model
    from litllm.model_folder import check_model_folder

    checkpoint_dir = check_model_folder(checkpoint_dir)
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise LitLLMError(f"--device {device}: CUDA is not available on this machine")
    dtype = resolve_precision(precision, device)
    if quantize is None:
        return load_adapter_model(checkpoint_dir, device=device, dtype=dtype).eval()
    from litllm.quantize import check_quantize_mode, quantize_model

    check_quantize_mode(quantize, device, dtype)  # fail before loading anything big
    # load on the CPU and quantize layer by layer onto the device: the full-precision model never
    # has to fit in device memory
    model = load_adapter_model(checkpoint_dir, device="cpu", dtype=dtype)
    quantize_model(model, quantize, device, compute_dtype=dtype)
    return model.to(device).eval()


def load_for_decoding(
    checkpoint_dir: Path,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """The loader of every generating command: `load_for_inference`, then the CPU weight layout and
    thread count that decode fastest here, or those a compiled run recorded for this model on this machine
    (`litllm.compile_decode.recorded_decode_choices`: the same compiled kernels). Returns (model, threads for the
    Engine); `model.decode_choices` says what was chosen, and under which key, for `record_decode_choices`."""
    from litllm.compile_decode import decode_choices_key, recorded_decode_choices

    model = load_for_inference(checkpoint_dir, device, precision, quantize)
    key = decode_choices_key(model)
    recorded = recorded_decode_choices(key) if model.wte.weight.device.type == "cpu" else None
    if recorded is not None:
        try:
            forced = None if recorded["layout"] == "unchanged" else recorded["layout"]  # (no Linear to lay out)
            layout, threads = optimize_for_decoding(model, layout=forced), recorded["threads"]
        except LitLLMError:  # that layout no longer works here: pick again
            recorded = None
    if recorded is None:
        layout, threads = optimize_for_decoding(model), pick_decode_threads(model)
    model.decode_choices = {"key": key, "layout": layout, "threads": threads}
    return model, threads


# ---------------------------------------------------------------------- the commands
@dataclass
class LoadArgs:
    """How every inference command loads a model: `--precision`, `--quantize`, `--device`."""

    precision: Optional[str] = None
    """`32-true`, `bf16-true` or `16-true` (default: bf16-true on a GPU that supports it, else 32-true; $LITLLM_PRECISION overrides it)."""
    quantize: Optional[str] = None
    """Quantize the weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`, `bnb.int8`) or torchao (`torchao.int8wo`, `torchao.int4wo`: weight-only int8/int4; `torchao.int8dq`: int8 weights and per-token int8 activations, the head too)."""
    device: Optional[str] = None
    """`cpu`, `cuda`, `cuda:1`, ... (default: cuda when available)."""
    devices: int = 1
    """Tensor parallelism: shard the model over this many devices (processes) per node; each holds ~1/N of the weights and KV cache (`--device cpu` runs N processes over gloo)."""
    num_nodes: int = 1
    """Tensor parallelism over several machines (start the command on each with torchrun or srun)."""
    strategy: str = "tensor"
    """With --devices > 1: `tensor` (tensor parallelism, one process per device) or `sequential` (consecutive blocks on consecutive GPUs of one process, no collectives)."""

    def for_decoding(self, checkpoint_dir: Path):
        """`load_for_decoding` with these flags: (model, threads for the Engine)."""
        from litllm.parallel import load_on_devices, uses_devices

        if uses_devices(self.devices, self.num_nodes):
            device = self.device or default_device()
            return load_on_devices(checkpoint_dir, self.devices, self.num_nodes, self.strategy, device,
                                   resolve_precision(self.precision, device), self.quantize)
        return load_for_decoding(checkpoint_dir, self.device, self.precision, self.quantize)


# ---------------------------------------------------------------------- a model folder ready to decode
@dataclass
class Decoder:
    """A model folder loaded for decoding: what `generate`, `chat`, `serve` and `LLM` start from."""

    checkpoint_dir: Path
    tokenizer: "Tokenizer"  # noqa: F821
    prompt_style: "PromptStyle"  # noqa: F821
    model: torch.nn.Module
    threads: int
    """Torch threads for the Engine (`pick_decode_threads`)."""

    @property
    def window(self) -> int:
        """The model's context window in tokens."""
        return self.model.max_seq_length

    def stops(self, chat: bool = True) -> dict:
        """The default stops of a Request: the tokenizer's, plus the prompt style's for a chat (formatted) prompt."""
        return default_stops(self.tokenizer, self.prompt_style if chat else None)

    def encode(self, prompt: str, sys_prompt: Optional[str] = None) -> list[int]:
        """`prompt` formatted with the prompt style, as token ids."""
        style = self.prompt_style
        return style.encode(self.tokenizer, style.apply(prompt, sys_prompt=sys_prompt)).tolist()

    def max_new_tokens(self, prompt_len: int, requested: Optional[int], default: int, flag: str = "--max_new_tokens",
                       say=None) -> int:
        """How many tokens a request with a `prompt_len`-token prompt may generate (`tokens_to_generate`)."""
        return tokens_to_generate(prompt_len, self.window, requested, default, flag, say)


def load_decoder(checkpoint_dir: Path, prompt_style: Optional[str] = None, load: Optional[LoadArgs] = None) -> Decoder:
    """Load a model folder for decoding: its tokenizer and prompt style (`prompt_style`, or the folder's own;
    a bad name fails before the weights load), then the model as `load` says (`load_for_decoding`)."""
    from litllm.model_folder import check_model_folder
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer

    checkpoint_dir = check_model_folder(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_checkpoint(checkpoint_dir, prompt_style)
    model, threads = (load or LoadArgs()).for_decoding(checkpoint_dir)
    return Decoder(checkpoint_dir, tokenizer, style, model, threads)


def tokens_to_generate(prompt_len: int, window: int, requested: Optional[int], default: int,
                       flag: str = "--max_new_tokens", say=None) -> int:
    """How many tokens a request may generate after a `prompt_len`-token prompt in a `window`-token context:
    the prompt must leave room; then `fit_max_new_tokens` on what it leaves."""
    check_prompt_fits(prompt_len, window)
    return fit_max_new_tokens(requested, default, window - prompt_len, window, flag, say)


def tokens_to_reserve(window: int, requested: Optional[int], default: int, flag: str = "--max_new_tokens") -> int:
    """How many tokens to keep free for each answer of a conversation whose length is not known yet (`chat`):
    a value the user gave must leave room for the conversation; the default is reduced to half the window."""
    if requested is not None:
        if requested >= window:
            raise LitLLMError(
                f"{flag} {requested} leaves no room for the conversation in the {window}-token context window"
            )
        return requested
    return fit_max_new_tokens(None, default, window // 2, window, flag)
