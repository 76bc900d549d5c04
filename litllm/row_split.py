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

The op is compiled from the C++ source below on first use (`torch.utils.cpp_extension`, ~45 CPU-s; the compiler
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

from litllm.cpu_layout import PromptLinear, plain_cpu_weight, swap_linears
from litllm.utils import atomic_path, cpu_flags, cpu_model_name, litllm_cache_home, owned_and_private

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <vector>

// The Fortran BLAS GEMV libtorch exports (MKL's in torch's x86 wheels): what a one-row F.linear runs, called here
// without the dispatcher so that OpenMP's threads need none of the caller's thread-local state.
extern "C" void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a,
                       const int* lda, const float* x, const int* incx, const float* beta, float* y, const int* incy);

// y (..., N) = x (..., K) @ w (N, K)^T. One row of fp32 on a row- or column-major w: the N output rows in chunks of
// whole 16-row groups, kChunks a thread, handed out dynamically (a thread the scheduler holds back leaves its chunk
// to another), each chunk one GEMV. Anything else: at::linear.
at::Tensor row_split_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "row_split_linear: x has ", x.size(-1),
              " features, w is ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  const bool column_major = w.stride(0) == 1 && w.stride(1) >= N, row_major = w.stride(1) == 1 && w.stride(0) >= K;
  const int64_t ld = column_major ? w.stride(1) : w.stride(0);
  if (x.numel() != K || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || N == 0 || K == 0 ||
      !(column_major || row_major) || ld > std::numeric_limits<int>::max() || x.device() != w.device() ||
      !w.device().is_cpu())
    return at::linear(x, w);
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const at::Tensor row = x.contiguous();
  const float* xp = row.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // 1: each thread's rows one GEMV on one contiguous range (column-major: runs of N/threads weights a row). 4 chunks a
  // thread (shorter runs) read 12% slower (benchmarks/one_row_matmul.py, a shared machine)
  constexpr int64_t kChunks = 1;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t rows = threads == 1 ? N  // one GEMV, as F.linear
      : std::max<int64_t>(16, ((N + threads * kChunks - 1) / (threads * kChunks) + 15) / 16 * 16);
  const int64_t chunks = (N + rows - 1) / rows;
  auto gemv = [&](int64_t c) {
    const int64_t n0 = c * rows, n = std::min(N, n0 + rows) - n0;
    const float one = 1.0f, zero = 0.0f;
    const int inc = 1, lda = static_cast<int>(ld), k = static_cast<int>(K), m = static_cast<int>(n);
    if (column_major)  // BLAS sees the rows n0.. as an (n, K) column-major matrix
      sgemv_("N", &m, &k, &one, wp + n0, &lda, xp, &inc, &zero, yp + n0, &inc);
    else  // and as a (K, n) column-major matrix to transpose
      sgemv_("T", &k, &m, &one, wp + n0 * ld, &lda, xp, &inc, &zero, yp + n0, &inc);
  };
  if (chunks == 1) {
    gemv(0);
  } else {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) gemv(c);
  }
  return y;
}

// int8 rows (litllm.quantize.Int8DynamicLinear's compiled step on AVX-512 VNNI CPUs): y (N, out) fp32 = x (N, K) fp32,
// each row rounded to int8 per block of `block` values with one symmetric scale d each (absmax / 127, as
// litllm.quantize._block_quantized and llama.cpp's q8_0), times the int8 weights in w (out, K) row-major: int8 x int8
// products summed in int32 by vpdpbusd, 64 weights an instruction (each int32 lane sums 4 weights of one block), scaled
// by d per lane into fp32 sums, times an fp32 scale per output row. The rows in one contiguous range per thread, as
// row_split_linear's; 4 at a time, the next 4 prefetched (without, it read 85 MB at 6.7 GB/s against inductor's 8.9).
#if defined(__x86_64__)
// 64 int8 x int8 products into 16 int32 lanes (4 each): |w| (128 fits u8) times q with w's sign (q in [-127, 127]:
// its negation fits), then into fp32 sums, each lane times its block's scale
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static inline __m512 int8_dot64(__m512 acc, __m512i wv, __m512i qv, __m512 d) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i qs = _mm512_mask_sub_epi8(qv, _mm512_movepi8_mask(wv), zero, qv);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), qs)), d, acc);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int8_rows_vnni(const int8_t* q, const float* lane_d, const int8_t* w, const float* s, float* y,
                           int64_t r0, int64_t r1, int64_t K) {
  const int64_t K64 = K / 64 * 64;
  const __mmask64 tail = (1ULL << (K - K64)) - 1;  // the last K % 64 weights (a multiple of 4)
  const __mmask16 tail_d = static_cast<__mmask16>((1U << ((K - K64) / 4)) - 1);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {  // 4 rows at a time: the activations' loads shared, 4 independent sums
    const int8_t* wr = w + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const char* next = reinterpret_cast<const char*>(wr + 4 * K);  // the next 4 rows, prefetched 256 bytes a step
    for (int64_t k = 0; k < K64; k += 64) {
      if (r + 8 <= r1)
        for (int j = 0; j < 4; ++j) _mm_prefetch(next + 4 * k + 64 * j, _MM_HINT_T0);
      const __m512i qv = _mm512_loadu_si512(q + k);
      const __m512 d = _mm512_loadu_ps(lane_d + k / 4);
      a0 = int8_dot64(a0, _mm512_loadu_si512(wr + k), qv, d);
      a1 = int8_dot64(a1, _mm512_loadu_si512(wr + K + k), qv, d);
      a2 = int8_dot64(a2, _mm512_loadu_si512(wr + 2 * K + k), qv, d);
      a3 = int8_dot64(a3, _mm512_loadu_si512(wr + 3 * K + k), qv, d);
    }
    if (tail) {
      const __m512i qv = _mm512_maskz_loadu_epi8(tail, q + K64);
      const __m512 d = _mm512_maskz_loadu_ps(tail_d, lane_d + K64 / 4);
      a0 = int8_dot64(a0, _mm512_maskz_loadu_epi8(tail, wr + K64), qv, d);
      a1 = int8_dot64(a1, _mm512_maskz_loadu_epi8(tail, wr + K + K64), qv, d);
      a2 = int8_dot64(a2, _mm512_maskz_loadu_epi8(tail, wr + 2 * K + K64), qv, d);
      a3 = int8_dot64(a3, _mm512_maskz_loadu_epi8(tail, wr + 3 * K + K64), qv, d);
    }
    y[r] = _mm512_reduce_add_ps(a0) * s[r];
    y[r + 1] = _mm512_reduce_add_ps(a1) * s[r + 1];
    y[r + 2] = _mm512_reduce_add_ps(a2) * s[r + 2];
    y[r + 3] = _mm512_reduce_add_ps(a3) * s[r + 3];
  }
  for (; r < r1; ++r) {  // the last rows, one at a time
    const int8_t* wr = w + r * K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64)
      acc = int8_dot64(acc, _mm512_loadu_si512(wr + k), _mm512_loadu_si512(q + k), _mm512_loadu_ps(lane_d + k / 4));
    if (tail)
      acc = int8_dot64(acc, _mm512_maskz_loadu_epi8(tail, wr + K64), _mm512_maskz_loadu_epi8(tail, q + K64),
                       _mm512_maskz_loadu_ps(tail_d, lane_d + K64 / 4));
    y[r] = _mm512_reduce_add_ps(acc) * s[r];
  }
}

#endif

at::Tensor int8_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t block) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), "int8_rows_linear: this CPU has no AVX-512 VNNI");
#else
  TORCH_CHECK(false, "int8_rows_linear: this CPU has no AVX-512 VNNI");
#endif
  // w: (out, K / 4) fp32-typed words, each the bits of 4 consecutive int8 weights of its row (inductor's carrier)
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == 4 * w.size(1) && scales.numel() == w.size(0) &&
              w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat &&
              w.is_contiguous() && block > 0 && block % 4 == 0 && x.size(1) % block == 0,
              "int8_rows_linear: x ", x.sizes(), " w ", w.sizes(), " ", w.scalar_type(), " block ", block);
  const int64_t N = x.size(0), R = w.size(0), K = x.size(1);
  const int8_t* wp = reinterpret_cast<const int8_t*>(w.const_data_ptr<float>());
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({N, R}, x.options());
  std::vector<int8_t> q(K);
  std::vector<float> lane_d(K / 4);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t rows = std::max<int64_t>(16, ((R + threads - 1) / threads + 15) / 16 * 16);
  const int64_t chunks = (R + rows - 1) / rows;
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xc.const_data_ptr<float>() + n * K;
    for (int64_t b = 0; b < K; b += block) {  // q8_0's rounding: torch.round is half to even, as nearbyint
      float amax = 0.f;
      for (int64_t i = b; i < b + block; ++i) amax = std::max(amax, std::fabs(xr[i]));
      const float d = amax / 127.f, inv = d == 0.f ? 0.f : 1.f / d;
      for (int64_t i = b; i < b + block; ++i) q[i] = static_cast<int8_t>(std::nearbyint(xr[i] * inv));
      for (int64_t i = b / 4; i < (b + block) / 4; ++i) lane_d[i] = d;
    }
    float* yr = y.mutable_data_ptr<float>() + n * R;
    auto part = [&](int64_t c) {
      const int64_t r0 = c * rows, r1 = std::min(R, r0 + rows);
#if defined(__x86_64__)
      int8_rows_vnni(q.data(), lane_d.data(), wp, sc.const_data_ptr<float>(), yr, r0, r1, K);
#endif
    };
    if (chunks == 1) {
      part(0);
    } else {
      #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t c = 0; c < chunks; ++c) part(c);
    }
  }
  return y;
}

// ---- int8 weight-only rows (litllm.quantize.Int8PackedLinear, torchao.int8wo with fp32 activations): y (N, out) fp32
// = x (N, K) fp32, unrounded, times the int8 weights in w (out, K) row-major, times an fp32 scale per output row. Each
// 16 weights sign-extended to int32 (vpmovsxbd), converted to fp32 (exact) and multiplied into 16 fp32 lanes (FMA): the
// eager kernel's arithmetic without its bf16 rounding of the activations and outputs. 4 rows at a time (the
// activations' loads shared, 4 independent sums), the next 4 prefetched; every row of x per 4 weight rows (read from
// memory once, then from L1). The rows in one contiguous range per thread, handed out as row_split_linear's.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 int8wo_fma16(__m512 acc, __m128i w16, __m512 x) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w16)), x, acc);
}

template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline void int8wo_block(const float* x, const int8_t* w, const float* s, float* y, int64_t K, bool prefetch) {
  const int64_t K16 = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1U << (K - K16)) - 1);
  __m512 a[ROWS];
  for (int j = 0; j < ROWS; ++j) a[j] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + ROWS * K);
  for (int64_t k = 0; k < K16; k += 16) {
    if (prefetch && k % 64 == 0)
      for (int j = 0; j < ROWS; ++j) _mm_prefetch(next + j * K + k, _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int j = 0; j < ROWS; ++j)
      a[j] = int8wo_fma16(a[j], _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)), xv);
  }
  if (tail) {
    const __m512 xv = _mm512_maskz_loadu_ps(tail, x + K16);
    for (int j = 0; j < ROWS; ++j) a[j] = int8wo_fma16(a[j], _mm_maskz_loadu_epi8(tail, w + j * K + K16), xv);
  }
  for (int j = 0; j < ROWS; ++j) y[j] = _mm512_reduce_add_ps(a[j]) * s[j];
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int8wo_range(const float* x, const int8_t* w, const float* s, float* y, int64_t N, int64_t R, int64_t K,
                         int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    for (int64_t n = 0; n < N; ++n)
      int8wo_block<4>(x + n * K, w + r * K, s + r, y + n * R + r, K, n == 0 && r + 8 <= r1);
  for (; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) int8wo_block<1>(x + n * K, w + r * K, s + r, y + n * R + r, K, false);
}
#endif

at::Tensor int8wo_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), "int8wo_rows_linear: this CPU has no AVX-512");
#else
  TORCH_CHECK(false, "int8wo_rows_linear: this CPU has no AVX-512");
#endif
  // w: (out, K / 4) fp32-typed words, each the bits of 4 consecutive int8 weights of its row (inductor's carrier)
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == 4 * w.size(1) && scales.numel() == w.size(0) &&
              w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat &&
              w.is_contiguous(), "int8wo_rows_linear: x ", x.sizes(), " w ", w.sizes(), " ", w.scalar_type());
  const int64_t N = x.size(0), R = w.size(0), K = x.size(1);
  const int8_t* wp = reinterpret_cast<const int8_t*>(w.const_data_ptr<float>());
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({N, R}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t rows = std::max<int64_t>(16, ((R + threads - 1) / threads + 15) / 16 * 16);
  const int64_t chunks = (R + rows - 1) / rows;
  auto part = [&](int64_t c) {
#if defined(__x86_64__)
    int8wo_range(xp, wp, sp, yp, N, R, K, c * rows, std::min(R, c * rows + rows));
#endif
  };
  if (chunks == 1) {
    part(0);
  } else {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) part(c);
  }
  return y;
}
// ---- end of int8 weight-only rows

TORCH_LIBRARY(litllm_cpu, m) {
  m.def("row_split_linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_rows_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
  m.def("int8wo_rows_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");  // int8 weight-only rows
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("row_split_linear", &row_split_linear);
  m.impl("int8_rows_linear", &int8_rows_linear);
  m.impl("int8wo_rows_linear", &int8wo_rows_linear);  // int8 weight-only rows
}
"""
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
    if not build and not hasattr(torch.ops.litllm_cpu, "row_split_linear") \
            and not (library_folder() / _library_name()).exists():
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
    word), an fp32 scale per row. fp32 int8wo layers (`litllm.quantize.Int8PackedLinear`) call it in compiled steps
    instead of inductor's int8 reduction, and eagerly for one row instead of torch's bf16 kernel (where the library is
    there already)."""
    return _int8_library_op("int8wo_rows_linear", _has_avx512(), build)


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
