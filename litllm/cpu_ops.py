"""litllm's C++ CPU ops (litllm/cpu_ops.cpp), one library: the fp32 row split (`litllm.row_split`), int8dq's
and int8wo's decode rows (row-major and packed), int8 prompt rows and bf16 int4wo's rows (`litllm.quantize`), packed
bf16 rows (`litllm.packed_bf16`), fused training norms and RoPE (`litllm.fused_norms`); how it
is built and loaded, the ops' shapes for tracing, and which ops run here.

The library is compiled from its C++ source on first use (`torch.utils.cpp_extension`, ~45 CPU-s; the compiler
inductor needs anyway) into `library_folder()` (`$XDG_CACHE_HOME/litllm/extensions`, else `~/.cache/...`; one build
per machine: not inductor's cache, which tests and users point elsewhere), named by the source, torch's version and
the CPU, and loaded from there by later processes (`torch.ops.load_library`, only a library this user owns and no
one else can write). AOTInductor's saved step calls its ops through torch's dispatcher. The row split calls the
Fortran `sgemv_` libtorch exports (with a torch that has none, the library does not load: a one-line note, compiled
steps keep `F.linear`).
"""

from __future__ import annotations

import hashlib
import platform
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch._subclasses.fake_tensor import is_fake  # loaded by `import torch` anyway

from litllm.utils import atomic_path, cpu_flags, cpu_model_name, litllm_cache_home, owned_and_private, switched_off

SOURCE = Path(__file__).with_name("cpu_ops.cpp").read_text()
"""The ops' C++ (litllm/cpu_ops.cpp): the fp32 row split, int8dq's and int8wo's decode rows, int8 prompt rows, packed
bf16 rows, and training's fused norms and RoPE (`litllm.fused_norms`)."""
NAME = "litllm_cpu_ops"
FLAGS = ["-O2", "-fopenmp"]
"""The compiler's flags (`-fopenmp`: the op's loop is an OpenMP one, in torch's OpenMP runtime)."""


@lru_cache(maxsize=None)
def _library_name() -> str:
    """The library's file name: the source, the flags, torch's version and the CPU (once: hashing the ~120 kB source
    and reading /proc/cpuinfo take ~120 us, which `library_built` would otherwise pay on every call)."""
    key = f"{SOURCE}|{FLAGS}|{torch.__version__}|{platform.machine()}|{cpu_model_name()}"
    return f"{NAME}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"


def library_folder() -> Path:
    """Where the op's library is built and kept: `$XDG_CACHE_HOME/litllm/extensions`, else under `~/.cache`."""
    return litllm_cache_home() / "extensions"


_loaded = False
"""Whether `row_split_op` has loaded (or built) the op library in this process: the one thing the per-call lookups
read once it has (`bf16_norm_op`, `library_built`, `load_built_library`), never the disk."""


@lru_cache(maxsize=None)
def row_split_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.row_split_linear`, its library loaded from `library_folder()` or built there first; None
    (with a one-line note) where it cannot be built or loaded here (no compiler, a foreign file...)."""
    global _loaded
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
            print(f"note: litllm's CPU ops are unavailable ({type(e).__name__}: {str(e)[:200]}); "
                  "torch's own ops run in their place", file=sys.stderr)
            return None
    _register_fake()
    _loaded = True
    return torch.ops.litllm_cpu.row_split_linear


def _build(path: Path) -> None:
    """Compile `SOURCE` into the shared library at `path` (atomically: another process may build it too) and load it
    (`load_inline` does: loading the copy at `path` again would register the op twice)."""
    import tempfile

    from torch.utils.cpp_extension import load_inline

    path.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm  # its write() puts the note on a line of its own while a progress bar is drawn

    tqdm.write(f"note: building litllm's CPU ops in {path.parent} (once per machine and torch version, about a minute)",
               file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent) as build:
        load_inline(NAME, cpp_sources=[SOURCE], is_python_module=False,
                    extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
        with atomic_path(path) as tmp:
            tmp.write_bytes((Path(build) / f"{NAME}.so").read_bytes())
            tmp.chmod(0o755)


@lru_cache(maxsize=None)
def _register_fake() -> None:
    """The ops' shapes for tracing (`torch.export`, `torch.compile`): every op of the library, here once it loads
    (the training ops' in `_register_training_fakes`)."""
    @torch.library.register_fake("litllm_cpu::row_split_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], w.size(0))

    @torch.library.register_fake("litllm_cpu::row_split_linear_blas")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], w.size(0))

    @torch.library.register_fake("litllm_cpu::int8_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.size(0))

    @torch.library.register_fake("litllm_cpu::int8_prompt_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], scales.numel())

    @torch.library.register_fake("litllm_cpu::packed_bf16_linear")
    def _(x: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("litllm_cpu::int8wo_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.size(0))

    @torch.library.register_fake("litllm_cpu::int8_packed_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], scales.numel())

    @torch.library.register_fake("litllm_cpu::int4_rows_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scale_zero: torch.Tensor, group: int, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    _register_training_fakes()


def _register_training_fakes() -> None:
    """The fused training ops' outputs (`litllm.fused_norms`, `litllm.fused_experts`) for fake tensors: the shapes,
    dtypes and strides the C++ returns (contiguous, new tensors; None where it returns an undefined one), so that
    `litllm estimate`'s fake step of a CPU run keeps what the real step keeps (`fake_cpu_training`). A new op of
    cpu_ops.cpp gets its function here too, checked against the op by `tests/test_fused_norms.py`'s opcheck."""
    @torch.library.register_fake("litllm_cpu::rms_norm_forward")
    def _(x, residual, w, eps):
        N = x.size(0)  # x (N, C): (y, s (empty without a residual), rstd (N,))
        return torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0), x.new_empty(N)

    @torch.library.register_fake("litllm_cpu::rms_norm_backward")
    def _(dy, x, rstd, w, add, weight_grad):
        return torch.empty_like(x), x.new_empty(x.size(1)) if weight_grad else None  # (dx (N, C), dw (C,))

    @torch.library.register_fake("litllm_cpu::qk_norm_rope_forward")
    def _(qkv, q_w, k_w, cos, sin, nh, nkv, eps):
        B, T = qkv.shape[:2]
        hs = qkv.size(2) // (nh + 2 * nkv)
        q, k, v = qkv.new_empty(B, T, nh, hs), qkv.new_empty(B, T, nkv, hs), qkv.new_empty(B, T, nkv, hs)
        return q, k, v, qkv.new_empty(B if q_w is not None else 0, T, nh + nkv)  # rstd: empty without qk-norm

    @torch.library.register_fake("litllm_cpu::qk_norm_rope_backward")
    def _(dq, dk, dv, qkv, q_w, k_w, cos, sin, rstd):
        if q_w is None:
            return qkv.new_empty(qkv.shape), None, None
        hs = dq.size(3)  # the norm weights' gradients: rows of one (2, hs) sum
        both = qkv.new_empty(2, hs)
        return qkv.new_empty(qkv.shape), both[0], both[1]

    @torch.library.register_fake("litllm_cpu::moe_swiglu_forward")
    def _(h, w):
        return h.new_empty(h.size(0), h.size(1) // 2)  # (M, I)

    @torch.library.register_fake("litllm_cpu::moe_swiglu_backward")
    def _(h, w, da):
        return torch.empty_like(h), torch.empty_like(w)  # (dh (M, 2I), dw (M,)); da is written in place

    @torch.library.register_fake("litllm_cpu::moe_combine")
    def _(o, pos, k):
        return o.new_empty(pos.size(0) // k, o.size(1))  # (N, C)

    @torch.library.register_fake("litllm_cpu::moe_experts_forward")
    def _(x, w, token, pos, k, fc, proj, counts):
        M, C, I = token.size(0), x.size(1), fc[0].size(0) // 2  # (y (N, C), xs (M, C), h (M, 2I))
        return x.new_empty(pos.size(0) // k, C), x.new_empty(M, C), x.new_empty(M, 2 * I)

    @torch.library.register_fake("litllm_cpu::moe_experts_backward")
    def _(grad_y, xs, h, w, token, pos, k, fc, proj, counts, need_x, need_weights):
        M, C = xs.shape
        grad_x = xs.new_empty(pos.size(0) // k, C) if need_x else None
        empty = xs.new_empty(0)  # an expert without rows: this one tensor, in both lists (as the C++ returns it)
        grad_fc = [torch.empty_like(f) if n else empty for f, n in zip(fc, counts)] if need_weights else []
        grad_proj = [torch.empty_like(p) if n else empty for p, n in zip(proj, counts)] if need_weights else []
        return grad_x, w.new_empty(M), grad_fc, grad_proj


INT8_ROWS_ENV = "LITLLM_INT8_ROWS"
"""`0`/`false`: compiled int8 steps keep inductor's own int8 reduction (int8dq on AVX-512 VNNI CPUs, int8wo on AVX-512
ones too) and eager int8wo calls torch's kernel, e.g. to compare."""


def has_avx512_vnni() -> bool:
    """Does this CPU have what the int8 ops need (AVX-512 with VNNI)?"""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu_flags()


def has_avx512() -> bool:
    """Does this CPU have what the fused training ops and the fp32 one-row kernel need (AVX-512 F/BW/VL)?"""
    return {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


_fake_cpu_training = False  # inside `fake_cpu_training`


@contextmanager
def fake_cpu_training() -> Iterator[None]:
    """Inside the block, fake tensors count as plain ones (`plain_tensor`), so that the fused training ops' paths take
    them as they take real CPU tensors: `litllm estimate`'s fake step of a CPU fp32 run (`litllm.estimate`) keeps
    what the real step keeps (the ops' outputs: their fake registrations, `_register_training_fakes`). Elsewhere a
    fake tensor keeps the model's own code (the fake CPU step of a GPU run)."""
    global _fake_cpu_training
    before, _fake_cpu_training = _fake_cpu_training, True
    try:
        yield
    finally:
        _fake_cpu_training = before


def plain_tensor(t: torch.Tensor) -> bool:
    """Whether `t` (a tensor, or a Parameter's `.data`) is an ordinary tensor, not a subclass (DTensor, quantized,
    fake); inside `fake_cpu_training`, a fake one counts as ordinary too."""
    return type(t) is torch.Tensor or (_fake_cpu_training and is_fake(t))


def eager_fp32_training(x: torch.Tensor) -> bool:
    """Whether `x` flows through an eager CPU fp32 training forward, where litllm's fused training ops may take it:
    a plain fp32 CPU tensor (`plain_tensor`: not DTensor, nor fake outside `fake_cpu_training`, nor a torch.compile
    trace), gradients on, no autocast."""
    return (plain_tensor(x) and x.is_cpu and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def training_ops_ready(switch_env: str) -> bool:
    """Whether a fused training op of this library can run here: `$<switch_env>` is not `0`/`false`/`no`/`off`, the
    CPU has AVX-512 and the library loads (built first, once per machine, where it is not yet; one source, so every
    op of it is there)."""
    if switched_off(switch_env):
        return False
    return has_avx512() and row_split_op() is not None


def _int8_library_op(name: str, cpu_has: bool, build: bool) -> Optional[object]:
    """`torch.ops.litllm_cpu.<name>` where `cpu_has` the op's instructions, `$LITLLM_INT8_ROWS` is not `0` and the
    library builds or loads (`row_split_op`); else None. `build=False`: None where the library is neither loaded nor
    built yet (an eager call does not wait ~1 min for a first build)."""
    if switched_off(INT8_ROWS_ENV) or not cpu_has:
        return None
    ready = row_split_op() is not None if build else load_built_library()
    return getattr(torch.ops.litllm_cpu, name) if ready else None


def int8_rows_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.int8_rows_linear(x, words, scales, block)` (the same library as `row_split_op`'s) where
    this CPU has AVX-512 VNNI (`_int8_library_op`). int8dq's compiled steps call it instead of inductor's int8 reduction
    (`litllm.quantize.Int8Words`)."""
    return _int8_library_op("int8_rows_linear", has_avx512_vnni(), build)


def int8wo_rows_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.int8wo_rows_linear(x, words, scales)` (the same library as `row_split_op`'s) where this CPU
    has AVX-512 (`_int8_library_op`): fp32 activations, unrounded, times int8 weights (row-major, 4 to an fp32-typed
    word), an fp32 scale per row, within fp32 rounding of the exact product: with VNNI each activation row as a 31-bit
    integer in 4 signed 8-bit digits by vpdpbusd (exact integer sums), else the weights converted to fp32 for FMAs
    (`torch.ops.litllm_cpu.int8wo_rows_linear_fma`, that kernel alone everywhere, to compare). fp32 int8wo layers
    (`litllm.quantize.Int8PackedLinear`) call it in compiled steps
    instead of inductor's int8 reduction, and eagerly for one row instead of torch's bf16 kernel (where the library is
    there already)."""
    return _int8_library_op("int8wo_rows_linear", has_avx512(), build)


INT8_PACKED_ENV = "LITLLM_INT8_PACKED"
"""`0`/`false`: int8 compiled steps that call litllm's ops take the row-major ones (`int8_rows_op`, `int8wo_rows_op`)
instead of `int8_packed_rows_linear`, e.g. to compare (benchmarks/int8_op_rate.py; their steps saved under keys of
their own)."""


INT8_AMX_ENV = "LITLLM_INT8_AMX"
"""When `int8_packed_rows_linear` multiplies int8wo through AMX tiles (on CPUs with AMX-INT8, where Linux grants them):
unset, from 2 activation rows (a batched or speculative step; one row keeps its VNNI kernel, faster there); `1`, from
one row; `0`/`false`, never. The op reads it each call (not part of a saved step's key: the step and its weights are
the same either way), so benchmarks alternate the kernels in one process."""


def int8_packed_rows_wanted() -> bool:
    """Whether int8 compiled steps that call litllm's ops (`int8_rows_op`, `int8wo_rows_op`) take its packed-rows op
    instead, `torch.ops.litllm_cpu.int8_packed_rows_linear(x, words, scales, block)` on the weights laid out 16 output
    rows a vector (`litllm.quantize.pack_int8_rows`; block 0: int8wo's unrounded activations): where this CPU has
    AVX-512 VNNI (and DQ) and `$LITLLM_INT8_PACKED` is not `0`. The library is the same, so it is there where they
    are."""
    return has_avx512_vnni() and "avx512dq" in cpu_flags() and not switched_off(INT8_PACKED_ENV)


def bf16_norm_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.bf16_rms_norm(x, residual, w, eps) -> (y, x + residual)` (no residual: the second empty)
    where the op library is loaded in this process; else None. The eager bf16 CPU norms without autograd
    (`litllm.model.RMSNorm`) call it, one op for their ~9-14, each call (~25 a token): so it reads no file and builds
    nothing (an eager run never waits for a first build). A model's load for decoding loads a library built already
    (`load_built_library`); one built later in this process is used from then on."""
    return torch.ops.litllm_cpu.bf16_rms_norm if _loaded else None


def library_built() -> bool:
    """Is the op library loaded in this process (`_loaded`) or built in `library_folder()` already? (Not loaded: the
    disk is asked each time, so a library built later, here or by another process, counts from then on.)"""
    return _loaded or (library_folder() / _library_name()).exists()


def load_built_library() -> bool:
    """Load the op library where it is built already, never building it (an eager run does not wait ~1 min for a
    first build), and say whether it is loaded in this process: once per model load for decoding
    (`litllm.compile_ledger.choose_decode_layout`), so that the eager ops' per-call lookups (`bf16_norm_op`) need not
    look at the disk; once loaded, a read of `_loaded`."""
    return _loaded or (library_built() and row_split_op() is not None)


INT8_PROMPT_ENV = "LITLLM_INT8_PROMPT"
"""`0`/`false`: int8 prompts (`litllm.quantize.Int8Words._eager_step`) keep the fp32 GEMM on weights converted per
call, e.g. to compare (benchmarks/int8_prefill.py)."""


def int8_prompt_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.int8_prompt_linear(x, w, scales, block)` (the same library as `row_split_op`'s) where
    this CPU has AVX-512 VNNI, the library is loaded or built already (a prefill never waits for a first build, as
    `int8_rows_op(build=False)`) and `$LITLLM_INT8_PROMPT` is not `0`; else None. The eager prefill of int8 layers
    (`litllm.quantize.Int8Words._eager_step`) calls it: many rows times int8 weights read once, int8dq's rows rounded
    per block (int8 dot products by vpdpbusd), int8wo's unrounded (the weights converted to fp32 in registers)."""
    if switched_off(INT8_PROMPT_ENV) or not has_avx512_vnni() or not load_built_library():
        return None
    return torch.ops.litllm_cpu.int8_prompt_linear


INT4_ROWS_ENV = "LITLLM_INT4_ROWS"
"""`0`/`false`: `torchao.int4wo` bf16 CPU layers stay torchao's (torch's kernel `_weight_int4pack_mm_for_cpu`) instead of
litllm's `int4_rows_linear` layout, e.g. to compare; read when a model is quantized."""


INT4_AMX_ENV = "LITLLM_INT4_AMX"
"""`0`/`false`: `int4_rows_linear` multiplies by its AVX-512 kernel (int16 inputs, vpdpwssd) where AMX-BF16 tiles would
run (read by the op each call)."""


def int4_rows_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.int4_rows_linear(x, w, scale_zero, group, out_features)` (the same library as
    `row_split_op`'s) where this CPU has AVX512-BF16 and VNNI, torch packs int4 weights in its AVX-512 layout (the one
    `litllm.quantize.int4_rows_layout` reads), `$LITLLM_INT4_ROWS` is not `0` and the library builds or loads; else
    None. bf16 `torchao.int4wo` CPU layers (`litllm.quantize.Int4RowsLinear`) multiply by it, eager and compiled."""
    if switched_off(INT4_ROWS_ENV) or not {"avx512_bf16", "avx512bw", "avx512_vnni"} <= cpu_flags():
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or (not build and not library_built()):
        return None
    return None if row_split_op() is None else torch.ops.litllm_cpu.int4_rows_linear
