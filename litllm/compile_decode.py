"""Compiling the decode engine's step with `torch.compile`: when it pays, the saved compiled step and the compile
caches that make the second run of a command start fast, and CUDA graphs.

- When (`should_compile`, `litllm.generate.decode_engine`): `--compile true/false` (`LLM(..., compile=...)`)
  decides; by default (`--compile` unset) the `LITLLM_COMPILE` environment variable (`0`/`false`, `1`/`true`) if
  set, else compiling pays when the engine decodes at least `PAYS_AFTER_TOKENS` tokens (a compiled step decodes
  1.3-6x faster on the CPU, more for small models, whose eager step is Python overhead, but compiling costs 20-70 s
  and more with an empty cache, and even loading a saved step (below) ~3 CPU-seconds more than an eager start, which
  a 50-token `generate` of a 134M model (~4 ms saved per token) doesn't win back), so a short `generate` stays eager.
- The saved step (CPU): the step is compiled ahead of time (`torch.compile(_decode_step, fullgraph=True)
  .aot_compile`) with the model as an input (its weights and KV cache are the graph's inputs, not saved with it)
  and saved, atomically, in `steps_folder(model, threads)/<rows>x<length>.pt`: one folder per CPU model, core
  count, torch version, thread count, model config and weights' names/shapes/strides/dtypes (as laid out for
  decoding). A later process loads it (`torch.compiler.load_compiled_function`): no dynamo trace, no compile;
  its guards (shapes, strides, dtypes of every input) are checked once; a saved step that does not load (another
  torch, torn), does not fit, or that another user could have written is not used: a one-line note, and the step
  compiles (and is saved) again. It is a pickle of our own making: only files owned by this user and writable by
  no one else are loaded (the trust model of inductor's own cache in the same folder). A model that does not
  trace as one graph (a quantized tensor subclass, say) takes `torch.compile`'s path (`compile_step`).
- Caches: inductor's FX graph cache and the AOT autograd cache, in `compile_cache_dir()`
  (`$TORCHINDUCTOR_CACHE_DIR` if set, else `$XDG_CACHE_HOME/litllm/torch_compile`, i.e.
  `~/.cache/litllm/torch_compile`): the saved steps' C++ kernels live there (a saved step whose kernels were
  deleted builds them again when it loads), and a process compiling the same graph at the same shapes loads the
  generated kernels instead of generating them.
- Same choices, same kernels: on the CPU the loader picks the weight layout and the thread count by timing
  (`litllm.inference.optimize_for_decoding`, `pick_decode_threads`), and both change the compiled step (inductor
  keys its cache by the thread count too), so a busy machine could pick otherwise in a second run and compile
  again. The first compiled run records its picks in `decode_choices.json` beside the caches, per machine,
  torch version, thread budget and model shape (`record_decode_choices`); later loads of that model take them
  from there without timing (`recorded_decode_choices`), so they find the saved step (and start faster).
- Shapes: the step is compiled for static shapes (batch rows x KV-cache length). `compiled_length` rounds
  a cache length up to a power of two (>= 256, at most the context window), so that commands with
  different prompt and answer lengths share a handful of compiled shapes; a saved longer one serves a shorter run.
- CUDA: `mode="reduce-overhead"` captures the step in a CUDA graph (one launch per token); the engine's
  inputs (token and position tensors, KV cache) stay at fixed addresses. Written for, not yet run on, a GPU;
  steps are not saved there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from litllm.errors import LitLLMError

COMPILE_ENV = "LITLLM_COMPILE"
CHOICES_FILE = "decode_choices.json"
PAYS_AFTER_TOKENS = {"cpu": 512, "cuda": 128}
"""Tokens an engine must decode (over its life) before compiling its step pays, per device type."""
MIN_COMPILED_LENGTH = 256
CPU_COMPILE_OPTIONS = {"realize_cpu_opcount_threshold": 4}
"""inductor settings of the CPU step: a one-row matmul (`litllm.inference.OneRowLinear`'s reduction) reads its input
row from a buffer instead of recomputing the RMSNorm before it once per weight row (a bf16 step of the 134M model
1.18x faster, fp32 ones 0.99-1.04x, the same tokens; tutorials/inference.md section 6c)."""


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


def _machine() -> str:
    """This CPU's model name, its core count and torch's version: what compiled kernels are built for."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()} cpus|torch {torch.__version__}"


def _weights_digest(model, strides: bool = False) -> str:
    """A digest of the model's parameters and buffers as they are now (names, shapes, dtypes, tensor types, and
    with `strides` their strides), the KV cache left out."""
    weights = hashlib.sha1()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".kv_cache." in name:
            continue
        layout = f":{tensor.stride()}" if strides and tensor.layout == torch.strided else ""
        weights.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{type(tensor).__name__}{layout};".encode())
    return weights.hexdigest()[:16]


def decode_choices_key(model) -> str:
    """What a layout and thread pick holds for: this CPU, torch's version and thread budget, the model's weights
    as loaded, before `optimize_for_decoding` (names, shapes, dtypes, tensor types) and device type."""
    device = model.wte.weight.device.type
    return f"{_machine()}|{torch.get_num_threads()} threads|{device}|{_weights_digest(model)}"


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
    return torch.compile(step, dynamic=False, options=CPU_COMPILE_OPTIONS)



# ---------------------------------------------------------------------- the saved compiled step (CPU)
STEPS_FOLDER = "decode_steps"


def _decode_step(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The step `torch.compile(...).aot_compile` compiles: the model is an input, so its weights and KV cache are
    the compiled graph's inputs (read from the model at each call), not constants saved with it."""
    return model.decode(tokens, input_pos=pos)[:, -1]  # (B, padded_vocab)


def steps_folder(model, threads: Optional[int]) -> Path:
    """Where the saved compiled steps of `model` (as laid out now, `optimize_for_decoding`) decoding with `threads`
    torch threads live: `compile_cache_dir()/decode_steps/<digest>`, the digest of this CPU, torch's version, the
    thread count, the device type, the model's config (less its name) and its weights' names/shapes/strides/dtypes/types."""
    threads = threads or torch.get_num_threads()
    config = repr(sorted((k, v) for k, v in vars(model.config).items() if k not in ("name", "hf_config")))  # not names
    key = (f"{_machine()}|{threads} threads|{model.wte.weight.device.type}|{config}|{_weights_digest(model, True)}"
           f"|{CPU_COMPILE_OPTIONS}")  # steps saved with other settings are compiled again
    return compile_cache_dir() / STEPS_FOLDER / hashlib.sha1(key.encode()).hexdigest()[:20]


def _step_file(rows: int, length: int) -> str:
    return f"{rows}x{length}.pt"


def saved_step_length(model, threads: Optional[int], rows: int, length: int, exact: bool = False) -> Optional[int]:
    """The shortest KV-cache length >= `length` (== with `exact`), within the context window, at which a compiled
    step of `model` with `rows` rows and `threads` threads is saved here (`steps_folder`); None when there is none."""
    if model.wte.weight.device.type != "cpu":
        return None
    try:
        names = [p.name for p in steps_folder(model, threads).iterdir()]
    except OSError:  # no folder: nothing saved
        return None
    lengths = []
    for name in names:
        shape = name[: -len(".pt")].split("x") if name.endswith(".pt") else []
        if len(shape) == 2 and all(n.isdigit() for n in shape) and int(shape[0]) == rows:
            lengths.append(int(shape[1]))
    fitting = [n for n in lengths if (n == length if exact else length <= n <= model.max_seq_length)]
    return min(fitting, default=None)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _trusted(path: Path) -> bool:
    """A saved step is a pickle: load only one this user wrote (owned by them, writable by no one else)."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _load_step(path: Path, inputs: tuple):
    """The compiled step saved at `path` if it loads and its guards accept `inputs` (the model, the token and
    position tensors); else None, with a one-line note (the caller compiles it again and overwrites it)."""
    try:
        if not _trusted(path):
            _note(f"not loading {path}: not owned by this user, or writable by others; compiling the step again")
            return None
        import torch._inductor.config as inductor_config

        # the kernels were built here: when every vector ISA this CPU reports built and loaded then, trust them
        # now rather than probe each again (a compile and a child process per ISA: ~0.3-4 s in all)
        trusted_isas = _read_choices(path.with_suffix(".json")).get("every_vec_isa_builds") is True
        with open(path, "rb") as f, inductor_config.patch({"cpp.vec_isa_ok": True} if trusted_isas else {}):
            step = torch.compiler.load_compiled_function(f)
        if not step.guard_check(*inputs):
            reason = str(step._artifacts.guard_manager.check_verbose(step.prepare_f_locals(*inputs)).verbose_code_parts)
            _note(f"the saved decode step {path} does not fit this model ({reason[:200]}); compiling it again")
            return None
        return step
    except Exception as e:  # stale (another torch), torn or foreign: a cache, so it is compiled again
        _note(f"could not load the saved decode step {path} ({type(e).__name__}: {str(e)[:200]}); compiling it again")
        return None


def _every_vec_isa_builds() -> bool:
    """Did inductor's probes (a test library compiled and loaded per vector ISA) accept every ISA this x86 CPU
    reports? Then trusting them without the probes (`cpp.vec_isa_ok`) picks the same ISA, so the same kernels."""
    try:
        from torch._inductor import cpu_vec_isa

        if platform.machine() not in ("x86_64", "AMD64"):
            return False
        flags = cpu_vec_isa.x86_isa_checker()
        reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        return reported == cpu_vec_isa.valid_vec_isa_list()
    except Exception:  # torch's internals moved: probe every time
        return False


def _compile_and_save(path: Path, inputs: tuple):
    """`_decode_step` compiled ahead of time for `inputs` and saved atomically at `path`; None when this model
    does not compile as one graph (the caller falls back to `torch.compile`). Saving is best effort."""
    from litllm.utils import atomic_path, atomic_write_text

    try:
        step = torch.compile(_decode_step, fullgraph=True, dynamic=False, options=CPU_COMPILE_OPTIONS).aot_compile(
            (inputs, {}))
    except Exception:  # a graph break (e.g. a quantized tensor subclass): the plain torch.compile path
        return None
    try:
        data = type(step).serialize(step).serialized_data
        atomic_write_text(path.with_suffix(".json"), json.dumps({"every_vec_isa_builds": _every_vec_isa_builds()}))
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except Exception as e:  # unpicklable, full disk...: decode with it, compile it again next time
        _note(f"could not save the compiled decode step to {path} ({type(e).__name__}: {str(e)[:200]})")
    return step


def unpack_weights(model) -> None:
    """oneDNN's packed weights (`litllm.inference.PackedLinear`, the layout `optimize_for_decoding` may pick for the
    eager step) are opaque tensors that inductor lowers only as frozen constants, and a compiled step takes the
    weights as inputs: compiling over them failed. Compiled steps multiply by the same weights as plain Linears
    (16-bit ones as `OneRowLinear`s: inductor's own one-row kernel reads them faster than the oneDNN matmul)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if hasattr(child, "packed_weight") and hasattr(child, "unpacked"):  # a PackedLinear
                setattr(module, name, child.unpacked())


def compile_engine_step(engine) -> Callable:
    """The `Engine`'s decode step (`tokens, pos, kv_len -> logits (B, vocab)`), compiled at the engine's static
    shapes. On the CPU: loaded from `steps_folder(...)/<rows>x<length>.pt` when a run before saved it (no dynamo
    trace, no compile: ~1 s), else compiled ahead of time (`torch.compile(...).aot_compile`) and saved there;
    `engine.step_source` says which ("loaded", "compiled"; "torch.compile" when the model is not one graph, or on
    CUDA: `compile_step`)."""
    model, device = engine.model, engine.device
    unpack_weights(model)
    static = [t for c in engine._caches for t in (c.k, c.v)] + [engine._tokens, engine._pos]
    engine.step_source = "torch.compile"
    if torch.device(device).type != "cpu":
        return compile_step(engine._decode_logits, device, static)
    enable_compile_cache()
    inputs = (model, engine._tokens, engine._pos)
    path = steps_folder(model, engine.threads) / _step_file(engine.max_batch_size, engine.max_seq_length)
    with torch.inference_mode():  # under the engine's thread count (Engine.__init__), as its step() runs it
        step = _load_step(path, inputs) if path.exists() else None
        engine.step_source = "loaded"
        if step is None:
            step, engine.step_source = _compile_and_save(path, inputs), "compiled"
    if step is None:
        engine.step_source = "torch.compile"
        return compile_step(engine._decode_logits, device, static)
    # its guards (shapes, strides, dtypes of the weights, KV cache and inputs) held when it was loaded or compiled,
    # and the engine passes the same model, cache and input tensors at every step: checking them again at each
    # token costs ~1 ms in Python (5% of a 134M model's step)
    step.disable_guard_check()
    vocab_size = engine.vocab_size

    def decode(tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        return step(model, tokens, pos)[:, :vocab_size]  # kv_len is None: the whole cache, the compiled shape

    return decode
