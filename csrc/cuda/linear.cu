// Non-causal linear attention (EfficientViT's LiteMLA, L2ViT's LinearAttention): CUDA kernels, forward and an
// O(N)-memory backward. The contract is csrc/effvit_ops.cpp's schema comment; per (b, h), with
// a_i = phi(q_i * q_scale), b_j = phi(k_j * k_scale):
//   S = sum_j b_j v_j^T,  z = sum_j b_j,  out_i = t_h * (a_i S) / max(a_i . z + eps, denom_min)
// The state M = [S | z] ([D, E], E = Dv + 1) is saved for the backward.
//
// Four kernels, all deterministic (no atomics; partial sums added in chunk order by sum_chunks_kernel):
//   outer:    P = sum_i x_i y_i^T over the tokens of a chunk ([D, E] partial per (b, h, chunk)); x = phi(src *
//             scale), y = a strided source with an optional ones column. The forward's state (x = b, y = [v, 1])
//             and the backward's [dS | dz] (x = a, y = [dnum, dden] from the scratch buffer) both use it. Each
//             thread owns a slot = kSlotRows rows x one column of P in registers; slots split over the threads
//             (and over several blocks for large D * E), tokens over "token groups" of threads where the slots
//             are fewer than the threads, summed in group order in shared memory at the end. With one chunk
//             the kernel writes the result directly, else the partials [BH, chunks, D, E] go through sum_chunks_kernel.
//   forward:  per token tile: the tile's phi(q * q_scale) [T, D] in shared memory, U = a M [T, E] (column Dv is
//             a . z), out = t_h U / max(U[:, Dv] + eps, denom_min) written through out's strides.
//   bwd dq:   per token tile: U = a M as in the forward, then per token c, dnum = t_h g / c, dden, and
//             da = M [dnum, dden]; grad_q = q_scale phi'(a) da. [dnum, dden] rows go to a scratch buffer
//             [BH, N, E] (acc dtype) for the outer kernel; per-block partial sums of g . num / c for grad_t.
//   bwd dkv:  per token tile, with G = [dS | dz]: grad_v = b G (the first Dv columns), grad_k = k_scale phi'(b)
//             (G [v, 1]).
// The state (or G) sits in shared memory as rows of es values; when it does not fit the 48 KB budget with the
// tiles (large D * Dv, double), it is staged in chunks of dc rows (re-read from L2 per tile).
// Thread maps: U[t, 4g..4g+3] per (t, g) pair (consecutive lanes take consecutive column groups of one token:
// the state rows are read as 16-byte vectors without conflicts, the token's a value is a broadcast); da / db
// per (t, 4 rows) pair. Global rows are read and written by element, in the order of the tensor's smaller
// stride (tokens fastest for (B, H, D, N) memory, dims fastest otherwise), so both layouts coalesce.
// Index math: 64-bit for global offsets (any strides), 32-bit inside tiles and shared memory.
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
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "../common/linear_checks.h"
#include "attention_tile.cuh"

namespace effvit {
namespace cuda {
namespace {

using attn::acc_exp;
using attn::dynamic_smem;
using attn::multiprocessor_count;
using attn::Vec4;

// ---- BEGIN linear device code -------------------------------------------------------------------------

constexpr int kThreads = 256;               // threads per block of the token-tile kernels (and most of outer's)
constexpr int kSlotRows = 8;                // rows of P per outer-kernel slot
constexpr int64_t kSmemBudget = 48 * 1024;  // dynamic shared memory usable without cudaFuncSetAttribute
constexpr int64_t kOuterTileBudget = 32 * 1024;

inline int32_t round_up(int32_t x, int32_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A logical [B, H, N, cols] tensor read or written through its four strides.
template <typename T>
struct Src {
  T* ptr;
  int64_t sb, sh, sn, sd;
  bool token_fastest;  // sn < sd: consecutive threads take consecutive tokens
  __device__ __forceinline__ T* at(int32_t b, int32_t h) const { return ptr + b * sb + h * sh; }
};

// phi (0 identity, 1 relu, 2 elu+1) and its derivative from phi's value y = phi(x): relu' = (y > 0), torch's
// (0 at x == 0); elu+1' = 1 for x > 0 (y > 1, or y == 1 where x + 1 rounds to 1: either way 1) else exp(x), y up to
// the rounding of elu(x) + 1.
template <typename acc_t>
__device__ __forceinline__ acc_t feature(acc_t x, int32_t phi) {
  if (phi == 1) return x < acc_t(0) ? acc_t(0) : x;  // NaN stays NaN, as torch's relu
  if (phi == 2) return x > acc_t(0) ? x + acc_t(1) : (acc_exp(x) - acc_t(1)) + acc_t(1);  // elu(x) + 1, as torch rounds it
  return x;
}
template <typename acc_t>
__device__ __forceinline__ acc_t feature_grad(acc_t y, int32_t phi) {
  if (phi == 1) return y > acc_t(0) ? acc_t(1) : acc_t(0);
  if (phi == 2) return y > acc_t(1) ? acc_t(1) : y;
  return acc_t(1);
}

// tile[t * stride + c] for t < rows, c < stride: element (t, c) of `base` (t < len, c < cols) through f, 1 in
// column ones_col (t < len), 0 elsewhere. Threads walk the source in its smaller stride's order, kLoadBatch
// elements each before storing any: the loads are in flight together (one at a time, a tile of a few thousand
// elements over a few warps waits out the global-memory latency dozens of times).
constexpr int kLoadBatch = 8;
template <typename acc_t, typename src_t, typename F>
__device__ __forceinline__ void load_tile(const src_t* base, int64_t sn, int64_t sd, bool token_fastest, int32_t len,
                                          int32_t cols, int32_t ones_col, int32_t rows, int32_t stride, acc_t* tile,
                                          const F& f) {
  const int32_t total = rows * stride, step = static_cast<int32_t>(blockDim.x);
  for (int32_t i0 = static_cast<int32_t>(threadIdx.x); i0 < total; i0 += kLoadBatch * step) {
    acc_t x[kLoadBatch];
    int32_t at[kLoadBatch];  // the element's place in the tile; -1: past the tile
    bool data[kLoadBatch];   // read from the source (f applies), else the ones column or padding
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int32_t i = i0 + u * step;
      int32_t t, c;
      if (token_fastest) {
        c = i / rows, t = i - c * rows;
      } else {
        t = i / stride, c = i - t * stride;
      }
      at[u] = i < total ? t * stride + c : -1;
      data[u] = i < total && t < len && c < cols;
      x[u] = data[u] ? static_cast<acc_t>(base[t * sn + c * sd])
                     : (i < total && t < len && c == ones_col ? acc_t(1) : acc_t(0));
    }
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      if (at[u] >= 0) tile[at[u]] = data[u] ? f(x[u]) : x[u];
    }
  }
}

// dst element (t, c) = f(t, c) for t < len, c < cols, in dst's smaller stride's order.
template <typename dst_t, typename F>
__device__ __forceinline__ void store_tile(dst_t* base, int64_t sn, int64_t sd, bool token_fastest, int32_t len,
                                           int32_t cols, const F& f) {
  const int32_t total = len * cols;
  for (int32_t i = threadIdx.x; i < total; i += blockDim.x) {
    int32_t t, c;
    if (token_fastest) {
      c = i / len, t = i - c * len;
    } else {
      t = i / cols, c = i - t * cols;
    }
    base[t * sn + c * sd] = static_cast<dst_t>(f(t, c));
  }
}

// ---- outer kernel: P = sum_i phi(x_i * scale) y_i^T over a chunk of tokens ----

struct OuterPlan {
  int32_t xs;            // x tile row stride: D rounded up to kSlotRows
  int32_t slots;         // E * xs / kSlotRows
  int32_t slot_threads;  // slots per block (<= kThreads)
  int32_t slot_blocks;   // blocks per (b, h, chunk) over the slots
  int32_t groups;        // token groups per block (slot_threads * groups <= kThreads)
  int32_t threads;       // blockDim.x: slot_threads * groups rounded up to a warp
  int32_t T;             // tokens per shared tile
  int32_t chunks;        // chunks of N per (b, h)
  int32_t chunk_tokens;  // tokens per chunk, a multiple of T
};

inline OuterPlan make_outer_plan(int64_t D, int64_t E, int64_t N, int64_t BH, int64_t acc_size, int64_t sms) {
  OuterPlan p{};
  p.xs = round_up(static_cast<int32_t>(D), kSlotRows);
  p.slots = static_cast<int32_t>(E) * (p.xs / kSlotRows);
  p.slot_threads = std::min(p.slots, kThreads);
  p.slot_blocks = static_cast<int32_t>(ceil_div(p.slots, p.slot_threads));
  p.groups = std::max(1, kThreads / p.slot_threads);
  p.threads = round_up(p.slot_threads * p.groups, 32);
  const int64_t per_token = (p.xs + E) * acc_size;
  p.T = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(128, kOuterTileBudget / per_token)));
  // chunks: enough blocks for four per SM (a block walks its tokens one after another, so blocks are the
  // parallelism), chunks of at least one tile; each chunk costs a D x E partial, summed by sum_chunks_kernel
  const int64_t want = ceil_div(4 * sms, std::max<int64_t>(1, BH * p.slot_blocks));
  const int64_t most = std::max<int64_t>(1, ceil_div(N, int64_t{p.T}));
  const int64_t chunks = std::max<int64_t>(1, std::min(want, most));
  p.chunk_tokens = static_cast<int32_t>(ceil_div(ceil_div(N, chunks), p.T) * p.T);
  p.chunks = static_cast<int32_t>(std::max<int64_t>(1, ceil_div(N, p.chunk_tokens)));
  return p;
}

inline int64_t outer_smem_bytes(const OuterPlan& p, int64_t E, int64_t acc_size) {
  const int64_t tiles = int64_t{p.T} * (p.xs + E);
  const int64_t reduce = int64_t{p.groups} * p.slot_threads * kSlotRows;
  return std::max(tiles, reduce) * acc_size;
}

template <typename acc_t>
struct OuterArgs {
  OuterPlan p;
  int32_t H, N, D, E;
  int32_t y_cols;    // columns read from y (E, or E - 1 with the ones column)
  int32_t ones_col;  // y's column of ones (-1: none)
  int32_t phi;
  acc_t x_scale;
};

// partial [BH, chunks, D, E]; blockIdx.x = ((bh * chunks) + chunk) * slot_blocks + slot block.
template <typename scalar_t, typename y_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    linear_outer_kernel(const OuterArgs<acc_t> a, const Src<const scalar_t> x, const Src<const y_t> y,
                        acc_t* __restrict__ partial) {
  const OuterPlan& p = a.p;
  int32_t idx = static_cast<int32_t>(blockIdx.x);
  const int32_t sblock = idx % p.slot_blocks;
  idx /= p.slot_blocks;
  const int32_t chunk = idx % p.chunks, bh = idx / p.chunks;
  const int32_t b = bh / a.H, h = bh - b * a.H, E = a.E;
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t lane_slot = tid % p.slot_threads, group = tid / p.slot_threads;
  const int32_t slot = sblock * p.slot_threads + lane_slot;
  const bool active = group < p.groups && slot < p.slots;
  const int32_t dg = slot / E, e = slot - dg * E;  // rows kSlotRows * dg .. + kSlotRows, column e

  acc_t* x_tile = reinterpret_cast<acc_t*>(dynamic_smem());
  acc_t* y_tile = x_tile + p.T * p.xs;
  const scalar_t* xb = x.at(b, h);
  const y_t* yb = y.at(b, h);
  const int32_t phi = a.phi;
  const acc_t scale = a.x_scale;

  acc_t acc[kSlotRows];
#pragma unroll
  for (int r = 0; r < kSlotRows; ++r) acc[r] = 0;
  const int32_t n_begin = chunk * p.chunk_tokens, n_end = std::min(a.N, n_begin + p.chunk_tokens);
  for (int32_t n0 = n_begin; n0 < n_end; n0 += p.T) {
    const int32_t len = std::min(p.T, n_end - n0);
    if (n0 > n_begin) __syncthreads();  // the previous tile is no longer read
    load_tile(xb + n0 * x.sn, x.sn, x.sd, x.token_fastest, len, a.D, -1, p.T, p.xs, x_tile,
              [&](acc_t v) { return feature(v * scale, phi); });
    load_tile(yb + n0 * y.sn, y.sn, y.sd, y.token_fastest, len, a.y_cols, a.ones_col, p.T, E, y_tile,
              [](acc_t v) { return v; });
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int32_t t = group; t < len; t += p.groups) {
        const acc_t yv = y_tile[t * E + e];
        acc_t xv[kSlotRows];
#pragma unroll
        for (int r = 0; r < kSlotRows; r += 4) {
          Vec4<acc_t>::load(x_tile + t * p.xs + dg * kSlotRows + r, *reinterpret_cast<acc_t(*)[4]>(xv + r));
        }
#pragma unroll
        for (int r = 0; r < kSlotRows; ++r) acc[r] += xv[r] * yv;
      }
    }
  }
  // the token groups' sums, added in group order
  __syncthreads();
  acc_t* red = reinterpret_cast<acc_t*>(dynamic_smem());
  if (group < p.groups) {
#pragma unroll
    for (int r = 0; r < kSlotRows; ++r) red[(group * p.slot_threads + lane_slot) * kSlotRows + r] = acc[r];
  }
  __syncthreads();
  if (group == 0 && slot < p.slots) {
    acc_t* dst = partial + (int64_t{bh} * p.chunks + chunk) * a.D * E;
#pragma unroll
    for (int r = 0; r < kSlotRows; ++r) {
      acc_t s = red[lane_slot * kSlotRows + r];
      for (int32_t g = 1; g < p.groups; ++g) s += red[(g * p.slot_threads + lane_slot) * kSlotRows + r];
      const int32_t d = dg * kSlotRows + r;
      if (d < a.D) dst[d * E + e] = s;
    }
  }
}

// ---- token-tile kernels: forward, backward dq, backward dkv ----

struct LinearPlan {
  int32_t d4, e4;  // D and E rounded up to 4
  int32_t xs;      // x tile row stride (>= d4)
  int32_t es;      // row stride of the state chunk and the y / u tiles (>= e4)
  int32_t T;       // tokens per tile
  int32_t dc;      // state rows per shared chunk, a multiple of 4 (d4: the whole state, loaded once per block)
  int32_t tiles;   // token tiles per (b, h)
  int32_t blocks;  // blocks per (b, h)
  int32_t tiles_per_block;
};

// A row stride of an odd number of 16-byte groups (float): the rows of 8 consecutive lanes' vector accesses fall
// in distinct bank groups.
inline int32_t padded_stride(int32_t n4) { return (n4 / 4) % 2 == 0 ? n4 + 4 : n4; }

inline int64_t tile_smem_values(int64_t T, int64_t xs, int64_t es) { return T * (xs + 2 * es) + T; }

inline LinearPlan make_linear_plan(int64_t D, int64_t E, int64_t N, int64_t BH, int64_t acc_size, int64_t sms) {
  LinearPlan p{};
  p.d4 = round_up(static_cast<int32_t>(D), 4);
  p.e4 = round_up(static_cast<int32_t>(E), 4);
  p.xs = padded_stride(p.d4);
  p.es = padded_stride(p.e4);
  // about two (t, column group) pairs per thread
  int64_t T = std::max<int64_t>(1, std::min<int64_t>(64, 2 * kThreads / (p.e4 / 4)));
  T = std::min<int64_t>(T, std::max<int64_t>(N, 1));
  const int64_t whole = int64_t{p.d4} * p.es;
  if ((whole + tile_smem_values(T, p.xs, p.es)) * acc_size <= kSmemBudget) {
    p.dc = p.d4;
  } else {
    while (T > 1 && tile_smem_values(T, p.xs, p.es) * acc_size > kSmemBudget / 2) T = (T + 1) / 2;
    const int64_t left = kSmemBudget / acc_size - tile_smem_values(T, p.xs, p.es);
    p.dc = static_cast<int32_t>(std::min<int64_t>(p.d4, left / p.es / 4 * 4));
  }
  p.T = static_cast<int32_t>(T);
  p.tiles = static_cast<int32_t>(ceil_div(std::max<int64_t>(N, 1), T));
  // four blocks per SM where N allows, and at most 8 tiles per block (the state is loaded once per block)
  const int64_t want = std::max(ceil_div(4 * sms, std::max<int64_t>(BH, 1)), ceil_div(p.tiles, 8));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(p.tiles, want));
  p.tiles_per_block = static_cast<int32_t>(ceil_div(p.tiles, blocks));
  p.blocks = static_cast<int32_t>(ceil_div(p.tiles, p.tiles_per_block));
  return p;
}

inline int64_t linear_smem_bytes(const LinearPlan& p, int64_t acc_size) {
  return (int64_t{p.dc} * p.es + tile_smem_values(p.T, p.xs, p.es)) * acc_size;
}

template <typename acc_t>
struct TileSmem {
  acc_t* M;  // [dc, es]: state rows c0 .. c0 + dc
  acc_t* X;  // [T, xs]: phi(x) of the tile's tokens (then grad_q / grad_k in place)
  acc_t* Y;  // [T, es]: grad_out -> [dnum, dden] (dq) or [v, 1] (dkv)
  acc_t* U;  // [T, es]: X M
  acc_t* W;  // [T]: g . num / c (dq)
  __device__ __forceinline__ TileSmem(unsigned char* base, const LinearPlan& p) {
    M = reinterpret_cast<acc_t*>(base);
    X = M + p.dc * p.es;
    Y = X + p.T * p.xs;
    U = Y + p.T * p.es;
    W = U + p.T * p.es;
  }
};

template <typename acc_t>
struct LinearArgs {
  LinearPlan p;
  int32_t H, N, D, Dv, E;
  int32_t phi;
  acc_t q_scale, k_scale, eps, denom_min;
  const acc_t* temperature;  // [H], or nullptr (t = 1)
};

// Rows c0 .. c0 + rows of the state [D, E] of one (b, h) into the shared chunk (zeros past D and E).
template <typename acc_t>
__device__ __forceinline__ void load_state_rows(const acc_t* M, int32_t c0, int32_t rows, int32_t D, int32_t E,
                                                int32_t es, acc_t* dst) {
  load_tile(M + c0 * E, int64_t{E}, int64_t{1}, false, std::min(rows, D - c0), E, -1, rows, es, dst,
            [](acc_t v) { return v; });
}

// U[t, :] = X[t, :] M for the tile (all state chunks). Starts with a barrier (the tiles' loads); multi: the state
// is staged chunk by chunk (else the caller loaded it once). A (t, column group) pair keeps one owner over the
// chunks, so U accumulates in place.
template <typename acc_t>
__device__ __forceinline__ void x_times_state(const LinearPlan& p, int32_t D, int32_t E, const acc_t* M_global,
                                              const TileSmem<acc_t>& sm) {
  const bool multi = p.dc < p.d4;
  const int32_t groups = p.e4 / 4, pairs = p.T * groups;
  for (int32_t c0 = 0; c0 < p.d4; c0 += p.dc) {
    const int32_t rows = std::min(p.dc, p.d4 - c0);
    if (multi) {
      __syncthreads();  // the previous chunk is no longer read
      load_state_rows(M_global, c0, rows, D, E, p.es, sm.M);
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < pairs; i += blockDim.x) {
      const int32_t t = i / groups, g = i - t * groups;
      acc_t u[4];
      if (c0 == 0) {
        u[0] = u[1] = u[2] = u[3] = 0;
      } else {
        Vec4<acc_t>::load(sm.U + t * p.es + 4 * g, u);
      }
      const acc_t* x = sm.X + t * p.xs + c0;
      const acc_t* m = sm.M + 4 * g;
      for (int32_t d = 0; d < rows; d += 4) {
        acc_t xv[4];
        Vec4<acc_t>::load(x + d, xv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_t mv[4];
          Vec4<acc_t>::load(m + (d + j) * p.es, mv);
#pragma unroll
          for (int c = 0; c < 4; ++c) u[c] += xv[j] * mv[c];
        }
      }
      Vec4<acc_t>::store(sm.U + t * p.es + 4 * g, u);
    }
  }
}

// f(t, d, w[4]) with w = (M Y[t, :])[d .. d + 4] for every token of the tile and d a multiple of 4 below d4.
// Starts with a barrier; stages the state again when it does not fit whole.
template <typename acc_t, typename F>
__device__ __forceinline__ void state_times_y(const LinearPlan& p, int32_t D, int32_t E, const acc_t* M_global,
                                              const TileSmem<acc_t>& sm, const F& f) {
  const bool multi = p.dc < p.d4;
  for (int32_t c0 = 0; c0 < p.d4; c0 += p.dc) {
    const int32_t rows = std::min(p.dc, p.d4 - c0);
    if (multi) {
      __syncthreads();
      load_state_rows(M_global, c0, rows, D, E, p.es, sm.M);
    }
    __syncthreads();
    const int32_t groups = rows / 4, pairs = p.T * groups;
    for (int32_t i = threadIdx.x; i < pairs; i += blockDim.x) {
      const int32_t t = i / groups, g = i - t * groups;
      acc_t w[4] = {0, 0, 0, 0};
      const acc_t* yr = sm.Y + t * p.es;
      const acc_t* m = sm.M + 4 * g * p.es;
      for (int32_t e = 0; e < p.e4; e += 4) {
        acc_t yv[4];
        Vec4<acc_t>::load(yr + e, yv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_t mv[4];
          Vec4<acc_t>::load(m + j * p.es + e, mv);
#pragma unroll
          for (int c = 0; c < 4; ++c) w[j] += mv[c] * yv[c];
        }
      }
      f(t, c0 + 4 * g, w);
    }
  }
}

struct BlockTiles {
  int32_t bh, blk, b, h, tile0, tile1;
};

__device__ __forceinline__ BlockTiles block_tiles(const LinearPlan& p, int32_t H) {
  BlockTiles bt;
  bt.bh = static_cast<int32_t>(blockIdx.x) / p.blocks;
  bt.blk = static_cast<int32_t>(blockIdx.x) - bt.bh * p.blocks;
  bt.b = bt.bh / H;
  bt.h = bt.bh - bt.b * H;
  bt.tile0 = bt.blk * p.tiles_per_block;
  bt.tile1 = std::min(bt.tile0 + p.tiles_per_block, p.tiles);
  return bt;
}

// The clamped denominator: NaN stays NaN (torch.clamp), denom_min = -inf is no clamp.
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_den(acc_t den, acc_t denom_min) {
  return den < denom_min ? denom_min : den;
}

// out [B, H, N, Dv] (any strides) from q and the state [BH, D, E].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    linear_forward_kernel(const LinearArgs<acc_t> a, const Src<const scalar_t> q, const acc_t* __restrict__ state,
                          const Src<scalar_t> out) {
  const LinearPlan& p = a.p;
  const BlockTiles bt = block_tiles(p, a.H);
  const TileSmem<acc_t> sm(dynamic_smem(), p);
  const int32_t D = a.D, E = a.E, Dv = a.Dv, phi = a.phi;
  const acc_t* M = state + int64_t{bt.bh} * D * E;
  const acc_t th = a.temperature != nullptr ? a.temperature[bt.h] : acc_t(1);
  const acc_t qs = a.q_scale, eps = a.eps, dmin = a.denom_min;
  const scalar_t* qb = q.at(bt.b, bt.h);
  scalar_t* ob = out.at(bt.b, bt.h);
  if (p.dc == p.d4) load_state_rows(M, 0, p.d4, D, E, p.es, sm.M);
  for (int32_t tile = bt.tile0; tile < bt.tile1; ++tile) {
    const int32_t n0 = tile * p.T, len = std::min(p.T, a.N - n0);
    if (tile > bt.tile0) __syncthreads();  // the previous tile is stored
    load_tile(qb + n0 * q.sn, q.sn, q.sd, q.token_fastest, len, D, -1, p.T, p.xs, sm.X,
              [&](acc_t v) { return feature(v * qs, phi); });
    x_times_state(p, D, E, M, sm);
    __syncthreads();
    const acc_t* U = sm.U;
    const int32_t es = p.es;
    store_tile(ob + n0 * out.sn, out.sn, out.sd, out.token_fastest, len, Dv, [&](int32_t t, int32_t c) {
      const acc_t cden = clamp_den(U[t * es + Dv] + eps, dmin);
      return th * U[t * es + c] / cden;
    });
  }
}

// grad_q [B, H, N, D] (contiguous), y_out [BH, N, E] = [dnum, dden] per token, dt_partial [BH, blocks].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    linear_backward_dq_kernel(const LinearArgs<acc_t> a, const Src<const scalar_t> grad_out,
                              const Src<const scalar_t> q, const acc_t* __restrict__ state,
                              const Src<scalar_t> grad_q, acc_t* __restrict__ y_out, acc_t* __restrict__ dt_partial) {
  const LinearPlan& p = a.p;
  const BlockTiles bt = block_tiles(p, a.H);
  const TileSmem<acc_t> sm(dynamic_smem(), p);
  const int32_t D = a.D, E = a.E, Dv = a.Dv, phi = a.phi, es = p.es, xs = p.xs;
  const acc_t* M = state + int64_t{bt.bh} * D * E;
  const acc_t th = a.temperature != nullptr ? a.temperature[bt.h] : acc_t(1);
  const acc_t qs = a.q_scale, eps = a.eps, dmin = a.denom_min;
  const scalar_t* qb = q.at(bt.b, bt.h);
  const scalar_t* gb = grad_out.at(bt.b, bt.h);
  scalar_t* dqb = grad_q.at(bt.b, bt.h);
  acc_t* yb = y_out + int64_t{bt.bh} * a.N * E;
  acc_t dt = 0;  // thread 0's running sum of g . num / c, in token order
  if (p.dc == p.d4) load_state_rows(M, 0, p.d4, D, E, p.es, sm.M);
  for (int32_t tile = bt.tile0; tile < bt.tile1; ++tile) {
    const int32_t n0 = tile * p.T, len = std::min(p.T, a.N - n0);
    if (tile > bt.tile0) __syncthreads();
    load_tile(qb + n0 * q.sn, q.sn, q.sd, q.token_fastest, len, D, -1, p.T, xs, sm.X,
              [&](acc_t v) { return feature(v * qs, phi); });
    load_tile(gb + n0 * grad_out.sn, grad_out.sn, grad_out.sd, grad_out.token_fastest, len, Dv, -1, p.T, es, sm.Y,
              [](acc_t v) { return v; });
    x_times_state(p, D, E, M, sm);  // U = [num, a . z]
    __syncthreads();
    // per token: Y[t] = [t_h g / c, dden], W[t] = g . num / c (rows past the tile stay zero)
    for (int32_t t = threadIdx.x; t < len; t += blockDim.x) {
      const acc_t* u = sm.U + t * es;
      acc_t* y = sm.Y + t * es;
      const acc_t den = u[Dv] + eps;
      const acc_t c = clamp_den(den, dmin);
      acc_t gn = 0;
      for (int32_t e = 0; e < Dv; ++e) gn += y[e] * u[e];
      const acc_t s = th / c;
      for (int32_t e = 0; e < Dv; ++e) y[e] *= s;
      y[Dv] = den >= dmin ? -th * gn / (c * c) : acc_t(0);
      sm.W[t] = gn / c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int32_t t = 0; t < len; ++t) dt += sm.W[t];
    }
    const acc_t* Y = sm.Y;
    store_tile(yb + int64_t{n0} * E, int64_t{E}, int64_t{1}, false, len, E,
               [&](int32_t t, int32_t c) { return Y[t * es + c]; });
    // grad_q = q_scale phi'(a) (M [dnum, dden]), in place of a
    acc_t* X = sm.X;
    state_times_y(p, D, E, M, sm, [&](int32_t t, int32_t d, const acc_t (&w)[4]) {
#pragma unroll
      for (int j = 0; j < 4; ++j) X[t * xs + d + j] = qs * feature_grad(X[t * xs + d + j], phi) * w[j];
    });
    __syncthreads();
    store_tile(dqb + n0 * grad_q.sn, grad_q.sn, grad_q.sd, grad_q.token_fastest, len, D,
               [&](int32_t t, int32_t c) { return X[t * xs + c]; });
  }
  if (threadIdx.x == 0) dt_partial[int64_t{bt.bh} * p.blocks + bt.blk] = dt;
}

// grad_k [B, H, N, D] and grad_v [B, H, N, Dv] (contiguous) from G = [dS | dz] [BH, D, E].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    linear_backward_dkv_kernel(const LinearArgs<acc_t> a, const Src<const scalar_t> k, const Src<const scalar_t> v,
                               const acc_t* __restrict__ grad_state, const Src<scalar_t> grad_k,
                               const Src<scalar_t> grad_v) {
  const LinearPlan& p = a.p;
  const BlockTiles bt = block_tiles(p, a.H);
  const TileSmem<acc_t> sm(dynamic_smem(), p);
  const int32_t D = a.D, E = a.E, Dv = a.Dv, phi = a.phi, es = p.es, xs = p.xs;
  const acc_t* M = grad_state + int64_t{bt.bh} * D * E;
  const acc_t ks = a.k_scale;
  const scalar_t* kb = k.at(bt.b, bt.h);
  const scalar_t* vb = v.at(bt.b, bt.h);
  scalar_t* dkb = grad_k.at(bt.b, bt.h);
  scalar_t* dvb = grad_v.at(bt.b, bt.h);
  if (p.dc == p.d4) load_state_rows(M, 0, p.d4, D, E, p.es, sm.M);
  for (int32_t tile = bt.tile0; tile < bt.tile1; ++tile) {
    const int32_t n0 = tile * p.T, len = std::min(p.T, a.N - n0);
    if (tile > bt.tile0) __syncthreads();
    load_tile(kb + n0 * k.sn, k.sn, k.sd, k.token_fastest, len, D, -1, p.T, xs, sm.X,
              [&](acc_t x) { return feature(x * ks, phi); });
    load_tile(vb + n0 * v.sn, v.sn, v.sd, v.token_fastest, len, Dv, Dv, p.T, es, sm.Y, [](acc_t x) { return x; });
    x_times_state(p, D, E, M, sm);  // U[:, :Dv] = grad_v
    acc_t* X = sm.X;
    state_times_y(p, D, E, M, sm, [&](int32_t t, int32_t d, const acc_t (&w)[4]) {
#pragma unroll
      for (int j = 0; j < 4; ++j) X[t * xs + d + j] = ks * feature_grad(X[t * xs + d + j], phi) * w[j];
    });
    __syncthreads();
    const acc_t* U = sm.U;
    store_tile(dvb + n0 * grad_v.sn, grad_v.sn, grad_v.sd, grad_v.token_fastest, len, Dv,
               [&](int32_t t, int32_t c) { return U[t * es + c]; });
    store_tile(dkb + n0 * grad_k.sn, grad_k.sn, grad_k.sd, grad_k.token_fastest, len, D,
               [&](int32_t t, int32_t c) { return X[t * xs + c]; });
  }
}

// result[bh, e] = sum over c of partial[bh, c, e], c in order (deterministic). A plain launch: at::sum_out's
// TensorIterator setup cost ~10 us of host time a call, a quarter of the forward at N = 3136 on an H100 host.
template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ result, int64_t total,
                                  int64_t width, int32_t chunks) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const acc_t* p = partial + (i / width) * chunks * width + i % width;
    acc_t s = p[0];
    for (int32_t c = 1; c < chunks; ++c) s += p[c * width];
    result[i] = s;
  }
}

// ---- END linear device code ---------------------------------------------------------------------------

// ---- host code --------------------------------------------------------------------------------------

constexpr int64_t kMaxDim = 128;

template <typename T, typename U>
Src<T> make_src(U* ptr, const Strides4& s) {
  return Src<T>{ptr, s.b, s.h, s.n, s.d, s.n < s.d};
}

void check_linear_cuda_shapes(const LinearInputs& in) {
  TORCH_CHECK_VALUE(in.D <= kMaxDim && in.Dv <= kMaxDim, "the CUDA linear attention kernels take head dims <= ",
                    kMaxDim, ", got D = ", in.D, ", Dv = ", in.Dv);
  TORCH_CHECK_VALUE(in.N < (int64_t{1} << 30) && in.B * in.H < (int64_t{1} << 30),
                    "linear_attention: N and B * H must be below 2**30 for the CUDA kernels");
}

template <typename acc_t>
LinearArgs<acc_t> make_linear_args(const LinearInputs& in, const LinearPlan& plan, double q_scale, double k_scale,
                                   double eps, double denom_min) {
  LinearArgs<acc_t> a;
  a.p = plan;
  a.H = static_cast<int32_t>(in.H);
  a.N = static_cast<int32_t>(in.N);
  a.D = static_cast<int32_t>(in.D);
  a.Dv = static_cast<int32_t>(in.Dv);
  a.E = a.Dv + 1;
  a.phi = static_cast<int32_t>(in.phi);
  a.q_scale = static_cast<acc_t>(q_scale);
  a.k_scale = static_cast<acc_t>(k_scale);
  a.eps = static_cast<acc_t>(eps);
  a.denom_min = static_cast<acc_t>(denom_min);
  a.temperature = in.temperature.defined() ? in.temperature.const_data_ptr<acc_t>() : nullptr;
  return a;
}

LinearPlan checked_linear_plan(const LinearInputs& in, int64_t acc_size) {
  const LinearPlan plan = make_linear_plan(in.D, in.Dv + 1, in.N, in.B * in.H, acc_size, multiprocessor_count());
  TORCH_INTERNAL_ASSERT(plan.dc >= 4 && linear_smem_bytes(plan, acc_size) <= kSmemBudget,
                        "linear attention: no shared-memory plan for D = ", in.D, ", Dv = ", in.Dv);
  TORCH_CHECK_VALUE(in.B * in.H * int64_t{plan.blocks} <= std::numeric_limits<int32_t>::max(),
                    "linear attention: too many blocks for the CUDA grid");
  return plan;
}

// result [B, H, D, E] (contiguous, acc dtype) = sum over tokens of phi(x * x_scale) [y, (1)]^T.
template <typename scalar_t, typename y_t, typename acc_t>
void launch_outer(const LinearInputs& in, const Src<const scalar_t>& x, double x_scale, const Src<const y_t>& y,
                  int64_t y_cols, bool ones, const at::Tensor& result, cudaStream_t stream) {
  const int64_t BH = in.B * in.H, E = in.Dv + 1;
  const OuterPlan plan = make_outer_plan(in.D, E, in.N, BH, sizeof(acc_t), multiprocessor_count());
  const int64_t smem = outer_smem_bytes(plan, E, sizeof(acc_t));
  TORCH_INTERNAL_ASSERT(smem <= kSmemBudget, "linear attention: outer kernel shared memory ", smem);
  const int64_t blocks = BH * plan.chunks * plan.slot_blocks;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "linear attention: too many blocks");
  OuterArgs<acc_t> a;
  a.p = plan;
  a.H = static_cast<int32_t>(in.H);
  a.N = static_cast<int32_t>(in.N);
  a.D = static_cast<int32_t>(in.D);
  a.E = static_cast<int32_t>(E);
  a.y_cols = static_cast<int32_t>(y_cols);
  a.ones_col = ones ? static_cast<int32_t>(y_cols) : -1;
  a.phi = static_cast<int32_t>(in.phi);
  a.x_scale = static_cast<acc_t>(x_scale);
  at::Tensor partial =
      plan.chunks == 1 ? result : at::empty({BH, plan.chunks, in.D * E}, result.options());
  linear_outer_kernel<scalar_t, y_t, acc_t><<<static_cast<unsigned>(blocks), plan.threads, smem, stream>>>(
      a, x, y, partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.chunks > 1) {
    const int64_t total = BH * in.D * E;
    const int64_t sum_blocks = std::min<int64_t>(ceil_div(total, int64_t{kThreads}), 16 * multiprocessor_count());
    sum_chunks_kernel<acc_t><<<static_cast<unsigned>(sum_blocks), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), result.mutable_data_ptr<acc_t>(), total, in.D * E, plan.chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> linear_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const std::optional<at::Tensor>& temperature,
                                                         std::string_view feature_map, double q_scale, double k_scale,
                                                         double eps, double denom_min) {
  const LinearInputs in =
      prepare_linear_inputs(q, k, v, temperature, feature_map);
  const auto acc_opts = in.q.options().dtype(window_acc_dtype(in.q.scalar_type()));
  at::Tensor out = empty_like_layout(in.q, in.Dv);
  if (in.B * in.H == 0 || in.N == 0) return {out, at::zeros({in.B, in.H, in.D, in.Dv + 1}, acc_opts)};
  check_linear_cuda_shapes(in);
  at::Tensor state = at::empty({in.B, in.H, in.D, in.Dv + 1}, acc_opts);
  const c10::cuda::CUDAGuard guard(in.q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "effvit::linear_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_outer<scalar_t, scalar_t, acc_t>(in, make_src<const scalar_t>(in.k.const_data_ptr<scalar_t>(), in.ks),
                                            k_scale, make_src<const scalar_t>(in.v.const_data_ptr<scalar_t>(), in.vs),
                                            in.Dv, true, state, stream);
    const LinearPlan plan = checked_linear_plan(in, sizeof(acc_t));
    linear_forward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(in.B * in.H * plan.blocks), kThreads, linear_smem_bytes(plan, sizeof(acc_t)),
           stream>>>(make_linear_args<acc_t>(in, plan, q_scale, k_scale, eps, denom_min),
                     make_src<const scalar_t>(in.q.const_data_ptr<scalar_t>(), in.qs), state.const_data_ptr<acc_t>(),
                     make_src<scalar_t>(out.mutable_data_ptr<scalar_t>(), Strides4(out)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& temperature, const at::Tensor& state, std::string_view feature_map,
    double q_scale, double k_scale, double eps, double denom_min) {
  const LinearInputs in =
      prepare_linear_inputs(q, k, v, temperature, feature_map);
  check_linear_backward(in, grad_out, state);
  const auto acc_opts = in.q.options().dtype(window_acc_dtype(in.q.scalar_type()));
  const bool has_t = in.temperature.defined();
  at::Tensor grad_t = has_t ? at::zeros({in.H}, acc_opts) : at::empty({0}, acc_opts);
  if (in.B * in.H == 0 || in.N == 0) {
    return {at::zeros({in.B, in.H, in.N, in.D}, in.q.options()), at::zeros({in.B, in.H, in.N, in.D}, in.q.options()),
            at::zeros({in.B, in.H, in.N, in.Dv}, in.q.options()), grad_t};
  }
  check_linear_cuda_shapes(in);
  at::Tensor grad_q = at::empty({in.B, in.H, in.N, in.D}, in.q.options());
  at::Tensor grad_k = at::empty({in.B, in.H, in.N, in.D}, in.q.options());
  at::Tensor grad_v = at::empty({in.B, in.H, in.N, in.Dv}, in.q.options());
  const int64_t E = in.Dv + 1, BH = in.B * in.H;
  const c10::cuda::CUDAGuard guard(in.q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor state_c = state.contiguous();
  at::Tensor y_scratch = at::empty({in.B, in.H, in.N, E}, acc_opts);  // [dnum, dden] per token
  at::Tensor grad_state = at::empty({in.B, in.H, in.D, E}, acc_opts);  // [dS | dz]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "effvit::linear_attention_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LinearPlan plan = checked_linear_plan(in, sizeof(acc_t));
    const int64_t smem = linear_smem_bytes(plan, sizeof(acc_t));
    const auto args = make_linear_args<acc_t>(in, plan, q_scale, k_scale, eps, denom_min);
    const auto q_src = make_src<const scalar_t>(in.q.const_data_ptr<scalar_t>(), in.qs);
    at::Tensor dt_partial = at::empty({BH, plan.blocks}, acc_opts);
    linear_backward_dq_kernel<scalar_t, acc_t><<<static_cast<unsigned>(BH * plan.blocks), kThreads, smem, stream>>>(
        args, make_src<const scalar_t>(grad_out.const_data_ptr<scalar_t>(), Strides4(grad_out)), q_src,
        state_c.const_data_ptr<acc_t>(), make_src<scalar_t>(grad_q.mutable_data_ptr<scalar_t>(), Strides4(grad_q)),
        y_scratch.mutable_data_ptr<acc_t>(), dt_partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // [dS | dz] = sum_i a_i [dnum_i, dden_i]^T
    launch_outer<scalar_t, acc_t, acc_t>(in, q_src, q_scale,
                                         make_src<const acc_t>(y_scratch.const_data_ptr<acc_t>(), Strides4(y_scratch)),
                                         E, false, grad_state, stream);
    linear_backward_dkv_kernel<scalar_t, acc_t><<<static_cast<unsigned>(BH * plan.blocks), kThreads, smem, stream>>>(
        args, make_src<const scalar_t>(in.k.const_data_ptr<scalar_t>(), in.ks),
        make_src<const scalar_t>(in.v.const_data_ptr<scalar_t>(), in.vs), grad_state.const_data_ptr<acc_t>(),
        make_src<scalar_t>(grad_k.mutable_data_ptr<scalar_t>(), Strides4(grad_k)),
        make_src<scalar_t>(grad_v.mutable_data_ptr<scalar_t>(), Strides4(grad_v)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (has_t) grad_t.copy_(dt_partial.view({in.B, in.H, plan.blocks}).sum(at::IntArrayRef{0, 2}));
  });
  return {grad_q, grad_k, grad_v, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CUDA, m) {
  m.impl("linear_attention", &linear_attention_cuda);
  m.impl("linear_attention_backward", &linear_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace effvit
