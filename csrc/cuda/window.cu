// Swin (shifted-)window attention: CUDA kernels (forward, and a flash-style backward from the log-sum-exp).
//
// One block per (window, head): blockIdx.x = (b * windows_per_image + window) * heads + head, heads
// innermost so that neighbouring blocks read neighbouring channels of the same pixels. Every index comes from
// csrc/common/window_geometry.h (roll, pad, partition, region mask and bias row as index arithmetic); 32-bit
// index math throughout, since prepare_window_inputs keeps qkv under 2^31 values.
//
// Work split: each token row of the window (a query in the forward and the dq kernel, a key in the dk/dv
// kernel) belongs to G adjacent lanes of a warp, each holding DPT of the head_dim values in registers
// (DPT = 32, or 16 for head_dim <= 16, double, and the dk/dv kernel, which holds four rows; G a power of
// two, G * DPT >= head_dim; dot products are summed over the G lanes with xor shuffles). A block of up to
// 256 threads covers threads / G rows per pass and loops passes until the window's N = wh * ww rows are done.
// The other side (keys, or queries) streams through shared memory in tiles of up to tile_rows tokens,
// converted to the accumulation type (float; double for double) and zero-filled past head_dim and past the
// window's end. Tiles are sized to fit the default 48 KB of dynamic shared memory, so every window (up to
// 64 x 64) and head_dim (up to 256) runs without the opt-in attribute; Swin-T (7 x 7 window, head_dim 32)
// has one 56-token tile of K and V per block (16 KB of shared memory) and 64 threads (49 query rows).
// Shared rows are read as 16-byte vectors, broadcast to the lanes of different rows. The inner loops go
// kStep = 8 (backward: 4) tokens at a time, several independent dot products in flight; tiles are padded to
// a multiple of kStep with zero rows so the loops need no bounds checks on shared memory. Global rows move
// four values at a time (8-byte half, 16-byte float loads and stores) when head_dim % 4 == 0 and the data is
// aligned (vec4).
// The lane split, row and tile helpers are csrc/cuda/attention_tile.cuh's, shared with hilo.cu.
//
//   forward:  online softmax over the key tiles (running max m and sum l per query row), out = o / l and
//             lse = m + log(l) for the real (non-padding) queries.
//   backward: no N x N tensor is kept; P = exp(S - lse) is recomputed. Two kernels, run in order:
//     dq:   per query row, over the key tiles: D = dO . O (saved to `delta`), dS = P * (dO . v - D),
//           dq = scale * sum_j dS k_j, and the bias table's gradient, summed per block in shared memory
//           (then one global atomic per table row and block) when the table is small enough.
//     dk/dv: per key row, over the query tiles: dv = sum_i P dO_i, dk = scale * sum_i dS q_i, with the
//           queries' lse and D in shared memory. Padding queries are cropped from the output, so they add
//           nothing: their lse is set to +inf (P = 0). Padding keys' dk and dv are summed per block in
//           shared memory, then added to grad_pad_qkv with global atomics.
//   Every real token is written exactly once to grad_qkv (its q part by the dq kernel, its k and v parts by
//   the dk/dv kernel), since each real token sits in exactly one window.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/window_checks.h"
#include "../common/window_geometry.h"
#include "attention_tile.cuh"

namespace effvit {
namespace cuda {
namespace {

using namespace attn;

// ---- device code ------------------------------------------------------------------------------------

constexpr int kMaxThreads = 256;                // threads per block, a multiple of 32
constexpr int kStep = 8;                        // tokens per forward inner-loop step; tile_rows is a multiple of it
constexpr int kBackwardStep = 4;                // the backward kernels' step (divides kStep): fewer registers
constexpr int kMaxHeadDim = 256;                // up to here a tile of kStep rows fits any plan (hd_pad <= 256)
constexpr int64_t kSmemBudget = 48 * 1024;      // dynamic shared memory usable without cudaFuncSetAttribute
constexpr int64_t kBiasSmemMax = 16 * 1024;     // stage the head's bias column (and gradient) up to this size

// The launch shape, chosen on the host (make_plan) and read by the kernels.
struct Plan {
  int32_t G;               // lanes per token row
  int32_t hd_pad;          // G * DPT, a power of two: the row stride of the shared tiles
  int32_t hd_shift;        // log2(hd_pad)
  int32_t threads;         // blockDim.x
  int32_t rows;            // token rows per pass, threads / G
  int32_t tile_rows;       // tokens per shared tile, a multiple of kStep
  int32_t bias_rows;       // bias table rows staged in shared memory (0: read from global memory, or no table)
  int32_t bias_grad_rows;  // rows of the bias gradient summed in shared memory (0: global atomics, or none)
  int32_t pad_elems;       // padding token dk and dv sums (2 * hd_pad in the dk/dv kernel, else 0)
};

// Shared memory: two tiles of tile_rows x hd_pad values, per-tile-row lse and delta, the staged bias column,
// its gradient and the padding-token sums (all acc_t), then three ints per tile row. The host sizes the
// allocation with bytes() and the kernels carve it with the constructor, from the same Plan.
template <typename acc_t>
struct Smem {
  acc_t *tile_a, *tile_b, *row_lse, *row_delta, *bias, *bias_grad, *pad;
  int32_t *pix, *region, *bias_part;

  static int64_t acc_elems(const Plan& p) {
    return 2 * int64_t{p.tile_rows} * p.hd_pad + 2 * p.tile_rows + p.bias_rows + p.bias_grad_rows + p.pad_elems;
  }
  static int64_t bytes(const Plan& p) {
    return acc_elems(p) * int64_t{sizeof(acc_t)} + 3 * int64_t{p.tile_rows} * int64_t{sizeof(int32_t)};
  }
  __device__ __forceinline__ Smem(unsigned char* base, const Plan& p) {
    tile_a = reinterpret_cast<acc_t*>(base);  // 16-byte aligned; tile_rows * hd_pad is a multiple of 16
    tile_b = tile_a + p.tile_rows * p.hd_pad;
    row_lse = tile_b + p.tile_rows * p.hd_pad;
    row_delta = row_lse + p.tile_rows;
    bias = row_delta + p.tile_rows;
    bias_grad = bias + p.bias_rows;
    pad = bias_grad + p.bias_grad_rows;
    pix = reinterpret_cast<int32_t*>(pad + p.pad_elems);
    region = pix + p.tile_rows;
    bias_part = region + p.tile_rows;
  }
};

enum class KernelKind { kForward, kBackwardDq, kBackwardDkv };

// Values of a token row per lane (DPT): 32 where a lane holds two or three row slices of floats, 16 where
// it holds four (dk/dv kernel: k, v, dk, dv) or doubles, which would otherwise spill registers.
inline int slice_width(int32_t head_dim, bool is_double, KernelKind kind) {
  return head_dim <= 16 || is_double || kind == KernelKind::kBackwardDkv ? 16 : 32;
}

// Lanes per row, threads and tile size for head_dim split into DPT-value slices; tile_rows < kStep means
// the shapes do not fit (only for head_dim > kMaxHeadDim, which the host rejects first).
inline Plan make_plan(const WindowGeometry& g, int dpt, int64_t acc_size, bool has_bias, KernelKind kind) {
  Plan p{};
  p.G = 1;
  while (p.G * dpt < g.head_dim) p.G *= 2;
  p.hd_pad = p.G * dpt;
  p.hd_shift = 0;
  while ((1 << p.hd_shift) < p.hd_pad) ++p.hd_shift;
  p.threads = static_cast<int32_t>(std::min<int64_t>(kMaxThreads, (int64_t{g.N} * p.G + 31) / 32 * 32));
  p.rows = p.threads / p.G;
  p.pad_elems = kind == KernelKind::kBackwardDkv ? 2 * p.hd_pad : 0;
  const int64_t table = g.table_rows();
  const int64_t bias_copies = kind == KernelKind::kBackwardDq ? 2 : 1;  // the dq kernel also sums the gradient
  bool stage = has_bias && bias_copies * table * acc_size <= kBiasSmemMax;
  const int64_t per_row = (2 * int64_t{p.hd_pad} + 2) * acc_size + 3 * int64_t{sizeof(int32_t)};
  const int64_t window_rows = (int64_t{g.N} + kStep - 1) / kStep * kStep;
  for (;;) {
    p.bias_rows = stage ? static_cast<int32_t>(table) : 0;
    p.bias_grad_rows = stage && kind == KernelKind::kBackwardDq ? static_cast<int32_t>(table) : 0;
    const int64_t fixed = (int64_t{p.bias_rows} + p.bias_grad_rows + p.pad_elems) * acc_size;
    const int64_t fit = fixed < kSmemBudget ? (kSmemBudget - fixed) / per_row / kStep * kStep : 0;
    p.tile_rows = static_cast<int32_t>(std::min(window_rows, fit));
    if (p.tile_rows >= kStep || !stage) break;
    stage = false;  // give the staged bias's room to the tiles
  }
  return p;
}

template <typename scalar_t, typename acc_t>
struct WindowArgs {
  WindowGeometry geo;
  Plan plan;
  const scalar_t* qkv;      // [B, H, W, 3C], contiguous
  const scalar_t* pad_qkv;  // [3C], or nullptr for zeros
  const acc_t* bias_table;  // [table_rows, heads], or nullptr
  acc_t scale;
  bool vec4;                // head_dim % 4 == 0 and every token row 4-value aligned: rows move as Pack4
};

// One head's q, k, v or dO rows: a pixel's row of the image, the padding token's row, or nullptr (zeros).
template <typename scalar_t>
struct TokenSource {
  const scalar_t* img;  // at this image and the head's first channel
  int32_t stride;       // values per pixel
  const scalar_t* pad;  // at the head's first channel; nullptr: padding tokens are zeros
  __device__ __forceinline__ const scalar_t* row(int32_t pix) const { return pix >= 0 ? img + pix * stride : pad; }
};

struct BlockWindow {
  int32_t b, wy, wx, h;
};

__device__ __forceinline__ BlockWindow block_window(const WindowGeometry& g) {
  BlockWindow bw;
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  bw.h = block % g.heads;
  const int32_t win = block / g.heads;
  bw.b = win / g.windows_per_image();
  const int32_t w = win - bw.b * g.windows_per_image();
  bw.wy = w / g.nww;
  bw.wx = w - bw.wy * g.nww;
  return bw;
}

struct Token {
  int32_t pix;     // input pixel, -1 for padding
  int32_t region;  // shift region
};

__device__ __forceinline__ Token token_at(const WindowGeometry& g, const BlockWindow& bw, int32_t t) {
  const int32_t r = g.row(bw.wy, t), c = g.col(bw.wx, t);
  return {g.source_pixel(r, c), g.region(r, c)};
}

// This head's column of the bias table: staged in shared memory, or read from global memory (or none).
template <typename acc_t>
struct BiasColumn {
  const acc_t* p;
  int32_t stride;
  __device__ __forceinline__ acc_t operator()(int32_t row) const { return p != nullptr ? p[row * stride] : acc_t(0); }
};

// Staged values are visible after the next __syncthreads (every kernel has one before its first tile use).
template <typename acc_t>
__device__ __forceinline__ BiasColumn<acc_t> stage_bias(const acc_t* table, const WindowGeometry& g, int32_t h,
                                                        const Plan& p, acc_t* staged) {
  if (table == nullptr) return {nullptr, 0};
  if (p.bias_rows == 0) return {table + h, g.heads};
  for (int32_t r = threadIdx.x; r < p.bias_rows; r += blockDim.x) staged[r] = table[r * g.heads + h];
  return {staged, 1};
}

// The logit of a (query, key) pair without its scaled dot product: bias plus Swin's region mask.
template <typename acc_t>
__device__ __forceinline__ acc_t logit_offset(const WindowGeometry& g, const BiasColumn<acc_t>& bias, int32_t row,
                                              int32_t query_region, int32_t key_region) {
  const acc_t mask = g.shifted && query_region != key_region ? acc_t(kSwinMaskValue) : acc_t(0);
  return bias(row) + mask;
}

// Per-token geometry of tile rows [t0, t0 + tile_rows): input pixel (-1 for padding and past the window's
// end), region and the key's (as_key) or query's part of the bias row. Rows past the window repeat token t0
// so that every index stays in range.
__device__ __forceinline__ void load_tile_geometry(const WindowGeometry& g, const BlockWindow& bw, const Plan& p,
                                                   int32_t t0, bool as_key, int32_t* pix, int32_t* region,
                                                   int32_t* bias_part) {
  for (int32_t t = threadIdx.x; t < p.tile_rows; t += blockDim.x) {
    const bool inside = t0 + t < g.N;
    const int32_t tok = inside ? t0 + t : t0;
    const Token tk = token_at(g, bw, tok);
    pix[t] = inside ? tk.pix : -1;
    region[t] = tk.region;
    bias_part[t] = as_key ? g.bias_row_key_part(tok) : g.bias_row_query_part(tok);
  }
}

// Tile row r of a token source, for load_tile_pair: the row of the tile's token pix[r] (from
// load_tile_geometry; a padding token's is the source's pad row, or nullptr), nullptr (zeros) for r >= len.
template <typename scalar_t>
struct TileRows {
  const TokenSource<scalar_t>& src;  // load_tiles' argument, alive for the call
  const int32_t* pix;
  int32_t len;
  __device__ __forceinline__ const scalar_t* row(int32_t r) const { return r < len ? src.row(pix[r]) : nullptr; }
};

// Fills tile_a and tile_b (tile_rows x hd_pad) from two sources for the tile's tokens (pix, from
// load_tile_geometry); zeros past head_dim and for rows >= len (attention_tile.cuh's load_tile_pair).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tiles(const Plan& p, int32_t hd, bool vec4, int32_t len, const int32_t* pix,
                                           const TokenSource<scalar_t>& src_a, acc_t* tile_a,
                                           const TokenSource<scalar_t>& src_b, acc_t* tile_b) {
  load_tile_pair<scalar_t>(p.tile_rows, p.hd_shift, hd, vec4, TileRows<scalar_t>{src_a, pix, len}, tile_a,
                           TileRows<scalar_t>{src_b, pix, len}, tile_b);
}

// out [B, H, W, C] and lse [B, heads, H, W]. One thread group per query row, online softmax over key tiles.
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    window_forward_kernel(const WindowArgs<scalar_t, acc_t> a, scalar_t* __restrict__ out, acc_t* __restrict__ lse) {
  const WindowGeometry& g = a.geo;
  const Plan& p = a.plan;
  const BlockWindow bw = block_window(g);
  const int32_t C = g.C(), hd = g.head_dim, HW = g.H * g.W, N = g.N, h = bw.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const Smem<acc_t> sm(dynamic_smem(), p);
  const BiasColumn<acc_t> bias = stage_bias(a.bias_table, g, h, p, sm.bias);

  const scalar_t* img = a.qkv + bw.b * HW * 3 * C;
  const scalar_t* pad = a.pad_qkv;
  const TokenSource<scalar_t> q_src{img + h * hd, 3 * C, pad != nullptr ? pad + h * hd : nullptr};
  const TokenSource<scalar_t> k_src{img + C + h * hd, 3 * C, pad != nullptr ? pad + C + h * hd : nullptr};
  const TokenSource<scalar_t> v_src{img + 2 * C + h * hd, 3 * C, pad != nullptr ? pad + 2 * C + h * hd : nullptr};

  for (int32_t row0 = 0; row0 < N; row0 += p.rows) {
    const int32_t i = row0 + static_cast<int32_t>(threadIdx.x) / p.G;
    const bool active = i < N;  // idle rows compute on token 0 and write nothing
    const int32_t ti = active ? i : 0;
    const Token tq = token_at(g, bw, ti);
    const int32_t q_bias = g.bias_row_query_part(ti);
    acc_t q[DPT], o[DPT];
    load_row<DPT>(q, active ? q_src.row(tq.pix) : nullptr, hd, a.vec4, ln);
#pragma unroll
    for (int k = 0; k < DPT; ++k) o[k] = 0;
    acc_t m = -infinity<acc_t>(), l = 0;

    for (int32_t k0 = 0; k0 < N; k0 += p.tile_rows) {
      const int32_t len = std::min(p.tile_rows, N - k0);
      if (row0 == 0 || p.tile_rows < N) {  // a window that fits one tile keeps it for later passes
        __syncthreads();                    // the previous tile is no longer read
        load_tile_geometry(g, bw, p, k0, /*as_key=*/true, sm.pix, sm.region, sm.bias_part);
        __syncthreads();
        load_tiles(p, hd, a.vec4, len, sm.pix, k_src, sm.tile_a, v_src, sm.tile_b);
        __syncthreads();
      }
      for (int32_t j0 = 0; j0 < len; j0 += kStep) {
        acc_t s[kStep];
        acc_t mx = m;
#pragma unroll
        for (int u = 0; u < kStep; ++u) {
          const int32_t j = j0 + u;  // < tile_rows; rows >= len are zeros and get no weight
          const acc_t dot = row_sum(dot_row<DPT>(q, sm.tile_a + (j << p.hd_shift), ln), p.G);
          s[u] = j < len ? a.scale * dot + logit_offset(g, bias, q_bias - sm.bias_part[j], tq.region, sm.region[j])
                         : -infinity<acc_t>();
          mx = s[u] > mx ? s[u] : mx;
        }
        // j0 < len, so s[0] and mx are finite; the first step's correction is exp(-inf) = 0 on zeros
        const acc_t corr = acc_exp(m - mx);
        m = mx;
        l *= corr;
#pragma unroll
        for (int k = 0; k < DPT; ++k) o[k] *= corr;
#pragma unroll
        for (int u = 0; u < kStep; ++u) {
          const acc_t pr = acc_exp(s[u] - m);
          l += pr;
          axpy_row<DPT>(pr, sm.tile_b + ((j0 + u) << p.hd_shift), o, ln);
        }
      }
    }
    if (active && tq.pix >= 0) {  // padding queries are cropped
      store_row<DPT>(out + (bw.b * HW + tq.pix) * C + h * hd, o, acc_t(1) / l, hd, a.vec4, ln);
      if (ln.part == 0) lse[(bw.b * g.heads + h) * HW + tq.pix] = m + acc_log(l);
    }
  }
}

// grad_qkv's q part, delta = dO . O [B, heads, H, W] for the dk/dv kernel, and grad_bias (nullptr without a
// table). One thread group per query row, over key tiles.
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    window_backward_dq_kernel(const WindowArgs<scalar_t, acc_t> a, const scalar_t* __restrict__ grad_out,
                              const scalar_t* __restrict__ out, const acc_t* __restrict__ lse,
                              scalar_t* __restrict__ grad_qkv, acc_t* __restrict__ delta, acc_t* __restrict__ grad_bias) {
  const WindowGeometry& g = a.geo;
  const Plan& p = a.plan;
  const BlockWindow bw = block_window(g);
  const int32_t C = g.C(), hd = g.head_dim, HW = g.H * g.W, N = g.N, h = bw.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const Smem<acc_t> sm(dynamic_smem(), p);
  const BiasColumn<acc_t> bias = stage_bias(a.bias_table, g, h, p, sm.bias);
  // the gradient of the table: summed in shared memory and added once per block, or added directly
  acc_t* bias_grad = nullptr;
  int32_t bias_grad_stride = 0;
  if (grad_bias != nullptr && p.bias_grad_rows > 0) {
    for (int32_t r = threadIdx.x; r < p.bias_grad_rows; r += blockDim.x) sm.bias_grad[r] = 0;
    bias_grad = sm.bias_grad, bias_grad_stride = 1;
  } else if (grad_bias != nullptr) {
    bias_grad = grad_bias + h, bias_grad_stride = g.heads;
  }

  const scalar_t* img = a.qkv + bw.b * HW * 3 * C;
  const scalar_t* pad = a.pad_qkv;
  const TokenSource<scalar_t> k_src{img + C + h * hd, 3 * C, pad != nullptr ? pad + C + h * hd : nullptr};
  const TokenSource<scalar_t> v_src{img + 2 * C + h * hd, 3 * C, pad != nullptr ? pad + 2 * C + h * hd : nullptr};

  for (int32_t row0 = 0; row0 < N; row0 += p.rows) {
    const int32_t i = row0 + static_cast<int32_t>(threadIdx.x) / p.G;
    const int32_t ti = i < N ? i : 0;
    const Token tq = token_at(g, bw, ti);
    const bool real = i < N && tq.pix >= 0;  // padding queries are cropped: no gradient flows through them
    const int32_t q_bias = g.bias_row_query_part(ti);
    const int32_t pixel = bw.b * HW + (real ? tq.pix : 0);
    acc_t q[DPT], dout[DPT], dq[DPT];
    load_row<DPT>(q, real ? img + tq.pix * 3 * C + h * hd : nullptr, hd, a.vec4, ln);
    load_row<DPT>(dout, real ? grad_out + pixel * C + h * hd : nullptr, hd, a.vec4, ln);
    load_row<DPT>(dq, real ? out + pixel * C + h * hd : nullptr, hd, a.vec4, ln);  // O, for D; dq starts below
    acc_t D = 0;
#pragma unroll
    for (int k = 0; k < DPT; ++k) D += dout[k] * dq[k];
    D = row_sum(D, p.G);
#pragma unroll
    for (int k = 0; k < DPT; ++k) dq[k] = 0;
    const acc_t lse_i = real ? lse[(bw.b * g.heads + h) * HW + tq.pix] : acc_t(0);

    for (int32_t k0 = 0; k0 < N; k0 += p.tile_rows) {
      const int32_t len = std::min(p.tile_rows, N - k0);
      if (row0 == 0 || p.tile_rows < N) {
        __syncthreads();
        load_tile_geometry(g, bw, p, k0, /*as_key=*/true, sm.pix, sm.region, sm.bias_part);
        __syncthreads();
        load_tiles(p, hd, a.vec4, len, sm.pix, k_src, sm.tile_a, v_src, sm.tile_b);
        __syncthreads();
      }
      for (int32_t j0 = 0; j0 < len; j0 += kBackwardStep) {
#pragma unroll
        for (int u = 0; u < kBackwardStep; ++u) {
          const int32_t j = j0 + u;
          const acc_t* k_row = sm.tile_a + (j << p.hd_shift);
          const acc_t qk = row_sum(dot_row<DPT>(q, k_row, ln), p.G);
          const acc_t dp = row_sum(dot_row<DPT>(dout, sm.tile_b + (j << p.hd_shift), ln), p.G);
          acc_t ds = 0;
          if (real && j < len) {
            const int32_t row = q_bias - sm.bias_part[j];
            const acc_t pr = acc_exp(a.scale * qk + logit_offset(g, bias, row, tq.region, sm.region[j]) - lse_i);
            ds = pr * (dp - D);
            if (bias_grad != nullptr && ln.part == 0) atomicAdd(bias_grad + row * bias_grad_stride, ds);
          }
          axpy_row<DPT>(ds, k_row, dq, ln);
        }
      }
    }
    if (real) {
      store_row<DPT>(grad_qkv + pixel * 3 * C + h * hd, dq, a.scale, hd, a.vec4, ln);
      if (ln.part == 0) delta[(bw.b * g.heads + h) * HW + tq.pix] = D;
    }
  }
  if (grad_bias != nullptr && p.bias_grad_rows > 0) {
    __syncthreads();  // every row's atomics are done
    for (int32_t r = threadIdx.x; r < p.bias_grad_rows; r += blockDim.x) {
      atomicAdd(grad_bias + r * g.heads + h, sm.bias_grad[r]);
    }
  }
}

// grad_qkv's k and v parts, and grad_pad [3C] for the padding keys. One thread group per key row, over
// query tiles; lse and delta of the tile's queries in shared memory.
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    window_backward_dkv_kernel(const WindowArgs<scalar_t, acc_t> a, const scalar_t* __restrict__ grad_out,
                               const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                               scalar_t* __restrict__ grad_qkv, acc_t* __restrict__ grad_pad) {
  const WindowGeometry& g = a.geo;
  const Plan& p = a.plan;
  const BlockWindow bw = block_window(g);
  const int32_t C = g.C(), hd = g.head_dim, HW = g.H * g.W, N = g.N, h = bw.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const Smem<acc_t> sm(dynamic_smem(), p);
  const BiasColumn<acc_t> bias = stage_bias(a.bias_table, g, h, p, sm.bias);
  for (int32_t e = threadIdx.x; e < p.pad_elems; e += blockDim.x) sm.pad[e] = 0;
  // the window's last (bottom-right) token is padding iff any is
  const bool has_padding = token_at(g, bw, N - 1).pix < 0;

  const scalar_t* img = a.qkv + bw.b * HW * 3 * C;
  const scalar_t* pad = a.pad_qkv;
  // padding queries add nothing, so their q and dO rows may as well be zeros
  const TokenSource<scalar_t> q_src{img + h * hd, 3 * C, nullptr};
  const TokenSource<scalar_t> do_src{grad_out + bw.b * HW * C + h * hd, C, nullptr};
  const TokenSource<scalar_t> k_src{img + C + h * hd, 3 * C, pad != nullptr ? pad + C + h * hd : nullptr};
  const TokenSource<scalar_t> v_src{img + 2 * C + h * hd, 3 * C, pad != nullptr ? pad + 2 * C + h * hd : nullptr};
  const acc_t* lse_bh = lse + (bw.b * g.heads + h) * HW;
  const acc_t* delta_bh = delta + (bw.b * g.heads + h) * HW;

  for (int32_t row0 = 0; row0 < N; row0 += p.rows) {
    const int32_t j = row0 + static_cast<int32_t>(threadIdx.x) / p.G;
    const bool active = j < N;
    const int32_t tj = active ? j : 0;
    const Token tk = token_at(g, bw, tj);
    const int32_t k_bias = g.bias_row_key_part(tj);
    acc_t k[DPT], v[DPT], dk[DPT], dv[DPT];
    load_row<DPT>(k, active ? k_src.row(tk.pix) : nullptr, hd, a.vec4, ln);
    load_row<DPT>(v, active ? v_src.row(tk.pix) : nullptr, hd, a.vec4, ln);
#pragma unroll
    for (int c = 0; c < DPT; ++c) dk[c] = 0, dv[c] = 0;

    for (int32_t t0 = 0; t0 < N; t0 += p.tile_rows) {
      const int32_t len = std::min(p.tile_rows, N - t0);
      if (row0 == 0 || p.tile_rows < N) {
        __syncthreads();
        load_tile_geometry(g, bw, p, t0, /*as_key=*/false, sm.pix, sm.region, sm.bias_part);
        __syncthreads();
        load_tiles(p, hd, a.vec4, len, sm.pix, q_src, sm.tile_a, do_src, sm.tile_b);
        // rows that add nothing (padding queries, rows past the window) get lse = +inf: P = dS = 0
        for (int32_t t = threadIdx.x; t < p.tile_rows; t += blockDim.x) {
          const int32_t pix = sm.pix[t];
          sm.row_lse[t] = pix >= 0 ? lse_bh[pix] : infinity<acc_t>();
          sm.row_delta[t] = pix >= 0 ? delta_bh[pix] : acc_t(0);
        }
        __syncthreads();
      }
      for (int32_t i0 = 0; i0 < len; i0 += kBackwardStep) {
#pragma unroll
        for (int u = 0; u < kBackwardStep; ++u) {
          const int32_t i = i0 + u;  // < tile_rows; rows >= len have lse = +inf
          const acc_t* q_row = sm.tile_a + (i << p.hd_shift);
          const acc_t* do_row = sm.tile_b + (i << p.hd_shift);
          const acc_t qk = row_sum(dot_row<DPT>(k, q_row, ln), p.G);
          const acc_t dp = row_sum(dot_row<DPT>(v, do_row, ln), p.G);
          const acc_t s = a.scale * qk + logit_offset(g, bias, sm.bias_part[i] - k_bias, sm.region[i], tk.region);
          const acc_t pr = acc_exp(s - sm.row_lse[i]);
          const acc_t ds = pr * (dp - sm.row_delta[i]);
          axpy_row<DPT>(pr, do_row, dv, ln);
          axpy_row<DPT>(ds, q_row, dk, ln);
        }
      }
    }
    if (active && tk.pix >= 0) {
      const int32_t pixel = bw.b * HW + tk.pix;
      store_row<DPT>(grad_qkv + pixel * 3 * C + C + h * hd, dk, a.scale, hd, a.vec4, ln);
      store_row<DPT>(grad_qkv + pixel * 3 * C + 2 * C + h * hd, dv, acc_t(1), hd, a.vec4, ln);
    } else if (active) {  // a padding key: its qkv is pad_qkv, shared by every padding token
#pragma unroll
      for (int c = 0; c < DPT; ++c) {
        const int32_t d = ln.dim(c);
        if (d < hd) {
          atomicAdd(sm.pad + d, dk[c] * a.scale);
          atomicAdd(sm.pad + p.hd_pad + d, dv[c]);
        }
      }
    }
  }
  if (has_padding) {
    __syncthreads();  // every padding key's sums are in
    for (int32_t d = threadIdx.x; d < hd; d += blockDim.x) {
      atomicAdd(grad_pad + C + h * hd + d, sm.pad[d]);
      atomicAdd(grad_pad + 2 * C + h * hd + d, sm.pad[p.hd_pad + d]);
    }
  }
}

// ---- host code --------------------------------------------------------------------------------------

// Checks the shapes the kernels take and returns the grid size (one block per window and head).
dim3 window_grid(const WindowGeometry& g) {
  TORCH_CHECK_VALUE(g.head_dim <= kMaxHeadDim, "the CUDA window attention kernels take head_dim <= ", kMaxHeadDim,
                    ", got ", g.head_dim);
  const int64_t blocks = int64_t{g.B} * g.windows_per_image() * g.heads;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "window attention: ", blocks,
                    " (window, head) pairs exceed the CUDA grid");
  return dim3(static_cast<unsigned>(blocks));
}

// Whether token rows can move as Pack4: head_dim % 4 == 0 makes every row offset (pixel * 3C + which * C +
// head * head_dim, or pixel * C + ...) a multiple of four values; the tensors' data must be aligned to four.
bool rows_are_vec4(const WindowGeometry& g, std::initializer_list<const at::Tensor*> tensors) {
  if (g.head_dim % 4 != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (4 * t->element_size()) != 0) return false;
  }
  return true;
}

template <typename scalar_t, typename acc_t>
WindowArgs<scalar_t, acc_t> make_args(const WindowInputs& in, const Plan& plan, double scale, bool vec4) {
  WindowArgs<scalar_t, acc_t> args;
  args.geo = in.geo;
  args.plan = plan;
  args.qkv = in.qkv.const_data_ptr<scalar_t>();
  args.pad_qkv = in.pad_qkv.defined() ? in.pad_qkv.const_data_ptr<scalar_t>() : nullptr;
  args.bias_table = in.bias_table.defined() ? in.bias_table.const_data_ptr<acc_t>() : nullptr;
  args.scale = static_cast<acc_t>(scale);
  args.vec4 = vec4;
  return args;
}

template <typename acc_t>
Plan checked_plan(const WindowGeometry& g, int dpt, bool has_bias, KernelKind kind) {
  const Plan plan = make_plan(g, dpt, sizeof(acc_t), has_bias, kind);
  TORCH_INTERNAL_ASSERT(plan.tile_rows >= kStep && Smem<acc_t>::bytes(plan) <= kSmemBudget,
                        "window attention: no shared-memory plan for head_dim ", g.head_dim);
  return plan;
}

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                                                         const std::optional<at::Tensor>& pad_qkv, int64_t num_heads,
                                                         at::IntArrayRef window, at::IntArrayRef shift, double scale) {
  const WindowInputs in = prepare_window_inputs(qkv, bias_table, pad_qkv, num_heads, window, shift);
  const WindowGeometry g = in.geo;
  const auto acc_opts = in.qkv.options().dtype(window_acc_dtype(in.qkv.scalar_type()));
  at::Tensor out = at::empty({g.B, g.H, g.W, g.C()}, in.qkv.options());
  at::Tensor lse = at::empty({g.B, g.heads, g.H, g.W}, acc_opts);
  if (out.numel() == 0) return {out, lse};
  const dim3 grid = window_grid(g);
  const c10::cuda::CUDAGuard guard(in.qkv.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool has_bias = in.bias_table.defined();
  const bool vec4 = rows_are_vec4(g, {&in.qkv, &in.pad_qkv, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.qkv.scalar_type(), "effvit::window_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDouble = std::is_same_v<acc_t, double>;
    const int dpt = slice_width(g.head_dim, kDouble, KernelKind::kForward);
    with_slice_width<!kDouble>(dpt, [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const Plan plan = checked_plan<acc_t>(g, DPT, has_bias, KernelKind::kForward);
      window_forward_kernel<scalar_t, acc_t, DPT><<<grid, plan.threads, Smem<acc_t>::bytes(plan), stream>>>(
          make_args<scalar_t, acc_t>(in, plan, scale, vec4), out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_qkv, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    at::IntArrayRef window, at::IntArrayRef shift, double scale) {
  const WindowInputs in = prepare_window_inputs(qkv, bias_table, pad_qkv, num_heads, window, shift);
  check_window_backward(in, grad_out, out, lse);
  const WindowGeometry g = in.geo;
  const bool has_bias = in.bias_table.defined();
  const auto acc_opts = in.qkv.options().dtype(window_acc_dtype(in.qkv.scalar_type()));
  // every real token's q, k and v parts are written exactly once, so grad_qkv needs no zeroing
  at::Tensor grad_qkv = at::empty(in.qkv.sizes(), in.qkv.options());
  at::Tensor grad_bias = has_bias ? at::zeros({g.table_rows(), g.heads}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad_pad = at::zeros({3 * g.C()}, acc_opts);
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_bias, grad_pad};
  const dim3 grid = window_grid(g);
  const c10::cuda::CUDAGuard guard(in.qkv.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad_out_c = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const at::Tensor delta = at::empty({g.B, g.heads, g.H, g.W}, acc_opts);  // dO . O per query, from the dq kernel
  const bool vec4 = rows_are_vec4(g, {&in.qkv, &in.pad_qkv, &grad_out_c, &out_c, &grad_qkv});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.qkv.scalar_type(), "effvit::window_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDouble = std::is_same_v<acc_t, double>;
    const int dq_dpt = slice_width(g.head_dim, kDouble, KernelKind::kBackwardDq);
    with_slice_width<!kDouble>(dq_dpt, [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const Plan plan = checked_plan<acc_t>(g, DPT, has_bias, KernelKind::kBackwardDq);
      window_backward_dq_kernel<scalar_t, acc_t, DPT><<<grid, plan.threads, Smem<acc_t>::bytes(plan), stream>>>(
          make_args<scalar_t, acc_t>(in, plan, scale, vec4), grad_out_c.const_data_ptr<scalar_t>(),
          out_c.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<acc_t>(), grad_qkv.mutable_data_ptr<scalar_t>(),
          delta.mutable_data_ptr<acc_t>(), has_bias ? grad_bias.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // reads delta, so it runs after the dq kernel (same stream)
    const int dkv_dpt = slice_width(g.head_dim, kDouble, KernelKind::kBackwardDkv);
    with_slice_width<false>(dkv_dpt, [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const Plan plan = checked_plan<acc_t>(g, DPT, has_bias, KernelKind::kBackwardDkv);
      window_backward_dkv_kernel<scalar_t, acc_t, DPT><<<grid, plan.threads, Smem<acc_t>::bytes(plan), stream>>>(
          make_args<scalar_t, acc_t>(in, plan, scale, vec4), grad_out_c.const_data_ptr<scalar_t>(),
          lse_c.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), grad_qkv.mutable_data_ptr<scalar_t>(),
          grad_pad.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_qkv, grad_bias, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CUDA, m) {
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace effvit
