"""Loading a model for decoding, what every inference command shares (`generate`, `chat`, `serve`, `LLM`,
`evaluate`): the weights (`--precision`, `--quantize`, `--device`), the model folder's tokenizer, prompt
style and default stops, the CPU weight layout (`litllm.cpu_layout`) and thread count that decode fastest here, and how many
tokens a request may generate in the context window.

Decoding itself (sampling, stops, the KV-cache loop with continuous batching) is `litllm.engine`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from litllm.cpu_layout import fastest_threads, thread_candidates
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


@torch.inference_mode()
def pick_decode_threads(model, budget_s: float = 3.0, min_gain: float = 1.1) -> int:
    """On the CPU, the torch thread count that decodes fastest here (the current one unless fewer win).

    Each decoding step runs a few dozen short parallel regions; when other processes keep the cores
    busy, every region waits for its slowest thread to be scheduled again (and with GNU OpenMP's default
    spin-wait the waiting thread held the core for ~10 ms: 2 threads 5-10x slower than 1; `import litllm`
    bounds it, `litllm.bound_omp_spin`). This times real one-token steps (interleaved, medians) with the current count,
    half of it and 1, within `budget_s`, and returns the fastest (fewer threads only if `min_gain`
    faster; `litllm.cpu_layout.fastest_threads`). It does not change the setting: apply it with
    `torch.set_num_threads` or `threads_for`. This is the EAGER step's pick; a compiled step's threads scale otherwise
    (one parallel region, matmuls split by rows), so a compiled run times its own step (`litllm.generate.decode_engine`,
    `litllm.compile_decode.pick_compiled_threads`) and records that pick.
    """
    if model.wte.weight.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.get_num_threads()
    device = model.wte.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    model.set_kv_cache(1, 8)
    try:
        model.decode(token, torch.tensor([0], device=device))  # warm-up, not timed
        return fastest_threads(lambda rep: model.decode(token, torch.tensor([rep], device=device)),
                               thread_candidates(), budget_s=budget_s, min_gain=min_gain)
    finally:
        model.clear_kv_cache()


# ---------------------------------------------------------------------- loading
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: Optional[str], device: str, quantize: Optional[str] = None) -> torch.dtype:
    """`--precision` -> dtype; default (`default_decode_precision`): bf16 on a GPU that supports it and, unquantized,
    on a CPU with bf16 units, else fp32."""
    precision = precision or default_decode_precision(device, quantize)
    if precision not in DECODE_PRECISIONS:
        # training's `bf16-mixed` (or a bare `bf16`): decoding keeps no fp32 copy, its name is the `-true` one
        same = next((p for p in DECODE_PRECISIONS if p.split("-")[0] == str(precision).split("-")[0]), None)
        hint = f" (did you mean {same}?)" if same else ""
        raise LitLLMError(f"--precision: expected one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}{hint}")
    return DECODE_PRECISIONS[precision]


def default_decode_precision(device: str, quantize: Optional[str] = None) -> str:
    """`--precision`'s default: `$LITLLM_PRECISION` if set, else bf16-true on a GPU that supports it and, for
    unquantized weights (`quantize` None), on a CPU with bf16 units (`cpu_has_bf16_units`: AVX512-BF16 or AMX), else
    32-true (the CPU's quantized modes keep computing in fp32, as they were measured).

    bf16 on such CPUs: on a 2-core AVX-512-BF16 AMD EPYC (Zen 4) the 134M Llama's compiled bf16 step took 2.0-2.8x less
    CPU time a token than fp32's at 1 thread, 2.2-2.3x at 2 (`benchmarks/decode_threads.py`, three runs at load 7-12),
    its eager step (oneDNN-packed) 1.19-1.45x less; its weights take half the memory, and its greedy agreement with
    fp32 is a GPU's bf16's (the same rounding: `benchmarks/bf16_agreement.py`,
    tutorials/inference_measurements.md#bf16-default).
    Not on CPUs without them (AVX2): there oneDNN has no bf16 GEMM (a prompt's matmuls convert the weights to fp32,
    `litllm.cpu_layout.upcast_16_bit_gemm`), and the default was not measured there. `--precision 32-true` keeps fp32."""
    from litllm.precision import PRECISION_ENV

    if os.environ.get(PRECISION_ENV):
        if os.environ[PRECISION_ENV] not in DECODE_PRECISIONS:
            raise LitLLMError(f"${PRECISION_ENV}: expected one of {', '.join(DECODE_PRECISIONS)}, "
                              f"got {os.environ[PRECISION_ENV]!r}")
        return os.environ[PRECISION_ENV]
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-true"
    if kind == "cpu" and quantize is None and cpu_has_bf16_units():
        return "bf16-true"
    return "32-true"


def cpu_has_bf16_units() -> bool:
    """Does this CPU multiply bf16 in hardware: AVX512-BF16 (`vdpbf16ps`) or AMX tiles (oneDNN's bf16 kernels)."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


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
    dtype = resolve_precision(precision, device, quantize)
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
    (`litllm.compile_ledger.recorded_decode_choices`: the same compiled kernels). Returns (model, threads for the
    Engine); `model.decode_choices` says what was chosen, and under which key, for `record_decode_choices`."""
    from litllm.compile_ledger import choose_decode_layout

    model = load_for_inference(checkpoint_dir, device, precision, quantize)
    return model, choose_decode_layout(model, pick_decode_threads)


# ---------------------------------------------------------------------- the commands
@dataclass
class LoadArgs:
    """How every inference command loads a model: `--precision`, `--quantize`, `--device`."""

    precision: Optional[str] = None
    """`32-true`, `bf16-true` or `16-true` (default: bf16-true on a GPU that supports it and unquantized on a CPU with bf16 units, AVX512-BF16 or AMX; else 32-true; $LITLLM_PRECISION overrides it; `32-true` keeps fp32)."""
    quantize: Optional[str] = None
    """Quantize the weights with bitsandbytes (`bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4`, `bnb.int8`) or torchao (`torchao.int8wo`, `torchao.int4wo`: weight-only int8/int4, int8wo the head too; `torchao.int8dq`: int8 weights and per-token int8 activations, the head too)."""
    device: Optional[str] = None
    """`cpu`, `cuda`, `cuda:1`, ... (default: cuda when available)."""
    devices: int = 1
    """Tensor parallelism: shard the model over this many devices (processes) per node; each holds ~1/N of the weights and KV cache (`--device cpu` runs N processes over gloo)."""
    num_nodes: int = 1
    """Tensor parallelism over several machines (start the command on each with torchrun or srun)."""
    strategy: str = "tensor"
    """With --devices > 1: `tensor` (tensor parallelism, one process per device) or `sequential` (consecutive blocks on consecutive GPUs of one process, no collectives)."""

    @property
    def tensor_parallel(self) -> bool:
        """Do these flags shard the model over several devices (processes)?"""
        from litllm.parallel import uses_devices

        return uses_devices(self.devices, self.num_nodes) and self.strategy == "tensor"

    def for_decoding(self, checkpoint_dir: Path):
        """`load_for_decoding` with these flags: (model, threads for the Engine)."""
        from litllm.parallel import load_on_devices, uses_devices

        if uses_devices(self.devices, self.num_nodes):
            device = self.device or default_device()
            return load_on_devices(checkpoint_dir, self.devices, self.num_nodes, self.strategy, device,
                                   resolve_precision(self.precision, device, self.quantize), self.quantize)
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
