// litllm's CPU ops (litllm/row_split.py builds and loads them: one library per machine, source and torch version)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// The threads an op splits its work over: torch's count, or 1 where it runs inside a parallel region already.
static int op_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// R output rows in one contiguous range per thread, whole 16-row groups (at least one): the rows of a chunk.
static int64_t rows_per_thread(int64_t R, int threads) {
  return std::max<int64_t>(16, ((R + threads - 1) / threads + 15) / 16 * 16);
}

// part(c) for each chunk c: inline for one, else handed out to torch's OpenMP threads as they come free (a thread
// the scheduler holds back on a busy machine leaves its chunk to another).
template <typename Part>
static void run_chunks(int64_t chunks, int threads, const Part& part) {
  if (chunks == 1) {
    part(0);
    return;
  }
  #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) part(c);
}

// q8_0's rounding of one row of K values, per block: q = round(x / d) + offset, d = max |x| / 127 over the block
// (nearbyint: half to even, as torch.round); lane_d holds each group of 4 values' d (one int32 lane of vpdpbusd's
// sums).
template <typename Q, int kOffset>
static void round_row_q8(const float* xr, int64_t K, int64_t block, Q* q, float* lane_d) {
  for (int64_t b = 0; b < K; b += block) {
    float amax = 0.f;
    for (int64_t i = b; i < b + block; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float d = amax / 127.f, inv = d == 0.f ? 0.f : 1.f / d;
    for (int64_t i = b; i < b + block; ++i)
      q[i] = static_cast<Q>(static_cast<int>(std::nearbyint(xr[i] * inv)) + kOffset);
    for (int64_t i = b / 4; i < (b + block) / 4; ++i) lane_d[i] = d;
  }
}

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
  const int threads = op_threads();
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
  run_chunks(chunks, threads, gemv);
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
  const int threads = op_threads();
  const int64_t rows = rows_per_thread(R, threads);
  const int64_t chunks = (R + rows - 1) / rows;
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xc.const_data_ptr<float>() + n * K;
    round_row_q8<int8_t, 0>(xr, K, block, q.data(), lane_d.data());
    float* yr = y.mutable_data_ptr<float>() + n * R;
    auto part = [&](int64_t c) {
      const int64_t r0 = c * rows, r1 = std::min(R, r0 + rows);
#if defined(__x86_64__)
      int8_rows_vnni(q.data(), lane_d.data(), wp, sc.const_data_ptr<float>(), yr, r0, r1, K);
#endif
    };
    run_chunks(chunks, threads, part);
  }
  return y;
}

// ---- int8 prompt rows (litllm.quantize.Int8Words' eager prefill): many activation rows times int8 weights ----
// y (N, out) fp32 = x (N, K) fp32 times the int8 weights in w (out, K) row-major (int8, or fp32-typed words of 4),
// times an fp32 scale per output row. block > 0 (int8dq): each x row rounded per block as int8_rows_linear rounds
// it, int8 x int8 products by vpdpbusd; block == 0 (int8wo): x unrounded, the weights converted to fp32 in registers
// (exact), fp32 FMAs. Each weight tile (kPromptMR rows) is read once for a chunk of kPromptRows x rows (kept in L2),
// the products kPromptMR x NR at a time in registers; a thread's weight rows one contiguous range, as
// int8_rows_linear's. From 8 (int8wo: 16) x rows on (a prompt), groups of 32 weight rows packed 16 outputs a vector
// instead (`int8_packed_part`, below), handed out in several chunks a thread.
#if defined(__x86_64__)
constexpr int kPromptMR = 4;             // weight rows a tile
constexpr int kPromptNR = 4;             // x rows a tile (int8 products: 16 accumulators, 8 weight registers)
constexpr int kPromptNR32 = 6;           // x rows a tile (fp32 products: 24 accumulators, 4 weight registers)
constexpr int64_t kPromptRows = 64;      // x rows a pass over the weights: their int8 values and lane scales in L2

// vpdpbusd multiplies u8 by s8: x's int8 values q are stored as q + 128 (u8), and each int32 lane starts at -128 times
// its 4 weights' sum (computed once per weight vector, shared by the NR x rows), so that it ends at sum(q * w) exactly
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int8_prompt_tile(const uint8_t* qu, const float* lane_d, const int8_t* w, const float* s, float* y,
                             int64_t K, int64_t R) {
  __m512 acc[MR][NR];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512(), u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const int64_t left = K - k;  // the last K % 64 values: masked (a multiple of 4; zero bytes add nothing)
    const __mmask64 m = left >= 64 ? ~0ULL : (1ULL << left) - 1;
    const __mmask16 md = left >= 64 ? 0xFFFF : static_cast<__mmask16>((1U << (left / 4)) - 1);
    __m512i wv[MR], start[MR];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      wv[i] = _mm512_maskz_loadu_epi8(m, w + i * K + k);
      start[i] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, u128, wv[i]));  // -128 * (sum of 4 weights)
    }
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512i qv = _mm512_maskz_loadu_epi8(m, qu + j * K + k);
      const __m512 d = _mm512_maskz_loadu_ps(md, lane_d + j * (K / 4) + k / 4);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[i], qv, wv[i])), d, acc[i][j]);
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) y[j * R + i] = _mm512_reduce_add_ps(acc[i][j]) * s[i];
}

template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int8_fp32_prompt_tile(const float* x, const int8_t* w, const float* s, float* y, int64_t K, int64_t R) {
  __m512 acc[MR][NR];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const int64_t left = K - k;
    const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1U << left) - 1);
    __m512 wv[MR];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)  // 16 int8 weights -> fp32, exact
      wv[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + i * K + k)));
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + j * K + k);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) y[j * R + i] = _mm512_reduce_add_ps(acc[i][j]) * s[i];
}

// weight rows r0..r1 times x rows n0..n1 (tiles, then the rows left over one at a time)
static void int8_prompt_part(const uint8_t* qu, const float* lane_d, const float* x, const int8_t* w, const float* s,
                             float* y, int64_t n0, int64_t n1, int64_t r0, int64_t r1, int64_t K, int64_t R,
                             bool int8_act) {
  const int NR = int8_act ? kPromptNR : kPromptNR32;
  for (int64_t r = r0; r < r1; r += kPromptMR) {
    const bool whole = r + kPromptMR <= r1;
    for (int64_t n = n0; n < n1;) {
      const bool wide = n + NR <= n1;
      const int64_t rows = wide ? NR : 1;
      for (int64_t i = 0; i < (whole ? 1 : r1 - r); ++i) {
        const int64_t ri = r + i;
        float* yo = y + n * R + ri;
        if (int8_act) {
          const uint8_t* q = qu + n * K;
          const float* d = lane_d + n * (K / 4);
          if (whole && wide) int8_prompt_tile<kPromptMR, kPromptNR>(q, d, w + ri * K, s + ri, yo, K, R);
          else if (whole) int8_prompt_tile<kPromptMR, 1>(q, d, w + ri * K, s + ri, yo, K, R);
          else if (wide) int8_prompt_tile<1, kPromptNR>(q, d, w + ri * K, s + ri, yo, K, R);
          else int8_prompt_tile<1, 1>(q, d, w + ri * K, s + ri, yo, K, R);
        } else {
          const float* xr = x + n * K;
          if (whole && wide) int8_fp32_prompt_tile<kPromptMR, kPromptNR32>(xr, w + ri * K, s + ri, yo, K, R);
          else if (whole) int8_fp32_prompt_tile<kPromptMR, 1>(xr, w + ri * K, s + ri, yo, K, R);
          else if (wide) int8_fp32_prompt_tile<1, kPromptNR32>(xr, w + ri * K, s + ri, yo, K, R);
          else int8_fp32_prompt_tile<1, 1>(xr, w + ri * K, s + ri, yo, K, R);
        }
      }
      n += rows;
    }
  }
}
// round_row_q8<uint8_t, 128> (the same values: one scale per block from its absmax, the products by x * (1 / d)
// rounded half to even) 16 values a vector, for blocks of whole vectors: the prompt's rows are rounded by the calling
// thread before the others start, so the scalar loop's ~4 ms a 32-token prompt (12 layers) kept one thread waiting
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void round_row_q8_u8_vectors(const float* xr, int64_t K, int64_t block, uint8_t* q, float* lane_d) {
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t b = 0; b < K; b += block) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = b; i < b + block; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
    const float d = _mm512_reduce_max_ps(amax) / 127.f, inv = d == 0.f ? 0.f : 1.f / d;
    const __m512 scale = _mm512_set1_ps(inv);
    for (int64_t i = b; i < b + block; i += 16) {  // the conversion rounds half to even (MXCSR's default, as nearbyint)
      const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), scale)), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
    }
    std::fill(lane_d + b / 4, lane_d + (b + block) / 4, d);
  }
}

// From kPackMinRows (int8wo: kPackMinRows32) x rows on, a thread packs each group of kPackRows weight rows once (into
// memory of its own that stays in L2) so that one vector holds 16 outputs: then the products need no horizontal sums,
// and int8dq's conversion to fp32 and multiply by the block scale come once per block of 32 values instead of once per
// 4 (about half the vector instructions); int8wo's products become one FMA per 16 products, the weights converted once
// per group, not once per tile of x rows. Fewer rows (the head's one row): the tiles above.
constexpr int64_t kPackRows = 32;     // weight rows a packed group: two vectors of 16 outputs
constexpr int64_t kPackMinRows = 8;     // x rows from which packing a group pays: int8dq (equal at 8 rows)
constexpr int64_t kPackMinRows32 = 16;  // int8wo (the fp32 weights written and read again: 1.5x slower at 8 rows)
constexpr int kPackNR = 6;            // x rows a packed int8 tile: 12 int32 and 12 fp32 sums in registers
constexpr int kPackNR32 = 12;         // x rows a packed fp32 tile: 24 fp32 sums
constexpr int64_t kChunksPerThread = 4;  // groups handed out in 4 chunks a thread: a late thread's share is taken

// The memory a thread packs its groups into: kept between calls (no allocation, no fresh pages per call)
static std::vector<int32_t>& pack_buffer(int64_t ints) {
  thread_local std::vector<int32_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < ints) buffer.resize(ints);
  return buffer;
}

// The `v` (<= 32) weight rows at w (row-major, K a row), as (K / 4, 2, 16) int32 words: for each 4 values of K, the 4
// int8 weights of rows 0..15, then of rows 16..31 (zeros past v): vpdpbusd's layout for 16 outputs a vector
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void pack_group_words(const int8_t* w, int64_t v, int64_t K, int32_t* words) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(K)));
  for (int h = 0; h < 2; ++h) {
    const int64_t left = std::clamp<int64_t>(v - 16 * h, 0, 16);
    const __mmask16 m = static_cast<__mmask16>((1U << left) - 1);
    const int8_t* wh = w + 16 * h * K;
    for (int64_t k = 0; k < K; k += 4)
      _mm512_storeu_si512(words + (k / 2 + h) * 16,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, wh + k, 1));
  }
}

// int8dq: the packed group (`pack_group_words`) times NR rows of x rounded per block (u8: q + 128, `lane_d` their block
// scales a lane of 4, as the tiles take them) into y (NR rows of R; the outputs of mask m0, m1). Each block's int32
// sums start at -128 times its weights' sums (`start`: (K / block, 2, 16)), so that they end at sum(q * w) exactly
// (kBlock: the block size known when compiling, q8_0's 32: the block's loop unrolled; 0: `block`)
template <int NR, int kBlock>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int8_packed_tile(const uint8_t* qu, const float* lane_d, const int32_t* words, const int32_t* start,
                             const float* s, float* y, int64_t K, int64_t runtime_block, int64_t R, __mmask16 m0,
                             __mmask16 m1) {
  const int64_t block = kBlock > 0 ? kBlock : runtime_block;
  __m512 f0[NR], f1[NR];
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) f0[j] = f1[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K; b += block) {
    __m512i a0[NR], a1[NR];
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      a0[j] = _mm512_loadu_si512(start + b / block * 32), a1[j] = _mm512_loadu_si512(start + b / block * 32 + 16);
    #pragma GCC unroll 8
    for (int64_t k = b; k < b + block; k += 4) {
      const __m512i w0 = _mm512_loadu_si512(words + k / 2 * 16), w1 = _mm512_loadu_si512(words + (k / 2 + 1) * 16);
      #pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        int32_t q4;
        std::memcpy(&q4, qu + j * K + k, 4);
        const __m512i qv = _mm512_set1_epi32(q4);
        a0[j] = _mm512_dpbusd_epi32(a0[j], qv, w0);
        a1[j] = _mm512_dpbusd_epi32(a1[j], qv, w1);
      }
    }
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512 d = _mm512_set1_ps(lane_d[j * (K / 4) + b / 4]);
      f0[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[j]), d, f0[j]);
      f1[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[j]), d, f1[j]);
    }
  }
  const __m512 s0 = _mm512_maskz_loadu_ps(m0, s), s1 = _mm512_maskz_loadu_ps(m1, s + 16);
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    _mm512_mask_storeu_ps(y + j * R, m0, _mm512_mul_ps(f0[j], s0));
    _mm512_mask_storeu_ps(y + j * R + 16, m1, _mm512_mul_ps(f1[j], s1));
  }
}

// all N rows of x times the packed group: tiles of kPackNR rows, then 3, then 1
template <int kBlock>
static void int8_packed_rows(const uint8_t* qu, const float* lane_d, const int32_t* words, const int32_t* start,
                             const float* s, float* y, int64_t N, int64_t K, int64_t block, int64_t R, __mmask16 m0,
                             __mmask16 m1) {
  int64_t n = 0;
  for (; n + kPackNR <= N; n += kPackNR)
    int8_packed_tile<kPackNR, kBlock>(qu + n * K, lane_d + n * (K / 4), words, start, s, y + n * R, K, block, R, m0,
                                      m1);
  for (; n + 3 <= N; n += 3)
    int8_packed_tile<3, kBlock>(qu + n * K, lane_d + n * (K / 4), words, start, s, y + n * R, K, block, R, m0, m1);
  for (; n < N; ++n)
    int8_packed_tile<1, kBlock>(qu + n * K, lane_d + n * (K / 4), words, start, s, y + n * R, K, block, R, m0, m1);
}

// -128 times the sums of each block's weights, per output row of the packed group: (K / block, 2, 16) int32
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void pack_group_starts(const int32_t* words, int64_t K, int64_t block, int32_t* start) {
  const __m512i zero = _mm512_setzero_si512(), u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < K; b += block)
    for (int h = 0; h < 2; ++h) {
      __m512i sum = zero;
      for (int64_t k = b; k < b + block; k += 4)
        sum = _mm512_dpbusd_epi32(sum, u128, _mm512_loadu_si512(words + (k / 2 + h) * 16));
      _mm512_storeu_si512(start + (b / block * 2 + h) * 16, _mm512_sub_epi32(zero, sum));
    }
}

// int8wo: the packed group's weights as fp32 (K, 2, 16) (exact), from its words
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void pack_group_floats(const int32_t* words, int64_t K, float* floats) {
  for (int64_t k = 0; k < K; k += 4)
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(words + (k / 2 + h) * 16);
      for (int t = 0; t < 4; ++t)  // byte t of each word, sign-extended
        _mm512_storeu_ps(floats + ((k + t) * 2 + h) * 16,
                         _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * t), 24)));
    }
}

// int8wo: the packed group's fp32 weights times NR rows of x (unrounded) into y, one FMA per 16 products
template <int NR>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int8_fp32_packed_tile(const float* x, const float* floats, const float* s, float* y, int64_t K, int64_t R,
                                  __mmask16 m0, __mmask16 m1) {
  __m512 f0[NR], f1[NR];
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) f0[j] = f1[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(floats + k * 32), w1 = _mm512_loadu_ps(floats + k * 32 + 16);
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512 xv = _mm512_set1_ps(x[j * K + k]);
      f0[j] = _mm512_fmadd_ps(w0, xv, f0[j]);
      f1[j] = _mm512_fmadd_ps(w1, xv, f1[j]);
    }
  }
  const __m512 s0 = _mm512_maskz_loadu_ps(m0, s), s1 = _mm512_maskz_loadu_ps(m1, s + 16);
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    _mm512_mask_storeu_ps(y + j * R, m0, _mm512_mul_ps(f0[j], s0));
    _mm512_mask_storeu_ps(y + j * R + 16, m1, _mm512_mul_ps(f1[j], s1));
  }
}

static __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1U << std::clamp<int64_t>(n, 0, 16)) - 1); }

// the packed groups g0..g1 of w (kPackRows weight rows each) times all N rows of x: tiles of NR rows, then fewer
static void int8_packed_part(const uint8_t* qu, const float* lane_d, const float* x, const int8_t* w, const float* s,
                             float* y, int64_t N, int64_t g0, int64_t g1, int64_t K, int64_t R, int64_t block) {
  const int64_t words_ints = K / 4 * 32;
  int32_t* words = pack_buffer(words_ints + (block > 0 ? K / block * 32 : K * 32)).data();
  int32_t* more = words + words_ints;  // int8dq: the blocks' starts; int8wo: the fp32 weights
  float* floats = reinterpret_cast<float*>(more);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r = g * kPackRows, v = std::min(kPackRows, R - r);
    const __mmask16 m0 = first_lanes(v), m1 = first_lanes(v - 16);
    pack_group_words(w + r * K, v, K, words);
    float* yr = y + r;
    if (block > 0) {
      pack_group_starts(words, K, block, more);
      if (block == 32) int8_packed_rows<32>(qu, lane_d, words, more, s + r, yr, N, K, block, R, m0, m1);
      else int8_packed_rows<0>(qu, lane_d, words, more, s + r, yr, N, K, block, R, m0, m1);
    } else {
      pack_group_floats(words, K, floats);
      int64_t n = 0;
      for (; n + kPackNR32 <= N; n += kPackNR32)
        int8_fp32_packed_tile<kPackNR32>(x + n * K, floats, s + r, yr + n * R, K, R, m0, m1);
      for (; n + 4 <= N; n += 4) int8_fp32_packed_tile<4>(x + n * K, floats, s + r, yr + n * R, K, R, m0, m1);
      for (; n < N; ++n) int8_fp32_packed_tile<1>(x + n * K, floats, s + r, yr + n * R, K, R, m0, m1);
    }
  }
}
#endif

at::Tensor int8_prompt_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t block) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), "int8_prompt_linear: this CPU has no AVX-512 VNNI");
#else
  TORCH_CHECK(false, "int8_prompt_linear: this CPU has no AVX-512 VNNI");
#endif
  // w: (out, K) int8, or (out, K / 4) fp32-typed words holding 4 consecutive int8 weights of their row each
  const bool words = w.scalar_type() == at::kFloat;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && (words || w.scalar_type() == at::kChar) &&
              x.size(1) == (words ? 4 : 1) * w.size(1) && scales.numel() == w.size(0) &&
              x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat && w.is_contiguous() &&
              block >= 0 && (block == 0 || (block % 4 == 0 && x.size(1) % block == 0)),
              "int8_prompt_linear: x ", x.sizes(), " w ", w.sizes(), " ", w.scalar_type(), " block ", block);
  const int64_t N = x.size(0), R = w.size(0), K = x.size(1);
  const int8_t* wp = static_cast<const int8_t*>(w.const_data_ptr());
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({N, R}, x.options());
  if (N == 0 || R == 0) return y;
#if defined(__x86_64__)
  const bool int8_act = block > 0;
  std::vector<uint8_t> qu(int8_act ? N * K : 0);  // the rounded rows (u8: q + 128) and their lane scales
  std::vector<float> lane_d(int8_act ? N * K / 4 : 0);
  uint8_t* const q = qu.data();
  float* const d = lane_d.data();
  const float* xp = xc.const_data_ptr<float>();
  for (int64_t n = 0; int8_act && n < N; ++n) {  // q8_0's rounding, as int8_rows_linear's (+ 128: u8 for vpdpbusd)
    if (block % 16 == 0) round_row_q8_u8_vectors(xp + n * K, K, block, q + n * K, d + n * (K / 4));
    else round_row_q8<uint8_t, 128>(xp + n * K, K, block, q + n * K, d + n * (K / 4));
  }
  const int threads = op_threads();
  float* yp = y.mutable_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  // packed groups of weight rows, kChunksPerThread chunks a thread, all N rows each
  if (N >= (int8_act ? kPackMinRows : kPackMinRows32) && K % 4 == 0) {
    const int64_t groups = (R + kPackRows - 1) / kPackRows;
    const int64_t per = threads == 1 ? groups : std::max<int64_t>(1, groups / (threads * kChunksPerThread));
    auto part = [&](int64_t c) {
      int8_packed_part(q, d, xp, wp, sp, yp, N, c * per, std::min(groups, (c + 1) * per), K, R, block);
    };
    run_chunks((groups + per - 1) / per, threads, part);
    return y;
  }
  const int64_t rows = rows_per_thread(R, threads);
  const int64_t chunks = (R + rows - 1) / rows;
  for (int64_t n0 = 0; n0 < N; n0 += kPromptRows) {
    const int64_t n1 = std::min(N, n0 + kPromptRows);
    auto part = [&](int64_t c) {
      int8_prompt_part(q, d, xp, wp, sp, yp, n0, n1, c * rows, std::min(R, (c + 1) * rows), K, R, int8_act);
    };
    run_chunks(chunks, threads, part);
  }
#endif
  return y;
}
// ---- end of int8 prompt rows ----

// bf16 rows times a weight in oneDNN's packed bf16 layout (litllm.cpu_layout.BlockedBf16Linear: the compiled step reads
// the same bytes a prompt's oneDNN GEMM does, no second copy): w (N/64, K/64, 32, 64, 2), padded with zeros to whole
// 64 x 64 blocks; each 64-byte line holds 16 outputs x 2 consecutive k, and vdpbf16ps multiplies a line by the
// broadcast pair of x into the 16 outputs' fp32 sums: no horizontal sums, one contiguous stream per 64 outputs.
#if defined(__x86_64__)
// R rows of x (a batch of decode rows) times one group of 64 outputs: the weight's loads shared by the R rows
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void bf16_group_rows(const int32_t* x, int64_t P, const uint16_t* wg, float* y, int64_t N, int64_t n) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* line = wg + p * 128;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(line), w1 = (__m512bh)_mm512_loadu_si512(line + 32),
                   w2 = (__m512bh)_mm512_loadu_si512(line + 64), w3 = (__m512bh)_mm512_loadu_si512(line + 96);
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * P + p]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xr);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xr);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xr);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xr);
    }
  }
  alignas(64) float tmp[64];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_store_ps(tmp + 16 * j, acc[r][j]);
    std::copy(tmp, tmp + n, y + r * N);
  }
}

// one row (decoding) times one group of 64 outputs: two pairs a step into separate sums (8 dependency chains)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void bf16_group_row(const int32_t* x, int64_t P, const uint16_t* wg, float* y, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t p = 0; p < P; p += 2) {
    const uint16_t* line = wg + p * 128;
    const char* ahead = reinterpret_cast<const char*>(line) + 1024;  // prefetched 1 KB ahead, 512 bytes a step
    for (int j = 0; j < 8; ++j) _mm_prefetch(ahead + 64 * j, _MM_HINT_T0);
    const __m512bh xa = (__m512bh)_mm512_set1_epi32(x[p]), xb = (__m512bh)_mm512_set1_epi32(x[p + 1]);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(line), xa);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(line + 32), xa);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(line + 64), xa);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(line + 96), xa);
    b0 = _mm512_dpbf16_ps(b0, (__m512bh)_mm512_loadu_si512(line + 128), xb);
    b1 = _mm512_dpbf16_ps(b1, (__m512bh)_mm512_loadu_si512(line + 160), xb);
    b2 = _mm512_dpbf16_ps(b2, (__m512bh)_mm512_loadu_si512(line + 192), xb);
    b3 = _mm512_dpbf16_ps(b3, (__m512bh)_mm512_loadu_si512(line + 224), xb);
  }
  alignas(64) float tmp[64];
  _mm512_store_ps(tmp, _mm512_add_ps(a0, b0));
  _mm512_store_ps(tmp + 16, _mm512_add_ps(a1, b1));
  _mm512_store_ps(tmp + 32, _mm512_add_ps(a2, b2));
  _mm512_store_ps(tmp + 48, _mm512_add_ps(a3, b3));
  std::copy(tmp, tmp + n, y);
}

// the groups g0..g1 of 64 outputs for M rows (x: each row zero-padded to KB * 64, as pairs)
static void bf16_blocks(const int32_t* x, int64_t M, int64_t KB, const uint16_t* w, float* y, int64_t N, int64_t g0,
                        int64_t g1) {
  const int64_t P = KB * 32;  // k pairs of a (padded) row
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* wg = w + g * P * 128;
    const int64_t n = std::min<int64_t>(64, N - g * 64);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_group_rows<4>(x + m * P, P, wg, y + m * N + g * 64, N, n);
    for (; m + 2 <= M; m += 2) bf16_group_rows<2>(x + m * P, P, wg, y + m * N + g * 64, N, n);
    if (m < M) bf16_group_row(x + m * P, P, wg, y + m * N + g * 64, n);
  }
}
#endif

at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& w, int64_t N) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "packed_bf16_linear: this CPU has no AVX512-BF16");
#else
  TORCH_CHECK(false, "packed_bf16_linear: this CPU has no AVX512-BF16");
#endif
  const int64_t K = x.size(-1);
  TORCH_CHECK(w.dim() == 5 && w.size(2) == 32 && w.size(3) == 64 && w.size(4) == 2 && w.is_contiguous() &&
              w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && w.size(1) * 64 >= K &&
              w.size(1) * 64 < K + 64 && w.size(0) * 64 >= N && w.size(0) * 64 < N + 64,
              "packed_bf16_linear: x ", x.sizes(), " ", x.scalar_type(), ", w ", w.sizes(), " ", w.scalar_type(),
              ", out_features ", N);
  const int64_t G = w.size(0), KB = w.size(1), M = x.numel() / std::max<int64_t>(K, 1);
  // the rows zero-padded to whole blocks (the weights' padding is zero too), as pairs
  std::vector<uint16_t> xpad(M * KB * 64, 0);
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) std::copy(xp + m * K, xp + (m + 1) * K, xpad.data() + m * KB * 64);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int threads = op_threads();
  const int64_t per = (G + threads - 1) / threads;  // each thread one contiguous range of 64-output groups
  auto part = [&](int64_t t) {
#if defined(__x86_64__)
    bf16_blocks(reinterpret_cast<const int32_t*>(xpad.data()), M, KB,
                reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()), y.mutable_data_ptr<float>(), N,
                std::min(G, t * per), std::min(G, (t + 1) * per));
#endif
  };
  run_chunks(threads, threads, part);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.to(at::kBFloat16).view(shape);
}
// ---- int8 weight-only rows (litllm.quantize.Int8PackedLinear, torchao.int8wo with fp32 activations): y (N, out) fp32
// = x (N, K) fp32, unrounded, times the int8 weights in w (out, K) row-major, times an fp32 scale per output row: within
// fp32 rounding of the exact product. Two kernels, 4 weight rows at a time (the activations' loads shared, 4
// independent sums), the next 4 prefetched; every row of x per 4 weight rows (read from memory once, then from L1); the
// rows in one contiguous range per thread, handed out as row_split_linear's.
// - VNNI (int8wo_rows_linear on AVX-512 VNNI CPUs): each x row as an integer X = x * 2^e (|X| <= 2^30: exact for the
//   row's values within 2^-7 of its absmax, the rest to 2^-31 of it, finer than fp32's own rounding of the sums) in 4
//   signed 8-bit digits; w + 128 (u8) times each digit by vpdpbusd, 64 products an instruction, exact int32 sums, and
//   w . X = sum over the digits of 256^i (w + 128) . digit_i - 128 sum(X). 4 instructions per 64 weights where
//   converting them to fp32 takes 12: the fp32 kernel ran below one core's DRAM rate (benchmarks/int8_op_rate.py).
// Every loop over the rows is unrolled (GCC at -O2 kept the fp32 kernel's 4 sums in memory, not registers: a store and
// a load per FMA, 11 GB/CPU-s on cached weights).
// - fp32 (int8wo_rows_linear_fma; int8wo_rows_linear elsewhere): each 16 weights sign-extended to int32, converted to
//   fp32 (exact) and multiplied into 16 fp32 lanes (FMA): the eager kernel's arithmetic without its bf16 rounding.
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
  #pragma GCC unroll 4
  for (int j = 0; j < ROWS; ++j) a[j] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + ROWS * K);
  for (int64_t k = 0; k < K16; k += 16) {
    if (prefetch && k % 64 == 0)
      #pragma GCC unroll 4
      for (int j = 0; j < ROWS; ++j) _mm_prefetch(next + j * K + k, _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j)
      a[j] = int8wo_fma16(a[j], _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)), xv);
  }
  if (tail) {
    const __m512 xv = _mm512_maskz_loadu_ps(tail, x + K16);
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j) a[j] = int8wo_fma16(a[j], _mm_maskz_loadu_epi8(tail, w + j * K + K16), xv);
  }
  #pragma GCC unroll 4
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

// One x row as the VNNI kernel takes it: digits (4, KP) int8 (digit i of X_k at i * KP + k, zero from K to KP, a whole
// number of 64), X = sum_i 256^i digit_i = x * 2^e, and 128 sum(X) (the digits' product with w + 128 counts it).
struct Int8woDigits {
  const int8_t* digits;
  int64_t offset_sum;  // 128 sum_k X_k
  double unscale;      // 2^-e
};

// The row's digits into `digits` (4 * KP bytes, zeroed); false where x has a non-finite value (the fp32 kernel's sums
// carry it) or K is too wide for exact int32 sums
__attribute__((target("avx512f,avx512bw,avx512vl")))
static bool int8wo_digits(const float* x, int64_t K, int64_t KP, int8_t* digits, Int8woDigits& out) {
  if (K > (int64_t{1} << 20)) return false;  // int32 lanes: up to K / 64 sums of 4 * 255 * 128
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;  // max_ps drops a NaN operand: counted apart
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m16 = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1U << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m16, x + k);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float m = _mm512_reduce_max_ps(amax);
  if (nan || !std::isfinite(m)) return false;
  int exponent = 0;
  std::frexp(m, &exponent);  // m < 2^exponent, so |x| 2^(30 - exponent) <= 2^30 (rounded to the nearest X)
  const int e = m == 0.f ? 0 : 30 - exponent;
  const __m512 scale_e = _mm512_set1_ps(static_cast<float>(e));  // scalef: x 2^e exactly, whatever e
  // signed digits: byte i of X + 0x80808080 is digit_i + 128 (no carry out: |X| <= 2^30)
  const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512i sum_lo = _mm512_setzero_si512(), sum_hi = sum_lo;  // sum(X) in int64 lanes
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m16 = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1U << (K - k)) - 1);
    const __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(_mm512_maskz_loadu_ps(m16, x + k), scale_e));
    sum_lo = _mm512_add_epi64(sum_lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(X)));
    sum_hi = _mm512_add_epi64(sum_hi, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(X, 1)));
    const __m512i biased = _mm512_xor_si512(_mm512_add_epi32(X, bias), bias);  // each byte: digit_i as int8
    for (int i = 0; i < 4; ++i)
      _mm_mask_storeu_epi8(digits + i * KP + k, m16, _mm512_cvtepi32_epi8(_mm512_srli_epi32(biased, 8 * i)));
  }
  out = {digits, 128 * _mm512_reduce_add_epi64(_mm512_add_epi64(sum_lo, sum_hi)), std::ldexp(1.0, -e)};
  return true;
}

// int32 lanes summed in int64 (16 lanes of up to 2^31 each)
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline int64_t int8wo_lanes_sum(__m512i v) {
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

// ROWS weight rows times one x row's digits: per 64 weights and row, one xor (w + 128 as u8) and 4 vpdpbusd
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static inline void int8wo_vnni_step(__m512i (&a)[ROWS][4], const __m512i* wv, const int8_t* d, int64_t KP,
                                    __m512i flip) {
  const __m512i d0 = _mm512_loadu_si512(d), d1 = _mm512_loadu_si512(d + KP), d2 = _mm512_loadu_si512(d + 2 * KP),
                d3 = _mm512_loadu_si512(d + 3 * KP);
  #pragma GCC unroll 4
  for (int j = 0; j < ROWS; ++j) {
    const __m512i u = _mm512_xor_si512(wv[j], flip);  // w + 128, as u8
    a[j][0] = _mm512_dpbusd_epi32(a[j][0], u, d0);
    a[j][1] = _mm512_dpbusd_epi32(a[j][1], u, d1);
    a[j][2] = _mm512_dpbusd_epi32(a[j][2], u, d2);
    a[j][3] = _mm512_dpbusd_epi32(a[j][3], u, d3);
  }
}

// ROWS weight rows (the next ROWS prefetched, a line each per 64 weights) times one x row's digits
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static inline void int8wo_vnni_block(const Int8woDigits& xd, int64_t KP, const int8_t* w, const float* s, float* y,
                                     int64_t K, bool prefetch) {
  const int64_t K64 = K / 64 * 64;
  const __mmask64 tail = K - K64 == 0 ? 0 : (~0ULL >> (64 - (K - K64)));  // the last K % 64 weights
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i a[ROWS][4];
  #pragma GCC unroll 4
  for (int j = 0; j < ROWS; ++j)
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) a[j][i] = _mm512_setzero_si512();
  const char* next = reinterpret_cast<const char*>(w + ROWS * K);
  __m512i wv[ROWS];
  for (int64_t k = 0; k < K64; k += 64) {
    if (prefetch)
      #pragma GCC unroll 4
      for (int j = 0; j < ROWS; ++j) _mm_prefetch(next + j * K + k, _MM_HINT_T0);
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j) wv[j] = _mm512_loadu_si512(w + j * K + k);
    int8wo_vnni_step<ROWS>(a, wv, xd.digits + k, KP, flip);
  }
  if (tail) {  // the digits past K are zero: the tail's masked-off weights (128 as u8) add nothing
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j) wv[j] = _mm512_maskz_loadu_epi8(tail, w + j * K + K64);
    int8wo_vnni_step<ROWS>(a, wv, xd.digits + K64, KP, flip);
  }
  #pragma GCC unroll 4
  for (int j = 0; j < ROWS; ++j) {  // exact in int64: |w . X| <= 2^37 K
    const int64_t dot = int8wo_lanes_sum(a[j][0]) + (int8wo_lanes_sum(a[j][1]) << 8) +
                        (int8wo_lanes_sum(a[j][2]) << 16) + (int8wo_lanes_sum(a[j][3]) << 24) - xd.offset_sum;
    y[j] = static_cast<float>(static_cast<double>(dot) * xd.unscale * s[j]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int8wo_vnni_range(const Int8woDigits* xd, int64_t KP, const int8_t* w, const float* s, float* y, int64_t N,
                              int64_t R, int64_t K, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    for (int64_t n = 0; n < N; ++n)
      int8wo_vnni_block<4>(xd[n], KP, w + r * K, s + r, y + n * R + r, K, n == 0 && r + 8 <= r1);
  for (; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) int8wo_vnni_block<1>(xd[n], KP, w + r * K, s + r, y + n * R + r, K, false);
}
#endif

// y = x @ (w * scales)^T by the VNNI kernel where `vnni` and every x row takes it (finite, K <= 2^20), else the fp32 one
static at::Tensor int8wo_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool vnni,
                                const char* name) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), name, ": this CPU has no AVX-512");
#else
  TORCH_CHECK(false, name, ": this CPU has no AVX-512");
#endif
  // w: (out, K / 4) fp32-typed words, each the bits of 4 consecutive int8 weights of its row (inductor's carrier)
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == 4 * w.size(1) && scales.numel() == w.size(0) &&
              w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat &&
              w.is_contiguous(), name, ": x ", x.sizes(), " w ", w.sizes(), " ", w.scalar_type());
  const int64_t N = x.size(0), R = w.size(0), K = x.size(1);
  const int8_t* wp = reinterpret_cast<const int8_t*>(w.const_data_ptr<float>());
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({N, R}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
#if defined(__x86_64__)
  const int64_t KP = (K + 63) / 64 * 64;  // the digits' row, whole 64s
  std::vector<int8_t> digits(vnni ? N * 4 * KP : 0, 0);
  std::vector<Int8woDigits> xd(vnni ? N : 0);
  for (int64_t n = 0; vnni && n < N; ++n) vnni = int8wo_digits(xp + n * K, K, KP, digits.data() + n * 4 * KP, xd[n]);
#endif
  const int threads = op_threads();
  const int64_t rows = rows_per_thread(R, threads);
  const int64_t chunks = (R + rows - 1) / rows;
  auto part = [&](int64_t c) {
#if defined(__x86_64__)
    const int64_t r0 = c * rows, r1 = std::min(R, r0 + rows);
    if (vnni)
      int8wo_vnni_range(xd.data(), KP, wp, sp, yp, N, R, K, r0, r1);
    else
      int8wo_range(xp, wp, sp, yp, N, R, K, r0, r1);
#endif
  };
  run_chunks(chunks, threads, part);
  return y;
}

at::Tensor int8wo_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
#if defined(__x86_64__)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
#else
  static const bool vnni = false;
#endif
  return int8wo_linear(x, w, scales, vnni, "int8wo_rows_linear");
}

// the fp32 kernel alone (what int8wo_rows_linear runs on AVX-512 CPUs without VNNI): for tests and
// benchmarks/int8_op_rate.py to compare
at::Tensor int8wo_rows_linear_fma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return int8wo_linear(x, w, scales, false, "int8wo_rows_linear_fma");
}
// ---- end of int8 weight-only rows

TORCH_LIBRARY(litllm_cpu, m) {
  m.def("row_split_linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_rows_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
  m.def("int8_prompt_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
  m.def("packed_bf16_linear(Tensor x, Tensor w, int out_features) -> Tensor");
  m.def("int8wo_rows_linear_fma(Tensor x, Tensor w, Tensor scales) -> Tensor");  // int8wo's kernel without VNNI
  m.def("int8wo_rows_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");  // int8 weight-only rows
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("row_split_linear", &row_split_linear);
  m.impl("int8_rows_linear", &int8_rows_linear);
  m.impl("int8_prompt_linear", &int8_prompt_linear);
  m.impl("packed_bf16_linear", &packed_bf16_linear);
  m.impl("int8wo_rows_linear_fma", &int8wo_rows_linear_fma);  // int8wo's kernel without VNNI
  m.impl("int8wo_rows_linear", &int8wo_rows_linear);  // int8 weight-only rows
}
