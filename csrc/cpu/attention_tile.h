// Building blocks of the CPU attention kernels (window and Lo-Fi attention): 64-byte vectors, a register-blocked
// GEMM micro-kernel, a vectorised exp and the row operations of a softmax over zero-padded buffers.
//
// The GEMM and the softmax rows (whose selects and register blocks must fit the register file) run in vectors of
// the running variant's width: 64 bytes on AVX-512, 32 on AVX2, 16 otherwise (running_isa); plain loads, stores,
// adds and multiplies use 64-byte vectors everywhere, which the compiler splits into registers without cost.
//
// Everything here is EFFVIT_ALWAYS_INLINE and in an unnamed namespace, so it is compiled inside each per-ISA
// variant of the kernel bodies that use it (cpu_isa.h) and never shared across translation units.
#pragma once

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"

// The vector helpers return 64-byte vectors by value; they are always inlined into the per-ISA variants,
// so no call ever crosses the ABI difference GCC warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace effvit {
namespace {

constexpr int kPad = 32;                 // buffer padding of both dimensions: two float vectors
constexpr int kRows = 4;                 // rows per micro-kernel block
constexpr float kMaskedColumn = -1e30f;  // logit of a padded key column

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// The instruction set whose variant of the kernels runs (cpu_isa.h), read once: the vector code below picks its
// width from it, so each variant runs the width its registers hold.
inline const cpu::CpuIsa running_isa = cpu::cpu_isa();

// One 64-byte vector of the accumulation type (one AVX-512 register; two AVX2 or four SSE ones).
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

template <typename V, typename T>
EFFVIT_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
EFFVIT_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One pass of gemm_nn with vectors of kBytes: a block of four rows by two vectors of C (eight accumulators: enough
// independent FMAs to cover their latency) stays in registers while the K loop streams two vectors of B and
// broadcasts four values of A per step. Eight accumulators and two B vectors must fit the register file, so the
// vector is the instruction set's own width: 64 bytes with AVX-512's 32 registers, 32 with AVX2's 16 and 16 with
// SSE (64-byte vectors on AVX2 spill every accumulator: measured 13x slower).
enum class Start { kZero, kInit, kAccumulate };  // what the accumulators start from

template <int kBytes, bool kTransA, Start kStart, typename acc_t>
EFFVIT_ALWAYS_INLINE void gemm_pass(const acc_t* __restrict__ A, int lda, const acc_t* __restrict__ B, int ldb,
                                    acc_t* __restrict__ C, int ldc, int M, int K, int Ncols,
                                    const acc_t* __restrict__ init) {
  using V = typename VecN<kBytes, acc_t>::type;
  constexpr int L = VecN<kBytes, acc_t>::lanes;
  for (int i = 0; i < M; i += kRows) {
    const acc_t* a0 = A + i * lda;
    int jb = 0;
    for (; jb + 2 * L <= Ncols; jb += 2 * L) {
      V c00 = {}, c10 = {}, c20 = {}, c30 = {}, c01 = {}, c11 = {}, c21 = {}, c31 = {};
      if (kStart != Start::kZero) {
        const acc_t* c0 = (kStart == Start::kInit ? init : C) + i * ldc + jb;
        c00 = vload<V>(c0), c01 = vload<V>(c0 + L);
        c10 = vload<V>(c0 + ldc), c11 = vload<V>(c0 + ldc + L);
        c20 = vload<V>(c0 + 2 * ldc), c21 = vload<V>(c0 + 2 * ldc + L);
        c30 = vload<V>(c0 + 3 * ldc), c31 = vload<V>(c0 + 3 * ldc + L);
      }
      for (int k = 0; k < K; ++k) {
        const V b0 = vload<V>(B + k * ldb + jb), b1 = vload<V>(B + k * ldb + jb + L);
        const acc_t* a = kTransA ? A + k * lda + i : a0 + k;
        const int step = kTransA ? 1 : lda;
        const acc_t x0 = a[0], x1 = a[step], x2 = a[2 * step], x3 = a[3 * step];
        c00 += x0 * b0;
        c01 += x0 * b1;
        c10 += x1 * b0;
        c11 += x1 * b1;
        c20 += x2 * b0;
        c21 += x2 * b1;
        c30 += x3 * b0;
        c31 += x3 * b1;
      }
      acc_t* c = C + i * ldc + jb;
      vstore(c, c00);
      vstore(c + L, c01);
      vstore(c + ldc, c10);
      vstore(c + ldc + L, c11);
      vstore(c + 2 * ldc, c20);
      vstore(c + 2 * ldc + L, c21);
      vstore(c + 3 * ldc, c30);
      vstore(c + 3 * ldc + L, c31);
    }
    if (jb < Ncols) {  // one vector of columns left: four accumulators
      V c0 = {}, c1 = {}, c2 = {}, c3 = {};
      if (kStart != Start::kZero) {
        const acc_t* s0 = (kStart == Start::kInit ? init : C) + i * ldc + jb;
        c0 = vload<V>(s0), c1 = vload<V>(s0 + ldc), c2 = vload<V>(s0 + 2 * ldc), c3 = vload<V>(s0 + 3 * ldc);
      }
      for (int k = 0; k < K; ++k) {
        const V b0 = vload<V>(B + k * ldb + jb);
        const acc_t* a = kTransA ? A + k * lda + i : a0 + k;
        const int step = kTransA ? 1 : lda;
        c0 += a[0] * b0;
        c1 += a[step] * b0;
        c2 += a[2 * step] * b0;
        c3 += a[3 * step] * b0;
      }
      acc_t* c = C + i * ldc + jb;
      vstore(c, c0);
      vstore(c + ldc, c1);
      vstore(c + 2 * ldc, c2);
      vstore(c + 3 * ldc, c3);
    }
  }
}

template <bool kTransA, Start kStart, typename acc_t>
EFFVIT_ALWAYS_INLINE void gemm_dispatch(const acc_t* __restrict__ A, int lda, const acc_t* __restrict__ B, int ldb,
                                        acc_t* __restrict__ C, int ldc, int M, int K, int Ncols,
                                        const acc_t* __restrict__ init) {
  switch (running_isa) {  // the variant running this code: each pass runs where its width is native
    case cpu::CpuIsa::kAvx512: return gemm_pass<64, kTransA, kStart>(A, lda, B, ldb, C, ldc, M, K, Ncols, init);
    case cpu::CpuIsa::kAvx2: return gemm_pass<32, kTransA, kStart>(A, lda, B, ldb, C, ldc, M, K, Ncols, init);
    default: return gemm_pass<16, kTransA, kStart>(A, lda, B, ldb, C, ldc, M, K, Ncols, init);
  }
}

// C[M x Ncols] = A[M x K] @ B[K x Ncols]; M a multiple of kRows, Ncols of 16 (the widest vector's floats).
// With `init`, C = init + A @ B (init laid out like C): the logits start from the bias. With kTransA, A is
// stored transposed ([K x M], row-major), which spares transposing P and dS in the backward.
// With kAccumulate, C += A @ B (C read first; init unused).
template <bool kTransA = false, bool kAccumulate = false, typename acc_t>
EFFVIT_ALWAYS_INLINE void gemm_nn(const acc_t* __restrict__ A, int lda, const acc_t* __restrict__ B, int ldb,
                                  acc_t* __restrict__ C, int ldc, int M, int K, int Ncols,
                                  const acc_t* __restrict__ init = nullptr) {
  if (kAccumulate) {
    gemm_dispatch<kTransA, Start::kAccumulate, acc_t>(A, lda, B, ldb, C, ldc, M, K, Ncols, nullptr);
  } else if (init != nullptr) {
    gemm_dispatch<kTransA, Start::kInit, acc_t>(A, lda, B, ldb, C, ldc, M, K, Ncols, init);
  } else {
    gemm_dispatch<kTransA, Start::kZero, acc_t>(A, lda, B, ldb, C, ldc, M, K, Ncols, nullptr);
  }
}

// exp on a vector of floats of any width (Cephes' expf: 2^n * p(r), |r| <= ln2 / 2, ~1 ulp). Below -87.3 the result
// is subnormal, as torch's exp gives it (a masked weight exp(-100) times an inf value is inf, not 0 * inf = NaN):
// scaled up by 2^64 and back down, so the exponent bits stay valid; exact 0 below float's smallest subnormal.
template <typename V>
EFFVIT_ALWAYS_INLINE V vexp(V x) {
  using I = typename VecN<sizeof(V), int32_t>::type;
  const auto subnormal = x < -87.3f;
  const auto zero = x < -103.98f;
  x = zero ? V{} - 103.98f : x;
  x = x > 88.7f ? V{} + 88.7f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I e = __builtin_convertvector(n, I) + 127;
  e = subnormal ? e + 64 : e;
  const I bits = e << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  V y = p * scale;
  y = subnormal ? y * 5.42101086242752217e-20f : y;  // 2^-64
  return zero ? V{} : y;
}

// log on a vector of positive normal floats (Cephes' logf: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m from a
// polynomial in m - 1, ~1 ulp); NaN lanes stay NaN.
template <typename V>
EFFVIT_ALWAYS_INLINE V vlog(V x) {
  using I = typename VecN<sizeof(V), int32_t>::type;
  I bits;
  std::memcpy(&bits, &x, sizeof(V));
  I e = ((bits >> 23) & 0xff) - 126;        // x = 2^e * m, m in [1/2, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  V m;
  std::memcpy(&m, &bits, sizeof(V));
  const auto low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const V f = low ? m + m - 1.0f : m - 1.0f;  // m - 1 after moving m into [sqrt(1/2), sqrt(2))
  const V z = f * f;
  V p = V{} + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const V ef = __builtin_convertvector(e, V);
  const V y = p * f * z + ef * -2.12194440e-4f - 0.5f * z;
  const V r = f + y + ef * 0.693359375f;
  return x == x ? r : x;
}

// dst[d] = src[d] * mul (restrict: lets the compiler vectorise the conversion and keep mul in a register).
// Whole vectors first where no conversion is needed: with mul a constant 1 the plain loop becomes a memcpy call per
// row, which costs more than the copy at these sizes.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void load_row(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int D, acc_t mul) {
  int d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    for (; d + L <= D; d += L) vstore(dst + d, vload<V>(src + d) * mul);
  }
  for (; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]) * mul;
}

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void store_row(const acc_t* __restrict__ src, scalar_t* __restrict__ dst, int D, acc_t mul) {
  for (int d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * mul);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (a K block into K^T for the logits GEMM).
// With AVX-512, float moves in 16 x 16 blocks, each row of a block one vector, through four rounds of two-vector
// shuffles (round b swaps the off-diagonal b x b sub-blocks of every 2b x 2b block): ~6 instructions per 16
// elements instead of ~8 per element of the scalar copy. That path rounds rows and cols up to multiples of 16:
// the source must be readable, and the destination writable, that far (zero padding transposes to zero padding).
template <typename acc_t>
EFFVIT_ALWAYS_INLINE void transpose(const acc_t* __restrict__ src, int lds, acc_t* __restrict__ dst, int ldd,
                                    int rows, int cols) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (running_isa == cpu::CpuIsa::kAvx512) {
      using V = Vec<float>::type;
      using I = int32_t __attribute__((vector_size(64)));
      // lanes [c * 2b, c * 2b + b) of the low result take the first b lanes of chunk c of each input, the high
      // result the last b; chunk lanes of the second input are 16 further in the shuffle's index space
      static constexpr I lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
      static constexpr I hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
      static constexpr I lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
      static constexpr I hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
      static constexpr I lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
      static constexpr I hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
      static constexpr I lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
      static constexpr I hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
      for (int r0 = 0; r0 < rows; r0 += 16) {
        for (int c0 = 0; c0 < cols; c0 += 16) {
          V m[16];
          for (int r = 0; r < 16; ++r) m[r] = vload<V>(src + int64_t{r0 + r} * lds + c0);
          auto round = [&m](int b, const I& lo, const I& hi) {
            for (int r = 0; r < 16; ++r) {
              if (r & b) continue;
              const V a = m[r], c = m[r + b];
              m[r] = __builtin_shuffle(a, c, lo);
              m[r + b] = __builtin_shuffle(a, c, hi);
            }
          };
          round(8, lo8, hi8);
          round(4, lo4, hi4);
          round(2, lo2, hi2);
          round(1, lo1, hi1);
          for (int c = 0; c < 16; ++c) vstore(dst + int64_t{c0 + c} * ldd + r0, m[c]);
        }
      }
      return;
    }
  }
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < rows; ++r) dst[int64_t{c} * ldd + r] = src[int64_t{r} * lds + c];
}

// Sum and max of a vector's lanes by halving (log2(lanes) dependent steps): a lane-by-lane scalar loop is one
// chain of lanes - 1 dependent adds, which costs more than the vector work of a short softmax row.
template <typename V, typename Op>
EFFVIT_ALWAYS_INLINE auto lane_reduce(const V& v, Op op) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (sizeof(V) == sizeof(T)) {
    return T(v[0]);
  } else {
    using H = typename VecN<sizeof(V) / 2, T>::type;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return lane_reduce(H(op(lo, hi)), op);
  }
}

template <typename V>
EFFVIT_ALWAYS_INLINE auto lane_sum(const V& v) {
  return lane_reduce(v, [](auto a, auto b) { return a + b; });
}

template <typename V>
EFFVIT_ALWAYS_INLINE auto lane_max(const V& v) {
  return lane_reduce(v, [](auto a, auto b) { return a > b ? a : b; });
}

// sum over d < Dp of a[d] * b[d], both zero-padded to Dp (a multiple of the vector width): vector partial sums,
// since a scalar float sum is one long dependency chain the compiler may not reorder.
template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t dot_padded(const acc_t* a, const acc_t* b, int Dp) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V sum = {};
  for (int d = 0; d < Dp; d += L) sum += vload<V>(a + d) * vload<V>(b + d);
  return lane_sum(sum);
}

// out[i] = sum over d < Dp of A[i * lda + d] * x[d] for i < n (rows and x zero-padded to Dp, a multiple of the
// vector width). Sixteen rows' vector products are reduced together by a transpose-and-add tree (four levels of two
// shuffles and an add: each level halves the lanes per row and doubles the rows per vector) instead of a sixteen-lane
// horizontal sum per row.
EFFVIT_ALWAYS_INLINE void dot_rows(const float* A, int lda, const float* x, int Dp, int n, float* out) {
  using V = Vec<float>::type;
  using I = int32_t __attribute__((vector_size(64)));
  static constexpr I lo16 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  static constexpr I lo8 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  static constexpr I lo4 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  static constexpr I lo2 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    V p[16];
    for (int r = 0; r < 16; ++r) {
      V sum = {};
      for (int d = 0; d < Dp; d += 16) sum += vload<V>(A + int64_t{i + r} * lda + d) * vload<V>(x + d);
      p[r] = sum;
    }
    for (int r = 0; r < 8; ++r) p[r] = __builtin_shuffle(p[2 * r], p[2 * r + 1], lo16) +
                                       __builtin_shuffle(p[2 * r], p[2 * r + 1], lo16 + 8);
    for (int r = 0; r < 4; ++r) p[r] = __builtin_shuffle(p[2 * r], p[2 * r + 1], lo8) +
                                       __builtin_shuffle(p[2 * r], p[2 * r + 1], lo8 + 4);
    for (int r = 0; r < 2; ++r) p[r] = __builtin_shuffle(p[2 * r], p[2 * r + 1], lo4) +
                                       __builtin_shuffle(p[2 * r], p[2 * r + 1], lo4 + 2);
    vstore(out + i, __builtin_shuffle(p[0], p[1], lo2) + __builtin_shuffle(p[0], p[1], lo2 + 1));
  }
  for (; i < n; ++i) out[i] = dot_padded(A + int64_t{i} * lda, x, Dp);
}

// float64 (tests and gradcheck): one row at a time.
EFFVIT_ALWAYS_INLINE void dot_rows(const double* A, int lda, const double* x, int Dp, int n, double* out) {
  for (int i = 0; i < n; ++i) out[i] = dot_padded(A + int64_t{i} * lda, x, Dp);
}

// max over a padded row (padded columns hold -1e30, so they never win), in vectors of kBytes.
template <int kBytes, typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t row_max_pass(const acc_t* row, int Np) {
  using V = typename VecN<kBytes, acc_t>::type;
  constexpr int L = VecN<kBytes, acc_t>::lanes;
  V m = vload<V>(row);
  for (int j = L; j < Np; j += L) {
    const V x = vload<V>(row + j);
    m = x > m ? x : m;
  }
  return lane_max(m);
}

template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t row_max(const acc_t* row, int Np) {
  switch (running_isa) {
    case cpu::CpuIsa::kAvx512: return row_max_pass<64>(row, Np);
    case cpu::CpuIsa::kAvx2: return row_max_pass<32>(row, Np);
    default: return row_max_pass<16>(row, Np);
  }
}

// The softmax shift of a row whose columns [real, Np) are padding (kMaskedColumn): its max. When no real column is
// above the padding's logit (a row of -inf, or of logits below -1e30), the padding becomes -inf and the max is the
// real columns' own, so that exp_row gives what torch's softmax gives: NaN for a row of -inf, exact probabilities
// for a row of -1e35.
template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t padded_row_max(acc_t* row, int real, int Np) {
  const acc_t m = row_max(row, Np);
  if (m > static_cast<acc_t>(kMaskedColumn) || real == Np) return m;
  acc_t real_max = -std::numeric_limits<acc_t>::infinity();
  for (int j = 0; j < real; ++j) real_max = row[j] > real_max ? row[j] : real_max;
  std::fill(row + real, row + Np, -std::numeric_limits<acc_t>::infinity());
  return real_max;
}

// row[j] becomes exp(row[j] - shift) in place over a padded row; returns the row's sum. In vectors of kBytes
// (float32) or 64 bytes (float64, plain std::exp).
template <int kBytes, typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t exp_row_pass(acc_t* row, int Np, acc_t shift) {
  constexpr int kWidth = std::is_same_v<acc_t, float> ? kBytes : 64;
  using V = typename VecN<kWidth, acc_t>::type;
  constexpr int L = VecN<kWidth, acc_t>::lanes;
  V sum = {};
  for (int j = 0; j < Np; j += L) {
    V e = vload<V>(row + j) - shift;
    if constexpr (std::is_same_v<acc_t, float>) {
      e = vexp(e);
    } else {
      for (int l = 0; l < L; ++l) e[l] = std::exp(e[l]);
    }
    vstore(row + j, e);
    sum += e;
  }
  return lane_sum(sum);
}

template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t exp_row(acc_t* row, int Np, acc_t shift) {
  switch (running_isa) {
    case cpu::CpuIsa::kAvx512: return exp_row_pass<64>(row, Np, shift);
    case cpu::CpuIsa::kAvx2: return exp_row_pass<32>(row, Np, shift);
    default: return exp_row_pass<16>(row, Np, shift);
  }
}

// The end of n softmax rows, from each row's shift (its max) and sum (>= 1: the largest term is exp(0)):
// inv[i] = 1 / sum[i] and lse[i] = shift[i] + log(sum[i]), in vectors of kBytes (float32; float64 and the last
// few rows one at a time with std::log).
template <int kBytes, typename acc_t>
EFFVIT_ALWAYS_INLINE void finish_rows_pass(const acc_t* sums, const acc_t* shifts, int n, acc_t* inv, acc_t* lse) {
  int i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename VecN<kBytes, float>::type;
    constexpr int L = VecN<kBytes, float>::lanes;
    for (; i + L <= n; i += L) {
      const V sum = vload<V>(sums + i);
      vstore(inv + i, 1.0f / sum);
      vstore(lse + i, vload<V>(shifts + i) + vlog(sum));
    }
  }
  for (; i < n; ++i) {
    inv[i] = acc_t(1) / sums[i];
    lse[i] = shifts[i] + std::log(sums[i]);
  }
}

template <typename acc_t>
EFFVIT_ALWAYS_INLINE void finish_rows(const acc_t* sums, const acc_t* shifts, int n, acc_t* inv, acc_t* lse) {
  switch (running_isa) {
    case cpu::CpuIsa::kAvx512: return finish_rows_pass<64>(sums, shifts, n, inv, lse);
    case cpu::CpuIsa::kAvx2: return finish_rows_pass<32>(sums, shifts, n, inv, lse);
    default: return finish_rows_pass<16>(sums, shifts, n, inv, lse);
  }
}

}  // namespace
}  // namespace effvit
