"""The fp32 one-row matmul of a compiled CPU decode step on every thread: `litllm_cpu::row_split_linear`, a small C++
op that splits the weight's output rows into one contiguous chunk per thread, hands them out to torch's OpenMP
threads as they come free (a thread the scheduler holds back on a busy machine leaves its chunk to another) and
multiplies each by the BLAS GEMV a one-row `F.linear` runs (MKL's here), and `RowSplitLinear`, the Linear that
calls it.

Why: MKL's fp32 GEMV, what a one-row `F.linear` (eager or compiled: inductor calls it out) runs, uses one thread
whatever torch's count, so on 2 cores a compiled fp32 step left the second one idle; inductor's own one-row
reduction (`torch.mv`, a `bmm` of one row: both lower to it on the CPU) splits the rows between threads but timed no
faster at 2 threads than MKL's GEMV at 1 (one 8-lane accumulator per row; tutorials/inference.md). Each chunk here is
MKL's own GEMV, on its own core. At one thread the op is one GEMV over all rows, as `F.linear`; anything but one fp32 row
on a row- or column-major weight goes to `F.linear`.

The op is compiled from its C++ source (litllm/cpu_ops.cpp, with litllm's other CPU ops) on first use (`torch.utils.cpp_extension`, ~45 CPU-s; the compiler
inductor needs anyway) into `library_folder()` (`$XDG_CACHE_HOME/litllm/extensions`, else `~/.cache/...`; one build
per machine: not inductor's cache, which tests and users point elsewhere), named by the source, torch's version and
the CPU, and loaded from there by later processes (`torch.ops.load_library`, only a library this user owns and no
one else can write). AOTInductor's saved step calls it through torch's dispatcher. It calls the Fortran `sgemv_`
libtorch exports (with a torch that has none, the library does not load: a one-line note, compiled steps keep
`F.linear`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from litllm.cpu_layout import OneRowLinear, PackedLinear, PromptLinear, becomes_one_row, plain_cpu_weight, swap_linears
from litllm.utils import atomic_path, cpu_flags, cpu_model_name, litllm_cache_home, owned_and_private

SOURCE = Path(__file__).with_name("cpu_ops.cpp").read_text()
"""The ops' C++ (litllm/cpu_ops.cpp): the fp32 row split, int8dq's and int8wo's decode rows, int8 prompt rows, packed
bf16 rows."""
NAME = "litllm_cpu_ops"
FLAGS = ["-O2", "-fopenmp"]
"""The compiler's flags (`-fopenmp`: the op's loop is an OpenMP one, in torch's OpenMP runtime)."""


def _library_name() -> str:
    """The library's file name: the source, the flags, torch's version and the CPU."""
    key = f"{SOURCE}|{FLAGS}|{torch.__version__}|{platform.machine()}|{cpu_model_name()}"
    return f"{NAME}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"


def library_folder() -> Path:
    """Where the op's library is built and kept: `$XDG_CACHE_HOME/litllm/extensions`, else under `~/.cache`."""
    return litllm_cache_home() / "extensions"


@lru_cache(maxsize=None)
def row_split_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.row_split_linear`, its library loaded from `library_folder()` or built there first; None
    (with a one-line note) where it cannot be built or loaded here (no compiler, a foreign file...)."""
    if not hasattr(torch.ops.litllm_cpu, "row_split_linear"):
        path = library_folder() / _library_name()
        try:
            if not path.exists():
                _build(path)  # loads it too
            elif not owned_and_private(path):
                raise RuntimeError(f"{path} is not owned by this user, or is writable by others")
            else:
                torch.ops.load_library(str(path))
        except Exception as e:  # no compiler, a failed build, a foreign file: plain F.linear
            print(f"note: the row-split fp32 matmul is unavailable ({type(e).__name__}: {str(e)[:200]}); "
                  "the compiled step calls F.linear", file=sys.stderr)
            return None
    _register_fake()
    return torch.ops.litllm_cpu.row_split_linear


def _build(path: Path) -> None:
    """Compile `SOURCE` into the shared library at `path` (atomically: another process may build it too) and load it
    (`load_inline` does: loading the copy at `path` again would register the op twice)."""
    import tempfile

    from torch.utils.cpp_extension import load_inline

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"note: building litllm's CPU ops in {path.parent} (once per machine and torch version, about a minute)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as build:
        load_inline(NAME, cpp_sources=[SOURCE], is_python_module=False,
                    extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
        with atomic_path(path) as tmp:
            tmp.write_bytes((Path(build) / f"{NAME}.so").read_bytes())
            tmp.chmod(0o755)


@lru_cache(maxsize=None)
def _register_fake() -> None:
    """The op's shapes for tracing (`torch.export`, `torch.compile`)."""
    @torch.library.register_fake("litllm_cpu::row_split_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], w.size(0))

    @torch.library.register_fake("litllm_cpu::int8_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.size(0))

    @torch.library.register_fake("litllm_cpu::int8_prompt_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.size(0))

    @torch.library.register_fake("litllm_cpu::packed_bf16_linear")
    def _(x: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("litllm_cpu::int8wo_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.size(0))


INT8_ROWS_ENV = "LITLLM_INT8_ROWS"
"""`0`/`false`: compiled int8 steps keep inductor's own int8 reduction (int8dq on AVX-512 VNNI CPUs, int8wo on AVX-512
ones too) and eager int8wo calls torch's kernel, e.g. to compare."""


def _has_avx512_vnni() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu_flags()


def _has_avx512() -> bool:
    return {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


def _int8_library_op(name: str, cpu_has: bool, build: bool) -> Optional[object]:
    """`torch.ops.litllm_cpu.<name>` where `cpu_has` the op's instructions, `$LITLLM_INT8_ROWS` is not `0` and the
    library builds or loads (`row_split_op`); else None. `build=False`: None where the library is neither loaded nor
    built yet (an eager call does not wait ~1 min for a first build)."""
    if os.environ.get(INT8_ROWS_ENV, "").strip().lower() in ("0", "false", "no", "off") or not cpu_has:
        return None
    if not build and not _library_there():
        return None
    return None if row_split_op() is None else getattr(torch.ops.litllm_cpu, name)


def int8_rows_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.int8_rows_linear(x, words, scales, block)` (the same library as `row_split_op`'s) where
    this CPU has AVX-512 VNNI (`_int8_library_op`). int8dq's compiled steps call it instead of inductor's int8 reduction
    (`litllm.quantize.Int8Words`)."""
    return _int8_library_op("int8_rows_linear", _has_avx512_vnni(), build)


def int8wo_rows_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.int8wo_rows_linear(x, words, scales)` (the same library as `row_split_op`'s) where this CPU
    has AVX-512 (`_int8_library_op`): fp32 activations, unrounded, times int8 weights (row-major, 4 to an fp32-typed
    word), an fp32 scale per row, within fp32 rounding of the exact product: with VNNI each activation row as a 31-bit
    integer in 4 signed 8-bit digits by vpdpbusd (exact integer sums), else the weights converted to fp32 for FMAs
    (`torch.ops.litllm_cpu.int8wo_rows_linear_fma`, that kernel alone everywhere, to compare). fp32 int8wo layers (`litllm.quantize.Int8PackedLinear`) call it in compiled steps
    instead of inductor's int8 reduction, and eagerly for one row instead of torch's bf16 kernel (where the library is
    there already)."""
    return _int8_library_op("int8wo_rows_linear", _has_avx512(), build)


def _library_there() -> bool:
    """Is the op library loaded in this process or built in `library_folder()` already?"""
    return hasattr(torch.ops.litllm_cpu, "row_split_linear") or (library_folder() / _library_name()).exists()


INT8_PROMPT_ENV = "LITLLM_INT8_PROMPT"
"""`0`/`false`: int8 prompts (`litllm.quantize.Int8Words._eager_step`) keep the fp32 GEMM on weights converted per
call, e.g. to compare (benchmarks/int8_prefill.py)."""


def int8_prompt_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.int8_prompt_linear(x, w, scales, block)` (the same library as `row_split_op`'s) where
    this CPU has AVX-512 VNNI, the library is loaded or built already (a prefill never waits for a first build, as
    `int8_rows_op(build=False)`) and `$LITLLM_INT8_PROMPT` is not `0`; else None. The eager prefill of int8 layers
    (`litllm.quantize.Int8Words._eager_step`) calls it: many rows times int8 weights read once, int8dq's rows rounded
    per block (int8 dot products by vpdpbusd), int8wo's unrounded (the weights converted to fp32 in registers)."""
    if os.environ.get(INT8_PROMPT_ENV, "").strip().lower() in ("0", "false", "no", "off") \
            or not _has_avx512_vnni() or not _library_there() or row_split_op() is None:
        return None
    return torch.ops.litllm_cpu.int8_prompt_linear


PACKED_BF16_ENV = "LITLLM_PACKED_BF16"
"""`0`/`false`: compiled bf16 steps keep row-major weights and inductor's `mv` (`OneRowLinear`), e.g. to compare."""


def packed_bf16_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.packed_bf16_linear(x, blocks, out_features)` (the same library as `row_split_op`'s) where
    this CPU has AVX512-BF16, oneDNN packs bf16 weights in `BF16_BLOCK`s, the library builds or loads and
    `$LITLLM_PACKED_BF16` is not `0`; else None. Compiled bf16 steps multiply by oneDNN's packed weights through it
    (`BlockedBf16Linear`). `build=False`: None where the library is neither loaded nor built yet."""
    if os.environ.get(PACKED_BF16_ENV, "").strip().lower() in ("0", "false", "no", "off") \
            or not {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags():
        return None
    if not build and not _library_there():
        return None
    if not _onednn_packs_bf16_blocks():
        return None
    return None if row_split_op() is None else torch.ops.litllm_cpu.packed_bf16_linear


@lru_cache(maxsize=None)
def _onednn_packs_bf16_blocks() -> bool:
    """Does oneDNN pack bf16 Linear weights here as `BF16_BLOCK` says (probed once, on a 192 x 128 weight)? Where it
    does not (another ISA's blocking, e.g. AMX's), no weight becomes a `BlockedBf16Linear` and the saved steps' keys
    (`litllm.compile_decode._blocked_modules`) say so."""
    try:
        return onednn_bf16_blocks(torch.randn(192, 128).to(torch.bfloat16)) is not None
    except (RuntimeError, AttributeError, OSError, TypeError):  # no oneDNN bf16 reorder, or no AOTInductor C shim
        return False


class RowSplitLinear(PromptLinear):
    """An fp32 CPU Linear whose one-row calls (decoding) run `litllm_cpu::row_split_linear` (every thread streams its
    own block of the weight's rows); more rows go through `litllm.cpu_layout.prompt_linear` (`F.linear`, or oneDNN's
    GEMM where that is faster). The weight is used as it is laid out (row- or column-major); for a compiled step
    (`row_split_linears`)."""

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features or torch.is_grad_enabled():  # the op has no backward: training's F.linear
            return super().forward(x)  # a prompt: `prompt_linear`
        y = torch.ops.litllm_cpu.row_split_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def becomes_row_split(module) -> bool:
    """Does `row_split_linears` make `module` a `RowSplitLinear`: a plain fp32 CPU Linear (or `PromptLinear`; a
    Parameter weight, not a quantized tensor subclass), or one already."""
    if isinstance(module, RowSplitLinear):
        return True
    weight = plain_cpu_weight(module)
    return type(module) in (torch.nn.Linear, PromptLinear) and weight is not None and weight.dtype == torch.float32


ENV = "LITLLM_ROW_SPLIT"
"""`0`/`false`: compiled fp32 steps keep `F.linear` (one thread's GEMV), e.g. to compare."""


def wants_row_split() -> bool:
    """Do fp32 compiled steps here take `RowSplitLinear`s: more than one thread to split the rows between (torch's
    thread budget), unless `$LITLLM_ROW_SPLIT` is `0`/`false`."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.get_num_threads() > 1


def row_split_linears(model) -> bool:
    """Every plain fp32 CPU Linear of `model` (`becomes_row_split`; a head tied to the embedding too) as a
    `RowSplitLinear` on the same tensors, where the op builds or loads (`row_split_op`); whether it did."""
    if not any(type(m) is not RowSplitLinear and becomes_row_split(m) for m in model.modules()) \
            or row_split_op() is None:
        return False
    swap_linears(model, RowSplitLinear, becomes_row_split)
    return True


BF16_BLOCK = (32, 64, 2)
"""oneDNN's packed bf16 Linear weight on AVX512-BF16 CPUs, per 64 x 64 block of (out, in): 32 pairs of input
features, each holding 64 outputs x the pair's 2 values; blocks ordered (out / 64, in / 64), padded with zeros
(`onednn_bf16_blocks` checks each weight it packs against it)."""


def onednn_bf16_blocks(weight: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(blocks, packed) for a bf16 (out, in) CPU weight: its oneDNN-packed bytes as a plain (ceil(out / 64),
    ceil(in / 64), 32, 64, 2) tensor that owns them, and an opaque oneDNN tensor on the same memory (what
    `torch.ops.mkldnn._linear_pointwise` multiplies a prompt by without reordering); None where oneDNN packs
    otherwise here (another blocking, no bf16 GEMM)."""
    import ctypes

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    out_features, in_features = weight.shape
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    blocks = torch.empty(-(-out_features // 64), -(-in_features // 64), *BF16_BLOCK, dtype=torch.bfloat16)
    if torch.ops.mkldnn._nbytes(packed) != 2 * blocks.numel():
        return None
    ctypes.memmove(blocks.data_ptr(), torch.ops.mkldnn.data_ptr(packed), 2 * blocks.numel())
    plain = blocks.permute(0, 3, 1, 2, 4).reshape(blocks.size(0) * 64, blocks.size(1) * 64)
    if not torch.equal(plain[:out_features, :in_features], weight) or plain.count_nonzero() != weight.count_nonzero():
        return None  # not the blocking assumed (or nonzero padding)
    return blocks, _onednn_view(blocks, packed)


def _onednn_view(blocks: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN tensor over `blocks`' memory (not owning it) that describes it as `packed` does: made through
    the C function AOTInductor loads packed constants with (`aoti_torch_create_tensor_from_blob_v2`)."""
    import ctypes

    lib = _aoti_shim()
    meta = bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).tolist())
    sizes = (ctypes.c_int64 * 2)(*packed.shape)
    strides = (ctypes.c_int64 * 2)(packed.size(1), 1)
    handle = ctypes.c_void_p()
    code = lib.aoti_torch_create_tensor_from_blob_v2(
        blocks.data_ptr(), 2, sizes, strides, 0, lib.aoti_torch_dtype_bfloat16(), lib.aoti_torch_device_type_cpu(), -1,
        ctypes.byref(handle), lib.aoti_torch_layout__mkldnn(), meta, len(meta))
    if code != 0:
        raise RuntimeError("aoti_torch_create_tensor_from_blob_v2 failed")
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype, capsule.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule(handle.value, None, None))


@lru_cache(maxsize=None)
def _aoti_shim():
    import ctypes

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.aoti_torch_create_tensor_from_blob_v2.restype = ctypes.c_int32
    lib.aoti_torch_create_tensor_from_blob_v2.argtypes = (
        ctypes.c_void_p, ctypes.c_int64, i64p, i64p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p, ctypes.c_int64)
    return lib


class BlockedBf16Linear(torch.nn.Module):
    """A bf16 CPU Linear held once, in oneDNN's packed layout (`onednn_bf16_blocks`), for a compiled run: a prompt's
    rows go through oneDNN's GEMM on it as packed (`torch.ops.mkldnn._linear_pointwise`, as the eager step's
    `PackedLinear`: no per-call reorder of a row-major weight), one row (decoding: eager, or the compiled step, which
    takes `blocks` as its input) through `litllm_cpu::packed_bf16_linear` on the same bytes. For inference only: not
    saved (`blocks` is no state-dict entry), no autograd."""

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)

    def __init__(self, in_features: int, out_features: int, blocks: torch.Tensor, onednn: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", blocks, persistent=False)  # (out/64, in/64, 32, 64, 2) bf16
        self.onednn = onednn  # not a buffer: opaque, and no input of the compiled step
        self._blocks_address = blocks.data_ptr()  # `onednn` reads this memory: see `forward`
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, a row-major copy gathered from the blocks (for code that multiplies by the matrix
        itself: MLA's absorbed attention)."""
        return self.blocks.permute(0, 3, 1, 2, 4).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features and not torch.compiler.is_compiling():  # a prompt
            if self.blocks.data_ptr() != self._blocks_address:  # `onednn` would read freed memory
                raise RuntimeError("BlockedBf16Linear: its blocks moved after packing (`.to()`?); pack the model "
                                   "again (`litllm.row_split.blocked_bf16_linears`)")
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.onednn, self.bias, "none", [], "")
        y = torch.ops.litllm_cpu.packed_bf16_linear(x, self.blocks, self.out_features)
        return y if self.bias is None else y + self.bias


def becomes_blocked_bf16(module, shared: set[int]) -> bool:
    """Does `blocked_bf16_linears` make `module` a `BlockedBf16Linear`: a bf16 CPU Linear of whole 64 x 64 blocks
    that a compiled step would multiply by through `litllm.cpu_layout.OneRowLinear` (`becomes_one_row`, or
    oneDNN-packed), whose weight no other module shares (`shared`: ids of the parameters outside Linears, e.g. a tied
    embedding)."""
    if isinstance(module, BlockedBf16Linear):
        return True
    if type(module) not in (OneRowLinear, torch.nn.Linear) and not isinstance(module, PackedLinear):
        return False
    if module.in_features % 64 or module.out_features % 64:  # whole blocks only: oneDNN pads others its own way
        return False
    if isinstance(module, PackedLinear):
        return module.packed_weight.dtype == torch.bfloat16
    return becomes_one_row(module) and module.weight.dtype == torch.bfloat16 and id(module.weight) not in shared


def shared_parameters(model) -> set[int]:
    """The ids of `model`'s parameters that a module other than a Linear holds (a tied embedding's weight)."""
    return {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}


def blocked_bf16_linears(model) -> None:
    """Every bf16 CPU Linear of `model` that `becomes_blocked_bf16` (a plain one or a `OneRowLinear`) as a
    `BlockedBf16Linear` on its weight packed by oneDNN, where the op builds or loads (`packed_bf16_op`); one layer at a
    time (at most one layer's second copy is alive), the row-major weight dropped. Layers oneDNN packs otherwise
    stay as they are."""
    if packed_bf16_op() is None:
        return
    shared = shared_parameters(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (OneRowLinear, torch.nn.Linear) and becomes_blocked_bf16(child, shared):
                made = onednn_bf16_blocks(child.weight)
                if made is not None:
                    setattr(module, name, BlockedBf16Linear(child.in_features, child.out_features, *made, child.bias))
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; nothing where it is absent): the
    row-major weights `blocked_bf16_linears` drops lie below later allocations in the heap, and glibc kept them
    (the 134M bf16 model's process: 705 MB resident after the conversion, 506 MB trimmed, as before it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
