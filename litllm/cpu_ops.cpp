// litllm's CPU ops (litllm/row_split.py builds and loads them: one library per machine, source and torch version)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
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

// An op of AVX-512 kernels refuses, in one line, a CPU without it (rather than die on an illegal instruction).
static void check_avx512(const char* op) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), op, ": this CPU has no AVX-512");
#else
  TORCH_CHECK(false, op, ": this CPU has no AVX-512");
#endif
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

// ---- fp32 rows kernel (AVX-512): y[b][r] = w[r] . x[b] for the rows r0..r1 of a row-major w (ld floats apart) and
// XROWS rows of x (ldx floats apart; y's ldy apart), what row_split_linear runs on a row-major weight in place of
// MKL's GEMV (one x row) or aten's mm (2-8: a batched decode step). 4 rows at a time, two independent sums each (8
// dependency chains a row of x: FMA latency 4, 2 a cycle), x loaded once per 32 values for the 4; the next 4 rows (the
// next 12 KB of a 768-wide weight) prefetched a line per 16 values, so that each short row (3 KB) starts in cache (8
// rows, or prefetching to L2, two blocks ahead, or non-temporally: no faster, NTA 2.4x slower). On a shared AMX Xeon
// the 134M fp32 step took 2-5% less CPU a token than on MKL's GEMV at 1 and 2 threads in 5 of 5 alternating runs
// (benchmarks/decode_threads.py --row_split_blas); a pass of the matmuls alone read on par (~11.1 GB per CPU-second,
// benchmarks/one_row_matmul.py): both at one core's read rate. Each x row's sums are a one-row call's, in its order:
// a batched row's result is the one-row op's bit for bit.
#if defined(__x86_64__)
template <int ROWS, int XROWS>
__attribute__((target("avx512f")))
static inline void fp32_rows_block(const float* x, int64_t ldx, const float* w, int64_t ld, int64_t K, float* y,
                                   int64_t ldy, bool prefetch) {
  __m512 a[XROWS][ROWS][2];
  #pragma GCC unroll 4
  for (int b = 0; b < XROWS; ++b)
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j) a[b][j][0] = a[b][j][1] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + ROWS * ld);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (prefetch)
      #pragma GCC unroll 4
      for (int j = 0; j < ROWS; ++j) {
        _mm_prefetch(next + 4 * (j * ld + k), _MM_HINT_T0);
        _mm_prefetch(next + 4 * (j * ld + k + 16), _MM_HINT_T0);
      }
    #pragma GCC unroll 4
    for (int b = 0; b < XROWS; ++b) {
      const __m512 x0 = _mm512_loadu_ps(x + b * ldx + k), x1 = _mm512_loadu_ps(x + b * ldx + k + 16);
      #pragma GCC unroll 4
      for (int j = 0; j < ROWS; ++j) {
        a[b][j][0] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * ld + k), x0, a[b][j][0]);
        a[b][j][1] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * ld + k + 16), x1, a[b][j][1]);
      }
    }
  }
  for (; k < K; k += 16) {  // the last 1-31 values: whole and masked vectors
    const __mmask16 m = static_cast<__mmask16>((1U << std::min<int64_t>(16, K - k)) - 1);
    #pragma GCC unroll 4
    for (int b = 0; b < XROWS; ++b) {
      const __m512 x0 = _mm512_maskz_loadu_ps(m, x + b * ldx + k);
      #pragma GCC unroll 4
      for (int j = 0; j < ROWS; ++j)
        a[b][j][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j * ld + k), x0, a[b][j][0]);
    }
  }
  #pragma GCC unroll 4
  for (int b = 0; b < XROWS; ++b)
    #pragma GCC unroll 4
    for (int j = 0; j < ROWS; ++j) y[b * ldy + j] = _mm512_reduce_add_ps(_mm512_add_ps(a[b][j][0], a[b][j][1]));
}

// y (M, N) rows r0..r1 = x (M, K) @ w^T, M in 1..kMaxXRows. One row: 4 weight rows at a time, the next 4
// prefetched. More: each block of 4 weight rows is read from memory once, by the first group of x rows (which
// prefetches the next block), and from L1 (12-32 KB) by the others; groups of 2 (16 sums and 8 weight vectors in
// registers) and a last odd row.
template <int XROWS>
__attribute__((target("avx512f")))
static void fp32_rows_group(const float* x, int64_t K, const float* w, int64_t ld, float* y, int64_t N, int64_t r,
                            int64_t r1, bool first) {
  if (r + 4 <= r1) fp32_rows_block<4, XROWS>(x, K, w + r * ld, ld, K, y + r, N, first && r + 8 <= r1);
  else for (; r < r1; ++r) fp32_rows_block<1, XROWS>(x, K, w + r * ld, ld, K, y + r, N, false);
}

__attribute__((target("avx512f")))
static void fp32_rows_range(const float* x, int64_t M, int64_t K, const float* w, int64_t ld, float* y, int64_t N,
                            int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 4) {
    int64_t b = 0;
    for (; b + 2 <= M; b += 2) fp32_rows_group<2>(x + b * K, K, w, ld, y + b * N, N, r, r1, b == 0);
    if (b < M) fp32_rows_group<1>(x + b * K, K, w, ld, y + b * N, N, r, r1, b == 0);
  }
}
#endif

// The most x rows row_split_linear multiplies by its kernel (a batched decode step's; a speculative verify's): more
// go to at::linear, a prompt's GEMM
constexpr int64_t kMaxXRows = 8;

static bool has_avx512f() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// y (..., N) = x (..., K) @ w (N, K)^T. One row of fp32 on a row- or column-major w, or up to kMaxXRows rows on a
// row-major w where litllm's kernel runs: the N output rows in one contiguous chunk of whole 16-row groups a thread,
// handed out dynamically (a thread the scheduler holds back leaves its chunk to another); each chunk litllm's AVX-512
// kernel above (row-major w on an AVX-512 CPU, unless `blas`) or one GEMV. Anything else: at::linear.
static at::Tensor row_split(const at::Tensor& x, const at::Tensor& w, bool blas) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "row_split_linear: x has ", x.size(-1),
              " features, w is ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  const bool column_major = w.stride(0) == 1 && w.stride(1) >= N, row_major = w.stride(1) == 1 && w.stride(0) >= K;
  const int64_t ld = column_major ? w.stride(1) : w.stride(0);
  const bool own = row_major && !blas && has_avx512f();  // litllm's kernel, else BLAS's GEMV
  const int64_t M = K == 0 ? 0 : x.numel() / K;  // rows of x
  if (!(M == 1 || (own && M > 1 && M <= kMaxXRows)) || x.scalar_type() != at::kFloat ||
      w.scalar_type() != at::kFloat || N == 0 || K == 0 || !(column_major || row_major) ||
      ld > std::numeric_limits<int>::max() || x.device() != w.device() || !w.device().is_cpu())
    return at::linear(x, w);
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const at::Tensor rows_x = x.contiguous();  // (M, K)
  const float* xp = rows_x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();  // (M, N)
  // 1: each thread's rows one contiguous range (column-major: runs of N/threads weights a row). 4 chunks a thread
  // (shorter runs) read 12% slower (benchmarks/one_row_matmul.py, a shared machine)
  constexpr int64_t kChunks = 1;
  const int threads = op_threads();
  const int64_t rows = threads == 1 ? N  // one chunk
      : std::max<int64_t>(16, ((N + threads * kChunks - 1) / (threads * kChunks) + 15) / 16 * 16);
  const int64_t chunks = (N + rows - 1) / rows;
  auto part = [&](int64_t c) {
    const int64_t n0 = c * rows, n = std::min(N, n0 + rows) - n0;
#if defined(__x86_64__)
    if (own) {
      fp32_rows_range(xp, M, K, wp, w.stride(0), yp, N, n0, n0 + n);
      return;
    }
#endif
    const float one = 1.0f, zero = 0.0f;
    const int inc = 1, lda = static_cast<int>(ld), k = static_cast<int>(K), m = static_cast<int>(n);
    if (column_major)  // BLAS sees the rows n0.. as an (n, K) column-major matrix
      sgemv_("N", &m, &k, &one, wp + n0, &lda, xp, &inc, &zero, yp + n0, &inc);
    else  // and as a (K, n) column-major matrix to transpose
      sgemv_("T", &k, &m, &one, wp + n0 * ld, &lda, xp, &inc, &zero, yp + n0, &inc);
  };
  run_chunks(chunks, threads, part);
  return y;
}

at::Tensor row_split_linear(const at::Tensor& x, const at::Tensor& w) { return row_split(x, w, false); }

// the same split, every chunk MKL's GEMV (what row_split_linear ran before its AVX-512 kernel): for tests and
// benchmarks to compare
at::Tensor row_split_linear_blas(const at::Tensor& x, const at::Tensor& w) { return row_split(x, w, true); }

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

// The same words from weights laid out for int8_packed_rows_linear (16 rows a group, w + 128): group g's two halves
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void group_words_from_packed(const uint8_t* packed, int64_t g, int64_t R, int64_t K, int32_t* words) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int h = 0; h < 2; ++h) {
    const int64_t half = 2 * g + h;  // its 16-row group in `packed`
    const uint8_t* ph = packed + half * 16 * K;
    for (int64_t k = 0; k < K; k += 4)
      _mm512_storeu_si512(words + (k / 2 + h) * 16, 16 * half < R
                          ? _mm512_xor_si512(_mm512_loadu_si512(ph + k * 16), flip) : _mm512_setzero_si512());
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
static void int8_packed_part(const uint8_t* qu, const float* lane_d, const float* x, const int8_t* w, bool prepacked,
                             const float* s, float* y, int64_t N, int64_t g0, int64_t g1, int64_t K, int64_t R,
                             int64_t block) {
  const int64_t words_ints = K / 4 * 32;
  int32_t* words = pack_buffer(words_ints + (block > 0 ? K / block * 32 : K * 32)).data();
  int32_t* more = words + words_ints;  // int8dq: the blocks' starts; int8wo: the fp32 weights
  float* floats = reinterpret_cast<float*>(more);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r = g * kPackRows, v = std::min(kPackRows, R - r);
    const __mmask16 m0 = first_lanes(v), m1 = first_lanes(v - 16);
    if (prepacked) group_words_from_packed(reinterpret_cast<const uint8_t*>(w), g, R, K, words);
    else pack_group_words(w + r * K, v, K, words);
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
  // w: (out, K) int8, or (out, K / 4) fp32-typed words holding 4 consecutive int8 weights of their row each, or
  // (int8dq) (ceil(out / 16), K / 4, 16) words laid out for int8_packed_rows_linear (`prepacked`)
  const bool words = w.scalar_type() == at::kFloat, prepacked = w.dim() == 3;
  TORCH_CHECK(x.dim() == 2 && (w.dim() == 2 || (prepacked && words && block > 0 && w.size(2) == 16)) &&
              (words || w.scalar_type() == at::kChar) && x.size(1) == (words ? 4 : 1) * w.size(1) &&
              (prepacked ? w.size(0) == (scales.numel() + 15) / 16 : scales.numel() == w.size(0)) &&
              x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat && w.is_contiguous() &&
              block >= 0 && (block == 0 || (block % 4 == 0 && x.size(1) % block == 0)),
              "int8_prompt_linear: x ", x.sizes(), " w ", w.sizes(), " ", w.scalar_type(), " block ", block);
  const int64_t N = x.size(0), R = scales.numel(), K = x.size(1);
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
  // packed groups of weight rows, kChunksPerThread chunks a thread, all N rows each (prepacked weights: any N)
  if (prepacked || (N >= (int8_act ? kPackMinRows : kPackMinRows32) && K % 4 == 0)) {
    const int64_t groups = (R + kPackRows - 1) / kPackRows;
    const int64_t per = threads == 1 ? groups : std::max<int64_t>(1, groups / (threads * kChunksPerThread));
    auto part = [&](int64_t c) {
      int8_packed_part(q, d, xp, wp, prepacked, sp, yp, N, c * per, std::min(groups, (c + 1) * per), K, R, block);
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

// bf16 rows times a weight in oneDNN's packed bf16 layout (litllm.packed_bf16.BlockedBf16Linear: the compiled step reads
// the same bytes a prompt's oneDNN GEMM does, no second copy): w (N/W, K/KW, KW/2, W, 2), padded with zeros to whole
// W x KW blocks: W = KW = 64 on AVX512-BF16 CPUs, W = KW = 32 on AMX ones (oneDNN's AMX blocking). Each line of a
// group holds its W outputs x 2 consecutive k (W/16 vectors of 16 outputs x 2 k), and vdpbf16ps multiplies a vector by
// the broadcast pair of x into the 16 outputs' fp32 sums: no horizontal sums, one contiguous stream per W outputs.
#if defined(__x86_64__)
// The first n of V vectors of 16 fp32 sums, rounded to bf16 (vcvtneps2bf16: to nearest even, as at::BFloat16) and
// stored to y: each thread writes its own outputs in bf16, no fp32 output for the calling thread to convert after
template <int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static inline void bf16_store_sums(const __m512 (&sums)[V], uint16_t* y, int64_t n) {
  #pragma GCC unroll 16
  for (int v = 0; v < V && 16 * v < n; ++v) {
    const __mmask16 live = n >= 16 * (v + 1) ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - 16 * v)) - 1);
    _mm256_mask_storeu_epi16(y + 16 * v, live, (__m256i)_mm512_cvtneps_pbh(sums[v]));
  }
}

// R rows of x (a batch of decode rows) times NG consecutive groups of W = 16 L outputs: the weight's loads shared by
// the R rows, R NG L = 16 sums, each group's stream prefetched 1 KB ahead as in bf16_groups_row. One stream without
// the prefetch waited on L3: 2 rows of the 134M model's weights took 1.55x the CPU time of one row's kernel (4
// streams).
template <int R, int L, int NG>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void bf16_group_rows(const int32_t* x, int64_t P, const uint16_t* wg, uint16_t* y, int64_t N, int64_t n) {
  __m512 acc[R][NG * L];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int j = 0; j < NG * L; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh w[NG * L];
    #pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const uint16_t* line = wg + (g * P + p) * 32 * L;
      #pragma GCC unroll 8
      for (int j = 0; j < L; ++j) _mm_prefetch(reinterpret_cast<const char*>(line) + 1024 + 64 * j, _MM_HINT_T0);
      #pragma GCC unroll 8
      for (int j = 0; j < L; ++j) w[g * L + j] = (__m512bh)_mm512_loadu_si512(line + 32 * j);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * P + p]);
      #pragma GCC unroll 16
      for (int j = 0; j < NG * L; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xr);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) bf16_store_sums(acc[r], y + r * N, n);
}

// the `paired` (even) first rows of x times the NG2 groups from g: 4 rows NG4 groups at a time, then 2 rows NG2 groups
template <int L, int NG2, int NG4>
static void bf16_paired_rows(const int32_t* x, int64_t paired, int64_t P, const uint16_t* w, uint16_t* y, int64_t N,
                             int64_t g) {
  constexpr int64_t W = 16 * L;
  int64_t m = 0;
  for (; m + 4 <= paired; m += 4)
    for (int64_t s = g; s < g + NG2; s += NG4)
      bf16_group_rows<4, L, NG4>(x + m * P, P, w + s * P * 2 * W, y + m * N + s * W, N, std::min(NG4 * W, N - s * W));
  for (; m < paired; m += 2)
    bf16_group_rows<2, L, NG2>(x + m * P, P, w + g * P * 2 * W, y + m * N + g * W, N, std::min(NG2 * W, N - g * W));
}

// one row (decoding) times NG consecutive groups of W = 16 L outputs: 2 pairs a step into separate sums (2 NG L
// dependency chains), each group's stream prefetched 1 KB ahead. NG = 1 for 64-output groups (512 bytes a step); 4 for
// AMX's 32-output ones: one stream of them read 9.3 GB per CPU-second on an AMX Xeon, 4 at once 11.5 (the 134M model's
// weights in a standalone loop, 1 thread; 2 streams 10.7, 8 11.8). P, a multiple of KW / 2 >= 16, is even.
template <int L, int NG>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void bf16_groups_row(const int32_t* x, int64_t P, const uint16_t* wg, uint16_t* y, int64_t n) {
  __m512 acc[NG][2][L];
  #pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
    #pragma GCC unroll 16
    for (int j = 0; j < 2 * L; ++j) acc[g][j / L][j % L] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p += 2) {
    #pragma GCC unroll 16
    for (int g = 0; g < NG; ++g) {
      const char* ahead = reinterpret_cast<const char*>(wg + (g * P + p) * 32 * L) + 1024;
      #pragma GCC unroll 8
      for (int j = 0; j < 2 * L; ++j) _mm_prefetch(ahead + 64 * j, _MM_HINT_T0);
    }
    #pragma GCC unroll 2
    for (int s = 0; s < 2; ++s) {
      const __m512bh xs = (__m512bh)_mm512_set1_epi32(x[p + s]);
      #pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) {
        const uint16_t* line = wg + (g * P + p + s) * 32 * L;
        #pragma GCC unroll 8
        for (int j = 0; j < L; ++j)
          acc[g][s][j] = _mm512_dpbf16_ps(acc[g][s][j], (__m512bh)_mm512_loadu_si512(line + 32 * j), xs);
      }
    }
  }
  __m512 sums[NG * L];
  #pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
    #pragma GCC unroll 8
    for (int j = 0; j < L; ++j) sums[g * L + j] = _mm512_add_ps(acc[g][0][j], acc[g][1][j]);
  bf16_store_sums(sums, y, n);
}

// the groups g0..g1 of W = 16 L outputs for M rows (x: each row zero-padded to P pairs): pairs of rows 8 / L groups at
// a time (4 rows half as many), a last odd row NG groups at a time
template <int L, int NG>
static void bf16_blocks(const int32_t* x, int64_t M, int64_t P, const uint16_t* w, uint16_t* y, int64_t N, int64_t g0,
                        int64_t g1) {
  constexpr int64_t W = 16 * L;
  constexpr int NG2 = 8 / L;  // groups a pair of rows takes at once (16 sums); 4 rows take half as many
  const int64_t paired = M - M % 2;
  int64_t g = g0;
  for (; g + NG2 <= g1 && paired > 0; g += NG2) bf16_paired_rows<L, NG2, NG2 / 2>(x, paired, P, w, y, N, g);
  for (; g < g1 && paired > 0; ++g) bf16_paired_rows<L, 1, 1>(x, paired, P, w, y, N, g);
  if (paired == M) return;
  const int32_t* xr = x + paired * P;
  uint16_t* yr = y + paired * N;
  g = g0;
  for (; g + NG <= g1; g += NG)
    bf16_groups_row<L, NG>(xr, P, w + g * P * 2 * W, yr + g * W, std::min(NG * W, N - g * W));
  for (; g < g1; ++g) bf16_groups_row<L, 1>(xr, P, w + g * P * 2 * W, yr + g * W, std::min(W, N - g * W));
}
#endif

at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& w, int64_t N) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "packed_bf16_linear: this CPU has no AVX512-BF16");
#else
  TORCH_CHECK(false, "packed_bf16_linear: this CPU has no AVX512-BF16");
#endif
  const int64_t K = x.size(-1);
  const bool blocking_64 = w.dim() == 5 && w.size(2) == 32 && w.size(3) == 64,  // AVX512-BF16's
      blocking_32 = w.dim() == 5 && w.size(2) == 16 && w.size(3) == 32;  // AMX's
  const int64_t W = blocking_64 ? 64 : 32, KW = W;  // outputs per group, k per block
  TORCH_CHECK((blocking_64 || blocking_32) && w.size(4) == 2 && w.is_contiguous() &&
              w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && w.size(1) * KW >= K &&
              w.size(1) * KW < K + KW && w.size(0) * W >= N && w.size(0) * W < N + W,
              "packed_bf16_linear: x ", x.sizes(), " ", x.scalar_type(), ", w ", w.sizes(), " ", w.scalar_type(),
              ", out_features ", N);
  const int64_t G = w.size(0), P = w.size(1) * KW / 2, M = x.numel() / std::max<int64_t>(K, 1);
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
  // the rows as pairs, zero-padded to whole blocks where K is not a multiple of KW (the weights' padding is zero too)
  std::vector<uint16_t> xpad(K == 2 * P ? 0 : M * P * 2, 0);
  for (int64_t m = 0; m < M && !xpad.empty(); ++m) std::copy(xp + m * K, xp + (m + 1) * K, xpad.data() + m * P * 2);
  const auto* xs = reinterpret_cast<const int32_t*>(xpad.empty() ? xp : xpad.data());
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());  // (..., N) bf16: each thread rounds and stores its own outputs
  const int threads = op_threads();
  const int64_t per = (G + threads - 1) / threads;  // each thread one contiguous range of groups
  auto part = [&](int64_t t) {
#if defined(__x86_64__)
    const auto* ws = reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>());
    auto* ys = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>());
    const int64_t g0 = std::min(G, t * per), g1 = std::min(G, (t + 1) * per);
    if (blocking_64)
      bf16_blocks<4, 1>(xs, M, P, ws, ys, N, g0, g1);
    else
      bf16_blocks<2, 4>(xs, M, P, ws, ys, N, g0, g1);
#endif
  };
  run_chunks(threads, threads, part);
  return y;
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
  check_avx512(name);
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
  m.def("row_split_linear_blas(Tensor x, Tensor w) -> Tensor");  // every chunk MKL's GEMV
  m.def("int8_rows_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
  m.def("int8_prompt_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
  m.def("packed_bf16_linear(Tensor x, Tensor w, int out_features) -> Tensor");
  m.def("int8wo_rows_linear_fma(Tensor x, Tensor w, Tensor scales) -> Tensor");  // int8wo's kernel without VNNI
  m.def("int8wo_rows_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");  // int8 weight-only rows
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("row_split_linear", &row_split_linear);
  m.impl("row_split_linear_blas", &row_split_linear_blas);  // every chunk MKL's GEMV
  m.impl("int8_rows_linear", &int8_rows_linear);
  m.impl("int8_prompt_linear", &int8_prompt_linear);
  m.impl("packed_bf16_linear", &packed_bf16_linear);
  m.impl("int8wo_rows_linear_fma", &int8wo_rows_linear_fma);  // int8wo's kernel without VNNI
  m.impl("int8wo_rows_linear", &int8wo_rows_linear);  // int8 weight-only rows
}

// ---- int8 packed rows (the compiled decode step of int8dq and int8wo layers on AVX-512 VNNI CPUs): y (N, out) fp32 =
// x (N, K) fp32 times int8 weights laid out for one activation row (`litllm.quantize.pack_int8_rows`): w
// (ceil(out / 16), K / 4, 16) fp32-typed words, word j of row r of group g holding the row's weights 4j..4j+3 plus 128
// (u8), so that one vector holds 16 outputs' 4 weights and vpdpbusd sums 64 products into 16 output sums with one
// broadcast activation word: no horizontal sums, and a group of 16 rows is one sequential read of 16 K bytes. Rows past
// out (the last group's padding) hold 128 (weight 0). Times an fp32 scale per output row.
// - block > 0 (int8dq): each x row rounded per block as int8_rows_linear rounds it (q8_0's), q times w + 128 in exact
//   int32 sums per block, which start at -128 sum(q) over the block (a broadcast: the same for every row), then times
//   the block's d into fp32 sums: one conversion and one FMA per 16 outputs and block.
// - block == 0 (int8wo): x unrounded, as the 4 signed 8-bit digits of int8wo_rows_linear (`int8wo_digits`): 4 vpdpbusd
//   per 64 weights, the sums combined exactly in int64 per 16 outputs; the same result, bit for bit. A row with a
//   non-finite value: fp32 products of the weights converted (its NaN and inf carried, as an fp32 GEMM's). From 2 x
//   rows, on CPUs with AMX-INT8, through AMX tiles instead (`int8wo_amx_range`, below): the same sums.
// kPackedGroups groups of 16 rows in flight (4 independent sums, 4 sequential reads), each read kPackedPrefetch bytes
// ahead (4 groups and 4 KB read fastest of 2/4/8 and 0-8 KB), times every x row in turn (a batch's or a speculative
// step's few rows: the groups' weights read from memory once, then from L2); the groups in one contiguous range per
// thread, as row_split_linear's rows. On the AMX Xeon, 1 thread, loaded (load average ~4), a
// pass over the 134M Llama's int8 weights (104 MB, held in L3) read 1.27x (int8dq) and 1.23x (int8wo) the row-major
// kernels' GB per CPU-second, a 2 MB weight in L2 1.33x / 1.25x (benchmarks/int8_op_rate.py, "model" and "hot").
constexpr int kPackedGroups = 4;
constexpr int64_t kPackedPrefetch = 4096;
#if defined(__x86_64__)
// int8dq: one x row rounded as round_row_q8_u8_vectors rounds it (blocks of whole vectors), as s8 q, with each
// block's d and -128 sum(q) (`start`): no scalar pass over the row (the calling thread rounds it while the others wait)
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void round_row_q8_s8_sums(const float* xr, int64_t K, int64_t block, int8_t* q, float* d, int32_t* start) {
  for (int64_t b = 0; b < K; b += block) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = b; i < b + block; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
    const float db = _mm512_reduce_max_ps(amax) / 127.f, inv = db == 0.f ? 0.f : 1.f / db;
    const __m512 scale = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = b; i < b + block; i += 16) {  // half to even (MXCSR's default), as round_row_q8_u8_vectors
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), scale));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
      sum = _mm512_add_epi32(sum, v);
    }
    d[b / block] = db;
    start[b / block] = -128 * _mm512_reduce_add_epi32(sum);
  }
}

// int8dq: G groups (at w, 16 K bytes apart) times one row's q (s8), each block's d and -128 sum(q) (`start`)
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int8_packed_dq_groups(const uint8_t* w, const int8_t* q, const float* d, const int32_t* start,
                                  const float* s, float* y, int64_t K, int64_t block, int64_t live) {
  const int64_t stride = 16 * K;
  __m512 f[G];
  #pragma GCC unroll 4
  for (int g = 0; g < G; ++g) f[g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K; b += block) {
    __m512i a[G];
    #pragma GCC unroll 4
    for (int g = 0; g < G; ++g) a[g] = _mm512_set1_epi32(start[b / block]);
    #pragma GCC unroll 8
    for (int64_t k = b; k < b + block; k += 4) {
      int32_t q4;
      std::memcpy(&q4, q + k, 4);
      const __m512i qv = _mm512_set1_epi32(q4);
      #pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const uint8_t* wk = w + g * stride + k * 16;
        _mm_prefetch(reinterpret_cast<const char*>(wk) + kPackedPrefetch, _MM_HINT_T0);
        a[g] = _mm512_dpbusd_epi32(a[g], _mm512_loadu_si512(wk), qv);
      }
    }
    const __m512 dv = _mm512_set1_ps(d[b / block]);
    #pragma GCC unroll 4
    for (int g = 0; g < G; ++g) f[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[g]), dv, f[g]);
  }
  #pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const __mmask16 m = static_cast<__mmask16>((1U << std::clamp<int64_t>(live - 16 * g, 0, 16)) - 1);
    _mm512_mask_storeu_ps(y + 16 * g, m, _mm512_mul_ps(f[g], _mm512_maskz_loadu_ps(m, s + 16 * g)));
  }
}

// int8wo: 8 outputs (half of a group's 16 lanes) from their 4 digit sums, exactly: sum_i 256^i a_i - 128 sum(X) in
// int64, then as int8wo_vnni_block: double(dot) 2^-e s, to fp32
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static inline __m256 int8wo_packed_half(const __m512i (&a)[4], int half, __m512i offset_sum, __m512d unscale,
                                        __m512d s) {
  __m512i dot = _mm512_sub_epi64(_mm512_setzero_si512(), offset_sum);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m256i lanes = half ? _mm512_extracti64x4_epi64(a[i], 1) : _mm512_castsi512_si256(a[i]);
    dot = _mm512_add_epi64(dot, _mm512_slli_epi64(_mm512_cvtepi32_epi64(lanes), 8 * i));
  }
  return _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(dot), unscale), s));
}

// int8wo: one row's digits times inputs k0..K of G groups added to their 4 digit sums (a[g][i]: int32 lanes, the
// group's 16 outputs)
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
static inline void int8wo_packed_sums(const uint8_t* w, const Int8woDigits& xd, int64_t KP, int64_t K, int64_t k0,
                                      __m512i (&a)[G][4]) {
  const int64_t stride = 16 * K;
  for (int64_t k = k0; k < K; k += 4) {
    __m512i dv[4];
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      int32_t d4;
      std::memcpy(&d4, xd.digits + i * KP + k, 4);
      dv[i] = _mm512_set1_epi32(d4);
    }
    #pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const uint8_t* wk = w + g * stride + k * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wk) + kPackedPrefetch, _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(wk);
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) a[g][i] = _mm512_dpbusd_epi32(a[g][i], wv, dv[i]);
    }
  }
}

// int8wo: a group's outputs (the first `live` of its 16) from its 4 digit sums
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline))
static inline void int8wo_packed_store(const __m512i (&a)[4], const Int8woDigits& xd, const float* s, float* y,
                                       int64_t live) {
  const __m512i offset_sum = _mm512_set1_epi64(xd.offset_sum);
  const __m512d unscale = _mm512_set1_pd(xd.unscale);
  for (int half = 0; half < 2; ++half) {
    const int64_t n = std::clamp<int64_t>(live - 8 * half, 0, 8);
    const __mmask8 m = static_cast<__mmask8>((1U << n) - 1);
    const __m512d sh = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, s + 8 * half));  // their scales
    _mm256_mask_storeu_ps(y + 8 * half, m, int8wo_packed_half(a, half, offset_sum, unscale, sh));
  }
}

// int8wo: G groups times one row's digits (`int8wo_digits`)
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))
static void int8wo_packed_groups(const uint8_t* w, const Int8woDigits& xd, int64_t KP, const float* s, float* y,
                                 int64_t K, int64_t live) {
  __m512i a[G][4];
  #pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) a[g][i] = _mm512_setzero_si512();
  int8wo_packed_sums<G>(w, xd, KP, K, 0, a);
  #pragma GCC unroll 4
  for (int g = 0; g < G; ++g) int8wo_packed_store(a[g], xd, s + 16 * g, y + 16 * g, live - 16 * g);
}

// int8wo, a row with a non-finite value: one group's weights converted to fp32, times x unrounded (NaN and inf carried)
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int8wo_packed_fp32_group(const uint8_t* w, const float* x, const float* s, float* y, int64_t K,
                                     int64_t live) {
  const __m512i u128 = _mm512_set1_epi32(128);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 4) {
    const __m512i v = _mm512_loadu_si512(w + k * 16);
    for (int t = 0; t < 4; ++t) {  // byte t of each word: the weight k + t of the 16 rows, + 128
      const __m512i wt = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 8 * t), _mm512_set1_epi32(255)), u128);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wt), _mm512_set1_ps(x[k + t]), acc);
    }
  }
  const __mmask16 m = static_cast<__mmask16>((1U << std::min<int64_t>(live, 16)) - 1);
  _mm512_mask_storeu_ps(y, m, _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(m, s)));
}
#endif

// ---- int8wo packed rows by AMX tiles (int8_packed_rows_linear, block 0, from `int8wo_amx_min_rows` x rows, 2
// by default): the packed layout is AMX-INT8's B operand as it is: a group's inputs k..k+63 are 16 rows of 64
// bytes (row k / 4 + t: the 16 outputs' inputs k + 4t..k + 4t + 3, w + 128 as u8), 1 KB contiguous at stride 64; 4
// x rows' digits (`int8wo_digits`: digit i of row n at (4n + i) KP) are the 16 rows of an A tile (s8) at stride KP.
// One tdpbsud adds sum_k digit_i[k] (w_jk + 128) into C[4n + i][j] for the 16 outputs j and the 4 rows: what the VNNI
// kernel adds with 64 vpdpbusd per row, the same int32 sums, so the outputs are bit for bit its. kAmxGroups groups in
// flight (C tiles 0-2, B tiles 3-5, the A tile 6), every row tile of x times a group set before the next set (its
// weights read once). The inputs past the last whole 64 (K % 64, a multiple of 4: a tile there would need a shape of
// its own) go through the VNNI kernel's loop on the stored sums; a row with a non-finite value through the fp32 group
// kernel, as on the VNNI path. The tiles' work does not depend on their rows: on the AMX Xeon (L3-resident weights,
// `benchmarks/int8_op_rate.py --amx`, loaded) one row ran 0.95x the VNNI kernel's speed, 2 rows 1.12x, 4 rows 1.43x, so
// one row keeps the VNNI kernel (`$LITLLM_INT8_AMX`: 1 takes the tiles from one row, 0 never).
#if defined(__x86_64__)
constexpr int kAmxGroups = 3;
constexpr int64_t kAmxMinRows = 2;

// ldtilecfg's 64 bytes (palette 1): each tile's rows and bytes a row
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this CPU has AMX-TILE and AMX-INT8 (cpuid leaf 7: edx bits 24, 25) and Linux lets this process use tile
// data (asked once: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA)
static bool amx_int8_granted() {
  static const bool granted = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// A switch in the environment as litllm.utils.switched_off reads one: 0 for 0/false/no/off, 1 for 1/true/yes/on, -1
// unset or else (read each call, so that a benchmark alternates kernels in one process)
static int env_switch(const char* name) {
  const char* env = std::getenv(name);
  std::string v;
  for (const char* p = env ? env : ""; *p; ++p)
    if (!std::isspace(static_cast<unsigned char>(*p)))
      v += static_cast<char>(std::tolower(static_cast<unsigned char>(*p)));
  if (v == "0" || v == "false" || v == "no" || v == "off") return 0;
  return v == "1" || v == "true" || v == "yes" || v == "on" ? 1 : -1;
}

// From how many x rows int8wo's packed rows take the tiles where AMX-INT8 is granted: kAmxMinRows, `$LITLLM_INT8_AMX`
// on from one row, off never
static int64_t int8wo_amx_min_rows() {
  const int on = env_switch("LITLLM_INT8_AMX");
  return on == 0 ? std::numeric_limits<int64_t>::max() : on == 1 ? 1 : kAmxMinRows;
}

// This thread's tiles (tile config is per thread) for `rows` digit rows, 4 per x row: C (rows x 16 int32), B (16 x
// 64 bytes), A (rows x 64)
__attribute__((target("amx-tile")))
static void int8wo_amx_configure(int rows) {
  AmxTileConfig config;
  for (int t = 0; t < kAmxGroups; ++t) {
    config.rows[t] = static_cast<uint8_t>(rows), config.colsb[t] = 64;
    config.rows[kAmxGroups + t] = 16, config.colsb[kAmxGroups + t] = 64;
  }
  config.rows[2 * kAmxGroups] = static_cast<uint8_t>(rows), config.colsb[2 * kAmxGroups] = 64;
  // gcc's _tile_loadconfig tells the compiler it reads 8 bytes of `config`: without this it may drop the other stores
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// G groups' (at w, 16 K bytes apart) digit sums over inputs 0..K64 (whole 64s) for the digit rows at `digits`
// (stride KP, as many as configured): group g's C into c[g] (rows x 16 int32)
template <int G>
__attribute__((target("amx-tile,amx-int8")))
static void int8wo_amx_sums(const uint8_t* w, const int8_t* digits, int64_t KP, int64_t K, int64_t K64,
                            int32_t (*c)[16][16]) {
  static_assert(G >= 1 && G <= kAmxGroups, "C tiles 0-2, B tiles 3-5");
  const int64_t stride = 16 * K;
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  for (int64_t k = 0; k < K64; k += 64) {
    _tile_loadd(6, digits + k, KP);
    _tile_loadd(3, w + k * 16, 64);
    if constexpr (G > 1) _tile_loadd(4, w + stride + k * 16, 64);
    if constexpr (G > 2) _tile_loadd(5, w + 2 * stride + k * 16, 64);
    _tile_dpbsud(0, 6, 3);
    if constexpr (G > 1) _tile_dpbsud(1, 6, 4);
    if constexpr (G > 2) _tile_dpbsud(2, 6, 5);
  }
  _tile_stored(0, c[0], 64);
  if constexpr (G > 1) _tile_stored(1, c[1], 64);
  if constexpr (G > 2) _tile_stored(2, c[2], 64);
}

// Groups g0..g1 times every x row (`digits`: 4 KP bytes a row, whole tiles of 4 rows where N > 4): per group set,
// each tile of up to 4 rows' sums, then per row and group the inputs past K64 by vpdpbusd and the outputs as the VNNI
// kernel's (`int8wo_packed_store`)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,amx-tile,amx-int8")))
static void int8wo_amx_range(const uint8_t* w, const int8_t* digits, const Int8woDigits* xd, const char* finite,
                             const float* x, int64_t KP, const float* s, float* y, int64_t N, int64_t R, int64_t K,
                             int64_t g0, int64_t g1) {
  const int64_t K64 = K / 64 * 64, tile_rows = std::min<int64_t>(N, 4);
  alignas(64) int32_t c[kAmxGroups][16][16] = {};  // the C tiles stored: (groups, 4 digits x 4 rows, 16 outputs)
  int8wo_amx_configure(4 * static_cast<int>(tile_rows));
  for (int64_t g = g0; g < g1;) {
    const int64_t count = std::min<int64_t>(kAmxGroups, g1 - g);
    const uint8_t* wg = w + 16 * g * K;
    for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
      const int8_t* dn = digits + n0 * 4 * KP;
      if (K64 > 0) {
        if (count == 3) int8wo_amx_sums<3>(wg, dn, KP, K, K64, c);
        else if (count == 2) int8wo_amx_sums<2>(wg, dn, KP, K, K64, c);
        else int8wo_amx_sums<1>(wg, dn, KP, K, K64, c);
      }
      for (int64_t h = 0; h < count; ++h) {
        const int64_t r = 16 * (g + h);
        for (int64_t n = n0; n < std::min(N, n0 + tile_rows); ++n) {
          float* yr = y + n * R + r;
          if (!finite[n]) {
            int8wo_packed_fp32_group(w + r * K, x + n * K, s + r, yr, K, R - r);
            continue;
          }
          __m512i a[1][4];
          #pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) a[0][i] = _mm512_load_si512(c[h][4 * (n - n0) + i]);
          int8wo_packed_sums<1>(w + r * K, xd[n], KP, K, K64, a);
          int8wo_packed_store(a[0], xd[n], s + r, yr, R - r);
        }
      }
    }
    g += count;
  }
  _tile_release();
}
#endif
// ---- end of int8wo packed rows by AMX tiles

at::Tensor int8_packed_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t block) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"),
              "int8_packed_rows_linear: this CPU has no AVX-512 VNNI");
#else
  TORCH_CHECK(false, "int8_packed_rows_linear: this CPU has no AVX-512 VNNI");
#endif
  // w: (ceil(out / 16), K / 4, 16) fp32-typed words; int8wo: K <= 2^16 (each int32 lane sums K / 4 products of 4
  // digits of at most 128 times 255)
  const int64_t R = scales.numel();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == 16 && w.size(0) == (R + 15) / 16 &&
              x.size(1) == 4 * w.size(1) && w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
              scales.scalar_type() == at::kFloat && w.is_contiguous() && block >= 0 &&
              (block > 0 ? block % 4 == 0 && x.size(1) % block == 0 : x.size(1) <= (int64_t{1} << 16)),
              "int8_packed_rows_linear: x ", x.sizes(), " w ", w.sizes(), " scales ", scales.sizes(), " block ", block);
  const int64_t N = x.size(0), K = x.size(1), groups = w.size(0);
  at::Tensor y = at::empty({N, R}, x.options());
  if (N == 0 || R == 0) return y;
#if defined(__x86_64__)
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.const_data_ptr<float>());
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  const float* xp = xc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // every row's activations first: int8dq's q (as the prompt op rounds it: blocks of whole vectors in one vector pass,
  // else q + 128 by the scalar loop, then q), each block's d and -128 sum(q); int8wo's digits (all rows' products then
  // read a group's weights once, from L2 after the first row)
  const int64_t blocks = block > 0 ? K / block : 0, KP = (K + 63) / 64 * 64;
  std::vector<int8_t> q(block > 0 ? N * K : 0);
  std::vector<uint8_t> qu(K);
  std::vector<float> lane_d(block > 0 ? K / 4 : 0), d(N * blocks);
  std::vector<int32_t> start(N * blocks);
  // (permission for tile data asked only where they would run: a process of one-row steps never asks)
  const bool amx = block == 0 && N >= int8wo_amx_min_rows() && amx_int8_granted();
  std::vector<int8_t> digits(block > 0 ? 0 : (amx ? (N + 3) / 4 * 4 : N) * 4 * KP, 0);  // AMX: whole tiles of 4 rows
  std::vector<Int8woDigits> xd(block > 0 ? 0 : N);
  std::vector<char> finite(N, 1);
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xp + n * K;
    if (block > 0 && block % 16 == 0) {  // q8_0's rounding, 16 values a vector (int8dq's 32)
      round_row_q8_s8_sums(xr, K, block, q.data() + n * K, d.data() + n * blocks, start.data() + n * blocks);
    } else if (block > 0) {
      round_row_q8<uint8_t, 128>(xr, K, block, qu.data(), lane_d.data());
      int8_t* qn = q.data() + n * K;
      for (int64_t b = 0; b < K; b += block) {
        int32_t sum = 0;
        for (int64_t i = b; i < b + block; ++i) {
          qn[i] = static_cast<int8_t>(qu[i] ^ 0x80);
          sum += qn[i];
        }
        d[n * blocks + b / block] = lane_d[b / 4];
        start[n * blocks + b / block] = -128 * sum;
      }
    } else {
      finite[n] = int8wo_digits(xr, K, KP, digits.data() + n * 4 * KP, xd[n]);
    }
  }
  // `count` groups from group g times row n
  auto groups_row = [&](int64_t g, int64_t count, int64_t n) {
    const int64_t r = 16 * g, live = R - r;
    const uint8_t* wg = wp + r * K;
    float* yr = yp + n * R + r;
    if (block > 0) {
      const int8_t* qn = q.data() + n * K;
      const float* dn = d.data() + n * blocks;
      const int32_t* sn = start.data() + n * blocks;
      if (count == kPackedGroups) int8_packed_dq_groups<kPackedGroups>(wg, qn, dn, sn, sp + r, yr, K, block, live);
      else int8_packed_dq_groups<1>(wg, qn, dn, sn, sp + r, yr, K, block, live);
    } else if (!finite[n]) {
      for (int64_t h = 0; h < count; ++h)
        int8wo_packed_fp32_group(wg + 16 * h * K, xp + n * K, sp + r + 16 * h, yr + 16 * h, K, live - 16 * h);
    } else if (count == kPackedGroups) {
      int8wo_packed_groups<kPackedGroups>(wg, xd[n], KP, sp + r, yr, K, live);
    } else {
      int8wo_packed_groups<1>(wg, xd[n], KP, sp + r, yr, K, live);
    }
  };
  const int threads = op_threads();
  const int64_t per = rows_per_thread(groups * 16, threads) / 16;  // groups a chunk
  auto part = [&](int64_t c) {
    const int64_t g1 = std::min(groups, (c + 1) * per);
    if (amx) {
      int8wo_amx_range(wp, digits.data(), xd.data(), finite.data(), xp, KP, sp, yp, N, R, K, c * per, g1);
      return;
    }
    for (int64_t g = c * per; g < g1;) {
      const int64_t count = g + kPackedGroups <= g1 ? kPackedGroups : 1;
      for (int64_t n = 0; n < N; ++n) groups_row(g, count, n);
      g += count;
    }
  };
  run_chunks((groups + per - 1) / per, threads, part);
#endif
  return y;
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("int8_packed_rows_linear(Tensor x, Tensor w, Tensor scales, int block) -> Tensor");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("int8_packed_rows_linear", &int8_packed_rows_linear);
}
// ---- end of int8 packed rows

// ---- training: norms and RoPE (litllm.fused_norms: RMSNorm, residual add + RMSNorm, qk-norm + RoPE, forward and
// backward, fp32). Each op is one pass over its rows where autograd through aten's ops makes 5-10 (each a fresh
// tensor), and a weight's gradient is summed over rows per thread, then over threads. Plain loops that the compiler
// vectorizes (`omp simd`) for AVX-512; litllm.fused_norms calls them on CPUs that have it only.
#if defined(__x86_64__)
#define NORM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define NORM_TARGET
#endif

static void check_fp32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", name, " must be a CPU fp32 tensor, got ",
              t.scalar_type(), " on ", t.device());
}

// Rows [0, n) in `chunks` contiguous ranges, part(chunk, begin, end) for each, on torch's threads (inline for one).
template <typename Part>
static int64_t row_chunks(int64_t n, int64_t min_rows, const Part& part) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(op_threads(), n / std::max<int64_t>(1, min_rows)));
  const int64_t rows = (n + chunks - 1) / chunks;
  run_chunks(chunks, static_cast<int>(chunks), [&](int64_t c) { part(c, c * rows, std::min(n, c * rows + rows)); });
  return chunks;
}

// 1 / sqrt(mean(x^2) + eps) of one row of n values.
NORM_TARGET static inline float row_rstd(const float* x, int64_t n, float eps) {
  float ss = 0.f;
  #pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

// The backward of y = x * rstd * w for one row, given dy: dx = rstd * (dy w - xhat mean(dy w xhat)) (+ add, the
// gradient that reaches x along another path), xhat = x * rstd; gw += dy * xhat (gw null: none).
NORM_TARGET static inline void row_norm_backward(const float* dy, const float* x, float rstd, const float* w,
                                                 const float* add, float* dx, float* gw, int64_t n) {
  float dot = 0.f;
  #pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += dy[i] * w[i] * x[i];
  const float c = dot * rstd / static_cast<float>(n);  // mean(dy w xhat)
  if (add) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = add[i] + rstd * (dy[i] * w[i] - x[i] * rstd * c);
  } else {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = rstd * (dy[i] * w[i] - x[i] * rstd * c);
  }
  if (gw) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) gw[i] += dy[i] * x[i] * rstd;
  }
}

// Rows [r0, r1) of rms_norm_forward.
NORM_TARGET static void rms_norm_rows(const float* xp, const float* rp, const float* wp, float* yp, float* sp,
                                      float* rsp, int64_t C, float e, int64_t r0, int64_t r1) {
  const bool add = rp != nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      if (add) {
        float* srow = sp + r * C;
        const float* hr = rp + r * C;
        #pragma omp simd
        for (int64_t i = 0; i < C; ++i) srow[i] = xr[i] + hr[i];
        xr = srow;
      }
      const float inv = row_rstd(xr, C, e);
      rsp[r] = inv;
      float* yr = yp + r * C;
      #pragma omp simd
      for (int64_t i = 0; i < C; ++i) yr[i] = xr[i] * inv * wp[i];
    }
}

// (y, s, rstd): s = x + residual (residual given; else s is x, not returned: an empty tensor), y = s * rstd * w,
// rstd = 1 / sqrt(mean(s^2) + eps) per row. x, residual: (N, C) contiguous; w: (C,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                                const at::Tensor& w, double eps) {
  check_avx512("rms_norm_forward");
  check_fp32(x, "rms_norm_forward", "x");
  check_fp32(w, "rms_norm_forward", "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm_forward: x must be (N, C) contiguous and weight (C,), got ", x.sizes(), " and ", w.sizes());
  const bool add = residual.has_value();
  if (add) {
    check_fp32(*residual, "rms_norm_forward", "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous(), "rms_norm_forward: residual ",
                residual->sizes(), " must be contiguous and of x's shape ", x.sizes());
  }
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({N}, x.options());
  at::Tensor s = add ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* rp = add ? residual->const_data_ptr<float>() : nullptr;
  const float* wp = w.const_data_ptr<float>();
  float *yp = y.mutable_data_ptr<float>(), *sp = add ? s.mutable_data_ptr<float>() : nullptr;
  float* rsp = rstd.mutable_data_ptr<float>();
  const float e = static_cast<float>(eps);
  row_chunks(N, 16, [&](int64_t, int64_t r0, int64_t r1) { rms_norm_rows(xp, rp, wp, yp, sp, rsp, C, e, r0, r1); });
  return {y, s, rstd};
}

// Rows [r0, r1) of rms_norm_backward; gw: this chunk's weight gradient (null: none).
NORM_TARGET static void rms_norm_backward_rows(const float* dyp, const float* xp, const float* rp, const float* wp,
                                               const float* ap, float* dxp, float* gw, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    row_norm_backward(dyp + r * C, xp + r * C, rp[r], wp, ap ? ap + r * C : nullptr, dxp + r * C, gw, C);
}

// (dx, dw) of rms_norm_forward: dy, x (N, C) (x: the normalized input, s where a residual was added), rstd (N,);
// dx gets `add` (N, C) added when given (the residual sum's own gradient); dw: (C,), empty unless weight_grad.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                                     const at::Tensor& w, const c10::optional<at::Tensor>& add,
                                                     bool weight_grad) {
  check_avx512("rms_norm_backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && x.is_contiguous() && x.dim() == 2 &&
              rstd.numel() == x.size(0) && w.numel() == x.size(1), "rms_norm_backward: shapes ", dy.sizes(), " ",
              x.sizes(), " ", rstd.sizes(), " ", w.sizes());
  if (add) TORCH_CHECK(add->sizes() == x.sizes() && add->is_contiguous(), "rms_norm_backward: add ", add->sizes());
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int threads = op_threads();
  at::Tensor partial = weight_grad ? at::zeros({threads, C}, x.options()) : at::Tensor();
  const float *dyp = dy.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  const float *rp = rstd.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  const float* ap = add ? add->const_data_ptr<float>() : nullptr;
  float* dxp = dx.mutable_data_ptr<float>();
  float* pp = weight_grad ? partial.mutable_data_ptr<float>() : nullptr;
  const int64_t chunks = row_chunks(N, 16, [&](int64_t c, int64_t r0, int64_t r1) {
    rms_norm_backward_rows(dyp, xp, rp, wp, ap, dxp, pp ? pp + c * C : nullptr, C, r0, r1);
  });
  at::Tensor dw = weight_grad ? (chunks == 1 ? partial[0] : partial.narrow(0, 0, chunks).sum(0)) : at::Tensor();
  return {dx, dw};
}

// One head of RoPE on xn (n values, n even): out[i] = xn[i] cos[i] + xn[(i + n/2) % n] sin[i] (sin's first half
// negated, as litllm.model.rope_cache makes it).
NORM_TARGET static inline void row_rope(const float* xn, const float* cos, const float* sin, float* out, int64_t n) {
  // (both halves in one loop: each element of xn, cos and sin read once, before the step's two stores)
  const int64_t h = n / 2;
  #pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const float a = xn[i], b = xn[i + h];
    out[i] = a * cos[i] + b * sin[i];
    out[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// Its backward: dxn[j] = g[j] cos[j] + g[(j + n/2) % n] sin[(j + n/2) % n].
NORM_TARGET static inline void row_rope_backward(const float* g, const float* cos, const float* sin, float* dxn,
                                                 int64_t n) {
  const int64_t h = n / 2;
  #pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const float a = g[i], b = g[i + h];
    dxn[i] = a * cos[i] + b * sin[i + h];
    dxn[i + h] = b * cos[i + h] + a * sin[i];
  }
}

constexpr int64_t kMaxHeadSize = 1024;

// Rows [r0, r1) (of B * T) of qk_norm_rope_forward.
NORM_TARGET static void qk_forward_rows(const float* src, int64_t sb, int64_t st, const float* cp,
    const float* sp, int64_t cb, int64_t ct, const float* qw, const float* kw, float* qp, float* kp, float* vp,
    float* rp, int64_t T, int64_t nh, int64_t nkv, int64_t hs, float e, int64_t r0, int64_t r1) {
  const bool norm = qw != nullptr;
    float xn[kMaxHeadSize];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* row = src + b * sb + t * st;
      const float *cr = cp + b * cb + t * ct, *sr = sp + b * cb + t * ct;
      for (int64_t hd = 0; hd < nh + nkv; ++hd) {
        const float* x = row + hd * hs;
        float* out = hd < nh ? qp + (r * nh + hd) * hs : kp + (r * nkv + hd - nh) * hs;
        const float* x_in = x;
        if (norm) {
          const float inv = row_rstd(x, hs, e);
          rp[r * (nh + nkv) + hd] = inv;
          const float* wr = hd < nh ? qw : kw;
          #pragma omp simd
          for (int64_t i = 0; i < hs; ++i) xn[i] = x[i] * inv * wr[i];
          x_in = xn;
        }
        row_rope(x_in, cr, sr, out, hs);
      }
      std::memcpy(vp + r * nkv * hs, row + (nh + nkv) * hs, sizeof(float) * nkv * hs);
    }
}

// (q, k, v, rstd) from the fused projection's output qkv (B, T, (nh + 2 nkv) hs), last dim contiguous: each query and
// key head RMS-normalized with its weight (q_w, k_w (hs,); none given: no norm) and rotated by RoPE over the whole
// head, cos/sin (B, T, hs) (any strides, the last 1); q (B, T, nh, hs), k and v (B, T, nkv, hs) contiguous (v a copy);
// rstd (B, T, nh + nkv) (empty without norm).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_forward(
    const at::Tensor& qkv, const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
    const at::Tensor& cos, const at::Tensor& sin, int64_t nh, int64_t nkv, double eps) {
  check_avx512("qk_norm_rope_forward");
  check_fp32(qkv, "qk_norm_rope_forward", "qkv");
  check_fp32(cos, "qk_norm_rope_forward", "cos");
  check_fp32(sin, "qk_norm_rope_forward", "sin");
  const bool norm = q_w.has_value();
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && qkv.size(2) % (nh + 2 * nkv) == 0,
              "qk_norm_rope_forward: qkv must be (B, T, (nh + 2 nkv) hs) with its last dim contiguous, got ",
              qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / (nh + 2 * nkv);
  TORCH_CHECK(hs % 2 == 0 && hs <= kMaxHeadSize && cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T &&
              cos.size(2) == hs && sin.sizes() == cos.sizes() && sin.strides() == cos.strides() && cos.stride(2) == 1,
              "qk_norm_rope_forward: cos/sin must be (B, T, hs) = (", B, ", ", T, ", ", hs, "), got ", cos.sizes());
  if (norm) TORCH_CHECK(k_w.has_value() && q_w->numel() == hs && k_w->numel() == hs && q_w->is_contiguous() &&
                        k_w->is_contiguous(), "qk_norm_rope_forward: q and k norm weights must be (hs,)");
  at::Tensor q = at::empty({B, T, nh, hs}, qkv.options()), k = at::empty({B, T, nkv, hs}, qkv.options());
  at::Tensor v = at::empty({B, T, nkv, hs}, qkv.options());
  at::Tensor rstd = at::empty({norm ? B : 0, T, nh + nkv}, qkv.options());
  const float* src = qkv.const_data_ptr<float>();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  const float* qw = norm ? q_w->const_data_ptr<float>() : nullptr;
  const float* kw = norm ? k_w->const_data_ptr<float>() : nullptr;
  float *qp = q.mutable_data_ptr<float>(), *kp = k.mutable_data_ptr<float>(), *vp = v.mutable_data_ptr<float>();
  float* rp = norm ? rstd.mutable_data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), cb = cos.stride(0), ct = cos.stride(1);
  row_chunks(B * T, 16, [&](int64_t, int64_t r0, int64_t r1) {
    qk_forward_rows(src, sb, st, cp, sp, cb, ct, qw, kw, qp, kp, vp, rp, T, nh, nkv, hs, e, r0, r1);
  });
  return {q, k, v, rstd};
}

// Strides of a (B, T, heads, hs) gradient over its first three dims.
struct Strides4 {
  int64_t b, t, h;
};

// Rows [r0, r1) (of B * T) of qk_norm_rope_backward; pw: this chunk's (2, hs) norm weight gradients (null: no norm).
NORM_TARGET static void qk_backward_rows(const float* gq, const Strides4& sq, const float* gk, const Strides4& sk,
    const float* gv, const Strides4& sv, const float* src, int64_t sb, int64_t st, const float* cp, const float* sp,
    int64_t cb, int64_t ct, const float* qw, const float* kw, const float* rp, float* out, float* pw, int64_t T,
    int64_t nh, int64_t nkv, int64_t hs, int64_t r0, int64_t r1) {
  const bool norm = qw != nullptr;
  const int64_t width = (nh + 2 * nkv) * hs;
    float dxn[kMaxHeadSize];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* row = src + b * sb + t * st;
      const float *cr = cp + b * cb + t * ct, *sr = sp + b * cb + t * ct;
      float* drow = out + r * width;
      for (int64_t hd = 0; hd < nh + nkv; ++hd) {
        const bool is_q = hd < nh;
        const int64_t j = is_q ? hd : hd - nh;
        const Strides4& g = is_q ? sq : sk;
        const float* gr = (is_q ? gq : gk) + b * g.b + t * g.t + j * g.h;
        float* dx = drow + hd * hs;
        if (!norm) {
          row_rope_backward(gr, cr, sr, dx, hs);
          continue;
        }
        row_rope_backward(gr, cr, sr, dxn, hs);
        row_norm_backward(dxn, row + hd * hs, rp[r * (nh + nkv) + hd], is_q ? qw : kw, nullptr, dx,
                          pw + (is_q ? 0 : hs), hs);
      }
      for (int64_t j = 0; j < nkv; ++j)
        std::memcpy(drow + (nh + nkv + j) * hs, gv + b * sv.b + t * sv.t + j * sv.h,
                    sizeof(float) * hs);
    }
}

// (dqkv, dq_w, dk_w) of qk_norm_rope_forward: dq (B, T, nh, hs), dk and dv (B, T, nkv, hs), any strides with the last
// dim contiguous (SDPA's gradients come transposed); dqkv (B, T, (nh + 2 nkv) hs) contiguous; the norm weights'
// gradients empty without norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& qkv,
    const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& rstd) {
  check_avx512("qk_norm_rope_backward");
  const bool norm = q_w.has_value();
  const int64_t B = qkv.size(0), T = qkv.size(1), nh = dq.size(2), nkv = dk.size(2), hs = dq.size(3);
  TORCH_CHECK(dq.dim() == 4 && dk.dim() == 4 && dv.dim() == 4 && dq.stride(3) == 1 && dk.stride(3) == 1 &&
              dv.stride(3) == 1 && dq.size(0) == B && dq.size(1) == T && dk.sizes() == dv.sizes() &&
              dk.size(0) == B && dk.size(1) == T && dk.size(3) == hs && qkv.size(2) == (nh + 2 * nkv) * hs &&
              qkv.stride(2) == 1 && hs <= kMaxHeadSize, "qk_norm_rope_backward: shapes ", dq.sizes(), " ",
              dk.sizes(), " ", dv.sizes(), " ", qkv.sizes());
  at::Tensor dqkv = at::empty({B, T, (nh + 2 * nkv) * hs}, qkv.options());
  const int threads = op_threads();
  at::Tensor partial = norm ? at::zeros({threads, 2, hs}, qkv.options()) : at::Tensor();
  const float *src = qkv.const_data_ptr<float>(), *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  const float *gq = dq.const_data_ptr<float>(), *gk = dk.const_data_ptr<float>(), *gv = dv.const_data_ptr<float>();
  const float* qw = norm ? q_w->const_data_ptr<float>() : nullptr;
  const float* kw = norm ? k_w->const_data_ptr<float>() : nullptr;
  const float* rp = norm ? rstd.const_data_ptr<float>() : nullptr;
  float* out = dqkv.mutable_data_ptr<float>();
  float* pp = norm ? partial.mutable_data_ptr<float>() : nullptr;
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), cb = cos.stride(0), ct = cos.stride(1);
  const Strides4 sq{dq.stride(0), dq.stride(1), dq.stride(2)}, sk{dk.stride(0), dk.stride(1), dk.stride(2)};
  const Strides4 sv{dv.stride(0), dv.stride(1), dv.stride(2)};
  const int64_t chunks = row_chunks(B * T, 16, [&](int64_t c, int64_t r0, int64_t r1) {
    qk_backward_rows(gq, sq, gk, sk, gv, sv, src, sb, st, cp, sp, cb, ct, qw, kw, rp, out, pp ? pp + c * 2 * hs : nullptr,
                     T, nh, nkv, hs, r0, r1);
  });
  at::Tensor dq_w, dk_w;
  if (norm) {
    at::Tensor total = chunks == 1 ? partial[0] : partial.narrow(0, 0, chunks).sum(0);  // (2, hs)
    dq_w = total[0];
    dk_w = total[1];
  }
  return {dqkv, dq_w, dk_w};
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("rms_norm_forward(Tensor x, Tensor? residual, Tensor w, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor rstd, Tensor w, Tensor? add, bool weight_grad) -> "
        "(Tensor, Tensor)");
  m.def("qk_norm_rope_forward(Tensor qkv, Tensor? q_w, Tensor? k_w, Tensor cos, Tensor sin, int nh, int nkv, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_backward(Tensor dq, Tensor dk, Tensor dv, Tensor qkv, Tensor? q_w, Tensor? k_w, Tensor cos, "
        "Tensor sin, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("qk_norm_rope_forward", &qk_norm_rope_forward);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward);
}
// ---- end of training: norms and RoPE

// ---- training: the MoE experts' path (litllm/fused_experts.py)
// Elementwise passes of the sparse MoE dispatch in training, each one kernel over every routed row of every expert
// at once (the rows sorted by expert, as `MoE.sparse_experts` sorts them): SwiGLU times the routing weight forward,
// its backward with the routing weights' gradient, and the sum of each token's k expert outputs (or input
// gradients) back into token order. fp32, contiguous; AVX-512 (checked in Python before use, and by each op).
#if defined(__x86_64__)
// e^x for fp32 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial of r, times 2^n (scalef). Within 2 ulp of
// expf on [-87, 88]; beyond, clamped (a sigmoid of such x is 0 or 1 to fp32 either way).
__attribute__((target("avx512f")))
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// sigmoid(g) = 1 / (1 + e^-g)
__attribute__((target("avx512f")))
static inline __m512 sigmoid512(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// Rows [r0, r1) of a = w * silu(gate) * up, h's row = [gate (I) | up (I)].
__attribute__((target("avx512f")))
static void swiglu_forward_rows(const float* h, const float* w, float* a, int64_t I, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = h + r * 2 * I;
    const float* u = g + I;
    float* ar = a + r * I;
    const __m512 wr = _mm512_set1_ps(w[r]);
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1U << (I - i)) - 1);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
      const __m512 silu = _mm512_mul_ps(gv, sigmoid512(gv));
      _mm512_mask_storeu_ps(ar + i, m, _mm512_mul_ps(_mm512_mul_ps(silu, uv), wr));
    }
  }
}

// Rows [r0, r1) of the backward of a = w * silu(gate) * up given da (the gradient of the unweighted expert output
// times proj's weight, i.e. d(loss)/d(a) / w): dh = w * da * [up * silu'(gate) | silu(gate)], dw = sum(da * silu *
// up) over the row, and da overwritten by w * silu * up (the forward's a, which proj's weight gradient needs).
// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
__attribute__((target("avx512f")))
static void swiglu_backward_rows(const float* h, const float* w, float* da, float* dh, float* dw, int64_t I,
                                 int64_t r0, int64_t r1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = h + r * 2 * I;
    const float* u = g + I;
    float* dar = da + r * I;
    float* dg = dh + r * 2 * I;
    float* du = dg + I;
    const __m512 wr = _mm512_set1_ps(w[r]);
    __m512 dot = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1U << (I - i)) - 1);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
      const __m512 dv = _mm512_maskz_loadu_ps(m, dar + i);
      const __m512 s = sigmoid512(gv);
      const __m512 silu = _mm512_mul_ps(gv, s);
      const __m512 a = _mm512_mul_ps(silu, uv);
      dot = _mm512_fmadd_ps(dv, a, dot);
      const __m512 dvw = _mm512_mul_ps(dv, wr);
      const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
      _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(dvw, uv), dsilu));
      _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(dvw, silu));
      _mm512_mask_storeu_ps(dar + i, m, _mm512_mul_ps(a, wr));
    }
    dw[r] = _mm512_reduce_add_ps(dot);
  }
}

// Rows [t0, t1) of y[t] = sum of rows o[pos[t k + j]], j < k, in ascending pos (expert index) order, as
// `index_add_` of the sorted rows into zeros sums them.
__attribute__((target("avx512f")))
static void combine_rows(const float* o, const int64_t* pos, float* y, int64_t C, int64_t k, int64_t t0, int64_t t1) {
  std::vector<int64_t> p(k);
  for (int64_t t = t0; t < t1; ++t) {
    std::copy(pos + t * k, pos + t * k + k, p.begin());
    std::sort(p.begin(), p.end());
    float* yr = y + t * C;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = C - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1U << (C - c)) - 1);
      __m512 acc = _mm512_maskz_loadu_ps(m, o + p[0] * C + c);
      for (int64_t j = 1; j < k; ++j) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, o + p[j] * C + c));
      _mm512_mask_storeu_ps(yr + c, m, acc);
    }
  }
}
#endif

static void check_rows(const char* op, const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim, op,
              ": ", what, " must be a contiguous fp32 CPU tensor of ", dim, " dimensions, got ", t.sizes(), " ",
              t.scalar_type());
}

// a (M, I) = w (M,) * silu(h[:, :I]) * h[:, I:], h (M, 2I).
at::Tensor moe_swiglu_forward(const at::Tensor& h, const at::Tensor& w) {
  check_avx512("moe_swiglu_forward");
  check_rows("moe_swiglu_forward", h, 2, "h");
  check_rows("moe_swiglu_forward", w, 1, "w");
  TORCH_CHECK(h.size(1) % 2 == 0 && w.size(0) == h.size(0), "moe_swiglu_forward: h ", h.sizes(), ", w ", w.sizes());
  const int64_t M = h.size(0), I = h.size(1) / 2;
  at::Tensor a = at::empty({M, I}, h.options());
#if defined(__x86_64__)
  const float* hp = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { swiglu_forward_rows(hp, wp, ap, I, r0, r1); });
#endif
  return a;
}

// The backward of moe_swiglu_forward: (dh (M, 2I), dw (M,)) from da (M, I) = d(loss)/d(a) / w, which it overwrites
// with a (see swiglu_backward_rows).
std::tuple<at::Tensor, at::Tensor> moe_swiglu_backward(const at::Tensor& h, const at::Tensor& w, at::Tensor& da) {
  check_avx512("moe_swiglu_backward");
  check_rows("moe_swiglu_backward", h, 2, "h");
  check_rows("moe_swiglu_backward", w, 1, "w");
  check_rows("moe_swiglu_backward", da, 2, "da");
  const int64_t M = h.size(0), I = h.size(1) / 2;
  TORCH_CHECK(w.size(0) == M && da.size(0) == M && da.size(1) == I, "moe_swiglu_backward: h ", h.sizes(), ", w ",
              w.sizes(), ", da ", da.sizes());
  at::Tensor dh = at::empty_like(h), dw = at::empty_like(w);
#if defined(__x86_64__)
  const float* hp = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* dap = da.data_ptr<float>();
  float* dhp = dh.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { swiglu_backward_rows(hp, wp, dap, dhp, dwp, I, r0, r1); });
#endif
  return {dh, dw};
}

// y (N, C): y[t] = the sum of o's rows pos[t k .. t k + k) (o (N k, C), the rows sorted by expert), in expert order.
at::Tensor moe_combine(const at::Tensor& o, const at::Tensor& pos, int64_t k) {
  check_avx512("moe_combine");
  check_rows("moe_combine", o, 2, "o");
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.dim() == 1 &&
              k > 0 && pos.size(0) == o.size(0) && pos.size(0) % k == 0, "moe_combine: o ", o.sizes(), ", pos ",
              pos.sizes(), " ", pos.scalar_type(), ", k ", k);
  const int64_t N = pos.size(0) / k, C = o.size(1);
  at::Tensor y = at::empty({N, C}, o.options());
#if defined(__x86_64__)
  const float* op = o.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) { combine_rows(op, pp, yp, C, k, t0, t1); });
#endif
  return y;
}

// out = a @ b, out a view (rows of a larger buffer)
static void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// The experts' blocks of rows: [start, start + counts[e]) for each expert e with routed rows.
static std::vector<std::pair<int64_t, int64_t>> expert_rows(at::IntArrayRef counts) {
  std::vector<std::pair<int64_t, int64_t>> rows;
  int64_t start = 0;
  for (int64_t n : counts) {
    rows.emplace_back(start, start + n);
    start += n;
  }
  return rows;
}

// The forward of SwiGLU experts over tokens sorted by expert (litllm/fused_experts.py): xs (M, C) = x's rows
// `token` (each routed (token, slot), expert by expert), h (M, 2I) = each block times its expert's fc weight (2I, C),
// a = w * silu(gate) * up, o (M, C) = each block of a times its expert's proj weight (C, I), and y (N, C) the sum of
// each token's k rows of o (`pos`: each (token, slot)'s row). Returns (y, xs, h): the backward's inputs. The
// matmuls are at::mm's (MKL's), the same as the experts' module calls run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_experts_forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& token, const at::Tensor& pos, int64_t k,
    at::TensorList fc, at::TensorList proj, at::IntArrayRef counts) {
  check_rows("moe_experts_forward", x, 2, "x");
  TORCH_CHECK(fc.size() == counts.size() && proj.size() == counts.size() && !fc.empty(),
              "moe_experts_forward: ", fc.size(), " fc and ", proj.size(), " proj weights for ", counts.size(),
              " experts");
  const int64_t M = token.size(0), I = fc[0].size(0) / 2, C = x.size(1);
  at::Tensor xs = x.index_select(0, token);
  at::Tensor h = at::empty({M, 2 * I}, x.options());
  at::Tensor o = at::empty({M, C}, x.options());
  const auto rows = expert_rows(counts);
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [r0, r1] = rows[e];
    if (r1 > r0) mm_into(h.slice(0, r0, r1), xs.slice(0, r0, r1), fc[e].t());
  }
  at::Tensor a = moe_swiglu_forward(h, w);
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [r0, r1] = rows[e];
    if (r1 > r0) mm_into(o.slice(0, r0, r1), a.slice(0, r0, r1), proj[e].t());
  }
  return {moe_combine(o, pos, k), xs, h};
}

// The backward of moe_experts_forward from grad_y (N, C): (grad_x (N, C) (empty unless need_x), grad_w (M,) in the
// sorted order, each expert's fc and proj weight gradients (empty lists unless need_weights; an expert without
// rows gets an empty one)).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> moe_experts_backward(
    const at::Tensor& grad_y, const at::Tensor& xs, const at::Tensor& h, const at::Tensor& w,
    const at::Tensor& token, const at::Tensor& pos, int64_t k, at::TensorList fc, at::TensorList proj,
    at::IntArrayRef counts, bool need_x, bool need_weights) {
  const int64_t M = token.size(0), I = h.size(1) / 2, C = xs.size(1);
  at::Tensor grad_o = grad_y.contiguous().index_select(0, token);  // (M, C) unweighted
  at::Tensor grad_a = at::empty({M, I}, xs.options());
  const auto rows = expert_rows(counts);
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [r0, r1] = rows[e];
    if (r1 > r0) mm_into(grad_a.slice(0, r0, r1), grad_o.slice(0, r0, r1), proj[e]);
  }
  auto [grad_h, grad_w] = moe_swiglu_backward(h, w, grad_a);  // grad_a holds a from here on
  std::vector<at::Tensor> grad_fc, grad_proj;
  const at::Tensor empty = at::empty({0}, xs.options());
  at::Tensor grad_xs = need_x ? at::empty({M, C}, xs.options()) : at::Tensor();
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [r0, r1] = rows[e];
    if (need_weights) {
      const bool rows_here = r1 > r0;
      grad_proj.push_back(rows_here ? at::mm(grad_o.slice(0, r0, r1).t(), grad_a.slice(0, r0, r1)) : empty);
      grad_fc.push_back(rows_here ? at::mm(grad_h.slice(0, r0, r1).t(), xs.slice(0, r0, r1)) : empty);
    }
    if (need_x && r1 > r0) mm_into(grad_xs.slice(0, r0, r1), grad_h.slice(0, r0, r1), fc[e]);
  }
  at::Tensor grad_x = need_x ? moe_combine(grad_xs, pos, k) : at::Tensor();
  return {grad_x, grad_w, grad_fc, grad_proj};
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("moe_swiglu_forward(Tensor h, Tensor w) -> Tensor");
  m.def("moe_swiglu_backward(Tensor h, Tensor w, Tensor(a!) da) -> (Tensor, Tensor)");
  m.def("moe_combine(Tensor o, Tensor pos, int k) -> Tensor");
  m.def("moe_experts_forward(Tensor x, Tensor w, Tensor token, Tensor pos, int k, Tensor[] fc, Tensor[] proj, "
        "int[] counts) -> (Tensor, Tensor, Tensor)");
  m.def("moe_experts_backward(Tensor grad_y, Tensor xs, Tensor h, Tensor w, Tensor token, Tensor pos, int k, "
        "Tensor[] fc, Tensor[] proj, int[] counts, bool need_x, bool need_weights) -> "
        "(Tensor, Tensor, Tensor[], Tensor[])");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("moe_swiglu_forward", &moe_swiglu_forward);
  m.impl("moe_swiglu_backward", &moe_swiglu_backward);
  m.impl("moe_combine", &moe_combine);
  m.impl("moe_experts_forward", &moe_experts_forward);
  m.impl("moe_experts_backward", &moe_experts_backward);
}
// ---- end of training: the MoE experts' path

// ---- training: MoE routing (litllm/fused_routing.py)
// Softmax top-k routing of a training step (Qwen3-MoE, Mixtral, OLMoE, gpt-oss), one pass over the router's logits
// (N, E) each way, where autograd through aten's ops runs softmax, topk, the renormalisation's sum and division, the
// sort of the slots by expert (argsort, bincount, the scatter of their places) and the load-balancing loss's second
// softmax and top-k, each a fresh tensor. fp32, contiguous; exp by exp512 (the experts' path's, above).
#if defined(__x86_64__)
using RouteElem = std::pair<float, int64_t>;

// torch.topk's (largest, sorted) own algorithm on one row p (E) (aten's topk_impl_loop: partial_sort where
// k * 64 <= E, else nth_element then a sort of the first k - 1, with its comparator: NaN largest), whose order among
// equal values is that algorithm's.
static void row_topk_as_aten(const float* p, int64_t E, int64_t k, std::vector<RouteElem>& queue, float* val,
                             int64_t* idx) {
  for (int64_t e = 0; e < E; ++e) queue[e] = {p[e], e};
  const auto greater = [](const RouteElem& x, const RouteElem& y) {
    return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
  };
  if (k * 64 <= E) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.begin() + E, greater);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.begin() + E, greater);
    std::sort(queue.begin(), queue.begin() + k - 1, greater);
  }
  for (int64_t j = 0; j < k; ++j) {
    val[j] = queue[j].first;
    idx[j] = queue[j].second;
  }
}

// The k largest of one row of probabilities p (E, >= 0), as torch.topk(k, largest=True, sorted=True) on the CPU picks
// and orders them, ties and NaNs included: k + 1 rounds of a vector max, each taking the largest value not yet taken
// (`taken`: a lane mask per 16 values, so that no scalar store feeds a vector load). Where none of those k + 1 values
// is there twice (and the row holds no NaN), that is torch's answer whatever its algorithm; else `row_topk_as_aten`.
__attribute__((target("avx512f,avx512bw")))
static void row_topk(const float* p, int64_t E, int64_t k, __mmask16* taken, std::vector<RouteElem>& queue,
                     float* val, int64_t* idx) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t blocks = (E + 15) / 16;
  bool ties = false;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v = _mm512_maskz_loadu_ps(first_lanes(E - 16 * b), p + 16 * b);
    ties |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;  // a NaN
    taken[b] = static_cast<__mmask16>(~first_lanes(E - 16 * b));  // the lanes past E: out
  }
  for (int64_t j = 0; j <= k && j < E && !ties; ++j) {  // (k == E: no (k + 1)-th value to tie with)
    __m512 m = minus_inf;
    for (int64_t b = 0; b < blocks; ++b) {  // (masked loads: the last block's lanes past E are not read)
      const __mmask16 open = static_cast<__mmask16>(~taken[b]);
      m = _mm512_mask_max_ps(m, open, m, _mm512_maskz_loadu_ps(open, p + 16 * b));
    }
    const float largest = _mm512_reduce_max_ps(m);
    const __m512 wanted = _mm512_set1_ps(largest);
    int count = 0;
    int64_t first = -1;
    for (int64_t b = 0; b < blocks; ++b) {
      const __mmask16 open = static_cast<__mmask16>(~taken[b]);
      const __mmask16 same = _mm512_mask_cmp_ps_mask(open, _mm512_maskz_loadu_ps(open, p + 16 * b), wanted, _CMP_EQ_OQ);
      count += __builtin_popcount(same);
      if (first < 0 && same) first = 16 * b + __builtin_ctz(same);
    }
    ties = count > 1;
    if (j < k) {
      val[j] = largest;
      idx[j] = first;
      taken[first / 16] |= static_cast<__mmask16>(1U << (first % 16));
    }
  }
  if (ties) row_topk_as_aten(p, E, k, queue, val, idx);
}

// p = softmax(z) of one row of E logits (a NaN among them: a row of NaNs, as torch's softmax gives); sums += p.
__attribute__((target("avx512f")))
static void row_softmax(const float* z, float* p, float* sums, int64_t E) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = minus_inf;
  bool nan = false;
  for (int64_t c = 0; c < E; c += 16) {
    const __m512 v = _mm512_mask_loadu_ps(minus_inf, first_lanes(E - c), z + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    m = _mm512_max_ps(m, v);
  }
  if (nan) {
    std::fill(p, p + E, std::numeric_limits<float>::quiet_NaN());
    for (int64_t e = 0; e < E; ++e) sums[e] += p[e];
    return;
  }
  const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 mask = first_lanes(E - c);
    const __m512 ex = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, z + c), largest)));
    _mm512_mask_storeu_ps(p + c, mask, ex);
    sum = _mm512_add_ps(sum, ex);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 mask = first_lanes(E - c);
    const __m512 pv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p + c), inv);
    _mm512_mask_storeu_ps(p + c, mask, pv);
    _mm512_mask_storeu_ps(sums + c, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sums + c), pv));
  }
}
#endif

static void check_route_rows(const char* op, const at::Tensor& t, at::ScalarType type, at::IntArrayRef shape,
                             const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() && t.sizes() == shape, op, ": ",
              what, " must be a contiguous ", type, " CPU tensor of shape ", shape, ", got ", t.scalar_type(), " ",
              t.sizes());
}

// Softmax top-k routing of logits (N, E): (weights (N, k) the chosen experts' probabilities, divided by their sum
// where `normalize`; chosen (N, k) as torch.topk picks them; probs (N, E), the backward's input; prob_sum (E,) each
// expert's probabilities summed over the rows and assigned (E,) its (token, slot)s, the load-balancing loss's two
// terms; order (N k,) the (token, slot)s (slot-major per token) sorted by expert, tokens in order within an expert,
// as a stable argsort of chosen gives them; pos (N k,) each (token, slot)'s place in that order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_forward(
    const at::Tensor& logits, int64_t k, bool normalize) {
  check_avx512("moe_route_forward");
  check_rows("moe_route_forward", logits, 2, "logits");
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moe_route_forward: k must be in [1, ", E, "] (the experts), got ", k);
  const auto longs = logits.options().dtype(at::kLong);
  at::Tensor weights = at::empty({N, k}, logits.options()), chosen = at::empty({N, k}, longs);
  at::Tensor probs = at::empty({N, E}, logits.options());
  at::Tensor order = at::empty({N * k}, longs), pos = at::empty({N * k}, longs);
  at::Tensor assigned = at::zeros({E}, longs);
  at::Tensor prob_sum = at::zeros({E}, logits.options());
#if defined(__x86_64__)
  const float* zp = logits.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* cp = chosen.data_ptr<int64_t>();
  std::vector<float> partial_sums(static_cast<size_t>(std::max(1, op_threads())) * E, 0.f);
  const int64_t chunks = row_chunks(N, 64, [&](int64_t c, int64_t r0, int64_t r1) {
    std::vector<RouteElem> queue(E);
    std::vector<__mmask16> taken((E + 15) / 16);
    float* sums = partial_sums.data() + c * E;
    for (int64_t r = r0; r < r1; ++r) {
      float* p = pp + r * E;
      row_softmax(zp + r * E, p, sums, E);
      float* w = wp + r * k;
      row_topk(p, E, k, taken.data(), queue, w, cp + r * k);
      if (normalize) {
        float s = 0.f;
        for (int64_t j = 0; j < k; ++j) s += w[j];
        for (int64_t j = 0; j < k; ++j) w[j] /= s;
      }
    }
  });
  float* sp = prob_sum.data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = 0; e < E; ++e) sp[e] += partial_sums[c * E + e];
  // a counting sort of the (token, slot)s by expert: stable, as argsort(stable=True)
  int64_t* ap = assigned.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i) ++ap[cp[i]];
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + ap[e - 1];
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* posp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i) {
    const int64_t place = next[cp[i]]++;
    op[place] = i;
    posp[i] = place;
  }
#endif
  return {weights, chosen, probs, prob_sum, assigned, order, pos};
}

// The backward of moe_route_forward: the logits' gradient (N, E) from the weights' (N, k) and prob_sum's (E,). Per
// row: the probabilities' gradient gp (prob_sum's, plus each chosen expert's through the weights: with `normalize`,
// w_j = p_j / S, S the chosen probabilities' sum, so dp_j = (g_j - sum_i g_i w_i) / S), then softmax's backward,
// dz = p (gp - sum_e p_e gp_e).
at::Tensor moe_route_backward(const at::Tensor& grad_weights, const at::Tensor& grad_prob_sum, const at::Tensor& probs,
                              const at::Tensor& chosen, bool normalize) {
  check_avx512("moe_route_backward");
  check_rows("moe_route_backward", probs, 2, "probs");
  const int64_t N = probs.size(0), E = probs.size(1), k = chosen.size(-1);
  check_route_rows("moe_route_backward", chosen, at::kLong, {N, k}, "chosen");
  check_route_rows("moe_route_backward", grad_weights, at::kFloat, {N, k}, "grad_weights");
  check_route_rows("moe_route_backward", grad_prob_sum, at::kFloat, {E}, "grad_prob_sum");
  at::Tensor grad = at::empty({N, E}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const float* gwp = grad_weights.data_ptr<float>();
  const float* gsp = grad_prob_sum.data_ptr<float>();
  const int64_t* cp = chosen.data_ptr<int64_t>();
  float* gp = grad.data_ptr<float>();
  row_chunks(N, 64, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = pp + r * E;
      const float* g = gwp + r * k;
      const int64_t* c = cp + r * k;
      float* dz = gp + r * E;  // the probabilities' gradient first, then the logits'
      std::copy(gsp, gsp + E, dz);
      if (normalize) {
        float s = 0.f, dot = 0.f;
        for (int64_t j = 0; j < k; ++j) s += p[c[j]];
        for (int64_t j = 0; j < k; ++j) dot += g[j] * (p[c[j]] / s);
        for (int64_t j = 0; j < k; ++j) dz[c[j]] += (g[j] - dot) / s;
      } else {
        for (int64_t j = 0; j < k; ++j) dz[c[j]] += g[j];
      }
      float dot = 0.f;
      for (int64_t e = 0; e < E; ++e) dot += p[e] * dz[e];
      for (int64_t e = 0; e < E; ++e) dz[e] = p[e] * (dz[e] - dot);
    }
  });
  return grad;
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("moe_route_forward(Tensor logits, int k, bool normalize) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_route_backward(Tensor grad_weights, Tensor grad_prob_sum, Tensor probs, Tensor chosen, bool normalize) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("moe_route_forward", &moe_route_forward);
  m.impl("moe_route_backward", &moe_route_backward);
}
// ---- end of training: MoE routing

// ---- int4 weight-only rows (litllm.quantize.Int4RowsLinear, torchao.int4wo with bf16 activations on AVX512-BF16
// CPUs): y (M, N) bf16 = x (M, K) bf16 times torchao's asymmetric uint4 weights, w[n, k] = (q - 8) * s + z with a bf16
// scale s and zero z per output and group of `group` inputs (tinygemm's values, unchanged).
// Layout (`litllm.quantize.int4_rows_layout`, made once at load): w (N/32, K/2, 32) uint8, per block of 32 outputs and
// pair of inputs (k, k+1) 32 bytes, byte 2j+t holding q[j, k+t] (low nibble) and q[16+j, k+t] (high nibble): one 32-byte
// load widened to 16-bit lanes gives both halves' 16 outputs x 2 inputs, the pairs of vpdpwssd (and of vdpbf16ps, the
// AMX tiles' kernel below). sz (N/32, K/group, 2, 32) bf16: each block's 32 scales, then 32 zeros, per group.
//
// One row's kernel (and up to 4 rows' where AMX does not run) multiplies in integers: each row's group of inputs as
// int16 in a power-of-two scale (`int4_round_x16`: |x| < 2^15 units), summed by vpdpwssd against the nibbles (q & 15,
// and q & 0xF0 = 16 times the high nibble, unshifted) into int32 sums, exact; then per group y += s * 2^e * sum +
// (z - 8 s) * sum(x), sum(x) the bf16 inputs' own fp32 sum. vpdpwssd does 32 products an instruction at 1.5-2x
// vdpbf16ps's rate on the AMX Xeon (12 independent sums), and its nibbles need no bf16 bits: a 32-byte chunk in ~3.0
// TSC ticks against ~4.9 by vdpbf16ps on bf16 x (weights in L2; tutorials/inference_measurements.md#int4-s37). The
// int16 inputs are bf16's exactly where |x| >= 2^-7 of the group's largest |x| (8 significant bits fit in 15), else
// within 2^-15 of that largest |x|: an output's error <= 2^-15 max|x| sum|s q| over each group, beside the bf16
// output's own rounding (2^-9 of it).
#if defined(__x86_64__)
constexpr int64_t kInt4Ahead = 4096;  // bytes of weights prefetched ahead (past a block's end: the next block's)

// Each row's groups of bf16 x as int16 units of 2^e (xi, (M, K)) and 2^e (xunit, (M, K/group)): e from the group's
// largest exponent, so that its largest |x| < 2^15 units; bf16's 8 significant bits are exact from 2^-7 of it down.
// A group of zeros or subnormals has unit 2^-126; NaN and inf come out as any int16 (their rows' sum(x) is NaN or inf).
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int4_round_x16(const uint16_t* x, int64_t M, int64_t K, int64_t group, int16_t* xi, float* xunit) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* xg = x + m * K + g * group;
      __m512i top = _mm512_setzero_si512();  // the largest biased exponent, as bf16 bits with the sign cleared
      for (int64_t k = 0; k < group; k += 32)
        top = _mm512_max_epu16(top, _mm512_and_si512(_mm512_loadu_si512(xg + k), _mm512_set1_epi16(0x7F80)));
      const int exponent = _mm512_reduce_max_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(
          _mm512_max_epu16(top, _mm512_shuffle_i64x2(top, top, 0x4E)), 0))) >> 7;
      // |x| < 2^(exponent - 126): units of 2^(exponent - 141), kept a normal float (exponent - 141 >= -126)
      const int unit_exponent = std::min(std::max(exponent, 15), 254) - 141;
      const __m512 inverse = _mm512_set1_ps(std::ldexp(1.f, -unit_exponent));
      xunit[m * G + g] = std::ldexp(1.f, unit_exponent);
      for (int64_t k = 0; k < group; k += 16) {  // bf16 -> fp32 (a shift), times 2^-e (exact), to int16 (nearest even)
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + k))), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xi + m * K + g * group + k),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse))));
      }
    }
}

template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void int4_block_rows(const int16_t* xi, int64_t K, const float* xunit, const float* xsum, int64_t G,
                            const uint8_t* w, const uint16_t* sz, int64_t group, float* out) {
  // int32 sums stay exact: |x| < 2^15, a product < 2^15 * 240 (a high nibble unshifted), 128 inputs a group: < 2^30
  constexpr int U = MR == 1 ? 2 : 1;  // independent sums per output vector (vpdpwssd's latency)
  const __m512i low = _mm512_set1_epi16(0x000F), high = _mm512_set1_epi16(0x00F0);
  const int64_t steps = group / 2;
  __m512 y[MR][2];
  #pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) y[m][0] = y[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MR][2][U];
    #pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
      #pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[m][0][u] = acc[m][1][u] = _mm512_setzero_si512();
    const uint8_t* wg = w + g * steps * 32;
    const int32_t* xg = reinterpret_cast<const int32_t*>(xi + g * group);  // int16 pairs (k, k+1)
    for (int64_t p = 0; p < steps; p += U) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + p * 32) + kInt4Ahead, _MM_HINT_T0);
      #pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + (p + u) * 32)));
        const __m512i lo = _mm512_and_si512(q, low), hi = _mm512_and_si512(q, high);
        #pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          const __m512i xb = _mm512_set1_epi32(xg[m * K / 2 + p + u]);
          acc[m][0][u] = _mm512_dpwssd_epi32(acc[m][0][u], lo, xb);
          acc[m][1][u] = _mm512_dpwssd_epi32(acc[m][1][u], hi, xb);
        }
      }
    }
    const uint16_t* sg = sz + g * 64;
    #pragma GCC unroll 4
    for (int h = 0; h < 2; ++h) {  // outputs 16h..16h+15: bf16 -> fp32 is a shift into the high half
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + 16 * h))), 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + 32 + 16 * h))), 16));
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);  // z - 8 s
      const __m512 s_high = h ? _mm512_mul_ps(s, _mm512_set1_ps(1.f / 16)) : s;  // the high nibbles' sums are 16 q's
      #pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        __m512i a = acc[m][h][0];
        if constexpr (U == 2) a = _mm512_add_epi32(a, acc[m][h][1]);
        const __m512 unit_s = _mm512_mul_ps(s_high, _mm512_set1_ps(xunit[m * G + g]));
        y[m][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), unit_s, y[m][h]);
        y[m][h] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[m * G + g]), y[m][h]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(out + m * 32, y[m][0]);
    _mm512_storeu_ps(out + m * 32 + 16, y[m][1]);
  }
}

// each of the M rows' sums over each group of `group` (a multiple of 16) bf16 inputs: 16 lanes a step
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void int4_group_sums(const uint16_t* x, int64_t M, int64_t K, int64_t group, float* xsum) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = k0; k < k0 + group; k += 16)  // bf16 -> fp32: a shift into the high half
        s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k))), 16)));
      xsum[m * (K / group) + k0 / group] = _mm512_reduce_add_ps(s);
    }
}

// `rows` rows of a block's 32 fp32 outputs (`out`, 32 a row) to bf16 (round to nearest even), the first n of each
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void int4_store_rows(const float* out, int64_t rows, int64_t n, uint16_t* y, int64_t N) {
  const __mmask32 live = static_cast<__mmask32>((uint64_t{1} << n) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512i both = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + r * 32)));
    const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + r * 32 + 16));
    _mm512_mask_storeu_epi16(y + r * N, live, _mm512_inserti64x4(both, hi, 1));
  }
}

// The same sums by AMX-BF16 tiles, from kInt4AmxMinRows x rows where AMX is granted (`$LITLLM_INT4_AMX`: 1 from one
// row, 0 never), on x's bf16 values as they are (no int16 rounding). A nibble q becomes the bf16 128 + q by OR-ing in
// 128's bits (its 7 mantissa bits hold q exactly), so sum_k x_k (128 + q) needs no conversion; the group's 136 * sum(x)
// (the 128 and q's offset 8) is folded in once per group: y += s * acc + (z - 136 s) * sum(x). A tile multiply does
// 16 vdpbf16ps' work for up to 16 rows at once: a block's 16 input pairs x 32 outputs (512 bytes of weights) are two B
// tiles (low nibbles: outputs 0-15, high: 16-31; 16 rows of 32 bf16 128 + q), stored to a ring in L1 kInt4AmxAhead
// chunks ahead of the tiles that read them (a tile load right after its stores waits for them); x's rows at the same 32
// inputs are the A tile (read in place, stride K); C the 2 x 16 outputs' fp32 sums over a group, then scaled. Each bf16
// pair's products are exact in fp32 and summed in fp32: the outputs differ from the AVX-512 kernel's by its int16
// inputs and fp32 rounding (tests: the float64 bounds each is held to). Measured (`benchmarks/int4_op_rate.py`, the
// host loaded) against the AVX-512 kernel as it was in session 35 (vdpbf16ps on bf16 x): 2 rows 1.5x, 4 rows 2.2x, 16
// rows 4.7x its speed; one row 0.86-1.00x. Against the int16 kernel (session 37): 2 rows 0.72-0.82x at 1 thread
// (a 2-row compiled step 0.96x, the tiles less CPU in 0 of 9 rounds), 3 rows 0.83-1.20x, 8 rows 1.55x, a 32-token
// prompt 1.31x; so one and two rows keep the int16 kernel.
constexpr int kInt4AmxAhead = 4;  // chunks of 32 inputs unpacked ahead of their tiles, in a ring of 2 * kInt4AmxAhead
constexpr int64_t kInt4AmxMinRows = 3;  // x rows from which the tiles run (`$LITLLM_INT4_AMX=1`: from one)

// Whether this CPU has AMX-BF16 (cpuid leaf 7: edx bit 22) beside AMX-INT8 and tile data is granted
static bool amx_bf16_granted() {
  static const bool granted = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && amx_int8_granted();
  }();
  return granted;
}

// This thread's tiles for `rows` x rows: A 0 (rows x 32 bf16), B 1-2 (16 pairs x 16 outputs x 2 bf16), C 3-4 (rows x
// 16 fp32)
__attribute__((target("amx-tile")))
static void int4_amx_configure(int rows) {
  AmxTileConfig config;
  for (int t = 0; t < 5; ++t) config.rows[t] = static_cast<uint8_t>(t == 1 || t == 2 ? 16 : rows), config.colsb[t] = 64;
  asm volatile("" : : "r"(&config) : "memory");  // as int8wo_amx_configure: the compiler must keep all 64 bytes
  _tile_loadconfig(&config);
}

// one chunk (16 input pairs of a block, 512 bytes) as the two B tiles: (2, 16 pairs, 32 bf16)
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline void int4_amx_unpack(const uint8_t* w, uint16_t (*b)[16][32]) {
  const __m512i nibble = _mm512_set1_epi16(0x000F), b128 = _mm512_set1_epi16(0x4300);
  #pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (r % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + r * 32) + kInt4Ahead, _MM_HINT_T0);
    const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * 32)));
    _mm512_store_si512(b[0][r], _mm512_ternarylogic_epi32(q, nibble, b128, 0xEA));
    _mm512_store_si512(b[1][r], _mm512_or_si512(_mm512_srli_epi16(q, 4), b128));
  }
}

// one block's 32 outputs for `rows` rows of x (as configured, <= 16): out (rows, 32) fp32
__attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))
static void int4_amx_block_rows(const uint16_t* x, int64_t K, int rows, const float* xsum, int64_t G,
                                const uint8_t* w, const uint16_t* sz, int64_t group, float* out) {
  alignas(64) uint16_t ring[2 * kInt4AmxAhead][2][16][32];
  alignas(64) float c[2][16][16];  // the C tiles stored: (halves, rows, 16 outputs)
  const int64_t chunks = K / 32, per_group = group / 32;
  for (int m = 0; m < rows; ++m)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out + m * 32 + 16 * h, _mm512_setzero_ps());
  for (int64_t i = 0; i < std::min<int64_t>(kInt4AmxAhead, chunks); ++i)
    int4_amx_unpack(w + i * 512, ring[i % (2 * kInt4AmxAhead)]);
  for (int64_t i = 0; i < chunks; ++i) {
    if (i % per_group == 0) {
      _tile_zero(3);
      _tile_zero(4);
    }
    const auto& b = ring[i % (2 * kInt4AmxAhead)];
    _tile_loadd(0, x + i * 32, K * 2);
    _tile_loadd(1, b[0], 64);
    _tile_loadd(2, b[1], 64);
    _tile_dpbf16ps(3, 0, 1);
    _tile_dpbf16ps(4, 0, 2);
    if (i + kInt4AmxAhead < chunks)
      int4_amx_unpack(w + (i + kInt4AmxAhead) * 512, ring[(i + kInt4AmxAhead) % (2 * kInt4AmxAhead)]);
    if (i % per_group < per_group - 1) continue;
    const int64_t g = i / per_group;
    _tile_stored(3, c[0], 64);
    _tile_stored(4, c[1], 64);
    const uint16_t* sg = sz + g * 64;
    for (int h = 0; h < 2; ++h) {  // y += s * sum + (z - 136 s) * sum(x)
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + 16 * h))), 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + 32 + 16 * h))), 16));
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, z);
      for (int m = 0; m < rows; ++m) {
        float* o = out + m * 32 + 16 * h;
        const __m512 y = _mm512_fmadd_ps(_mm512_load_ps(c[h][m]), s, _mm512_loadu_ps(o));
        _mm512_storeu_ps(o, _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[m * G + g]), y));
      }
    }
  }
}

// blocks b0..b1 times all M rows of x by tiles of up to 16 rows, into y (M, N) bf16
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
static void int4_amx_blocks(const uint16_t* x, int64_t M, int64_t K, const float* xsum, int64_t G, const uint8_t* w,
                            const uint16_t* sz, int64_t group, int64_t N, int64_t b0, int64_t b1, uint16_t* y) {
  alignas(64) float out[16 * 32];
  int configured = 0;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < M; m += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m));
      if (rows != configured) int4_amx_configure(configured = rows);
      int4_amx_block_rows(x + m * K, K, rows, xsum + m * G, G, w + b * K * 16, sz + b * G * 64, group, out);
      int4_store_rows(out, rows, std::min<int64_t>(32, N - b * 32), y + m * N + b * 32, N);
    }
  if (configured) _tile_release();
}
#endif

at::Tensor int4_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                            int64_t N) {
#if defined(__x86_64__)
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vnni"), "int4_rows_linear: this CPU has no AVX512-BF16 and VNNI");
#else
  TORCH_CHECK(false, "int4_rows_linear: this CPU has no AVX512-BF16 and VNNI");
#endif
  const int64_t K = x.size(-1), NB = w.size(0), G = K / std::max<int64_t>(group, 1);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kByte && sz.scalar_type() == at::kBFloat16 &&
              w.dim() == 3 && w.size(1) * 2 == K && w.size(2) == 32 && w.is_contiguous() && sz.is_contiguous() &&
              (group == 32 || group == 64 || group == 128) && K % group == 0 && sz.dim() == 4 &&
              sz.size(0) == NB && sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == 32 && NB * 32 >= N &&
              NB * 32 < N + 32,
              "int4_rows_linear: x ", x.sizes(), " ", x.scalar_type(), ", w ", w.sizes(), " ", w.scalar_type(),
              ", scales ", sz.sizes(), " ", sz.scalar_type(), ", group ", group, ", out_features ", N);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
  std::vector<float> xsum(M * G);  // each row's sum over each group, for the zeros
#if defined(__x86_64__)
  int4_group_sums(xp, M, K, group, xsum.data());
#endif
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>();
  const int threads = op_threads();
  const int64_t per = (NB + threads - 1) / threads;  // each thread one contiguous range of blocks
#if defined(__x86_64__)
  // (permission for tile data asked only where they would run: a process of one-row steps never asks)
  const int amx_switch = env_switch("LITLLM_INT4_AMX");
  const bool amx = amx_switch != 0 && M >= (amx_switch == 1 ? 1 : kInt4AmxMinRows) && amx_bf16_granted();
  // the AVX-512 kernel's int16 inputs (the AMX tiles read x's bf16 in place)
  std::vector<int16_t> xi(amx ? 0 : M * K);
  std::vector<float> xunit(amx ? 0 : M * G);
  if (!amx) int4_round_x16(xp, M, K, group, xi.data(), xunit.data());
#endif
  auto part = [&](int64_t t) {
#if defined(__x86_64__)
    const uint8_t* wp = w.const_data_ptr<uint8_t>();
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(sz.const_data_ptr<at::BFloat16>());
    if (amx) {
      int4_amx_blocks(xp, M, K, xsum.data(), G, wp, sp, group, N, t * per, std::min(NB, (t + 1) * per),
                      reinterpret_cast<uint16_t*>(yp));
      return;
    }
    float out[4 * 32];
    for (int64_t b = t * per; b < std::min(NB, (t + 1) * per); ++b) {
      const uint8_t* wb = wp + b * K * 16;
      const uint16_t* sb = sp + b * G * 64;
      const int64_t n = std::min<int64_t>(32, N - b * 32);
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t rows = std::min<int64_t>(4, M - m);
        const int16_t* xm = xi.data() + m * K;
        const float* um = xunit.data() + m * G;
        const float* sm = xsum.data() + m * G;
        if (rows == 4) int4_block_rows<4>(xm, K, um, sm, G, wb, sb, group, out);
        else if (rows == 3) int4_block_rows<3>(xm, K, um, sm, G, wb, sb, group, out);
        else if (rows == 2) int4_block_rows<2>(xm, K, um, sm, G, wb, sb, group, out);
        else int4_block_rows<1>(xm, K, um, sm, G, wb, sb, group, out);
        int4_store_rows(out, rows, n, reinterpret_cast<uint16_t*>(yp) + m * N + b * 32, N);
      }
    }
#endif
  };
  run_chunks(std::min<int64_t>(threads, NB), threads, part);
  return y;
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("int4_rows_linear(Tensor x, Tensor w, Tensor scale_zero, int group, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("int4_rows_linear", &int4_rows_linear);
}
// ---- end of int4 weight-only rows

// ---- eager bf16 decoding: residual add + RMSNorm (litllm.model.RMSNorm, bf16 CPU inference without autograd)
// One call for what an eager bf16 step otherwise runs as ~9 aten ops a norm (~14 with the residual add; the 134M
// Llama's step has 25 norms): s = x + residual rounded to bf16 (where a residual is given; else s is empty), then
// y = s * rsqrt(mean(s^2) + eps) * w in fp32, rounded to bf16 (round to nearest even), as those ops compute it; the sum
// of squares in another order (16 partial sums): the same values within fp32 rounding.
std::tuple<at::Tensor, at::Tensor> bf16_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                 const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 1 &&
              w.is_contiguous() && x.dim() >= 1 && x.size(-1) == w.numel() &&
              (!residual.has_value() || (residual->scalar_type() == at::kBFloat16 && residual->sizes() == x.sizes())),
              "bf16_rms_norm: x ", x.sizes(), " ", x.scalar_type(), ", weight ", w.sizes(), " ", w.scalar_type());
  const int64_t C = w.numel(), N = x.numel() / std::max<int64_t>(C, 1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor s = residual.has_value() ? at::empty_like(xc) : at::empty({0}, xc.options()), y = at::empty_like(xc);
  const at::BFloat16* xp = xc.const_data_ptr<at::BFloat16>();
  const at::BFloat16* rp = residual.has_value() ? rc.const_data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* wp = w.const_data_ptr<at::BFloat16>();
  at::BFloat16* sp = residual.has_value() ? s.mutable_data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>();
  const float e = static_cast<float>(eps);
  std::vector<float> row(C);
  for (int64_t n = 0; n < N; ++n) {
    float sums[16] = {0.f};
    for (int64_t c = 0; c < C; ++c) {
      float v = static_cast<float>(xp[n * C + c]);
      if (sp) {
        const at::BFloat16 added(v + static_cast<float>(rp[n * C + c]));
        sp[n * C + c] = added;
        v = static_cast<float>(added);
      }
      row[c] = v;
      sums[c % 16] += v * v;
    }
    float total = 0.f;
    for (float part : sums) total += part;
    const float r = 1.f / std::sqrt(total / static_cast<float>(C) + e);
    for (int64_t c = 0; c < C; ++c) yp[n * C + c] = at::BFloat16(row[c] * r * static_cast<float>(wp[c]));
  }
  return {y, s};
}

TORCH_LIBRARY_FRAGMENT(litllm_cpu, m) {
  m.def("bf16_rms_norm(Tensor x, Tensor? residual, Tensor w, float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) {
  m.impl("bf16_rms_norm", &bf16_rms_norm);
}
// ---- end of eager bf16 decoding: residual add + RMSNorm
