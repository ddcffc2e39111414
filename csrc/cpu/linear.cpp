// Non-causal linear attention (EfficientViT's LiteMLA, L2ViT): CPU kernels.
//
// Every product is one GEMM of the micro-kernel in attention_tile.h on blocks of 64 tokens gathered into padded
// float buffers (q, k and v are read through their strides, so (B, N, H, D) and (B, H, D, N) memory need no copy):
//   state:  S = phi(k)^T v, and z = column sums of phi(k) (apart, so Dv = 32 pads to 32 columns, not 64)
//   output: num = phi(q) S, den = phi(q) . z;  out = t * num / max(den + eps, denom_min)
//   backward, per query block: G = [t g / c, dden] (dden the gradient of the denominator, zero where the clamp
//   holds); da = G [S | z]^T; [dS | dz] += phi(q)^T G; per key block: db = [v, 1] [dS | dz]^T, dv = phi(k) dS.
// The state and its gradient are accumulated in float32 (float64 for float64), so half inputs cannot overflow at
// any N. When (image, head) pairs are too few for the threads, tokens are split into chunks whose partial sums are
// added in chunk order, so results never depend on thread timing.
// The forward walks a block of tokens for all heads (of a task's head group) at once: in (B, N, H, D) memory — a
// qkv Linear's output — one token's heads are contiguous, where one head alone is 128 bytes every few kilobytes,
// a new page per token (walking one head at a time over all tokens was 1.5-2x slower at N = 3136 and 50176).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/linear_checks.h"
#include "attention_tile.h"
#include "cpu_isa.h"

namespace effvit {
namespace {

constexpr int kTokens = 64;         // tokens per block
constexpr int kMinChunkTokens = 512;
constexpr int kPrefetchTokens = 8;  // how far ahead gather_heads prefetches
template <typename T>
constexpr int kLineElems = 64 / sizeof(T);

// Forward tasks: (image, token range, head group), `ranges` token ranges of `tokens` (a multiple of kTokens),
// heads in groups of `heads`.
struct HeadSplit {
  int ranges = 1, tokens = 0, groups = 1, heads = 1;
  int64_t tasks(int B) const { return int64_t{B} * ranges * groups; }
};

template <typename scalar_t, typename acc_t>
struct LinearCall {
  int B = 0, H = 0, N = 0, D = 0, Dv = 0;
  int Dr = 0;    // D rounded up to kRows (rows of [S | z] as a GEMM output)
  int Dp = 0;    // D padded to kPad (columns)
  int Dvp = 0;   // Dv + 1 padded to kPad ([S | z] as one block, in the backward)
  int Dsp = 0;   // Dv padded to kPad (S alone, in the forward: z is summed apart, so Dv = 32 is not padded to 64)
  int chunks = 1;       // backward: token chunks per (image, head)
  HeadSplit state_split, output_split;  // forward
  FeatureMap phi = FeatureMap::kRelu;
  acc_t q_scale = 1, k_scale = 1, eps = 0, denom_min = 0;
  const scalar_t *q = nullptr, *k = nullptr, *v = nullptr;
  Strides4 qs, ks, vs;
  const acc_t* temperature = nullptr;
  int64_t pairs() const { return int64_t{B} * H; }
  int64_t tasks() const { return pairs() * chunks; }
  int chunk_begin(int c) const { return static_cast<int>(int64_t{N} * c / chunks); }
};

template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t phi_value(acc_t x, FeatureMap f) {
  if (f == FeatureMap::kRelu) return x < acc_t(0) ? acc_t(0) : x;  // NaN stays NaN, as torch's relu
  // elu(x) + 1 as torch rounds it, (exp(x) - 1) + 1: 0 where exp(x) is below half an ulp of 1, as the reference's
  if (f == FeatureMap::kEluPlusOne) return x > acc_t(0) ? x + acc_t(1) : (std::exp(x) - acc_t(1)) + acc_t(1);
  return x;
}

template <typename acc_t>
EFFVIT_ALWAYS_INLINE acc_t phi_slope(acc_t x, FeatureMap f) {
  if (f == FeatureMap::kRelu) return x > acc_t(0) ? acc_t(1) : acc_t(0);
  if (f == FeatureMap::kEluPlusOne) return x > acc_t(0) ? acc_t(1) : std::exp(x);
  return acc_t(1);
}

// Rows [j0, j0 + n) of a [N, D] slice (element strides sn, sd) times mul into dst [rows, ld]; rows past n and
// columns past D are zero.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void gather_rows(const scalar_t* base, int64_t sn, int64_t sd, int j0, int n, int D, acc_t mul,
                                      acc_t* __restrict__ dst, int ld, int rows) {
  std::fill(dst, dst + int64_t{rows} * ld, acc_t(0));
  if (sd == 1) {
    for (int t = 0; t < n; ++t) load_row(base + (j0 + t) * sn, dst + int64_t{t} * ld, D, mul);
  } else {  // (B, H, D, N) memory: walk tokens innermost, they are contiguous
    for (int d = 0; d < D; ++d) {
      const scalar_t* src = base + d * sd + j0 * sn;
      for (int t = 0; t < n; ++t) dst[int64_t{t} * ld + d] = static_cast<acc_t>(src[t * sn]) * mul;
    }
  }
}

// phi in place over rows [0, n) of a [rows, ld] buffer, one loop per map so each vectorises.
template <typename acc_t>
EFFVIT_ALWAYS_INLINE void apply_phi(acc_t* buf, int ld, int n, int D, FeatureMap f) {
  if (f == FeatureMap::kRelu) {
    for (int t = 0; t < n; ++t) {
      acc_t* __restrict__ row = buf + int64_t{t} * ld;
      for (int d = 0; d < D; ++d) row[d] = row[d] < acc_t(0) ? acc_t(0) : row[d];
    }
  } else if (f == FeatureMap::kEluPlusOne) {
    for (int t = 0; t < n; ++t)
      for (int d = 0; d < D; ++d) buf[int64_t{t} * ld + d] = phi_value(buf[int64_t{t} * ld + d], f);
  }
}

// Rows of src [n, ld] scaled by mul into a [.., D] slice with strides (sn, sd).
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void scatter_rows(const acc_t* src, int ld, int n, int D, scalar_t* base, int64_t sn, int64_t sd,
                                       int j0) {
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < D; ++d) base[(j0 + t) * sn + d * sd] = static_cast<scalar_t>(src[int64_t{t} * ld + d]);
}

template <typename acc_t>
EFFVIT_ALWAYS_INLINE void add_into(acc_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Rows [j0, j0 + n) of `heads` heads (head stride sh; element strides sn, sd) times mul into per-head buffers
// dst + hh * rows * ld, each [rows, ld]; rows past n and columns past D are zero. With sd == 1 a token's heads are
// read together, so (B, N, H, D) memory is read in order; `tokens` is the slice's length (how far prefetching may go).
// With relu, the feature map is applied as the rows are read (phi(0) = 0 keeps the padding zero).
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void gather_heads(const scalar_t* base, int64_t sh, int64_t sn, int64_t sd, int heads, int j0,
                                       int n, int D, acc_t mul, acc_t* __restrict__ dst, int ld, int rows,
                                       int tokens, bool relu = false) {
  const int64_t head_size = int64_t{rows} * ld;
  if (sd == 1) {
    for (int t = 0; t < n; ++t) {
      // a few tokens ahead, into the next block too (of the `tokens` there are); ~10% here, where each token is a
      // new page
      if (j0 + t + kPrefetchTokens < tokens)
        for (int hh = 0; hh < heads; ++hh)
          for (int d = 0; d < D; d += kLineElems<scalar_t>)
            __builtin_prefetch(base + hh * sh + (j0 + t + kPrefetchTokens) * sn + d, 0, 3);
      for (int hh = 0; hh < heads; ++hh) {
        acc_t* __restrict__ row = dst + hh * head_size + int64_t{t} * ld;
        const scalar_t* __restrict__ src = base + hh * sh + (j0 + t) * sn;
        if (relu) {
          for (int d = 0; d < D; ++d) {
            const acc_t x = static_cast<acc_t>(src[d]) * mul;
            row[d] = x < acc_t(0) ? acc_t(0) : x;
          }
        } else {
          load_row(src, row, D, mul);
        }
        std::fill(row + D, row + ld, acc_t(0));
      }
    }
    for (int hh = 0; hh < heads; ++hh)
      std::fill(dst + hh * head_size + int64_t{n} * ld, dst + (hh + 1) * head_size, acc_t(0));
  } else {
    for (int hh = 0; hh < heads; ++hh) {
      gather_rows(base + hh * sh, sn, sd, j0, n, D, mul, dst + hh * head_size, ld, rows);
      if (relu) apply_phi(dst + hh * head_size, ld, n, D, FeatureMap::kRelu);
    }
  }
}

// Asks for rows [j0, j0 + n) of `heads` heads (as gather_heads reads them) into L2, a whole block ahead: issued
// before a block's GEMMs, the next block's rows arrive while they run, where prefetching a few tokens ahead of
// the gather leaves it waiting on memory.
template <typename scalar_t>
EFFVIT_ALWAYS_INLINE void prefetch_block(const scalar_t* base, int64_t sh, int64_t sn, int64_t sd, int heads, int j0,
                                         int n, int D) {
  constexpr int kLine = kLineElems<scalar_t>;
  if (sd == 1) {
    for (int t = 0; t < n; ++t)
      for (int hh = 0; hh < heads; ++hh)
        for (int d = 0; d < D; d += kLine) __builtin_prefetch(base + hh * sh + (j0 + t) * sn + d, 0, 2);
  } else if (sn == 1) {
    for (int hh = 0; hh < heads; ++hh)
      for (int d = 0; d < D; ++d)
        for (int t = 0; t < n; t += kLine) __builtin_prefetch(base + hh * sh + d * sd + j0 + t, 0, 2);
  }
}

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void split_task(const LinearCall<scalar_t, acc_t>& c, const HeadSplit& split, int64_t t, int* b,
                                     int* j_begin, int* j_end, int* h0, int* heads) {
  *b = static_cast<int>(t / (int64_t{split.ranges} * split.groups));
  const int rest = static_cast<int>(t % (int64_t{split.ranges} * split.groups));
  *j_begin = std::min(c.N, (rest / split.groups) * split.tokens);
  *j_end = std::min(c.N, *j_begin + split.tokens);
  *h0 = (rest % split.groups) * split.heads;
  *heads = std::max(0, std::min(split.heads, c.H - *h0));
}

// Partial S and z of one (image, token range, head): [Dr, Dsp] then [Dp]; task t writes its heads' partials at
// partial + (t * heads_per_group + hh) * state_part_size.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE int64_t state_part_size(const LinearCall<scalar_t, acc_t>& c) {
  return int64_t{c.Dr} * c.Dsp + c.Dp;
}

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void state_body(const LinearCall<scalar_t, acc_t>* call, acc_t* partial, int64_t begin,
                                     int64_t end) {
  const LinearCall<scalar_t, acc_t>& c = *call;
  const HeadSplit& split = c.state_split;
  const int64_t part = state_part_size(c), kb_size = int64_t{kTokens} * c.Dp, vb_size = int64_t{kTokens} * c.Dsp;
  std::vector<acc_t> kb(kb_size * split.heads), vb(vb_size * split.heads);
  for (int64_t t = begin; t < end; ++t) {
    int b, j_begin, j_end, h0, heads;
    split_task(c, split, t, &b, &j_begin, &j_end, &h0, &heads);
    acc_t* parts = partial + t * split.heads * part;
    std::fill(parts, parts + split.heads * part, acc_t(0));
    for (int j0 = j_begin; j0 < j_end; j0 += kTokens) {
      const int n = std::min(kTokens, j_end - j0);
      gather_heads(c.k + b * c.ks.b + h0 * c.ks.h, c.ks.h, c.ks.n, c.ks.d, heads, j0, n, c.D, c.k_scale, kb.data(),
                   c.Dp, kTokens, c.N, c.phi == FeatureMap::kRelu);
      gather_heads(c.v + b * c.vs.b + h0 * c.vs.h, c.vs.h, c.vs.n, c.vs.d, heads, j0, n, c.Dv, acc_t(1), vb.data(),
                   c.Dsp, kTokens, c.N);
      if (j0 + kTokens < j_end) {
        const int next = std::min(kTokens, j_end - j0 - kTokens);
        prefetch_block(c.k + b * c.ks.b + h0 * c.ks.h, c.ks.h, c.ks.n, c.ks.d, heads, j0 + kTokens, next, c.D);
        prefetch_block(c.v + b * c.vs.b + h0 * c.vs.h, c.vs.h, c.vs.n, c.vs.d, heads, j0 + kTokens, next, c.Dv);
      }
      for (int hh = 0; hh < heads; ++hh) {
        acc_t* kh = kb.data() + hh * kb_size;
        acc_t* out = parts + hh * part;
        acc_t* __restrict__ z = out + int64_t{c.Dr} * c.Dsp;
        if (c.phi != FeatureMap::kRelu) apply_phi(kh, c.Dp, n, c.D, c.phi);
        // S += phi(k)^T v: phi(k) read transposed (kTransA), tokens as the inner dimension; z += column sums
        gemm_nn<true, true>(kh, c.Dp, vb.data() + hh * vb_size, c.Dsp, out, c.Dsp, c.Dr, n, c.Dsp);
        for (int i = 0; i < n; ++i) {
          const acc_t* __restrict__ row = kh + int64_t{i} * c.Dp;
          for (int d = 0; d < c.Dp; ++d) z[d] += row[d];
        }
      }
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(state_range, state_body)

// out = t * num / max(den + eps, denom_min) with num = phi(q) S, den = phi(q) . z; S padded [pairs, Dp, Dsp] and
// z [pairs, Dp].
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void output_body(const LinearCall<scalar_t, acc_t>* call, const acc_t* S, const acc_t* z,
                                      scalar_t* out, Strides4 os, int64_t begin, int64_t end) {
  const LinearCall<scalar_t, acc_t>& c = *call;
  const HeadSplit& split = c.output_split;
  const int64_t qb_size = int64_t{kTokens} * c.Dp;
  std::vector<acc_t> qb(qb_size * split.heads), num(int64_t{kTokens} * c.Dsp), row_mul(kTokens);
  for (int64_t t = begin; t < end; ++t) {
    int b, j_begin, j_end, h0, heads;
    split_task(c, split, t, &b, &j_begin, &j_end, &h0, &heads);
    for (int j0 = j_begin; j0 < j_end; j0 += kTokens) {
      const int n = std::min(kTokens, j_end - j0);
      gather_heads(c.q + b * c.qs.b + h0 * c.qs.h, c.qs.h, c.qs.n, c.qs.d, heads, j0, n, c.D, c.q_scale, qb.data(),
                   c.Dp, kTokens, c.N, c.phi == FeatureMap::kRelu);
      if (j0 + kTokens < j_end)
        prefetch_block(c.q + b * c.qs.b + h0 * c.qs.h, c.qs.h, c.qs.n, c.qs.d, heads, j0 + kTokens,
                       std::min(kTokens, j_end - j0 - kTokens), c.D);
      for (int hh = 0; hh < heads; ++hh) {
        const int h = h0 + hh;
        const int64_t bh = int64_t{b} * c.H + h;
        acc_t* qh = qb.data() + hh * qb_size;
        if (c.phi != FeatureMap::kRelu) apply_phi(qh, c.Dp, n, c.D, c.phi);
        gemm_nn(qh, c.Dp, S + bh * c.Dp * c.Dsp, c.Dsp, num.data(), c.Dsp, round_up(n, kRows), c.D, c.Dsp);
        const acc_t temp = c.temperature != nullptr ? c.temperature[h] : acc_t(1);
        acc_t* mul = row_mul.data();
        dot_rows(qh, c.Dp, z + bh * c.Dp, c.Dp, n, mul);  // the denominators
        for (int i = 0; i < n; ++i) mul[i] = temp / std::max(mul[i] + c.eps, c.denom_min);
        scalar_t* oh = out + b * os.b + h * os.h;
        if (os.d == 1) {
          for (int i = 0; i < n; ++i) store_row(num.data() + int64_t{i} * c.Dsp, oh + (j0 + i) * os.n, c.Dv, mul[i]);
        } else {  // (B, H, D, N) memory: tokens innermost
          for (int e = 0; e < c.Dv; ++e) {
            scalar_t* dst = oh + e * os.d + j0 * os.n;
            for (int i = 0; i < n; ++i) dst[i * os.n] = static_cast<scalar_t>(num[int64_t{i} * c.Dsp + e] * mul[i]);
          }
        }
      }
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(output_range, output_body)

// Backward over query blocks: grad_q, and the partial [dS | dz] [Dr, Dvp] and dt of task t (in `partial`, dt at
// index Dr * Dvp). state: [S | z] padded [pairs, Dp, Dvp]; state_t: its transpose [pairs, Dvp, Dp].
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void query_grad_body(const LinearCall<scalar_t, acc_t>* call, const acc_t* state,
                                          const acc_t* state_t, const scalar_t* grad_out, Strides4 gs, scalar_t* grad_q,
                                          acc_t* partial, int64_t begin, int64_t end) {
  const LinearCall<scalar_t, acc_t>& c = *call;
  const int64_t part_size = int64_t{c.Dr} * c.Dvp + 1;
  std::vector<acc_t> raw(int64_t{kTokens} * c.Dp), a(int64_t{kTokens} * c.Dp), nd(int64_t{kTokens} * c.Dvp),
      g(int64_t{kTokens} * c.Dvp), da(int64_t{kTokens} * c.Dp), tmp(int64_t{c.Dr} * c.Dvp);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bh = t / c.chunks;
    const int chunk = static_cast<int>(t % c.chunks), b = static_cast<int>(bh / c.H), h = static_cast<int>(bh % c.H);
    const acc_t temp = c.temperature != nullptr ? c.temperature[h] : acc_t(1);
    const acc_t* st = state + bh * c.Dp * c.Dvp;
    const acc_t* stt = state_t + bh * c.Dvp * c.Dp;
    acc_t* part = partial + t * part_size;
    std::fill(part, part + part_size, acc_t(0));
    for (int j0 = c.chunk_begin(chunk), last = c.chunk_begin(chunk + 1); j0 < last; j0 += kTokens) {
      const int n = std::min(kTokens, last - j0), n4 = round_up(n, kRows);
      gather_rows(c.q + b * c.qs.b + h * c.qs.h, c.qs.n, c.qs.d, j0, n, c.D, c.q_scale, raw.data(), c.Dp, kTokens);
      std::copy(raw.begin(), raw.end(), a.begin());
      apply_phi(a.data(), c.Dp, n, c.D, c.phi);
      gemm_nn(a.data(), c.Dp, st, c.Dvp, nd.data(), c.Dvp, n4, c.D, c.Dvp);
      gather_rows(grad_out + b * gs.b + h * gs.h, gs.n, gs.d, j0, n, c.Dv, acc_t(1), g.data(), c.Dvp, kTokens);
      if (j0 + kTokens < last) {
        const int next = std::min(kTokens, last - j0 - kTokens);
        prefetch_block(c.q + b * c.qs.b + h * c.qs.h, 0, c.qs.n, c.qs.d, 1, j0 + kTokens, next, c.D);
        prefetch_block(grad_out + b * gs.b + h * gs.h, 0, gs.n, gs.d, 1, j0 + kTokens, next, c.Dv);
      }
      for (int i = 0; i < n; ++i) {
        acc_t* gi = g.data() + int64_t{i} * c.Dvp;
        const acc_t* ni = nd.data() + int64_t{i} * c.Dvp;
        const acc_t den = ni[c.Dv] + c.eps, cl = std::max(den, c.denom_min);
        acc_t g_dot_num = 0;
        for (int e = 0; e < c.Dv; ++e) g_dot_num += gi[e] * ni[e];
        part[int64_t{c.Dr} * c.Dvp] += g_dot_num / cl;
        const acc_t dnum = temp / cl;
        for (int e = 0; e < c.Dv; ++e) gi[e] *= dnum;
        gi[c.Dv] = den >= c.denom_min ? -temp * g_dot_num / (cl * cl) : acc_t(0);  // the clamp's gradient mask
      }
      // da = G [S | z]^T; grad_q = q_scale * phi'(q * q_scale) * da
      gemm_nn(g.data(), c.Dvp, stt, c.Dp, da.data(), c.Dp, n4, c.Dv + 1, c.Dp);
      for (int i = 0; i < n; ++i)
        for (int d = 0; d < c.D; ++d)
          da[int64_t{i} * c.Dp + d] *= c.q_scale * phi_slope(raw[int64_t{i} * c.Dp + d], c.phi);
      scatter_rows(da.data(), c.Dp, n, c.D, grad_q + (bh * c.N) * c.D, int64_t{c.D}, int64_t{1}, j0);
      // [dS | dz] += phi(q)^T G
      gemm_nn<true>(a.data(), c.Dp, g.data(), c.Dvp, tmp.data(), c.Dvp, c.Dr, n, c.Dvp);
      add_into(part, tmp.data(), int64_t{c.Dr} * c.Dvp);
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(query_grad_range, query_grad_body)

// Backward over key blocks: db = [v, 1] [dS | dz]^T, grad_k = k_scale phi'(k k_scale) db, grad_v = phi(k) dS.
// grads: [dS | dz] padded [pairs, Dp, Dvp]; grads_t its transpose [pairs, Dvp, Dp].
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void key_grad_body(const LinearCall<scalar_t, acc_t>* call, const acc_t* grads,
                                        const acc_t* grads_t, scalar_t* grad_k, scalar_t* grad_v, int64_t begin,
                                        int64_t end) {
  const LinearCall<scalar_t, acc_t>& c = *call;
  const int blocks = (c.N + kTokens - 1) / kTokens;
  std::vector<acc_t> raw(int64_t{kTokens} * c.Dp), kb(int64_t{kTokens} * c.Dp), vb(int64_t{kTokens} * c.Dvp),
      db(int64_t{kTokens} * c.Dp), dv(int64_t{kTokens} * c.Dvp);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bh = t / blocks;
    const int j0 = static_cast<int>(t % blocks) * kTokens, b = static_cast<int>(bh / c.H), h = static_cast<int>(bh % c.H);
    const int n = std::min(kTokens, c.N - j0), n4 = round_up(n, kRows);
    gather_rows(c.k + b * c.ks.b + h * c.ks.h, c.ks.n, c.ks.d, j0, n, c.D, c.k_scale, raw.data(), c.Dp, kTokens);
    std::copy(raw.begin(), raw.end(), kb.begin());
    apply_phi(kb.data(), c.Dp, n, c.D, c.phi);
    gather_rows(c.v + b * c.vs.b + h * c.vs.h, c.vs.n, c.vs.d, j0, n, c.Dv, acc_t(1), vb.data(), c.Dvp, kTokens);
    for (int i = 0; i < n; ++i) vb[int64_t{i} * c.Dvp + c.Dv] = acc_t(1);
    if (t + 1 < end) {  // the next task's block, while this one's products run
      const int64_t nbh = (t + 1) / blocks;
      const int nj0 = static_cast<int>((t + 1) % blocks) * kTokens, nb = static_cast<int>(nbh / c.H);
      const int nh = static_cast<int>(nbh % c.H), nn = std::min(kTokens, c.N - nj0);
      prefetch_block(c.k + nb * c.ks.b + nh * c.ks.h, 0, c.ks.n, c.ks.d, 1, nj0, nn, c.D);
      prefetch_block(c.v + nb * c.vs.b + nh * c.vs.h, 0, c.vs.n, c.vs.d, 1, nj0, nn, c.Dv);
    }
    gemm_nn(vb.data(), c.Dvp, grads_t + bh * c.Dvp * c.Dp, c.Dp, db.data(), c.Dp, n4, c.Dv + 1, c.Dp);
    for (int i = 0; i < n; ++i)
      for (int d = 0; d < c.D; ++d)
        db[int64_t{i} * c.Dp + d] *= c.k_scale * phi_slope(raw[int64_t{i} * c.Dp + d], c.phi);
    scatter_rows(db.data(), c.Dp, n, c.D, grad_k + (bh * c.N) * c.D, int64_t{c.D}, int64_t{1}, j0);
    gemm_nn(kb.data(), c.Dp, grads + bh * c.Dp * c.Dvp, c.Dvp, dv.data(), c.Dvp, n4, c.D, c.Dvp);
    scatter_rows(dv.data(), c.Dvp, n, c.Dv, grad_v + (bh * c.N) * c.Dv, int64_t{c.Dv}, int64_t{1}, j0);
  }
}
EFFVIT_CPU_ISA_VARIANTS(key_grad_range, key_grad_body)

// Token ranges of at least min_tokens (kTokens for the output: one block each), then head groups, until about `want`
// tasks: heads are split only when images and token ranges are too few for the threads.
inline HeadSplit split_heads(int B, int H, int N, int min_tokens, int64_t want) {
  HeadSplit s;
  const int64_t images = std::max(B, 1);
  const int64_t most_ranges = std::max(1, N / min_tokens);
  s.ranges = static_cast<int>(std::clamp<int64_t>((want + images - 1) / images, 1, most_ranges));
  const int blocks = (N + kTokens - 1) / kTokens;
  s.tokens = std::max(1, (blocks + s.ranges - 1) / s.ranges) * kTokens;
  s.ranges = std::max(1, (N + s.tokens - 1) / s.tokens);
  const int64_t groups = std::clamp<int64_t>((want + images * s.ranges - 1) / (images * s.ranges), 1, std::max(H, 1));
  s.heads = static_cast<int>((std::max(H, 1) + groups - 1) / groups);
  s.groups = (std::max(H, 1) + s.heads - 1) / s.heads;
  return s;
}

template <typename scalar_t, typename acc_t>
LinearCall<scalar_t, acc_t> make_call(const LinearInputs& in, double q_scale, double k_scale, double eps,
                                      double denom_min) {
  LinearCall<scalar_t, acc_t> c;
  c.B = static_cast<int>(in.B), c.H = static_cast<int>(in.H), c.N = static_cast<int>(in.N);
  c.D = static_cast<int>(in.D), c.Dv = static_cast<int>(in.Dv);
  c.Dr = round_up(c.D, kRows), c.Dp = round_up(c.D, kPad), c.Dvp = round_up(c.Dv + 1, kPad);
  c.Dsp = round_up(c.Dv, kPad);
  const int64_t want = 4 * int64_t{at::get_num_threads()};
  if (c.pairs() < want)
    c.chunks = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>((want + c.pairs() - 1) / c.pairs(),
                                                                      c.N / kMinChunkTokens), 1, 1 << 16));
  c.state_split = split_heads(c.B, c.H, c.N, 2 * kTokens, want);
  c.output_split = split_heads(c.B, c.H, c.N, kTokens, want);
  c.phi = in.phi;
  c.q_scale = static_cast<acc_t>(q_scale), c.k_scale = static_cast<acc_t>(k_scale);
  c.eps = static_cast<acc_t>(eps);
  c.denom_min = std::isinf(denom_min) && denom_min < 0 ? -std::numeric_limits<acc_t>::infinity()
                                                       : static_cast<acc_t>(denom_min);
  c.q = in.q.data_ptr<scalar_t>(), c.k = in.k.data_ptr<scalar_t>(), c.v = in.v.data_ptr<scalar_t>();
  c.qs = in.qs, c.ks = in.ks, c.vs = in.vs;
  c.temperature = in.temperature.defined() ? in.temperature.data_ptr<acc_t>() : nullptr;
  return c;
}

// Sums the per-chunk partials [pairs, chunks, Dr, Dvp] (plus `extra` trailing values each) in chunk order into
// padded [pairs, Dp, Dvp] blocks (rows past D zero), their transposes [pairs, Dvp, Dp], and the extras [pairs].
template <typename acc_t>
void reduce_partials(const acc_t* partial, int64_t pairs, int chunks, int Dr, int Dp, int Dvp, int extra, acc_t* full,
                     acc_t* full_t, acc_t* extras) {
  const int64_t part = int64_t{Dr} * Dvp + extra;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      acc_t* dst = full + p * Dp * Dvp;
      std::fill(dst, dst + int64_t{Dp} * Dvp, acc_t(0));
      acc_t extra_sum = 0;
      for (int ch = 0; ch < chunks; ++ch) {
        const acc_t* src = partial + (p * chunks + ch) * part;
        for (int64_t i = 0; i < int64_t{Dr} * Dvp; ++i) dst[i] += src[i];
        if (extra > 0) extra_sum += src[int64_t{Dr} * Dvp];
      }
      if (extras != nullptr) extras[p] = extra_sum;
      if (full_t == nullptr) continue;
      acc_t* tr = full_t + p * Dvp * Dp;
      for (int r = 0; r < Dp; ++r)
        for (int e = 0; e < Dvp; ++e) tr[int64_t{e} * Dp + r] = dst[int64_t{r} * Dvp + e];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& temperature,
                                                        c10::string_view feature_map, double q_scale, double k_scale,
                                                        double eps, double denom_min) {
  const LinearInputs in = prepare_linear_inputs(q, k, v, temperature, std::string_view(feature_map.data(), feature_map.size()));
  at::Tensor out = empty_like_layout(in.q, in.Dv);
  const auto acc_type = window_acc_dtype(in.q.scalar_type());
  at::Tensor state = at::zeros({in.B, in.H, in.D, in.Dv + 1}, in.q.options().dtype(acc_type));
  if (in.B * in.H == 0 || in.N == 0) {
    out.zero_();
    return {out, state};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "linear_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto c = make_call<scalar_t, acc_t>(in, q_scale, k_scale, eps, denom_min);
    const auto* call = &c;
    const int64_t part = state_part_size(c);
    const HeadSplit& ss = c.state_split;
    std::vector<acc_t> partial(ss.tasks(c.B) * ss.heads * part);
    at::parallel_for(0, ss.tasks(c.B), 1, [&](int64_t b, int64_t e) { state_range(call, partial.data(), b, e); });
    // token-range partials summed in range order: S padded [pairs, Dp, Dsp], z [pairs, Dp]
    std::vector<acc_t> S(c.pairs() * c.Dp * c.Dsp, acc_t(0)), z(c.pairs() * c.Dp, acc_t(0));
    for (int64_t p = 0; p < c.pairs(); ++p) {
      const int64_t b = p / c.H;
      const int h = static_cast<int>(p % c.H), group = h / ss.heads;
      for (int r = 0; r < ss.ranges; ++r) {
        const int64_t task = (b * ss.ranges + r) * ss.groups + group;
        const acc_t* src = partial.data() + (task * ss.heads + h % ss.heads) * part;
        add_into(S.data() + p * c.Dp * c.Dsp, src, int64_t{c.Dr} * c.Dsp);
        add_into(z.data() + p * c.Dp, src + int64_t{c.Dr} * c.Dsp, int64_t{c.Dp});
      }
    }
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const Strides4 os(out);
    at::parallel_for(0, c.output_split.tasks(c.B), 1, [&](int64_t b, int64_t e) {
      output_range(call, static_cast<const acc_t*>(S.data()), static_cast<const acc_t*>(z.data()), out_ptr, os, b,
                   e);
    });
    // the state output: [S | z] without padding
    acc_t* st = state.data_ptr<acc_t>();
    for (int64_t p = 0; p < c.pairs(); ++p)
      for (int d = 0; d < c.D; ++d) {
        std::copy(S.data() + (p * c.Dp + d) * c.Dsp, S.data() + (p * c.Dp + d) * c.Dsp + c.Dv,
                  st + (p * c.D + d) * (c.Dv + 1));
        st[(p * c.D + d) * (c.Dv + 1) + c.Dv] = z[p * c.Dp + d];
      }
  });
  return {out, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& temperature, const at::Tensor& state_in, c10::string_view feature_map,
    double q_scale, double k_scale, double eps, double denom_min) {
  const LinearInputs in = prepare_linear_inputs(q, k, v, temperature, std::string_view(feature_map.data(), feature_map.size()));
  check_linear_backward(in, grad_out, state_in);
  const auto acc_opts = in.q.options().dtype(window_acc_dtype(in.q.scalar_type()));
  at::Tensor grad_q = at::zeros({in.B, in.H, in.N, in.D}, in.q.options());
  at::Tensor grad_k = at::zeros({in.B, in.H, in.N, in.D}, in.q.options());
  at::Tensor grad_v = at::zeros({in.B, in.H, in.N, in.Dv}, in.q.options());
  at::Tensor grad_t = in.temperature.defined() ? at::zeros({in.H}, acc_opts) : at::zeros({0}, acc_opts);
  if (in.B * in.H == 0 || in.N == 0) return {grad_q, grad_k, grad_v, grad_t};
  const at::Tensor state = state_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "linear_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto c = make_call<scalar_t, acc_t>(in, q_scale, k_scale, eps, denom_min);
    const auto* call = &c;
    const int64_t pairs = c.pairs();
    // the saved state padded to [pairs, Dp, Dvp] and transposed
    std::vector<acc_t> st(pairs * c.Dp * c.Dvp, acc_t(0)), stt(pairs * c.Dvp * c.Dp, acc_t(0));
    const acc_t* src = state.data_ptr<acc_t>();
    for (int64_t p = 0; p < pairs; ++p)
      for (int d = 0; d < c.D; ++d)
        for (int e = 0; e <= c.Dv; ++e) {
          const acc_t x = src[(p * c.D + d) * (c.Dv + 1) + e];
          st[(p * c.Dp + d) * c.Dvp + e] = x;
          stt[(p * c.Dvp + e) * c.Dp + d] = x;
        }
    const Strides4 gs(grad_out);
    std::vector<acc_t> partial(c.tasks() * (int64_t{c.Dr} * c.Dvp + 1));
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    at::parallel_for(0, c.tasks(), 1, [&](int64_t b, int64_t e) {
      query_grad_range(call, static_cast<const acc_t*>(st.data()), static_cast<const acc_t*>(stt.data()),
                       grad_out.data_ptr<scalar_t>(), gs, gq, partial.data(), b, e);
    });
    std::vector<acc_t> grads(pairs * c.Dp * c.Dvp), grads_t(pairs * c.Dvp * c.Dp), dt(pairs);
    reduce_partials<acc_t>(partial.data(), pairs, c.chunks, c.Dr, c.Dp, c.Dvp, 1, grads.data(), grads_t.data(),
                           dt.data());
    if (in.temperature.defined()) {
      acc_t* g = grad_t.data_ptr<acc_t>();
      for (int64_t p = 0; p < pairs; ++p) g[p % c.H] += dt[p];  // pairs in (b, h) order: images in order
    }
    const int blocks = (c.N + kTokens - 1) / kTokens;
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    at::parallel_for(0, pairs * blocks, 1, [&](int64_t b, int64_t e) {
      key_grad_range(call, static_cast<const acc_t*>(grads.data()), static_cast<const acc_t*>(grads_t.data()), gk, gv,
                     b, e);
    });
  });
  return {grad_q, grad_k, grad_v, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CPU, m) {
  m.impl("linear_attention", &linear_attention_cpu);
  m.impl("linear_attention_backward", &linear_attention_backward_cpu);
}

}  // namespace effvit
