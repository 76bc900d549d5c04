"""Compiling the decode engine's step: the saved compiled step (an AOTInductor package) that makes every later
run start compiled, the compile caches, and CUDA graphs. When a step is compiled (rent or buy) and what that is
priced by: `litllm.compile_ledger`.

- The saved step (CPU): the step (`_DecodeStep`: `model.decode` of one token per row) is exported
  (`torch.export`) and compiled by AOTInductor into a `.pt2` package (a shared library and its metadata) with the
  weights and KV cache left out (`aot_inductor.package_constants_in_so=False`), saved atomically in
  `steps_folder(model)/<rows>x<length>.pt2`: one folder per CPU model, core count, torch version, model config and
  weights' names/shapes/strides/dtypes (as a compiled step takes them) and inductor settings (not the thread count,
  which its kernels take when they run, but under a 1-thread budget, whose step has it baked in:
  `cpu_compile_options`). A later process
  loads it with torch's C++ loader (`torch._C._aoti.AOTIModelPackageLoader`: no trace, no compile, inductor's
  compiler not imported) and hands it the running model's own weights and the engine's KV cache as user-managed
  constants (`load_constants(..., user_managed=True)`: no copies; its kernels write the cache in place at each
  step). The package records the shapes, strides and dtypes of every tensor it was compiled for (`_step_spec`);
  a saved step that does not load (another torch, torn), does not fit, or that another user could have written is
  not used: a one-line note, and the step compiles (and is saved) again, or, in a run that would not compile,
  decodes eagerly. It is a shared library of our own making: only files owned by this user and writable by no one
  else are loaded (the trust model of inductor's own cache in the same folder). A model that does not export as
  one graph (a quantized tensor subclass, say) takes `torch.compile`'s path (`compile_step`), unsaved.
- Caches: inductor's FX graph cache and the AOT autograd cache, in `compile_cache_dir()`
  (`$TORCHINDUCTOR_CACHE_DIR` if set, else `$XDG_CACHE_HOME/litllm/torch_compile`, i.e.
  `~/.cache/litllm/torch_compile`): a process compiling the same graph at the same shapes loads the generated
  kernels instead of generating them.
- Same choices, same kernels: on the CPU the loader picks the weight layout and the thread count by timing the
  eager step (`litllm.cpu_layout.optimize_for_decoding`, `pick_decode_threads`); the layout changes the compiled
  step, so a busy machine could pick otherwise in a second run and compile again, and the compiled step's threads
  scale otherwise than the eager step's. The first compiled run therefore times its compiled step at each thread
  count (`pick_compiled_threads`: one compile, its kernels take the count when they run, `cpu_compile_options`)
  and decodes with the
  fastest, then records the layout and that count in `decode_choices.json` beside the caches, per machine, torch
  version, thread budget, OpenMP wait policy and model shape (`litllm.compile_ledger.record_decode_choices`);
  later loads of that model take them from there without timing (`recorded_decode_choices`), so they find the saved
  step (and start faster).
- Shapes: the step is compiled for its engine's batch rows and KV cache (rows x cache length), and attends over
  the cache's filled part only: the length it attends over is a dynamic dimension of the exported graph (the
  size of a third input, `span`), which the engine sets at each call to its rows' longest length rounded up to a
  multiple of `KV_BUCKET` (`attended_length`; no host sync: the engine knows it). One package serves every length up
  to its cache's, so a chat in a 4096-position window decodes at position 100 reading 128 positions of the cache,
  not 4096. `compiled_length` rounds a cache length up to a power of two (>= 256, at most the context window), so
  that commands with different prompt and answer lengths share a handful of compiled shapes; a saved longer one
  serves a shorter run (at no cost but the cache's memory). `torch.compile`'s steps (CUDA graphs, models that do
  not export as one graph) keep static shapes: the whole cache.
- CUDA: `mode="reduce-overhead"` captures the step in a CUDA graph (one launch per token); the engine's
  inputs (token and position tensors, KV cache) stay at fixed addresses. Written for, not yet run on, a GPU;
  steps are not saved there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from litllm.cpu_layout import (ONE_ROW_DTYPES, PackedLinear, becomes_blocked_bf16, becomes_one_row,
                               blocked_bf16_linears, fastest_threads, one_row_kernel, one_row_linears, prompt_linears,
                               shared_parameters, thread_candidates)
from litllm.cpu_ops import int8_rows_op, int8wo_rows_op
from litllm.packed_bf16 import BlockedBf16Linear, bf16_block, blocks_shape, packed_bf16_op
from litllm.row_split import RowSplitLinear, becomes_row_split, row_split_kernel, row_split_linears, wants_row_split
from litllm.utils import atomic_path, cpu_model_name, litllm_cache_home, owned_and_private

MIN_COMPILED_LENGTH = 256
KV_BUCKET = 64
"""A saved step attends over the cache's first `attended_length` positions: the rows' longest length rounded up to a
multiple of this (at most 64 positions read beyond it, ~1% of the 134M bf16 step's bytes; the dynamic dimension's
values stay multiples of 16 lanes, where inductor's attention loops run whole vectors)."""
SERIAL_KERNEL_OPTIONS = {"cpp.min_chunk_size": 4096}
"""inductor settings of every CPU step (in `CPU_COMPILE_OPTIONS` and `ONE_ROW_COMPILE_OPTIONS`): a kernel gets an
OpenMP region of its own only where each thread has >= 4096 values to work on (inductor's default: 512). A decode
step's SwiGLU product (2048-5632 values) and the attention kernel's cache-write loop took a region, and so a fork and
a barrier, per layer for a microsecond of work, while the step's other thread waited; now they run on the calling
thread (the 134M fp32 step: 61 regions a token instead of 73, and one barrier less inside each layer's attention
kernel; tutorials/inference_measurements.md#fp32-two-threads). The matmuls (the row-split and int8 ops, inductor's
own one-row reductions) and the attention's reductions keep theirs. Under `cpp.dynamic_threads` (another thread budget)
inductor keeps a region for each kernel whatever this says."""
CPU_COMPILE_OPTIONS = {"realize_cpu_opcount_threshold": 4, **SERIAL_KERNEL_OPTIONS}
"""inductor settings of the CPU step: a one-row matmul reads its input row from a buffer instead of recomputing the
RMSNorm before it once per weight row (fp32 steps 0.99-1.04x, the int8dq step's own reduction needs it: 1.9x slower
at 10; tutorials/inference.md section 6c); small kernels serial (`SERIAL_KERNEL_OPTIONS`). Steps over `OneRowLinear`s
take `ONE_ROW_COMPILE_OPTIONS`."""
ONE_ROW_COMPILE_OPTIONS = {"realize_cpu_opcount_threshold": 10, **SERIAL_KERNEL_OPTIONS}
"""inductor settings of a CPU step whose 16-bit weights are `litllm.cpu_layout.OneRowLinear`s: the norm still in a
buffer, and the mv's own product (weight, row, their fp32 conversions, at most the norm's final multiply: 4-10 ops)
inside its reduction. Realized (at 4), it became an fp32 loop body beside the bf16 one, inductor then tiled the
reduction by fp32's lane count and loaded half a bf16 vector per step, which on AVX2 goes through a stack buffer (a
failed store-to-load forwarding per load): the 134M bf16 step 1.7x slower (tutorials/inference.md section 6c)."""


def _one_row_modules(model) -> list[str]:
    """The names of the Linears `model`'s compiled CPU step multiplies by through `litllm.cpu_layout.OneRowLinear`
    (`unpack_weights` makes them so: 16-bit oneDNN-packed and plain Linears), or bf16 ones through
    `litllm.packed_bf16.BlockedBf16Linear`, before or after it did."""
    def one_row(module) -> bool:
        if isinstance(module, BlockedBf16Linear):
            return True
        if _is_packed(module):
            return module.packed_weight.dtype in ONE_ROW_DTYPES
        return becomes_one_row(module)

    return [name for name, module in model.named_modules() if one_row(module)]


def _row_split_modules(model) -> list[str]:
    """The names of the fp32 Linears `model`'s compiled CPU step multiplies by through
    `litllm.row_split.RowSplitLinear` (`unpack_weights` makes them so where torch has more than one thread or litllm's
    AVX-512 kernel is there, `wants_row_split`: fp32 oneDNN-packed and plain Linears), before or after it did."""
    def split(module) -> bool:
        if isinstance(module, RowSplitLinear):
            return True
        if not wants_row_split():
            return False
        return module.packed_weight.dtype == torch.float32 if _is_packed(module) else becomes_row_split(module)

    return [name for name, module in model.named_modules() if split(module)]


def _int8_rows_tag(model) -> str:
    """Whether `model`'s int8 layers (`litllm.quantize.Int8Words`) multiply in its compiled step by litllm's C++ ops
    (on row-major `words`) or by inductor's reduction: ' int8-rows <op?>' for int8dq layers
    (`litllm.cpu_ops.int8_rows_op`), ' int8wo-rows' for int8wo ones where they call `int8wo_rows_op` (steps saved
    before it had no such part: theirs multiply by inductor's reduction, as they still do where the op is not here);
    '' for a model without any."""
    layers = [module for module in model.modules() if hasattr(module, "prepare_compiled") and module.compiled_tensors()]
    dynamic = any(module.words_block is not None for module in layers)
    weight_only = any(module.words_block is None for module in layers)
    return ((f" int8-rows {int8_rows_op() is not None}" if dynamic else "")
            + (" int8wo-rows" if weight_only and int8wo_rows_op() is not None else ""))


def cpu_compile_options(model) -> dict:
    """The inductor settings of `model`'s CPU step (`ONE_ROW_COMPILE_OPTIONS` where it multiplies by OneRowLinears,
    `_one_row_modules`), which is compiled at torch's thread count outside `threads_for` (the thread budget; `Engine`).

    Threads: a step compiled at as many threads as the CPU has cores (torch's default budget) opens its parallel
    regions without a `num_threads` clause (inductor's rule), so they take torch's count when they run: one compiled
    (and saved) step serves every count up to the budget and can be timed at each (`pick_compiled_threads`), and it
    runs as fast as steps compiled for each count (a 2-layer bf16 step on a 2-core AVX2 EPYC at load average 2.6:
    median 127.3 vs 128.7 tok/s at 1 thread, 111.9 vs 111.9 at 2). Under another budget inductor bakes the count into
    every region, so there the step takes `cpp.dynamic_threads`, whose kernels read the count when they run but give
    every reduction a parallel region of its own (10 regions in that step instead of one): 0.93x at 2 threads.
    Under a budget of 1 thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)` before loading; `thread_candidates`
    then has nothing else to time) the step is only ever run at 1, so it is compiled for it (`BUDGET_STEP_OPTIONS`)."""
    options = ONE_ROW_COMPILE_OPTIONS if _one_row_modules(model) else CPU_COMPILE_OPTIONS
    budget = torch.get_num_threads()
    if budget == os.cpu_count():
        return options
    return {**options, **(BUDGET_STEP_OPTIONS if budget == 1 else {"cpp.dynamic_threads": True})}


BUDGET_STEP_OPTIONS = {"cpp.threads": 1}
"""inductor settings that a CPU step compiled under a 1-thread budget adds (`cpu_compile_options`): its count baked
in, so inductor writes serial kernels (no parallel region, no barrier) instead of `cpp.dynamic_threads`' 1-thread
regions: 0.4-1.4% less CPU time a token for the 134M step (tutorials/inference.md section 6). Given explicitly, the
count is in the saved step's key (`steps_folder`) and in inductor's cache key: its own step (as the dynamic one
was), compiled once and loaded afterwards. A step so compiled runs on 1 thread whatever count it is run at."""


def compile_cache_dir() -> Path:
    """Where torch's compile caches live: `$TORCHINDUCTOR_CACHE_DIR`, else `~/.cache/litllm/torch_compile`."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder and not _set_by_inductor(folder):
        return Path(folder)
    return litllm_cache_home() / "torch_compile"


def _set_by_inductor(folder: str) -> bool:
    """Is `folder` ($TORCHINDUCTOR_CACHE_DIR) inductor's default, which inductor itself puts in the environment the
    first time it looks for its cache (`import torchao` does, in every `--quantize torchao.*` run), rather than the
    user's choice? Taken as the user's, it sent that run's saved steps and records to /tmp/torchinductor_<user>."""
    utils = sys.modules.get("torch._inductor.runtime.cache_dir_utils")  # not imported: inductor set nothing
    return utils is not None and os.path.abspath(folder) == os.path.abspath(utils.default_cache_dir())


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
    cpu = cpu_model_name(default=platform.processor() or platform.machine())
    return f"{cpu}|{os.cpu_count()} cpus|torch {torch.__version__}"


def _weights_digest(model, strides: bool = False) -> str:
    """A digest of the model's parameters and buffers as they are now (names, shapes, dtypes, tensor types, and
    with `strides` their strides, a oneDNN-packed Linear as the plain one `unpack_weights` makes of it, a bf16 one
    that becomes a `litllm.packed_bf16.BlockedBf16Linear` as its blocks, and an
    int8 CPU layer with the plain copy of its weights `unpack_weights` gives it, which is what a compiled step takes),
    the KV cache left out."""
    entries = []
    packed = {name for name, module in model.named_modules() if _is_packed(module)} if strides else set()
    int8 = {name: module for name, module in model.named_modules()
            if hasattr(module, "prepare_compiled") and module.compiled_tensors()}
    for name, module in int8.items():  # int8 layers: as the compiled step takes them (prepared), whether or not yet
        if strides:
            entries += [f"{name}.{leaf}:{shape}:{dtype}:Tensor:{stride};"
                        for leaf, shape, dtype, stride in module.compiled_tensors()]
    blocked = _blocked_modules(model) if strides else {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".kv_cache." in name or name.rpartition(".")[0] in int8:
            continue
        module, _, leaf = name.rpartition(".")
        if module in blocked and leaf in ("weight", "packed_weight", "blocks"):  # as `blocked_bf16_linears` makes it
            name, shape, kind = f"{module}.blocks", blocked[module], "Tensor"
            layout = f":{tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))}"  # contiguous
        elif module in packed and leaf == "packed_weight":  # unpacked: an (out, in) Parameter, row- or column-major
            linear = model.get_submodule(module)
            name, shape, kind = f"{module}.weight", (linear.out_features, linear.in_features), "Parameter"
            layout = f":{(1, linear.out_features) if linear.unpack_column_major else (linear.in_features, 1)}"
        else:
            shape, kind = tuple(tensor.shape), type(tensor).__name__
            layout = f":{tensor.stride()}" if strides and tensor.layout == torch.strided else ""
        entries.append(f"{name}:{shape}:{tensor.dtype}:{kind}{layout};")
    order = sorted if strides else list  # sorted: unpacking moves a weight from the buffers to the parameters
    return hashlib.sha1("".join(order(entries)).encode()).hexdigest()[:16]


def _blocked_modules(model) -> dict[str, tuple]:
    """The bf16 Linears `unpack_weights` makes (or made) `litllm.packed_bf16.BlockedBf16Linear`s, by name, with the
    shape of their blocks; none where the op is not built yet or does not run here (`packed_bf16_op`)."""
    if packed_bf16_op(build=False) is None:
        return {}
    shared = shared_parameters(model)
    return {name: blocks_shape(module.out_features, module.in_features, bf16_block())
            for name, module in model.named_modules() if becomes_blocked_bf16(module, shared)}


def decode_choices_key(model) -> str:
    """What a layout and thread pick holds for: this CPU, torch's version and thread budget, OpenMP's wait policy
    (`_omp_wait`), a tensor-parallel rank's place (`_tp_tag`), the model's weights as loaded, before
    `optimize_for_decoding` (names, shapes, dtypes, tensor types) and device type."""
    device = model.wte.weight.device.type
    return (f"{_machine()}|{torch.get_num_threads()} threads|{_omp_wait()}|{device}{_tp_tag(model)}|"
            f"{_weights_digest(model)}")


def _tp_tag(model) -> str:
    """A tensor-parallel rank's place (`litllm.parallel`): its rank, the world size and the name of the process group
    its compiled step's collectives run in (`litllm.parallel.layers.step_group`), which the step carries (and the
    vocabulary rows its embedding holds start at its rank's); "" for a model on one device."""
    n = getattr(model, "tp_size", 1)
    if n == 1:
        return ""
    import torch.distributed as dist

    return f"|tensor parallel rank {dist.get_rank()} of {n}, group {getattr(model, 'tp_step_group', '')}"


def _omp_wait() -> str:
    """OpenMP's wait policy as this process's environment sets it (`litllm.bound_omp_spin`): how a step's threads
    wait at its barriers, which under load decides whether a second thread pays (a pick timed under GNU OpenMP's
    default spin is not the one under the bound)."""
    return f"omp wait {os.environ.get('OMP_WAIT_POLICY', '')}/{os.environ.get('GOMP_SPINCOUNT', '')}"


def _config_repr(model) -> str:
    return repr(sorted((k, v) for k, v in vars(model.config).items() if k not in ("name", "hf_config")))  # not names


clock = time.perf_counter
"""What decode steps (`litllm.compile_ledger.time_decode`) and compiles (`step_engine`) are timed with (tests put a
fake clock here)."""
cpu_clock = time.process_time
"""What `faster_row_steps` times a server's steps with: the CPU seconds of the process (all its threads)."""


def attended_length(kv_len: Optional[int], length: int) -> int:
    """How many of a `length`-position cache's positions a saved step attends over for rows whose longest length is
    `kv_len` (None: all): `kv_len` rounded up to a multiple of `KV_BUCKET`, at most `length`."""
    return length if kv_len is None else min(-(-kv_len // KV_BUCKET) * KV_BUCKET, length)


def compiled_length(length: int, window: int) -> int:
    """The KV-cache length to compile for: `length` rounded up to a power of two (>= 256), at most `window`."""
    rounded = max(MIN_COMPILED_LENGTH, 1 << max(0, length - 1).bit_length())
    return max(length, min(rounded, window))


def _step_length(model, length: int, exact: bool) -> int:
    """The KV-cache length a step compiled now for `length` positions gets (none saved): `compiled_length`'s
    unless `exact`."""
    return length if exact else compiled_length(length, model.max_seq_length)


def compile_step(step: Callable, device: torch.device, static_tensors, options: dict) -> Callable:
    """`step` compiled at static shapes, its kernels cached on disk (`enable_compile_cache`); on CUDA captured in
    a CUDA graph, `static_tensors` (the KV cache, the step's input buffers) marked as living at fixed addresses; on
    the CPU with inductor's `options` (`cpu_compile_options`)."""
    enable_compile_cache()
    import torch._dynamo.config as dynamo_config

    # each engine shape (rows x cache length) and model is one more compiled graph of the same code object:
    # allow more than torch's default 8 before it falls back to eager
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if torch.device(device).type == "cuda":  # untested here (no GPU on the development machine)
        for tensor in static_tensors:
            torch._dynamo.mark_static_address(tensor)
        return torch.compile(step, dynamic=False, mode="reduce-overhead")
    return torch.compile(step, dynamic=False, options=options)



# ---------------------------------------------------------------------- the saved compiled step (CPU)
STEPS_FOLDER = "decode_steps"
STEP_CODE = "attended length"
"""What changed last in the model code a saved step traces (part of `steps_folder`'s key): steps saved before it are
compiled again rather than loaded with the old code (a step over the whole cache, without the `span` input of the
attended length: `attended_length`)."""


def steps_folder(model) -> Path:
    """Where the saved compiled steps of `model` (as laid out now, `optimize_for_decoding`) live:
    `compile_cache_dir()/decode_steps/<digest>`, the digest of this CPU, torch's version, the device type, a
    tensor-parallel rank's place (`_tp_tag`), the model's config (less its name), its weights'
    names/shapes/strides/dtypes/types, which Linears the step multiplies by through `OneRowLinear` and how
    (`litllm.cpu_layout.one_row_kernel`) and which through `RowSplitLinear` (`litllm.row_split`) and by what kernel,
    its inductor settings (`cpu_compile_options`) and `STEP_CODE`; not the thread count, which its kernels take when
    they run, but under a 1-thread budget (`BUDGET_STEP_OPTIONS`: another folder)."""
    key = (f"{_machine()}|{model.wte.weight.device.type}{_tp_tag(model)}|{_config_repr(model)}|"
           f"{_weights_digest(model, True)}|one-row {_one_row_modules(model)} {one_row_kernel()}"  # Linears' kernel
           f"|row-split {_row_split_modules(model)} {row_split_kernel()}{_int8_rows_tag(model)}"
           f"|{cpu_compile_options(model)}|{STEP_CODE}")  # steps saved with other settings are compiled again
    return compile_cache_dir() / STEPS_FOLDER / hashlib.sha1(key.encode()).hexdigest()[:20]


def _step_file(rows: int, length: int, kind: str = "") -> str:
    return f"{rows}x{length}{kind}.pt2"


def saved_step_length(model, rows: int, length: int, exact: bool = False, kind: str = "") -> Optional[int]:
    """The shortest KV-cache length >= `length` (== with `exact`), within the context window, at which a compiled
    step of `model` with `rows` rows is saved here (`steps_folder`; `kind`: which step, "" the decode step, else
    as `_verify_kind`); None when there is none."""
    if model.wte.weight.device.type != "cpu" or not steps_save(model):  # (a file left by a version that saved it)
        return None
    try:
        names = [p.name for p in steps_folder(model).iterdir()]
    except OSError:  # no folder: nothing saved
        return None
    lengths = []
    for name in names:
        shape = name[: -len(f"{kind}.pt2")].split("x") if name.endswith(f"{kind}.pt2") else []
        if len(shape) == 2 and all(n.isdigit() for n in shape) and int(shape[0]) == rows:
            lengths.append(int(shape[1]))
    fitting = [n for n in lengths if (n == length if exact else length <= n <= model.max_seq_length)]
    return min(fitting, default=None)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


class _DecodeStep(torch.nn.Module):
    """What AOTInductor compiles: one decode step of `model` (logits of the last position, (B, padded_vocab)),
    attending over the cache's first `span.size(0)` positions (a dynamic dimension: `_compile_and_save`).
    Exported, the model's weights and KV cache are the graph's constants, left out of the package and handed at
    load time (the running model's own tensors): the same saved step serves every checkpoint of these shapes."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, input_pos=pos, kv_len=span.size(0))[:, -1]  # (B, padded_vocab)


def _step_tensors(engine) -> dict[str, torch.Tensor]:
    """The tensors the saved step reads and writes, by the names export gives them (`model.<name>`): the model's
    parameters and buffers, the KV cache being the engine's own (written in place at each step)."""
    model = engine.model
    tensors = dict(model.named_parameters(prefix="model", remove_duplicate=False))
    tensors.update(model.named_buffers(prefix="model", remove_duplicate=False))
    for i, cache in enumerate(engine._caches):
        tensors[f"model.blocks.{i}.attn.kv_cache.k"], tensors[f"model.blocks.{i}.attn.kv_cache.v"] = cache.k, cache.v
    return tensors


def _step_inputs(engine) -> dict[str, torch.Tensor]:
    """The decode step's inputs, by name: the engine's token and position buffers, (B, 1) each."""
    return {"tokens": engine._tokens, "pos": engine._pos}


def _with_span(engine, inputs: Optional[dict]) -> dict[str, torch.Tensor]:
    """A saved step's inputs (`inputs`, by default the decode step's) and last `span`, (cache length,) uint8: a
    slice of it, `span[:n]`, has the step attend over the cache's first n positions (only its size is read)."""
    span = torch.empty(engine._caches[0].k.size(2), dtype=torch.uint8, device=engine._caches[0].k.device)
    return {**(inputs or _step_inputs(engine)), "span": span}


def _step_spec(engine, inputs: Optional[dict] = None) -> str:
    """Shapes, strides and dtypes of every tensor the step reads or writes (`inputs`, by default the decode step's,
    included), as JSON: a saved step runs only on tensors laid out as the ones it was compiled for (its kernels
    index them so)."""
    tensors = {**_step_tensors(engine), **(inputs or _step_inputs(engine))}
    return json.dumps({name: [list(t.shape), list(t.stride()), str(t.dtype)] for name, t in sorted(tensors.items())})


SPEC_KEY = "litllm_tensors"
"""The package metadata entry holding `_step_spec` of the engine the step was compiled for."""


def _load_step(path: Path, engine, inputs: Optional[dict] = None) -> Optional[Callable]:
    """The AOTInductor step saved at `path`, bound to `engine`'s weights and KV cache (no copies: the package's
    kernels read and write the engine's tensors), if it loads and fits (`inputs`: as `_step_spec`); else None, with
    a one-line note."""
    if not steps_save(engine.model):  # (a file left by a version that saved such steps: it never fits)
        return None
    inputs = _with_span(engine, inputs)
    try:
        if not owned_and_private(path):
            _note(f"not loading {path}: not owned by this user, or writable by others")
            return None
        # C++ (`torch._C._aoti`): loads the package's shared library without importing inductor
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        tensors = _step_tensors(engine)
        names = loader.get_constant_fqns()
        if loader.get_metadata().get(SPEC_KEY) != _step_spec(engine, inputs) or not set(names) <= set(tensors):
            _note(f"the saved decode step {path} does not fit this model (other shapes or strides)")
            return None
        constants = {name: tensors[name] for name in names}
        loader.load_constants(constants, False, True, True)  # user-managed: the engine's tensors, not copies
    except Exception as e:  # stale (another torch), torn or foreign: a cache, so it is built again
        _note(f"could not load the saved decode step {path} ({type(e).__name__}: {str(e)[:200]})")
        return None
    span = inputs["span"]
    length = span.size(0)

    def step(tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int] = None,
             _constants=constants) -> torch.Tensor:  # (keeps them alive)
        """The step over the cache's first `attended_length(kv_len, ...)` positions (None: all of them)."""
        return loader.run([tokens, pos, span[:attended_length(kv_len, length)]])[0]

    return step


def _compile_and_save(path: Path, engine, step: Optional[torch.nn.Module] = None,
                      inputs: Optional[dict] = None) -> Optional[Callable]:
    """The engine's decode step (or `step`, a module over the engine's model taking `inputs`, as `_step_spec`)
    compiled by AOTInductor (`torch.export`, then `aoti_compile_and_package` without the weights) and saved
    atomically at `path`, then loaded from there; None when the model does not export as one graph or holds tensor
    subclasses (the caller falls back to `torch.compile`)."""
    import io

    import torch._inductor
    import torch.fx.experimental._config as fx_config

    if not steps_save(engine.model):
        return None
    given, inputs = inputs, _with_span(engine, inputs)
    # the attended length (span's size) is a dynamic dimension, up to the whole cache: one package for all. Size-
    # oblivious: a slice of the cache is contiguous at the whole length only, and asking (the traced tensors' metadata
    # does) would otherwise guard the length to one side of that
    lengths = [None] * (len(inputs) - 1) + [{0: torch.export.Dim("attended", min=1, max=inputs["span"].size(0))}]
    try:
        package = io.BytesIO()
        configs = {**cpu_compile_options(engine.model), "aot_inductor.package_constants_in_so": False,  # weights: at load
                   "aot_inductor.metadata": {SPEC_KEY: _step_spec(engine, inputs)}}
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):  # (no autograd graph)
            program = torch.export.export(step or _DecodeStep(engine.model), tuple(inputs.values()),
                                          dynamic_shapes=tuple(lengths), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=configs)
    except Exception:  # a graph break, a tensor subclass (quantized weights)...: the plain torch.compile path
        return None
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(package.getvalue())
            tmp.chmod(0o644)
    except Exception as e:  # full disk, read-only...: decode with it from a private copy, build it again next time
        _note(f"could not save the compiled decode step to {path} ({type(e).__name__}: {str(e)[:200]})")
        with tempfile.TemporaryDirectory() as folder:  # the loader extracts the library: the copy may go
            path = Path(folder) / path.name
            path.write_bytes(package.getvalue())
            return _load_step(path, engine, given)
    return _load_step(path, engine, given)


def steps_save(model) -> bool:
    """Can a compiled step of `model` be saved and loaded (AOTInductor, `_compile_and_save`): are its parameters and
    buffers plain tensors? A tensor subclass's (torchao.int4wo's CPU weights) inner tensors become the package's
    unnamed constants ("constant149"...) that `_load_step` cannot hand the running model's tensors: such a step was
    saved, never loaded ("does not fit"), and every run compiled it twice (AOTInductor, then torch.compile)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in [*model.parameters(), *model.buffers()])


def _is_packed(module) -> bool:
    return isinstance(module, PackedLinear)


def unpack_weights(model) -> None:
    """oneDNN's packed weights (`litllm.cpu_layout.PackedLinear`, the layout `optimize_for_decoding` may pick for the
    eager step) are opaque tensors that inductor lowers only as frozen constants, and a compiled step takes the
    weights as inputs: compiling over them failed. Compiled steps multiply by the same weights as plain Linears
    (16-bit ones as `OneRowLinear`s: inductor's own one-row kernel reads them faster than the oneDNN matmul).
    `torchao.int8dq`'s layers (fbgemm's packed weights, opaque too) and fp32 `torchao.int8wo` ones get a plain copy of
    their int8 weights that the compiled step multiplies by instead (`litllm.quantize.Int8Words.prepare_compiled`).
    Every other row-major 16-bit CPU Linear becomes a `OneRowLinear` too (`litllm.cpu_layout.one_row_linears`: where
    oneDNN cannot pack 16-bit weights, AVX2 CPUs, the eager pick leaves them row-major). On AVX512-BF16 CPUs the bf16
    ones of whole blocks (64 x 64; 32 x 32 where oneDNN packs for AMX; not a head tied to the embedding) then become
    `litllm.packed_bf16.BlockedBf16Linear`s
    (`blocked_bf16_linears`): their weight packed by oneDNN once more, held in that layout only, which a prompt's
    oneDNN GEMM reads without reordering it per call (the prefill of a compiled run) and the step's AVX512-BF16 op
    too. With more than one thread or on AVX-512 CPUs (`wants_row_split`),
    fp32 CPU Linears become `litllm.row_split.RowSplitLinear`s (their one-row matmul on every thread: MKL's fp32 GEMV
    runs on one; litllm's AVX-512 kernel), where its op builds here; the others `PromptLinear`s where a prompt's GEMM is
    oneDNN's."""
    prepare_int8_for_compile(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _is_packed(child):
                setattr(module, name, child.unpacked())
    one_row_linears(model)
    blocked_bf16_linears(model)
    if wants_row_split():
        row_split_linears(model)
    prompt_linears(model)  # (fp32 ones the row split left: a prompt's GEMM)


def prepare_int8_for_compile(model) -> None:
    """Give every `litllm.quantize.Int8Words` layer (torchao.int8dq, torchao.int8wo on the CPU) the plain copy of its
    int8 weights that a compiled step multiplies by."""
    for module in model.modules():
        if hasattr(module, "prepare_compiled"):
            module.prepare_compiled()


def load_saved_step(engine) -> bool:
    """Make the (eager) `engine` decode with the step saved for its shapes, if one loads and fits (else a one-line
    note when one was there, and it stays eager): how a short `generate` uses a saved step without compiling."""
    path = steps_folder(engine.model) / _step_file(engine.max_batch_size, engine.max_seq_length)
    found = torch.device(engine.device).type == "cpu" and path.exists()
    if found:  # the step reads int8 layers' plain copies of their weights: made only when there is a step to load
        prepare_int8_for_compile(engine.model)
    step = _load_step(path, engine) if found else None
    if step is not None:
        engine._decode, engine._compiled, engine.step_source = _bind(step, engine), True, "loaded"
        engine.compile_row_steps()
    return step is not None


def step_engine(make: Callable, model, rows: int, length: int, compile: Optional[bool], *,
                exact: bool = False, min_rows: int = 0):
    """The engine `make(rows, length, compiled)` builds for `rows` rows of `length` positions, its decode step made
    as `compile` says (`litllm.compile_ledger.compile_choice`): False, eager; None, the step saved for these shapes
    if one fits and loads (`load_saved_step`; one that does not load leaves it eager, with a note), else eager; True,
    compiled ahead now
    or loaded (`compile_engine_step`, through `make(..., True)`). A compiled or loaded step has max(rows,
    `min_rows`) rows (a smaller batch decodes on a larger one's step, the extra rows idle) and the shortest saved
    KV-cache length that fits (`saved_step_length`), else `length` rounded up to a shape other lengths share
    (`compiled_length`) unless `exact`. `engine.compile_seconds`: what building the compiled step took (load or
    compile; not set when eager)."""
    saved = None if compile is False else saved_step_length(model, max(rows, min_rows), length, exact=exact)
    if compile is False or (compile is None and saved is None):
        return make(rows, length, False)
    unpack_weights(model)  # the compiled step takes the weights as plain Linears (saved steps are keyed so)
    rows, t0 = max(rows, min_rows), clock()
    # a tensor-parallel rank 0 loads through `make(..., True)`: what it makes every rank makes, so each loads its own
    # (`load_saved_step` here would load rank 0's alone, whose collectives the eager ranks would never meet)
    if compile is None and getattr(model, "tp_size", 1) == 1:
        engine = make(rows, saved, False)
        if load_saved_step(engine):
            engine.compile_seconds = clock() - t0
        return engine
    engine = make(rows, saved or _step_length(model, length, exact), True)
    engine.compile_seconds = clock() - t0
    return engine


PICK_ROUNDS = 5
"""Rounds of `pick_compiled_threads` (one step at each thread count per round)."""


def pick_compiled_threads(engine, min_gain: float = 1.1) -> int:
    """The thread count at which `engine`'s compiled CPU step decodes fastest here, among torch's count, half of it
    and 1 (`litllm.cpu_layout.fastest_threads`: medians of interleaved steps timed by `clock`, fewer threads only if
    `min_gain` faster). The eager step's pick (`litllm.inference.pick_decode_threads`) does not hold for it: the
    compiled bf16 and int8dq steps are one parallel region whose matmuls split by rows (1.8x from a second thread
    on a quiet 2-core EPYC) where the eager step, dozens of short regions, gained little. Its kernels take the count
    when they run (`cpu_compile_options`), so one compile is timed at every count. The timed steps decode the
    engine's idle rows (a dummy token at the parking position, overwritten before anything reads it) over the cache's
    first `KV_BUCKET` positions (what a step reads at the start of a run, however long its cache). Under a
    1-thread budget there is nothing to time (and its step runs on 1 thread whatever the count: `BUDGET_STEP_OPTIONS`)."""
    candidates = thread_candidates()
    if len(candidates) == 1:
        return candidates[0]
    with torch.inference_mode():
        engine._decode(engine._tokens, engine._pos, KV_BUCKET)  # warm-up, not timed
        return fastest_threads(lambda rep: engine._decode(engine._tokens, engine._pos, KV_BUCKET), candidates,
                               rounds=PICK_ROUNDS, min_gain=min_gain, clock=clock)


ROW_STEP_GAIN = 1.1
"""How much faster than every larger step a step over the first rows must decode to be kept (`faster_row_steps`)."""


def faster_row_steps(engine, steps: dict[int, Callable]) -> dict[int, Callable]:
    """Of `steps` (rows -> the engine's compiled step over its first `rows` rows, ascending, fewer than all), those
    that decode faster here than every larger one, the engine's own step over all its rows included (`kept_row_counts`
    on the least CPU time of `PICK_ROUNDS` interleaved rounds, each step over the cache's first `KV_BUCKET` positions
    on the engine's idle rows, as `pick_compiled_threads` times). CPU time (the process's), not wall time: timed by the
    clock under load average 4 on 2 cores, a server kept none of them (a 1-row step of 21 CPU-ms against 60 for 16)."""
    timed = {**steps, engine.max_batch_size: engine._decode}
    times: dict[int, list[float]] = {rows: [] for rows in timed}
    with torch.inference_mode():
        for rep in range(PICK_ROUNDS + 1):
            for rows, step in timed.items():
                t0 = cpu_clock()
                step(engine._tokens[:rows], engine._pos[:rows], KV_BUCKET)
                if rep:  # the first round warms up
                    times[rows].append(cpu_clock() - t0)
    kept = kept_row_counts({rows: min(t) for rows, t in times.items()})
    return {rows: steps[rows] for rows in kept}


def kept_row_counts(seconds: dict[int, float], min_gain: float = ROW_STEP_GAIN) -> list[int]:
    """The row counts of `seconds` (rows -> a step's time; the largest: the step over all rows) whose step beats
    every larger one by `min_gain`, less the largest: a running set of rows takes the smallest kept step that holds
    it, never one slower than a larger step would be."""
    largest = max(seconds)
    return [rows for rows in sorted(seconds) if rows < largest
            and all(seconds[rows] * min_gain < t for more, t in seconds.items() if more > rows)]


def _bind(step: Callable, engine) -> Callable:
    vocab_size = engine.vocab_size

    def decode(tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        return step(tokens, pos, kv_len)[:, :vocab_size]  # over the cache's first `attended_length` positions

    return decode


def _whole_cache(step: Callable) -> Callable:
    """`torch.compile`'s decode step (static shapes) called as the engine calls its step: over the whole cache
    (`kv_len` None: an int would be a constant of its graph, one compile per value)."""
    def decode(tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        return step(tokens, pos, None)

    return decode


def compile_engine_step(engine, rows: Optional[int] = None) -> Optional[Callable]:
    """The `Engine`'s decode step (`tokens, pos, kv_len -> logits (B, vocab)`), compiled for the engine's rows and
    cache. On the CPU, attending over the cache's first `attended_length(kv_len, ...)` positions: loaded from
    `steps_folder(...)/<rows>x<length>.pt2` when a run before saved it (no trace, no compile: a few ms), else
    compiled ahead of time by AOTInductor and saved there; `engine.step_source` says
    which ("loaded", "compiled"; "torch.compile" when the model does not export as one graph, or on CUDA:
    `compile_step`).

    `rows` (fewer than the engine's, CPU only): a step over the engine's first `rows` rows alone (it takes
    `tokens[:rows], pos[:rows]` and writes those rows of the same KV cache, `KVCache.update`), saved as
    `<rows>x<length>-of<B>.pt2`; None where it would not be AOTInductor's (`engine.step_source` is left alone)."""
    model, device = engine.model, engine.device
    unpack_weights(model)
    slots = engine.max_batch_size
    if rows is not None and rows < slots:
        if torch.device(device).type != "cpu":
            return None
        inputs = {"tokens": engine._tokens[:rows], "pos": engine._pos[:rows]}  # (rows, 1) each
        path = steps_folder(model) / _step_file(rows, engine.max_seq_length, kind=f"-of{slots}")
        step = _load_step(path, engine, inputs) if path.exists() else None
        if step is None and steps_save(model):  # serve's first start: a line a step, as the whole step's note
            _note(f"compiling the decode step over the first {rows} of {slots} rows once (a few clients decode on "
                  f"it); later starts load it")
            enable_compile_cache()
            step = _compile_and_save(path, engine, inputs=inputs)
        return step and _bind(step, engine)
    static = [t for c in engine._caches for t in (c.k, c.v)] + [engine._tokens, engine._pos]
    engine.step_source = "torch.compile"
    if torch.device(device).type != "cpu":
        return _whole_cache(compile_step(engine._decode_logits, device, static, cpu_compile_options(engine.model)))
    path = steps_folder(model) / _step_file(slots, engine.max_seq_length)
    # (a tensor-parallel rank's step holds its collectives, in a process group of their own:
    # `litllm.parallel.layers.step_group`)
    step = _load_step(path, engine) if path.exists() else None
    engine.step_source = "loaded"
    if step is None:
        enable_compile_cache()  # the kernels inductor generates are cached: a rebuild of the same step is faster
        # at torch's thread budget (Engine.__init__): its kernels take step()'s count when they run
        step, engine.step_source = _compile_and_save(path, engine), "compiled"
    if step is None:
        engine.step_source = "torch.compile"
        # compiled at its first call, inside step()'s `threads_for`: kernels that read the count when they run (but
        # for a 1-thread budget's step: 1 baked in, `cpu_compile_options`)
        options = cpu_compile_options(engine.model)
        options = options if "cpp.threads" in options else {**options, "cpp.dynamic_threads": True}
        return _whole_cache(compile_step(engine._decode_logits, device, static, options))
    return _bind(step, engine)


# ---------------------------------------------------------------------- speculative decoding's verify step
class _VerifyStep(torch.nn.Module):
    """What AOTInductor compiles for speculative decoding's check (`litllm.speculative`): `model.decode` of one row's
    newest token and the draft's k proposals at once, the logits at every position ((1, k + 1, padded_vocab)), over
    the cache's first `span.size(0)` positions (as `_DecodeStep`)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, span: Optional[torch.Tensor]) -> torch.Tensor:
        # (span None: the whole cache, `torch.compile`'s static step, `_whole_cache`)
        kv_len = None if span is None else span.size(0)
        return self.model.decode(tokens, input_pos=pos, kv_len=kv_len)  # (1, k + 1, padded_vocab)


def _verify_kind(width: int) -> str:
    """The saved verify step's file tag (`_step_file`): `1x<length>-verify<width>.pt2` beside the decode steps."""
    return f"-verify{width}"


def verify_engine(make: Callable, model, length: int, width: int, compile: Optional[bool]):
    """The one-row `Engine` that `make(length)` builds (eager, it holds the KV cache and prefills) for speculative
    decoding's target, with `engine.verify(tokens, pos, kv_len)`: logits (width, vocab) of one forward over `width`
    tokens (1, width) at positions (1, width) (the newest token and the k proposals) over the cache's first
    `attended_length(kv_len)` positions (None: all; `torch.compile`'s step: all), compiled as
    `compile` says (as `step_engine`'s decode step: False or a default with nothing saved, None: eager; None: the
    verify step saved for this shape if one fits and loads; True: loaded, else compiled ahead by AOTInductor and
    saved as `steps_folder(model)/1x<length>-verify<width>.pt2`, or `torch.compile`'s where the model does not
    export as one graph and on CUDA). `engine.verify_tokens` / `engine.verify_pos` are its input buffers;
    `engine.compile_seconds` what building the compiled one took, through its first check."""
    kind = _verify_kind(width)
    saved = None if compile is False else saved_step_length(model, 1, length, kind=kind)
    if compile is False or (compile is None and saved is None):
        engine = make(length)
        engine.verify = None
        return engine
    unpack_weights(model)  # the compiled step takes the weights as plain Linears (saved steps are keyed so)
    t0 = clock()
    engine = make(saved or compiled_length(length, model.max_seq_length))
    device = engine.device
    engine.verify_tokens = torch.zeros(1, width, dtype=torch.long, device=device)
    engine.verify_pos = torch.arange(width, device=device)[None]
    inputs = {"tokens": engine.verify_tokens, "pos": engine.verify_pos}
    path = steps_folder(model) / _step_file(1, engine.max_seq_length, kind)
    cpu = device.type == "cpu"
    step = _load_step(path, engine, inputs) if cpu and path.exists() else None
    engine.step_source = "loaded"
    if step is None and compile and cpu:
        enable_compile_cache()
        step, engine.step_source = _compile_and_save(path, engine, _VerifyStep(model), inputs), "compiled"
    if step is None and compile:  # CUDA, or no single graph: torch.compile's, unsaved
        engine.step_source = "torch.compile"
        static = [t for c in engine._caches for t in (c.k, c.v)] + list(inputs.values())
        options = cpu_compile_options(model)
        options = options if "cpp.threads" in options else {**options, "cpp.dynamic_threads": True}
        step = _whole_cache(compile_step(_VerifyStep(model), device, static, options))
    engine.verify = None if step is None else _bind_verify(step, engine.vocab_size)
    if step is not None:
        with torch.inference_mode():  # its first check, timed with the build as the decode step's warm-up is
            engine.verify(engine.verify_tokens, engine.verify_pos)  # (`litllm.generate.decode_engine`): a
            # torch.compile'd step compiles here; it writes cache positions 0..k, which a prefill overwrites first
        engine.compile_seconds = clock() - t0
    return engine


def _bind_verify(step: Callable, vocab_size: int) -> Callable:
    def verify(tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        return step(tokens, pos, kv_len)[0, :, :vocab_size]  # (width, vocab)

    return verify


class SlotSteps(list):
    """`slot_steps`' steps, one per slot, and how they were made, as an engine says its own step's
    (`litllm.compile_ledger.record_step_compile` reads both): `step_source` "compiled" (by this process, ahead of
    time) or "loaded" (from the cache), `compile_seconds` what the compile, or the load, of the first slot's took."""

    step_source: str
    compile_seconds: float


def slot_steps(model, slots: list[list], step: torch.nn.Module, inputs: dict[str, torch.Tensor],
               kind: str = "") -> Optional[SlotSteps]:
    """`step` (a module over `model` taking `inputs`, by name: `_DecodeStep` or `_VerifyStep`) compiled ahead once
    for one row of a batched engine's KV cache and loaded once per slot, bound to that slot's cache (`slots[i]`: the
    blocks' `KVCache.rows` views of slot i, laid out as a one-row cache's): the rounds of `serve --draft_model`
    (`litllm.speculative.SpeculativeBatchEngine`), which decode one slot at a time. Saved as
    `steps_folder(model)/1x<length><kind>.pt2`, the file a one-row engine of that cache length uses (each further
    slot loads it: a few ms). None off the CPU or where the model does not export as one graph (the rounds stay
    eager). The steps say whether this process compiled them (`SlotSteps`)."""
    from types import SimpleNamespace

    if model.wte.weight.device.type != "cpu":
        return None
    unpack_weights(model)
    views = [SimpleNamespace(model=model, _caches=caches) for caches in slots]  # what `_step_tensors` reads
    path = steps_folder(model) / _step_file(1, slots[0][0].k.size(2), kind)
    t0, source = clock(), "loaded"
    first = _load_step(path, views[0], inputs) if path.exists() else None
    if first is None:
        enable_compile_cache()
        first, source = _compile_and_save(path, views[0], step, inputs), "compiled"
    if first is None:
        return None
    seconds = clock() - t0
    steps = SlotSteps([first] + [_load_step(path, view, inputs) for view in views[1:]])
    steps.step_source, steps.compile_seconds = source, seconds
    return None if any(s is None for s in steps) else steps
