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
- Shapes: the step is compiled for static shapes (batch rows x KV-cache length). `compiled_length` rounds
  a cache length up to a power of two (>= 256, at most the context window), so that commands with
  different prompt and answer lengths share a handful of compiled shapes.
- CUDA: `mode="reduce-overhead"` captures the step in a CUDA graph (one launch per token); the engine's
  inputs (token and position tensors, KV cache) stay at fixed addresses. Written for, not yet run on, a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from litllm.errors import LitLLMError

COMPILE_ENV = "LITLLM_COMPILE"
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

