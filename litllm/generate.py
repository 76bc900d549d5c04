"""Text generation: sampling, the KV-cache decode loop, left-padded batches, and `litllm generate`.

Core functions (used by chat, the Python API and evaluation):
- `sample(logits, temperature, top_k, top_p)`: one next token per row.
- `generate_tokens(model, prompt_ids, max_new_tokens, ...)`: an iterator of new token ids for one
  prompt (prefill once, then one token per forward pass reading the KV cache), stopping at a stop id
  or a multi-token stop sequence (which is never yielded).
- `generate_batch(model, prompts, max_new_tokens, ..., pad_id)`: several prompts at once, left-padded;
  greedy outputs equal those of `generate_tokens` run one prompt at a time.

KV cache ownership: when the model already has a KV cache big enough (the caller set one with
`model.set_kv_cache`, e.g. to reuse it across calls), the generators use it and leave it in place.
Otherwise they allocate one sized to prompt + new tokens and clear it when they finish (also when
a streaming consumer stops early), so a plain `model(idx)` works again afterwards.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

import torch

from litllm.errors import LitLLMError

Precision = Literal["32-true", "bf16-true", "16-true"]
PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


# ---------------------------------------------------------------------- sampling
def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token of each row of `logits` (..., vocab) -> (...,) long.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p` (nucleus).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise LitLLMError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise LitLLMError(f"--top_k must be a positive integer, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise LitLLMError(f"--top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise LitLLMError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")


# ---------------------------------------------------------------------- stop handling
def _stop_lists(stop_ids: Iterable[int], stop_sequences: Iterable[Sequence[int]]) -> list[list[int]]:
    stops = [[int(i)] for i in stop_ids]
    stops += [list(map(int, s)) for s in stop_sequences if len(s)]
    return stops


def _ends_with_stop(tokens: list[int], stops: list[list[int]]) -> int:
    """Length of the stop sequence `tokens` ends with (0 if none)."""
    for s in stops:
        if len(tokens) >= len(s) and tokens[-len(s):] == s:
            return len(s)
    return 0


def _held_back(tokens: list[int], stops: list[list[int]]) -> int:
    """How many trailing tokens could still be the start of a stop sequence (not safe to emit yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(tokens)), best, -1):
            if tokens[-n:] == s[:n]:
                best = n
                break
    return best


def truncate_at_stop(tokens: list[int], stops: list[list[int]]) -> list[int]:
    """`tokens` up to (not including) the first stop id or stop sequence."""
    for end in range(1, len(tokens) + 1):
        n = _ends_with_stop(tokens[:end], stops)
        if n:
            return tokens[: end - n]
    return tokens


# ---------------------------------------------------------------------- decoding
@contextmanager
def kv_cache_for(model, batch_size: int, length: int) -> Iterator[None]:
    """Use the model's KV cache if it fits `batch_size` x `length`; else set one for the block and clear it after."""
    cache = model.blocks[0].attn.kv_cache
    if cache is not None and cache.k.size(0) >= batch_size and cache.k.size(2) >= length:
        yield
        return
    model.set_kv_cache(batch_size, length)
    try:
        yield
    finally:
        model.clear_kv_cache()


def context_check(model, prompt_len: int, max_new_tokens: int) -> int:
    """Clear error when the prompt doesn't fit; return how many new tokens fit in the context window."""
    limit = model.max_seq_length
    if prompt_len >= limit:
        raise LitLLMError(
            f"the prompt has {prompt_len} tokens but the model's context window is {limit}: shorten the prompt"
        )
    return min(max_new_tokens, limit - prompt_len)


@torch.inference_mode()
def generate_tokens(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    stop_sequences: Iterable[Sequence[int]] = (),
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield the new token ids that follow `prompt_ids` (T,), one at a time (streaming).

    Stops after `max_new_tokens` (clipped to the context window), or when the output ends with a
    stop id or stop sequence; stop tokens are not yielded, and tokens that might begin a stop
    sequence are held back until it is clear they don't. Ensures a KV cache (see module docstring).
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    prompt_ids = prompt_ids.reshape(-1)
    T = prompt_ids.numel()
    if T == 0:
        raise LitLLMError("the prompt is empty (no tokens)")
    max_new_tokens = context_check(model, T, max_new_tokens)
    device = model.wte.weight.device
    stops = _stop_lists(stop_ids, stop_sequences)
    positions = torch.arange(T + max_new_tokens, device=device)
    with kv_cache_for(model, 1, T + max_new_tokens):
        logits = model(prompt_ids.to(device)[None], input_pos=positions[:T])[:, -1]  # (1, vocab)
        token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
        generated: list[int] = []
        emitted = 0
        for step in range(max_new_tokens):
            generated.append(int(token))
            n_stop = _ends_with_stop(generated, stops)
            if n_stop:
                # emit whatever preceded the stop sequence and was held back
                yield from generated[emitted: len(generated) - n_stop]
                return
            safe = len(generated) - _held_back(generated, stops)
            yield from generated[emitted:safe]
            emitted = max(emitted, safe)
            if step == max_new_tokens - 1:
                break
            pos = T + step
            logits = model(token[None], input_pos=positions[pos: pos + 1])[:, -1]
            token = sample(logits, temperature, top_k, top_p, generator)
        yield from generated[emitted:]


@torch.inference_mode()
def generate_batch(
    model,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    stop_sequences: Iterable[Sequence[int]] = (),
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> list[torch.Tensor]:
    """Generate for several prompts at once; returns each prompt's new tokens (stops excluded).

    Prompts are left-padded to the same length; each row gets its own RoPE positions
    (`position_ids`) and padding is hidden from attention (`key_padding_mask`), so a row's greedy
    output equals generating it alone. Rows that hit a stop keep decoding (discarded) until all
    rows stop. Ensures a KV cache (see module docstring).
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not prompts:
        return []
    device = model.wte.weight.device
    prompts = [p.reshape(-1).to(device) for p in prompts]
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    if int(lengths.min()) == 0:
        raise LitLLMError("a prompt is empty (no tokens)")
    B, T = len(prompts), int(lengths.max())
    max_new_tokens = context_check(model, T, max_new_tokens)
    stops = _stop_lists(stop_ids, stop_sequences)
    total = T + max_new_tokens

    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    key_mask = torch.ones(B, total, dtype=torch.bool, device=device)  # True = a real token
    for row, p in enumerate(prompts):
        idx[row, T - p.numel():] = p
        key_mask[row, : T - p.numel()] = False
    position_ids = (key_mask[:, :T].long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    positions = torch.arange(total, device=device)

    with kv_cache_for(model, B, total):
        logits = model(idx, input_pos=positions[:T], position_ids=position_ids, key_padding_mask=key_mask)[:, -1]
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        out = token[:, None]
        done = [False] * B
        next_pos = lengths[:, None].clone()  # (B, 1) RoPE position of each row's next token
        for step in range(1, max_new_tokens):
            rows = out.tolist()
            for r in range(B):
                done[r] = done[r] or bool(_ends_with_stop(rows[r], stops))
            if all(done):
                break
            pos = T + step - 1
            logits = model(
                token[:, None], input_pos=positions[pos: pos + 1], position_ids=next_pos, key_padding_mask=key_mask
            )[:, -1]
            token = sample(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, token[:, None]], dim=1)
            next_pos = next_pos + 1
    return [torch.tensor(truncate_at_stop(row, stops), dtype=torch.long) for row in out.tolist()]


# ---------------------------------------------------------------------- text streaming
def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Turn a stream of token ids into text chunks, never splitting a multi-byte character.

    Decodes a short window of recent tokens and emits only the new text once it is complete (no
    trailing U+FFFD), so SentencePiece's leading spaces and byte-fallback pieces come out right.
    """
    ids: list[int] = []
    prefix, read = 0, 0  # window start; end of the already-emitted tokens
    for token in tokens:
        ids.append(token)
        before = tokenizer.decode(ids[prefix:read])
        after = tokenizer.decode(ids[prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            yield after[len(before):]
            prefix, read = read, len(ids)
    if read < len(ids):  # an incomplete character at the very end: emit what decoding gives
        before, after = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:])
        if len(after) > len(before):
            yield after[len(before):]


# ---------------------------------------------------------------------- CPU weight layout
class PackedLinear(torch.nn.Module):
    """A Linear whose weight oneDNN has reordered into its own blocked layout (CPU inference only).

    One-row matmuls (decoding) stream the weight from memory; oneDNN's kernel on its packed layout
    does that up to ~2x faster than the BLAS call `F.linear` makes on some CPUs. The packed weight
    is an opaque `mkldnn` tensor kept out of the state dict: the module is for generation, not
    for saving, moving between devices or training.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def _column_major(linear: torch.nn.Linear) -> torch.nn.Linear:
    # same values and shape; the transpose F.linear multiplies by becomes contiguous
    linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return linear


LAYOUTS = {"column-major": _column_major, "onednn-packed": PackedLinear}


def _layout_works(name: str, linear: torch.nn.Linear) -> bool:
    """Can this layout run here (oneDNN ops present) and give the same numbers?"""
    if name == "onednn-packed" and not (
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
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3)


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
    `layout` forces one ("row-major", "column-major", "onednn-packed") without timing.
    Returns the layout in use: "row-major", "column-major", "onednn-packed", or "unchanged" (GPU).
    """
    import torch.nn as nn

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "onednn-packed"  # already done
    linears = [
        (name, m) for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight is not model.wte.weight
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
    for name in LAYOUTS:
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
    with kv_cache_for(model, 1, 8):
        model(token, input_pos=torch.tensor([0], device=device))  # warm-up, not timed
        for rep in range(5):
            for n in candidates:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                model(token, input_pos=torch.tensor([rep], device=device))
                times[n].append(time.perf_counter() - t0)
            if rep >= 1 and time.perf_counter() - start > budget_s:  # big models: fewer samples
                break
    torch.set_num_threads(current)
    median = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best = current
    for n in candidates[1:]:
        if median[n] * min_gain < median[best]:
            best = n
    return best


@contextmanager
def threads_for(n: Optional[int]) -> Iterator[None]:
    """Run a block with `n` torch threads (None: unchanged), restoring the setting afterwards."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- loading
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: Optional[str], device: str) -> torch.dtype:
    """`--precision` -> dtype; default bf16 on a GPU that supports it, fp32 elsewhere."""
    if precision is None:
        if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in PRECISIONS:
        raise LitLLMError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def load_for_inference(
    checkpoint_dir: Path,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """Load a converted model folder for generation: dtype, optional bitsandbytes quantization, eval mode.

    Folders written by `finetune_adapter(_v2)` (with an `adapter.yaml`) load with their adapter modules.
    """
    from litllm.adapter import load_adapter_model
    from litllm.utils import check_model_dir

    checkpoint_dir = check_model_dir(checkpoint_dir)
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


# ---------------------------------------------------------------------- the command
def generate(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    *,
    sys_prompt: Optional[str] = None,
    prompt_style: Optional[str] = None,
    num_samples: int = 1,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    seed: int = 1234,
    device: Optional[str] = None,
) -> None:
    """Generate text from a prompt with a converted model, streaming it to stdout.

    Args:
        checkpoint_dir: A converted model folder (`lit_model.safetensors`, `model_config.yaml`, tokenizer).
        prompt: The instruction or text to continue; formatted with the prompt style first.
        sys_prompt: A system prompt, for styles that have one.
        prompt_style: A prompt style name (e.g. `alpaca`, `llama3`, `chatml`, `default` for plain
            text); by default the checkpoint's `prompt_style.yaml`, its chat template, or its family's style.
        num_samples: How many independent samples to generate.
        max_new_tokens: Most tokens to generate per sample (stops earlier at EOS or a stop sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (null: no limit).
        top_p: Nucleus sampling: sample among the most likely tokens whose probabilities add up to
            top_p, in (0, 1]; 1 disables it.
        precision: `32-true`, `bf16-true` or `16-true` (default: bf16-true on a GPU that supports it, else 32-true).
        quantize: Quantize the weights with bitsandbytes: `bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4` or `bnb.int8`.
        compile: Compile the model with `torch.compile` (pays off for long generations).
        seed: Random seed for sampling.
        device: `cpu`, `cuda`, `cuda:1`, ... (default: cuda when available).
    """
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer
    from litllm.utils import check_model_dir

    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if num_samples < 1:
        raise LitLLMError(f"--num_samples must be >= 1, got {num_samples}")
    checkpoint_dir = check_model_dir(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_name(prompt_style) if prompt_style else PromptStyle.from_checkpoint(checkpoint_dir)
    device = device or default_device()
    t0 = time.perf_counter()
    model = load_for_inference(checkpoint_dir, device, precision, quantize)
    optimize_for_decoding(model)
    threads = pick_decode_threads(model)
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    prompt_ids = style.encode(tokenizer, style.apply(prompt, sys_prompt=sys_prompt))
    context_check(model, prompt_ids.numel(), max_new_tokens)
    runner = torch.compile(model, dynamic=True) if compile else model
    stops = style.stop_tokens(tokenizer)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    for i in range(num_samples):
        t0 = time.perf_counter()
        n = 0

        def counted(tokens):
            nonlocal n
            for t in tokens:
                n += 1
                yield t

        tokens = generate_tokens(
            runner, prompt_ids, max_new_tokens, temperature, top_k, top_p,
            stop_sequences=stops, generator=generator,
        )
        with threads_for(threads):
            for chunk in stream_text(tokenizer, counted(tokens)):
                print(chunk, end="", flush=True)
        print(flush=True)
        dt = time.perf_counter() - t0
        print(f"Sample {i + 1}: {n} tokens in {dt:.2f} s, {n / dt:.2f} tokens/s", file=sys.stderr)
    if torch.device(device).type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", file=sys.stderr)
