"""Compiling the decode engine's step with `torch.compile`: when it pays, the compile caches that make the
second run of a command start fast, and CUDA graphs.

- When (`should_compile`): `--compile true/false` (`LLM(..., compile=...)`) decides; by default
  (`--compile` unset) the `LITLLM_COMPILE` environment variable (`0`/`false`, `1`/`true`) if set, else
  compiling pays when the engine decodes at least `PAYS_AFTER_TOKENS` tokens: a compiled step decodes
  1.3-6x faster on the CPU (more for small models, whose eager step is Python overhead) but compiling
  costs ~1-3 s with a warm cache and 20-70 s without one (measured on a shared 2-core AMX host,
  `benchmarks/generate.py`), so a 50-token `generate` stays eager, `serve` (long-lived) compiles.
- Caches: inductor's FX graph cache and the AOT autograd cache, in `compile_cache_dir()`
  (`$TORCHINDUCTOR_CACHE_DIR` if set, else `$XDG_CACHE_HOME/litllm/torch_compile`, i.e.
  `~/.cache/litllm/torch_compile`): a second process compiling the same model at the same shapes loads
  the generated kernels instead of generating them.
- Same choices, same kernels: on the CPU the loader picks the weight layout and the thread count by timing
  (`litllm.inference.optimize_for_decoding`, `pick_decode_threads`), and both change the compiled step (inductor
  keys its cache by the thread count too), so a busy machine could pick otherwise in a second run and compile
  again. The first compiled run records its picks in `decode_choices.json` beside the caches, per machine,
  torch version, thread budget and model shape (`record_decode_choices`); later loads of that model take them
  from there without timing (`recorded_decode_choices`), so they hit the cache (and start faster).
- Shapes: the step is compiled for static shapes (batch rows x KV-cache length). `compiled_length` rounds
  a cache length up to a power of two (>= 256, at most the context window), so that commands with
  different prompt and answer lengths share a handful of compiled shapes.
- CUDA: `mode="reduce-overhead"` captures the step in a CUDA graph (one launch per token); the engine's
  inputs (token and position tensors, KV cache) stay at fixed addresses. Written for, not yet run on, a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

from litllm.errors import LitLLMError

COMPILE_ENV = "LITLLM_COMPILE"
CHOICES_FILE = "decode_choices.json"
PAYS_AFTER_TOKENS = {"cpu": 512, "cuda": 128}
"""Tokens an engine must decode (over its life) before compiling its step pays, per device type."""
MIN_COMPILED_LENGTH = 256


def compile_cache_dir() -> Path:
    """Where torch's compile caches live: `$TORCHINDUCTOR_CACHE_DIR`, else `~/.cache/litllm/torch_compile`."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "litllm" / "torch_compile"


def enable_compile_cache() -> Path:
    """Point inductor's caches (FX graph cache, AOT autograd cache) at `compile_cache_dir()` and turn them on."""
    folder = compile_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # inductor reads it at each cache access
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def decode_choices_key(model) -> str:
    """What a layout and thread pick holds for: this CPU, torch's version and thread budget, the model's weights
    as loaded, before `optimize_for_decoding` (names, shapes, dtypes, tensor types) and device type."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    weights = hashlib.sha1()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        weights.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{type(tensor).__name__};".encode())
    device = model.wte.weight.device.type
    return f"{cpu}|{os.cpu_count()} cpus|torch {torch.__version__}|{torch.get_num_threads()} threads|{device}|" \
           f"{weights.hexdigest()[:16]}"


def _read_choices(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or a torn/foreign file: a cache, so it is simply picked again
        return {}
    return data if isinstance(data, dict) else {}


def recorded_decode_choices(key: str) -> Optional[dict]:
    """`{"layout": ..., "threads": n}` that a compiled run recorded under `key` (`decode_choices_key`), or None."""
    choice = _read_choices(compile_cache_dir() / CHOICES_FILE).get(key)
    if isinstance(choice, dict) and isinstance(choice.get("layout"), str) and isinstance(choice.get("threads"), int):
        return choice
    return None


def record_decode_choices(key: str, layout: str, threads: int) -> None:
    """Remember the weight layout and thread count a model (`decode_choices_key`, taken as loaded) decodes with
    here (see the module doc); written atomically."""
    from litllm.utils import atomic_write_text

    path = compile_cache_dir() / CHOICES_FILE
    choices = _read_choices(path)
    if choices.get(key) == {"layout": layout, "threads": threads}:
        return
    choices[key] = {"layout": layout, "threads": threads}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(choices, indent=1, sort_keys=True))


def env_compile() -> Optional[bool]:
    """`$LITLLM_COMPILE` as a bool (None when unset or empty)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LitLLMError(f"${COMPILE_ENV}: expected 0/false or 1/true, got {value!r}")


def should_compile(compile: Optional[bool], device, tokens: Optional[int]) -> bool:
    """Compile the decode step? `compile` as given; None: `$LITLLM_COMPILE`, else whether an engine that decodes
    `tokens` tokens over its life (None: long-lived, e.g. a server) on `device` gets back the compile cost."""
    if compile is not None:
        return compile
    from_env = env_compile()
    if from_env is not None:
        return from_env
    threshold = PAYS_AFTER_TOKENS.get(torch.device(device).type)
    return threshold is not None and (tokens is None or tokens >= threshold)


def compiled_length(length: int, window: int) -> int:
    """The KV-cache length to compile for: `length` rounded up to a power of two (>= 256), at most `window`."""
    rounded = max(MIN_COMPILED_LENGTH, 1 << max(0, length - 1).bit_length())
    return max(length, min(rounded, window))


def compile_step(step: Callable, device: torch.device, static_tensors=()) -> Callable:
    """`step` compiled at static shapes, its kernels cached on disk (`enable_compile_cache`); on CUDA captured in
    a CUDA graph, `static_tensors` (the KV cache, the step's input buffers) marked as living at fixed addresses."""
    enable_compile_cache()
    import torch._dynamo.config as dynamo_config

    # each engine shape (rows x cache length) and model is one more compiled graph of the same code object:
    # allow more than torch's default 8 before it falls back to eager
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if torch.device(device).type == "cuda":  # untested here (no GPU on the development machine)
        for tensor in static_tensors:
            torch._dynamo.mark_static_address(tensor)
        return torch.compile(step, dynamic=False, mode="reduce-overhead")
    return torch.compile(step, dynamic=False)

