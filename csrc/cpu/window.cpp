// Swin (shifted-)window attention: CPU kernels.
//
// One task is one (image, window, head). It gathers the window's q, k and v through the roll / pad /
// partition index arithmetic of window_geometry.h into small float buffers (padding tokens read the qkv
// Linear's bias), computes the logits with one register-blocked GEMM micro-kernel, adds the relative
// position bias (gathered once per thread and head into a dense [N, N] block) and the region mask (from the
// tokens' regions, only in windows that hold several), takes the softmax with a vectorised exp, and
// writes P @ V straight to the token's place in the [B, H, W, C] output. No attention matrix outlives the
// task; the log-sum-exp of each row is the only thing the backward needs beyond q, k, v and the output.
//
// The backward recomputes P from the log-sum-exp and runs every product through the same micro-kernel
// (reading P and dS transposed where a product needs them the other way round). Gradients of padding tokens
// and of the bias table are summed per thread chunk and added in chunk order, so results do not depend
// on thread timing.
//
// Buffers are padded to multiples of 32 in both the token and the head dimension and zero-filled, so
// the micro-kernel never needs a tail; padded key columns get a logit of -1e30 and vanish in the softmax.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/window_checks.h"
#include "attention_tile.h"
#include "cpu_isa.h"

namespace effvit {
namespace {

// What every task of one call shares (read-only).
template <typename scalar_t, typename acc_t>
struct WindowCall {
  WindowGeometry g;
  int Np = 0, Dp = 0;                  // padded tokens per window, padded head_dim
  int cols = 0;                        // key columns the logit and dP GEMMs compute (window_logits)
  acc_t scale = 1;
  const scalar_t* qkv = nullptr;       // [B, H, W, 3C]
  const scalar_t* pad_qkv = nullptr;   // [3C] or null (zeros)
  const acc_t* reversed_columns = nullptr;  // [heads, table rows]: each head's table column, last row first
  const int32_t* bias_rows = nullptr;       // [N, N]: bias table row of (i, j) (the backward's scatter)
  int64_t tasks() const { return int64_t{g.B} * g.windows_per_image() * g.heads; }
};

// The logits' starting block of each head, [rows, Np]: bias[i, j] = the table's entry of (i, j) (0 without a
// table) for i, j < N, everything else -1e30 (padded key columns vanish in the softmax). A thread gathers a head's
// block the first time one of its tasks needs it: the heads spread over the threads' task ranges, so a head is
// gathered only by the threads that run it, in the same parallel region as the attention.
template <typename acc_t>
struct HeadBias {
  std::unique_ptr<acc_t[]> blocks;  // [heads, rows, Np], a head's block written before first use
  std::vector<char> ready;
  int rows, Np;
  HeadBias(int heads, int rows_, int Np_)
      : blocks(new acc_t[int64_t{heads} * rows_ * Np_]), ready(heads, 0), rows(rows_), Np(Np_) {}

  template <typename scalar_t>
  EFFVIT_ALWAYS_INLINE const acc_t* head(const WindowCall<scalar_t, acc_t>& c, int h) {
    acc_t* block = blocks.get() + int64_t{h} * rows * Np;
    if (!ready[h]) {
      const int T = c.g.table_rows();
      fill(c.reversed_columns != nullptr ? c.reversed_columns + int64_t{h} * T : nullptr, c.g, block);
      ready[h] = 1;
    }
    return block;
  }

  // Query i's bias at key (rj, cj) is the table row bias_row_query_part(i) - rj * (2 ww - 1) - cj: for each key
  // row, ww consecutive table rows in descending order, so ww consecutive entries of the reversed column. A key
  // row is one vector copy when a vector holds ww values: its spare lanes are overwritten by the next key row, or
  // for the last one fall in the row's padded columns (ws 7: 49 of 64; else that one goes value by value). A
  // lookup per key was a sixth of the op at 7x7x768, batch 1 (each head's block used once).
  EFFVIT_ALWAYS_INLINE void fill(const acc_t* reversed, const WindowGeometry& g, acc_t* block) const {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    const int N = g.N, ww = g.ww, T = g.table_rows();
    const int vector_rows = ww > L ? 0 : (g.wh - 1) * ww + L <= Np ? g.wh : g.wh - 1;
    for (int i = 0; i < rows; ++i) {
      acc_t* __restrict__ row = block + int64_t{i} * Np;
      const int real = i < N ? N : 0;
      if (reversed != nullptr && real > 0) {
        const acc_t* __restrict__ src = reversed + (T - 1 - g.bias_row_query_part(i));
        for (int rj = 0; rj < vector_rows; ++rj) vstore(row + rj * ww, vload<V>(src + rj * (2 * ww - 1)));
        for (int rj = vector_rows; rj < g.wh; ++rj)
          for (int cj = 0; cj < ww; ++cj) row[rj * ww + cj] = src[rj * (2 * ww - 1) + cj];
      } else {
        for (int j = 0; j < real; ++j) row[j] = acc_t(0);
      }
      for (int j = real; j < Np; ++j) row[j] = static_cast<acc_t>(kMaskedColumn);
    }
  }
};

// Per-chunk buffers: one window's operands, [Np x Dp] (token-major) or [Dp x Np] (transposed).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, k, v, kt, s, o;
  std::vector<acc_t> vt, dout, dp, dq, dk, dv;  // backward only
  Scratch(int Np, int Dp, bool backward)
      : q(Np * Dp), k(Np * Dp), v(Np * Dp), kt(Dp * Np), s(Np * Np), o(Np * Dp) {
    if (backward) {
      for (auto* b : {&vt, &dout, &dq, &dk, &dv}) b->assign(Np * Dp, 0);
      dp.assign(Np * Np, 0);
    }
  }
};

struct TaskIndex {
  int b, wy, wx, h;
};

inline TaskIndex task_index(const WindowGeometry& g, int64_t t) {
  TaskIndex ti;
  ti.h = static_cast<int>(t % g.heads);
  int64_t w = t / g.heads;
  ti.wx = static_cast<int>(w % g.nww);
  w /= g.nww;
  ti.wy = static_cast<int>(w % g.nwh);
  ti.b = static_cast<int>(w / g.nwh);
  return ti;
}

// The input pixel (-1: padding) and shift region of each token of window (wy, wx), walked row by row (no
// division per token); returns whether the window holds more than one region.
inline bool window_tokens(const WindowGeometry& g, int wy, int wx, int32_t* pixel, int32_t* region) {
  bool several = false;
  for (int ty = 0, t = 0; ty < g.wh; ++ty) {
    const int r = wy * g.wh + ty, src_r = g.source_row(r);
    for (int tx = 0; tx < g.ww; ++tx, ++t) {
      const int c = wx * g.ww + tx, src_c = g.source_col(c);
      pixel[t] = src_r < 0 || src_c < 0 ? -1 : src_r * g.W + src_c;
      region[t] = g.shifted ? g.region(r, c) : 0;
      several |= region[t] != region[0];
    }
  }
  return several;
}

// The tokens of the current task's window, and of the next task's when that is another window. Tasks run
// heads fastest, so a window's tokens are worked out once for all its heads; the next task's rows are
// requested ahead of time (scattered short runs the hardware prefetcher does not follow; the current task's
// work hides the wait).
struct TokenCursor {
  std::vector<int32_t> pixel, region, next_pixel, next_region;
  int64_t window = -1, next_window = -1;
  bool several = false, next_several = false;
  const int32_t* ahead_pixel = nullptr;  // the next task's tokens, image and head (ahead_pixel null: none)
  int ahead_b = 0, ahead_h = 0;
  explicit TokenCursor(int N) : pixel(N), region(N), next_pixel(N), next_region(N) {}

  template <typename scalar_t, typename acc_t>
  EFFVIT_ALWAYS_INLINE void enter(const WindowCall<scalar_t, acc_t>& c, int64_t t, int64_t end, const TaskIndex& ti) {
    const WindowGeometry& g = c.g;
    const int64_t w = t / g.heads;
    if (w != window) {
      if (w == next_window) {
        pixel.swap(next_pixel);
        region.swap(next_region);
        several = next_several;
      } else {
        several = window_tokens(g, ti.wy, ti.wx, pixel.data(), region.data());
      }
      window = w;
    }
    ahead_pixel = nullptr;
    if (t + 1 >= end) return;
    if ((t + 1) / g.heads == w) {
      ahead_pixel = pixel.data(), ahead_b = ti.b, ahead_h = ti.h + 1;
    } else {
      const TaskIndex nt = task_index(g, t + 1);
      next_several = window_tokens(g, nt.wy, nt.wx, next_pixel.data(), next_region.data());
      next_window = (t + 1) / g.heads;
      ahead_pixel = next_pixel.data(), ahead_b = nt.b, ahead_h = nt.h;
    }
  }

  // Requests the next task's run of `parts` consecutive [C] parts of token t's row in a [B, H, W, parts * C]
  // tensor (3 for qkv; 1 for the output and its gradient) into L2: L1 is smaller than one task's buffers, which
  // would evict the lines before use. Called token by token while the current task works through its rows: a
  // task's ~300 lines requested at once fill the miss queue, and the prefetches stall. kForWrite asks for the
  // lines in a writable state (the output about to be stored).
  template <bool kForWrite = false, typename scalar_t>
  EFFVIT_ALWAYS_INLINE void prefetch_ahead(const scalar_t* data, int parts, const WindowGeometry& g, int t) const {
    if (ahead_pixel == nullptr || ahead_pixel[t] < 0) return;
    const int C = g.C(), bytes = g.head_dim * static_cast<int>(sizeof(scalar_t));
    const char* src = reinterpret_cast<const char*>(
        data + (int64_t{ahead_b} * g.H * g.W + ahead_pixel[t]) * parts * C + ahead_h * g.head_dim);
    for (int part = 0; part < parts; ++part)
      for (int off = 0; off < bytes; off += 64) __builtin_prefetch(src + part * C * sizeof(scalar_t) + off, kForWrite, 2);
  }
};

// Gathers the q (times scale), k and v of one (window, head) into the scratch buffers, and k transposed.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void gather_window(const WindowCall<scalar_t, acc_t>& c, const TaskIndex& ti,
                                        const int32_t* pixel, Scratch<acc_t>& s) {
  const WindowGeometry& g = c.g;
  const int C = g.C(), D = g.head_dim, Np = c.Np, Dp = c.Dp;
  const int64_t image = int64_t{ti.b} * g.H * g.W;
  const acc_t scale = c.scale;
  acc_t* __restrict__ q = s.q.data();
  acc_t* __restrict__ k = s.k.data();
  acc_t* __restrict__ v = s.v.data();
  for (int t = 0; t < g.N; ++t) {
    const scalar_t* src = pixel[t] >= 0 ? c.qkv + (image + pixel[t]) * 3 * C : c.pad_qkv;
    if (src == nullptr) {  // padding token without a qkv bias
      std::fill(q + t * Dp, q + t * Dp + D, acc_t(0));
      std::fill(k + t * Dp, k + t * Dp + D, acc_t(0));
      std::fill(v + t * Dp, v + t * Dp + D, acc_t(0));
      continue;
    }
    src += ti.h * D;
    load_row(src, q + t * Dp, D, scale);
    load_row(src + C, k + t * Dp, D, acc_t(1));
    load_row(src + 2 * C, v + t * Dp, D, acc_t(1));
  }
  transpose(k, Dp, s.kt.data(), Np, g.N, D);
}

// logits = bias + q k^T (+ region mask) in s.s, rows [0, rows), columns [0, N) (and up to cols, or Np when
// cols >= N, where padded columns get -1e30). With cols < N (ws 7: 49 keys), the GEMM covers the first cols
// columns and the last few come from row dot products: 49 columns padded to 64 would spend a quarter of the
// GEMM and of the softmax's exps on padding.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void window_logits(const WindowCall<scalar_t, acc_t>& c, const acc_t* bias, Scratch<acc_t>& s,
                                        const int32_t* region, bool several_regions, int rows, int cols,
                                        acc_t* tail) {
  const int Np = c.Np, N = c.g.N;
  gemm_nn(s.q.data(), c.Dp, s.kt.data(), Np, s.s.data(), Np, rows, c.g.head_dim, cols < N ? cols : Np, bias);
  for (int j = cols; j < N; ++j) {
    dot_rows(s.q.data(), c.Dp, s.k.data() + j * c.Dp, c.Dp, N, tail);
    for (int i = 0; i < N; ++i) s.s[i * Np + j] = bias[i * Np + j] + tail[i];
  }
  if (!several_regions) return;
  for (int i = 0; i < N; ++i) {
    acc_t* srow = s.s.data() + i * Np;
    for (int j = 0; j < N; ++j)
      if (region[i] != region[j]) srow[j] += static_cast<acc_t>(kSwinMaskValue);
  }
}

// Task t's window in the scratch buffers: its tokens, q, k, v and the logits (rows [0, rows); columns as
// window_logits says, with `tail` a scratch column of Np).
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE TaskIndex start_task(const WindowCall<scalar_t, acc_t>& c, int64_t t, int64_t end, int rows,
                                          int cols, TokenCursor& tokens, Scratch<acc_t>& s, acc_t* tail,
                                          HeadBias<acc_t>& bias) {
  const TaskIndex ti = task_index(c.g, t);
  tokens.enter(c, t, end, ti);
  gather_window(c, ti, tokens.pixel.data(), s);
  window_logits(c, bias.head(c, ti.h), s, tokens.region.data(), tokens.several, rows, cols, tail);
  return ti;
}

// P[i, j] = exp(S[i, j] - shift[i]) for the columns j in [first, N) of the [N, Np] logits, all rows of a column in
// one vector pass (through `column`, Np long); adds them to sums[i] if given.
template <typename acc_t>
EFFVIT_ALWAYS_INLINE void exp_columns(acc_t* S, int Np, int N, int first, const acc_t* shift, acc_t* column,
                                      acc_t* sums) {
  for (int j = first; j < N; ++j) {
    for (int i = 0; i < N; ++i) column[i] = S[i * Np + j] - shift[i];
    std::fill(column + N, column + Np, acc_t(0));  // the vector pass's padding: exp(0), never read
    exp_row(column, Np, acc_t(0));
    for (int i = 0; i < N; ++i) S[i * Np + j] = column[i];
    if (sums != nullptr)
      for (int i = 0; i < N; ++i) sums[i] += column[i];
  }
}

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void window_forward_body(const WindowCall<scalar_t, acc_t>* call, scalar_t* out, acc_t* lse,
                                              int64_t begin, int64_t end) {
  const WindowCall<scalar_t, acc_t>& c = *call;
  const WindowGeometry& g = c.g;
  const int N = g.N, Np = c.Np, Dp = c.Dp, D = g.head_dim, C = g.C();
  const int rows = round_up(N, kRows);
  const int64_t HW = int64_t{g.H} * g.W;
  const int cols = c.cols, vector_cols = std::min(cols, Np);  // columns [vector_cols, N) go a column at a time
  Scratch<acc_t> s(Np, Dp, false);
  TokenCursor tokens(N);
  HeadBias<acc_t> bias(g.heads, rows, Np);
  std::vector<acc_t> inv_sum(N), maxima(N), tail_sum(N), sums(N), row_lse(N), column(Np, acc_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const TaskIndex ti = start_task(c, t, end, rows, cols, tokens, s, column.data(), bias);
    const int32_t* pixel = tokens.pixel.data();
    for (int i = 0; i < N; ++i) {
      acc_t* row = s.s.data() + i * Np;
      acc_t m = padded_row_max(row, std::min(N, vector_cols), vector_cols);
      for (int j = vector_cols; j < N; ++j) m = std::max(m, row[j]);
      maxima[i] = m;
      tail_sum[i] = 0;
    }
    exp_columns(s.s.data(), Np, N, vector_cols, maxima.data(), column.data(), tail_sum.data());
    for (int i = 0; i < N; ++i) {
      tokens.prefetch_ahead(c.qkv, 3, g, i);
      tokens.prefetch_ahead<true>(out, 1, g, i);
      acc_t* row = s.s.data() + i * Np;
      if (pixel[i] < 0) {  // a padding query: cropped, so skip its softmax
        std::fill(row, row + Np, acc_t(0));
        sums[i] = 1;
        continue;
      }
      sums[i] = exp_row(row, vector_cols, maxima[i]) + tail_sum[i];
    }
    finish_rows(sums.data(), maxima.data(), N, inv_sum.data(), row_lse.data());
    gemm_nn(s.s.data(), Np, s.v.data(), Dp, s.o.data(), Dp, rows, N, Dp);
    for (int i = 0; i < N; ++i) {
      if (pixel[i] < 0) continue;
      lse[(int64_t{ti.b} * g.heads + ti.h) * HW + pixel[i]] = row_lse[i];
      scalar_t* dst = out + (int64_t{ti.b} * HW + pixel[i]) * C + ti.h * D;
      const acc_t* o = s.o.data() + i * Dp;
      store_row(o, dst, D, inv_sum[i]);
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(window_forward_range, window_forward_body)

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void window_backward_body(const WindowCall<scalar_t, acc_t>* call, const scalar_t* grad_out,
                                               const scalar_t* out, const acc_t* lse, scalar_t* grad_qkv,
                                               acc_t* grad_bias, acc_t* grad_pad, int64_t begin, int64_t end) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const WindowCall<scalar_t, acc_t>& c = *call;
  const WindowGeometry& g = c.g;
  const int N = g.N, Np = c.Np, Dp = c.Dp, D = g.head_dim, C = g.C();
  const int rows = round_up(N, kRows);
  const int table_rows = g.table_rows();
  const int64_t HW = int64_t{g.H} * g.W;
  const int cols = c.cols, vector_cols = std::min(cols, Np);  // as in the forward
  Scratch<acc_t> s(Np, Dp, true);
  TokenCursor tokens(N);
  HeadBias<acc_t> bias(g.heads, rows, Np);
  std::vector<acc_t> delta(N), row_lse(N), column(Np, acc_t(0));
  // dS summed over this chunk's windows per (head, i, j), folded into table rows once at the end: a dense
  // vector add per task instead of N * N scattered adds
  std::vector<acc_t> dense_bias(grad_bias != nullptr ? int64_t{g.heads} * N * Np : 0, acc_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const TaskIndex ti = start_task(c, t, end, rows, cols, tokens, s, column.data(), bias);
    const int32_t* pixel = tokens.pixel.data();
    const int64_t head_base = (int64_t{ti.b} * g.heads + ti.h) * HW;
    // P from the saved log-sum-exp; dO, D_i = dO_i . O_i; V^T for dP = dO V^T
    for (int i = 0; i < N; ++i) {
      tokens.prefetch_ahead(c.qkv, 3, g, i);
      tokens.prefetch_ahead(out, 1, g, i);
      tokens.prefetch_ahead(grad_out, 1, g, i);
      tokens.prefetch_ahead<true>(grad_qkv, 3, g, i);
      acc_t* prow = s.s.data() + i * Np;
      acc_t* dorow = s.dout.data() + i * Dp;
      if (pixel[i] < 0) {
        std::fill(prow, prow + Np, acc_t(0));
        std::fill(dorow, dorow + D, acc_t(0));
        delta[i] = 0;
        row_lse[i] = std::numeric_limits<acc_t>::infinity();  // exp(0 - inf) = 0 in exp_columns
        continue;
      }
      row_lse[i] = lse[head_base + pixel[i]];
      exp_row(prow, vector_cols, row_lse[i]);
      const int64_t at = (int64_t{ti.b} * HW + pixel[i]) * C + ti.h * D;
      load_row(grad_out + at, dorow, D, acc_t(1));
      acc_t* orow = s.o.data() + i * Dp;  // the forward's buffer, free here
      load_row(out + at, orow, D, acc_t(1));
      delta[i] = dot_padded(dorow, orow, Dp);
    }
    exp_columns(s.s.data(), Np, N, vector_cols, row_lse.data(), column.data(), static_cast<acc_t*>(nullptr));
    transpose(s.v.data(), Dp, s.vt.data(), Np, N, D);
    // dV = P^T dO
    gemm_nn<true>(s.s.data(), Np, s.dout.data(), Dp, s.dv.data(), Dp, rows, N, Dp);
    // dS = P * (dO V^T - D_i), over real query rows; dS summed per (head, i, j) for the bias table
    // (the columns past cols, as in the logits, from row dot products)
    gemm_nn(s.dout.data(), Dp, s.vt.data(), Np, s.dp.data(), Np, rows, D, cols < N ? cols : Np);
    for (int j = vector_cols; j < N; ++j) {
      dot_rows(s.dout.data(), Dp, s.v.data() + j * Dp, Dp, N, column.data());
      for (int i = 0; i < N; ++i) s.dp[i * Np + j] = column[i];
    }
    acc_t* dense = dense_bias.data() + int64_t{ti.h} * N * Np;
    for (int i = 0; i < N; ++i) {
      acc_t* ds = s.dp.data() + i * Np;
      const acc_t* p = s.s.data() + i * Np;
      acc_t* dense_row = dense + i * Np;
      for (int j = 0; j < vector_cols; j += L) {
        const V d = vload<V>(p + j) * (vload<V>(ds + j) - delta[i]);
        vstore(ds + j, d);
        if (grad_bias != nullptr) vstore(dense_row + j, vload<V>(dense_row + j) + d);
      }
      for (int j = vector_cols; j < N; ++j) {
        ds[j] = p[j] * (ds[j] - delta[i]);
        if (grad_bias != nullptr) dense_row[j] += ds[j];
      }
    }
    // dQ = scale dS K, dK = dS^T (q * scale)
    gemm_nn(s.dp.data(), Np, s.k.data(), Dp, s.dq.data(), Dp, rows, N, Dp);
    gemm_nn<true>(s.dp.data(), Np, s.q.data(), Dp, s.dk.data(), Dp, rows, N, Dp);
    for (int j = 0; j < N; ++j) {
      const acc_t* dq = s.dq.data() + j * Dp;
      const acc_t* dk = s.dk.data() + j * Dp;
      const acc_t* dv = s.dv.data() + j * Dp;
      if (pixel[j] < 0) {  // padding token: its k and v are pad_qkv's, whose gradient sums over them
        acc_t* pk = grad_pad + C + ti.h * D;
        for (int d = 0; d < D; ++d) {
          pk[d] += dk[d];
          pk[C + d] += dv[d];
        }
        continue;
      }
      scalar_t* dst = grad_qkv + (int64_t{ti.b} * HW + pixel[j]) * 3 * C + ti.h * D;
      store_row(dq, dst, D, c.scale);
      store_row(dk, dst + C, D, acc_t(1));
      store_row(dv, dst + 2 * C, D, acc_t(1));
    }
  }
  if (grad_bias == nullptr) return;
  for (int h = 0; h < g.heads; ++h)
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j)
        grad_bias[int64_t{h} * table_rows + c.bias_rows[i * N + j]] += dense_bias[(int64_t{h} * N + i) * Np + j];
}
EFFVIT_CPU_ISA_VARIANTS(window_backward_range, window_backward_body)


// The per-call shared state: the bias table's columns per head (reversed) and the bias row of each (i, j).
template <typename scalar_t, typename acc_t>
struct WindowCallStorage {
  WindowCall<scalar_t, acc_t> call;
  std::vector<acc_t> reversed_columns;
  std::vector<int32_t> bias_rows;

  WindowCallStorage(const WindowInputs& in, double scale) {
    WindowCall<scalar_t, acc_t>& c = call;
    c.g = in.geo;
    const WindowGeometry& g = c.g;
    c.Np = round_up(g.N, kPad);
    // the logit GEMM (and the backward's dP GEMM) stops at the last whole vector of keys when at most two keys are
    // left over (ws 7: 48 of 49), which the softmax then treats a column at a time
    const int whole = g.N / 16 * 16;
    c.cols = whole > 0 && g.N - whole <= 2 ? whole : c.Np;
    c.Dp = round_up(g.head_dim, kPad);
    c.scale = static_cast<acc_t>(scale);
    c.qkv = in.qkv.data_ptr<scalar_t>();
    c.pad_qkv = in.pad_qkv.defined() ? in.pad_qkv.data_ptr<scalar_t>() : nullptr;
    std::vector<int32_t> key_part(g.N);
    for (int j = 0; j < g.N; ++j) key_part[j] = g.bias_row_key_part(j);
    bias_rows.resize(int64_t{g.N} * g.N);
    for (int i = 0; i < g.N; ++i) {
      const int32_t query_part = g.bias_row_query_part(i);
      for (int j = 0; j < g.N; ++j) bias_rows[i * g.N + j] = query_part - key_part[j];
    }
    // each head's table column made contiguous and reversed (HeadBias copies runs of it)
    if (in.bias_table.defined()) {
      const acc_t* table = in.bias_table.data_ptr<acc_t>();
      const int T = g.table_rows();
      reversed_columns.assign(int64_t{g.heads} * T + Vec<acc_t>::lanes, acc_t(0));  // + HeadBias::fill's over-read
      for (int r = 0; r < T; ++r)
        for (int h = 0; h < g.heads; ++h) reversed_columns[int64_t{h} * T + (T - 1 - r)] = table[r * g.heads + h];
      c.reversed_columns = reversed_columns.data();
    }
    c.bias_rows = bias_rows.data();
  }
};

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv_in,
                                                        const std::optional<at::Tensor>& bias_table,
                                                        const std::optional<at::Tensor>& pad_qkv, int64_t num_heads,
                                                        at::IntArrayRef window, at::IntArrayRef shift, double scale) {
  const WindowInputs in = prepare_window_inputs(qkv_in, bias_table, pad_qkv, num_heads, window, shift);
  const WindowGeometry& g = in.geo;
  auto out = at::empty({g.B, g.H, g.W, g.C()}, in.qkv.options());
  auto lse = at::empty({g.B, g.heads, g.H, g.W}, in.qkv.options().dtype(window_acc_dtype(in.qkv.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.qkv.scalar_type(), "window_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const WindowCallStorage<scalar_t, acc_t> storage(in, scale);
    const auto* call = &storage.call;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, call->tasks(), 1, [&](int64_t begin, int64_t end) {
      window_forward_range(call, out_ptr, lse_ptr, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_qkv, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t num_heads,
    at::IntArrayRef window, at::IntArrayRef shift, double scale) {
  const WindowInputs in = prepare_window_inputs(qkv_in, bias_table, pad_qkv, num_heads, window, shift);
  check_window_backward(in, grad_out_in, out_in, lse_in);
  const WindowGeometry& g = in.geo;
  const auto acc_opts = in.qkv.options().dtype(window_acc_dtype(in.qkv.scalar_type()));
  auto grad_qkv = at::empty_like(in.qkv);
  const bool has_table = in.bias_table.defined();
  auto grad_table = has_table ? at::zeros({g.table_rows(), g.heads}, acc_opts) : at::zeros({0}, acc_opts);
  auto grad_pad = at::zeros({3 * g.C()}, acc_opts);
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_table, grad_pad};
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const WindowCallStorage<scalar_t, acc_t> storage(in, scale);
    const auto* call = &storage.call;
    const int64_t tasks = call->tasks();
    // one partial sum of the bias-table and padding gradients per chunk, added in chunk order
    const int64_t chunks = std::min<int64_t>(tasks, at::get_num_threads());
    const int64_t table_size = int64_t{g.heads} * g.table_rows(), pad_size = 3 * g.C();
    std::vector<acc_t> partial(chunks * (table_size + pad_size), acc_t(0));
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    scalar_t* gq = grad_qkv.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        acc_t* gb = partial.data() + chunk * (table_size + pad_size);
        window_backward_range(call, go, o, l, gq, has_table ? gb : static_cast<acc_t*>(nullptr), gb + table_size,
                              tasks * chunk / chunks, tasks * (chunk + 1) / chunks);
      }
    });
    // partials hold the table as [heads, rows]; the gradient is [rows, heads] like the table
    acc_t* gt = grad_table.data_ptr<acc_t>();
    acc_t* gp = grad_pad.data_ptr<acc_t>();
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const acc_t* gb = partial.data() + chunk * (table_size + pad_size);
      if (has_table)
        for (int h = 0; h < g.heads; ++h)
          for (int r = 0; r < g.table_rows(); ++r) gt[r * g.heads + h] += gb[h * g.table_rows() + r];
      for (int64_t k = 0; k < pad_size; ++k) gp[k] += gb[table_size + k];
    }
  });
  return {grad_qkv, grad_table, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace effvit
