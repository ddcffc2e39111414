// EViT token dropping: CUDA kernels of the token-drop ops. The contract is csrc/effvit_ops.cpp's schema comment
// (section token_drop), the truth effvit/reference/token_drop.py; the argument checks are
// csrc/common/token_drop_checks.h's, shared with csrc/cpu/token_drop.cpp.
//
// cls_attention_scores: the EViT score of every non-prefix token from the CLS query alone (no [B, H, N, N]):
//   cls_softmax:    one block per (b, h). q[b, h] is staged in shared memory (acc dtype); every key's logit
//                   scale * q . k_j goes to a global workspace probs [B, H, N] (acc dtype; global, so that any N
//                   fits), then the block's max, sum and lse = log-sum-exp (torch.logsumexp's rule: a +-inf max
//                   shifts by 0), and probs[j] = exp(logit_j - shift) / sum for j >= P (shift: that max).
//                   Each key belongs to G adjacent lanes (G = 1..32, a power of two), lane `part` reading dims
//                   part, part + G, ...: G consecutive values of a key row per step (coalesced for rows with
//                   unit dim stride), summed over the G lanes with attn::row_sum. For keys adjacent in memory
//                   (k.stride(2) < k.stride(3)) G = 1: a thread per key, the warp reads 32 adjacent keys.
//   cls_head_mean:  scores[b, j] = sum_h probs[b, h, P + j] / H, heads in order. Two kernels instead of atomics
//                   into scores: deterministic.
// cls_attention_scores_backward: one block per (b, h), the probabilities recomputed from the saved lse:
//   p_j = exp(scale * q . k_j - lse), g_j = grad_scores[j - P] / H (0 for prefix keys), c = sum_j p_j g_j,
//   ds_j = p_j (g_j - c) (kept in the workspace [B, H, N]); grad_k[j, d] = scale * ds_j * q[d], written in
//   grad_k's memory order; grad_q[d] = scale * sum_j ds_j k[j, d] by threads (slice, d): dims across the lanes
//   (coalesced), keys across `slices` groups of threads whose partial sums are added in slice order.
// drop_tokens:
//   drop_rank:      a thread per (image, position j), B * ceil(M / kThreads) blocks. rank_j = #{i : s_i > s_j,
//                   or s_i == s_j and i < j} against all M scores of the image, staged kRankTile at a time in
//                   shared memory as integer keys with the float order (exact for every score dtype; -0 == +0).
//                   NaN ranks below every number, -inf included (kept only where keep exceeds the numbers), as
//                   in the CPU kernel and tests/test_token_drop.py; torch.topk would rank NaN first.
//                   The ranks are a permutation of 0..M-1: token j is kept iff rank_j < K, and in score order
//                   index[rank_j] = j fills every slot once. rank [B, M] (int32) stays as a workspace.
//   drop_spatial_index (spatial_order only): one block per image, a block prefix count of the kept flags in
//                   position order (warp ballots): index[#kept before j] = j.
//   drop_gather:    one block per out row (b, r < P + K): out[b, r] = x[b, r] (prefix) or x[b, P + index[r-P]].
//   drop_fuse (fuse only): B * ceil(C / 32) blocks of 32 channels x kFuseSlices slices: out[b, P + K, c]
//                   = sum over dropped j (rank_j >= K) of w_j * x[b, P + j, c] in the acc dtype (w: the scores
//                   converted to it), each slice summing every kFuseSlices-th token, the slices added in order.
// drop_tokens_backward:
//   drop_slot:      one block per image: slot[b, j] = i where index[b, i] = j, else -1 (dropped). An index
//                   outside [0, M) fails a device-side assert (the CPU kernel raises IndexError; raising here
//                   would need a host sync) and is skipped where asserts are compiled out.
//   drop_backward:  one block per grad_x row (b, n): the prefix row and kept rows copy their grad_out row; a
//                   dropped row is w_j * g_f (g_f = grad_out[b, P + K], the fused token's gradient) with fuse, 0
//                   without; with fuse, grad_scores[b, j] = g_f . x[b, P + j] (block sum) for dropped j, 0 for
//                   kept j. Without fuse grad_scores is zeros (host).
// Every output element is written exactly once (the tests poison new tensors with NaN); no atomics, every sum
// in a fixed order: deterministic. No host synchronisation: shapes are static, the ranks stay on the device.
// Index math: 64-bit for global offsets (any input strides), 32-bit for positions inside a row or image.
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
#include <tuple>
#include <type_traits>

#include "../common/token_drop_checks.h"
#include "attention_tile.cuh"

namespace effvit {
namespace cuda {
namespace {

using attn::acc_exp;
using attn::acc_log;
using attn::dynamic_smem;
using attn::infinity;
using attn::row_sum;

// ---- BEGIN token_drop device code ---------------------------------------------------------------------

constexpr int kThreads = 256;                // threads per block (at most); every block a multiple of 32
constexpr int kRankTile = 2048;              // scores staged per pass of the rank kernel (16 KB as uint64)
constexpr int kFuseLanes = 32;               // channels per drop_fuse block
constexpr int kFuseSlices = kThreads / kFuseLanes;  // token slices per drop_fuse block
constexpr int64_t kMaxHeadDim = 4096;        // q staged in shared memory: (D + kThreads) * 8 bytes < 48 KB
constexpr int64_t kSmemBudget = 48 * 1024;   // dynamic shared memory usable without cudaFuncSetAttribute

// A logical [B, R, C] tensor (x, grad_out; q as [B, H, D]) read through its strides.
template <typename T>
struct Rows {
  const T* ptr;
  int64_t sb, sr, sc;
  __device__ __forceinline__ const T* row(int64_t b, int64_t r) const { return ptr + b * sb + r * sr; }
};

// k [B, H, N, D] read through its strides.
template <typename T>
struct Keys {
  const T* ptr;
  int64_t sb, sh, sn, sd;
  __device__ __forceinline__ const T* head(int64_t b, int64_t h) const { return ptr + b * sb + h * sh; }
};

template <typename scalar_t>
struct ClsArgs {
  Rows<scalar_t> q;  // [B, H, D]
  Keys<scalar_t> k;  // [B, H, N, D]
  int32_t H, N, D, P;
  int32_t lanes_per_key;  // G: a power of two <= 32
};

// max that propagates NaN (as torch.max / logsumexp do; fmax would drop it).
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// The sum (kMax false) or NaN-propagating max (kMax true) of x over the block, returned to every thread (the
// same value: thread 0 of warp 0 broadcasts it). blockDim.x must be a multiple of 32. Starts with a barrier (a
// previous call's readers are done with the scratch) and ends with one, so global and shared writes made before
// the call are visible to the whole block after it.
template <bool kMax, typename acc_t>
__device__ __forceinline__ acc_t block_reduce(acc_t x) {
  __shared__ acc_t warp_part[32];
  __shared__ acc_t result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const auto warp_reduce = [](acc_t v) {
    if constexpr (kMax) {
      for (int offset = 16; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
      return v;
    } else {
      return row_sum(v, 32);
    }
  };
  x = warp_reduce(x);
  __syncthreads();
  if (lane == 0) warp_part[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = warp_reduce(lane < warps ? warp_part[lane] : (kMax ? -infinity<acc_t>() : acc_t(0)));
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}

// ---- cls_attention_scores ----

// q[b, h] as acc_t into shared memory, visible to the block on return.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_query(const ClsArgs<scalar_t>& a, int32_t b, int32_t h, acc_t* q_s) {
  const scalar_t* qh = a.q.row(b, h);
  for (int32_t d = threadIdx.x; d < a.D; d += blockDim.x) q_s[d] = static_cast<acc_t>(qh[d * a.q.sc]);
  __syncthreads();
}

// f(j, q . k_j) for every key j of head (b, h), called by one lane (part 0) of the key's G lanes.
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_key_dot(const ClsArgs<scalar_t>& a, int32_t b, int32_t h,
                                                 const acc_t* q_s, const F& f) {
  const int32_t G = a.lanes_per_key;
  const int32_t keys_per_pass = static_cast<int32_t>(blockDim.x) / G;
  const int32_t group = static_cast<int32_t>(threadIdx.x) / G, part = static_cast<int32_t>(threadIdx.x) % G;
  const scalar_t* k_head = a.k.head(b, h);
  // j0 is the same for the whole block, so every lane reaches row_sum's shuffles
  for (int32_t j0 = 0; j0 < a.N; j0 += keys_per_pass) {
    const int32_t j = j0 + group;
    acc_t dot = 0;
    if (j < a.N) {
      const scalar_t* key = k_head + j * a.k.sn;
      for (int32_t d = part; d < a.D; d += G) dot += q_s[d] * static_cast<acc_t>(key[d * a.k.sd]);
    }
    dot = row_sum(dot, G);
    if (j < a.N && part == 0) f(j, dot);
  }
}

// probs [B, H, N]: the head's logits, then softmax probabilities at j >= P; lse [B, H]. grid: B * H,
// dynamic shared memory: D acc values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cls_softmax_kernel(const ClsArgs<scalar_t> a, const acc_t scale, acc_t* __restrict__ probs,
                       acc_t* __restrict__ lse) {
  const int32_t bh = static_cast<int32_t>(blockIdx.x), b = bh / a.H, h = bh - b * a.H;
  acc_t* q_s = reinterpret_cast<acc_t*>(dynamic_smem());
  stage_query(a, b, h, q_s);
  acc_t* row = probs + int64_t{bh} * a.N;
  acc_t local_max = -infinity<acc_t>();
  for_each_key_dot(a, b, h, q_s, [&](int32_t j, acc_t dot) {
    const acc_t logit = dot * scale;  // EViT's order: the scale after the product
    row[j] = logit;
    local_max = nan_max(local_max, logit);
  });
  const acc_t row_max = block_reduce<true>(local_max);  // also makes every logit visible to the block
  const acc_t shift = (row_max == infinity<acc_t>() || row_max == -infinity<acc_t>()) ? acc_t(0) : row_max;
  acc_t local_sum = 0;
  for (int32_t j = threadIdx.x; j < a.N; j += blockDim.x) local_sum += acc_exp(row[j] - shift);
  const acc_t sum = block_reduce<false>(local_sum);
  if (threadIdx.x == 0) lse[bh] = shift + acc_log(sum);
  // a +inf logit makes the softmax itself nan (exp(inf - inf)), as torch's: every probability of the row
  const acc_t denom = row_max == infinity<acc_t>() ? std::numeric_limits<acc_t>::quiet_NaN() : sum;
  // each thread rewrites only the entries it reads here; the sums above are done (block_reduce's barrier)
  for (int32_t j = a.P + threadIdx.x; j < a.N; j += blockDim.x) row[j] = acc_exp(row[j] - shift) / denom;
}

// scores [B, M] = the mean over heads of probs[b, h, P + j]. 1-D grid-stride over B * M.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cls_head_mean_kernel(const acc_t* __restrict__ probs, int32_t H, int32_t N, int32_t P, int64_t total,
                         acc_t* __restrict__ scores) {
  const int32_t M = N - P;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / M, j = i - b * M;
    const acc_t* p = probs + b * H * N + P + j;
    acc_t sum = 0;
    for (int32_t h = 0; h < H; ++h) sum += p[int64_t{h} * N];
    scores[i] = sum / static_cast<acc_t>(H);  // H = 0: NaN, torch's mean over no heads
  }
}

// grad_q [B, H, D] and grad_k [B, H, N, D] (contiguous). grad_scores [B, M] and lse [B, H] in acc dtype, any
// strides; ds [B, H, N] a workspace. grid: B * H, dynamic shared memory: D + kThreads acc values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cls_backward_kernel(const ClsArgs<scalar_t> a, const acc_t scale, const acc_t* __restrict__ grad_scores,
                        int64_t gs_sb, int64_t gs_sm, const acc_t* __restrict__ lse, int64_t lse_sb,
                        int64_t lse_sh, acc_t* __restrict__ ds, scalar_t* __restrict__ grad_q,
                        scalar_t* __restrict__ grad_k) {
  const int32_t bh = static_cast<int32_t>(blockIdx.x), b = bh / a.H, h = bh - b * a.H;
  const int32_t N = a.N, D = a.D, P = a.P;
  acc_t* q_s = reinterpret_cast<acc_t*>(dynamic_smem());
  acc_t* slice_sums = q_s + D;  // [slices][D], slices * D <= blockDim.x
  stage_query(a, b, h, q_s);
  const acc_t head_lse = lse[b * lse_sb + h * lse_sh];
  const acc_t heads = static_cast<acc_t>(a.H);
  const acc_t* g_row = grad_scores + b * gs_sb;
  const auto head_grad = [&](int32_t j) { return j >= P ? g_row[(j - P) * gs_sm] / heads : acc_t(0); };
  acc_t* row = ds + int64_t{bh} * N;
  acc_t local_pg = 0;
  for_each_key_dot(a, b, h, q_s, [&](int32_t j, acc_t dot) {
    const acc_t p = acc_exp(dot * scale - head_lse);
    row[j] = p;  // the probability now, ds once sum_j p_j g_j is known
    local_pg += p * head_grad(j);
  });
  const acc_t pg = block_reduce<false>(local_pg);  // also makes every p_j visible to the block
  for (int32_t j = threadIdx.x; j < N; j += blockDim.x) row[j] = row[j] * (head_grad(j) - pg);
  __syncthreads();
  // grad_k[j, d] = scale * ds_j * q[d], in memory order (N * D < 2^31: checked on the host)
  scalar_t* gk = grad_k + int64_t{bh} * N * D;
  for (int32_t e = threadIdx.x; e < N * D; e += blockDim.x) {
    const int32_t j = e / D, d = e - j * D;
    gk[e] = static_cast<scalar_t>(scale * row[j] * q_s[d]);
  }
  // grad_q[d] = scale * sum_j ds_j k[j, d]: thread (slice, lane) takes dims lane, lane + d_lanes, ... and keys
  // slice, slice + slices, ...
  const int32_t threads = static_cast<int32_t>(blockDim.x), tid = static_cast<int32_t>(threadIdx.x);
  const int32_t d_lanes = min(D, threads), slices = threads / d_lanes;
  const int32_t slice = tid / d_lanes, lane = tid - slice * d_lanes;
  const scalar_t* k_head = a.k.head(b, h);
  scalar_t* gq = grad_q + int64_t{bh} * D;
  if (slice < slices) {
    for (int32_t d = lane; d < D; d += d_lanes) {
      const scalar_t* column = k_head + d * a.k.sd;
      acc_t sum = 0;
      for (int32_t j = slice; j < N; j += slices) sum += row[j] * static_cast<acc_t>(column[j * a.k.sn]);
      if (slices == 1) {
        gq[d] = static_cast<scalar_t>(scale * sum);
      } else {
        slice_sums[slice * D + d] = sum;  // slices > 1: d_lanes == D, one dim per thread
      }
    }
  }
  if (slices > 1) {
    __syncthreads();
    for (int32_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t sum = 0;
      for (int32_t s = 0; s < slices; ++s) sum += slice_sums[s * D + d];
      gq[d] = static_cast<scalar_t>(scale * sum);
    }
  }
}

// ---- drop_tokens ----

// An unsigned integer with the order of the score: key(a) > key(b) iff a > b, key(-0) == key(+0) (they tie,
// as in torch's comparisons), and NaN maps to 0, below every number (-inf included): NaN scores rank last.
__device__ __forceinline__ uint32_t rank_key(float v) {
  if (v != v) return 0u;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);  // ~u of a number is never 0 (that is a NaN's)
}
__device__ __forceinline__ uint64_t rank_key(double v) {
  if (v != v) return 0ull;
  if (v == 0.0) v = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) != 0ull ? ~u : (u | 0x8000000000000000ull);
}

// rank [B, M] (int32); without spatial order also index [B, K] (index[b, rank_j] = j for rank_j < K).
// scores [B, M] any float dtype and strides, compared in its opmath type (exact: float for half, bfloat16 and
// float, double for double). grid: B * blocks_per_image, a thread per position.
template <typename score_t>
__global__ void __launch_bounds__(kThreads)
    drop_rank_kernel(const score_t* __restrict__ scores, int64_t s_sb, int64_t s_sm, int32_t M, int32_t K,
                     int32_t blocks_per_image, bool score_order, int32_t* __restrict__ rank,
                     int64_t* __restrict__ index) {
  using key_t = std::conditional_t<std::is_same_v<at::opmath_type<score_t>, double>, uint64_t, uint32_t>;
  __shared__ key_t tile[kRankTile];
  const int32_t b = static_cast<int32_t>(blockIdx.x) / blocks_per_image;
  const int32_t j = (static_cast<int32_t>(blockIdx.x) - b * blocks_per_image) * static_cast<int32_t>(blockDim.x) +
                    static_cast<int32_t>(threadIdx.x);
  const score_t* s = scores + b * s_sb;
  const auto key_at = [&](int32_t i) { return rank_key(static_cast<at::opmath_type<score_t>>(s[i * s_sm])); };
  const key_t own = j < M ? key_at(j) : key_t(0);
  int32_t above = 0;  // tokens ranked before j
  for (int32_t t0 = 0; t0 < M; t0 += kRankTile) {
    const int32_t len = min(kRankTile, M - t0);
    __syncthreads();  // the previous tile is no longer read
    for (int32_t i = threadIdx.x; i < len; i += blockDim.x) tile[i] = key_at(t0 + i);
    __syncthreads();
    if (j < M) {
      const int32_t before_own = j - t0;  // tile entries at positions below j: i < before_own
#pragma unroll 8
      for (int32_t i = 0; i < len; ++i) {
        const key_t other = tile[i];
        above += static_cast<int32_t>((other > own) | ((other == own) & (i < before_own)));
      }
    }
  }
  if (j < M) {
    rank[int64_t{b} * M + j] = above;
    if (score_order && above < K) index[int64_t{b} * K + above] = j;
  }
}

// index [B, K] in ascending position: index[b, #kept tokens before j] = j for kept j (rank_j < K). grid: B.
__global__ void __launch_bounds__(kThreads)
    drop_spatial_index_kernel(const int32_t* __restrict__ rank, int32_t M, int32_t K, int64_t* __restrict__ index) {
  __shared__ int32_t warp_kept[kThreads / 32];
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int32_t* rank_b = rank + int64_t{b} * M;
  int64_t* index_b = index + int64_t{b} * K;
  int32_t kept_before_chunk = 0;
  for (int32_t c0 = 0; c0 < M; c0 += blockDim.x) {  // uniform: every lane reaches the ballot
    const int32_t j = c0 + static_cast<int32_t>(threadIdx.x);
    const bool kept = j < M && rank_b[j] < K;
    const uint32_t ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) warp_kept[warp] = __popc(ballot);
    __syncthreads();
    int32_t slot = kept_before_chunk + __popc(ballot & ((1u << lane) - 1u));
    int32_t chunk_kept = 0;
    for (int32_t w = 0; w < warps; ++w) {
      if (w < warp) slot += warp_kept[w];
      chunk_kept += warp_kept[w];
    }
    if (kept) index_b[slot] = j;
    kept_before_chunk += chunk_kept;
    __syncthreads();  // warp_kept is rewritten by the next chunk
  }
}

// out[b, r] for r < P + K (out [B, out_rows, C] contiguous): the prefix rows, then the kept rows in index order.
// grid: B * (P + K), a block per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    drop_gather_kernel(const Rows<scalar_t> x, const int64_t* __restrict__ index, int32_t P, int32_t K, int32_t C,
                       int32_t out_rows, scalar_t* __restrict__ out) {
  const int32_t gathered = P + K;
  const int64_t b = blockIdx.x / gathered;
  const int32_t r = static_cast<int32_t>(blockIdx.x - b * gathered);
  const int64_t src = r < P ? r : P + index[b * K + (r - P)];
  const scalar_t* from = x.row(b, src);
  scalar_t* to = out + (b * out_rows + r) * C;
  for (int32_t c = threadIdx.x; c < C; c += blockDim.x) to[c] = from[c * x.sc];
}

// out[b, P + K, c] = sum over dropped j (rank_j >= K) of weight[b, j] * x[b, P + j, c], in acc_t (weight [B, M]
// the scores in acc_t, any strides). grid: B * ceil(C / kFuseLanes), block (kFuseLanes, kFuseSlices).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    drop_fuse_kernel(const Rows<scalar_t> x, const int32_t* __restrict__ rank, const acc_t* __restrict__ weight,
                     int64_t w_sb, int64_t w_sm, int32_t P, int32_t M, int32_t K, int32_t C, int32_t out_rows,
                     scalar_t* __restrict__ out) {
  __shared__ acc_t slice_sums[kFuseSlices][kFuseLanes];
  const int32_t chunks = (C + kFuseLanes - 1) / kFuseLanes;
  const int64_t b = blockIdx.x / chunks;
  const int32_t c = static_cast<int32_t>(blockIdx.x - b * chunks) * kFuseLanes + threadIdx.x;
  acc_t sum = 0;
  if (c < C) {
    const int32_t* rank_b = rank + b * M;
    const acc_t* w = weight + b * w_sb;
    const scalar_t* xc = x.row(b, P) + c * x.sc;
    for (int32_t j = threadIdx.y; j < M; j += kFuseSlices) {
      // a kept row is skipped, not weighted by 0: its inf / NaN must not reach the sum
      if (rank_b[j] >= K) sum += w[j * w_sm] * static_cast<acc_t>(xc[j * x.sr]);
    }
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t total = 0;
    for (int s = 0; s < kFuseSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[(b * out_rows + P + K) * C + c] = static_cast<scalar_t>(total);
  }
}

// ---- drop_tokens_backward ----

// slot [B, M] (int32): i where index[b, i] = j, -1 for the dropped tokens. index [B, K] any strides. grid: B.
__global__ void __launch_bounds__(kThreads)
    drop_slot_kernel(const int64_t* __restrict__ index, int64_t i_sb, int64_t i_sk, int32_t M, int32_t K,
                     int32_t* __restrict__ slot) {
  const int64_t b = blockIdx.x;
  int32_t* slot_b = slot + b * M;
  for (int32_t j = threadIdx.x; j < M; j += blockDim.x) slot_b[j] = -1;
  __syncthreads();  // the -1s land before the kept tokens' slots
  for (int32_t i = threadIdx.x; i < K; i += blockDim.x) {
    const int64_t j = index[b * i_sb + i * i_sk];
    CUDA_KERNEL_ASSERT_MSG(j >= 0 && j < M, "drop_tokens_backward: index holds a position outside [0, N - P)");
    if (j >= 0 && j < M) slot_b[j] = i;
  }
}

// grad_x [B, N, C] (contiguous) row by row; with fuse also grad_scores [B, M] (acc_t, contiguous): g_f . x[P + j]
// for dropped j, 0 for kept j. weight [B, M]: the scores in acc_t (any strides; read with fuse only). grid: B * N.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    drop_backward_kernel(const Rows<scalar_t> grad_out, const Rows<scalar_t> x, const int32_t* __restrict__ slot,
                         const acc_t* __restrict__ weight, int64_t w_sb, int64_t w_sm, int32_t N, int32_t P,
                         int32_t K, int32_t C, bool fuse, scalar_t* __restrict__ grad_x,
                         acc_t* __restrict__ grad_scores) {
  const int64_t b = blockIdx.x / N;
  const int32_t n = static_cast<int32_t>(blockIdx.x - b * N), M = N - P, j = n - P;
  scalar_t* to = grad_x + int64_t{blockIdx.x} * C;
  const int32_t kept_slot = n < P ? -1 : slot[b * M + j];
  if (n < P || kept_slot >= 0) {  // a prefix or kept token: its own row of grad_out
    const scalar_t* from = grad_out.row(b, n < P ? n : P + kept_slot);
    for (int32_t c = threadIdx.x; c < C; c += blockDim.x) to[c] = from[c * grad_out.sc];
    if (fuse && n >= P && threadIdx.x == 0) grad_scores[b * M + j] = 0;
    return;
  }
  if (!fuse) {  // a dropped token without the fused token: no gradient
    for (int32_t c = threadIdx.x; c < C; c += blockDim.x) to[c] = scalar_t(0);
    return;
  }
  // a dropped token (block-uniform branch: the block_reduce below is reached by every thread)
  const scalar_t* g_fused = grad_out.row(b, P + K);
  const scalar_t* xr = x.row(b, n);
  const acc_t w = weight[b * w_sb + j * w_sm];
  acc_t dot = 0;
  for (int32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t g = static_cast<acc_t>(g_fused[c * grad_out.sc]);
    to[c] = static_cast<scalar_t>(w * g);
    dot += g * static_cast<acc_t>(xr[c * x.sc]);
  }
  dot = block_reduce<false>(dot);
  if (threadIdx.x == 0) grad_scores[b * M + j] = dot;
}

// ---- END token_drop device code -----------------------------------------------------------------------

// ---- host code --------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 1-D grid of `blocks`, checked against CUDA's limit.
unsigned grid_of(int64_t blocks, const char* op) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many blocks (", blocks,
                    ") for the CUDA grid");
  return static_cast<unsigned>(blocks);
}

// Threads of a block that walks a row of C values: C rounded up to a warp, at most kThreads.
int row_threads(int64_t C) {
  return static_cast<int>(std::min<int64_t>(kThreads, ceil_div(std::max<int64_t>(C, 1), 32) * 32));
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Lanes per key of the score kernels: 1 when the keys are adjacent in memory (a thread per key coalesces),
// else the smallest power of two (<= 32) giving each lane at most four dims of a row.
int32_t lanes_per_key(const at::Tensor& k, int64_t D) {
  if (k.size(2) > 1 && D > 1 && k.stride(2) < k.stride(3)) return 1;
  int32_t G = 1;
  while (G < 32 && G * 4 < D) G *= 2;
  return G;
}

template <typename scalar_t>
ClsArgs<scalar_t> make_cls_args(const ClsScoreInputs& in, const at::Tensor& q, const at::Tensor& k) {
  ClsArgs<scalar_t> a;
  a.q = rows_of<scalar_t>(q);
  a.k = Keys<scalar_t>{k.const_data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.stride(2), k.stride(3)};
  a.H = static_cast<int32_t>(in.H);
  a.N = static_cast<int32_t>(in.N);
  a.D = static_cast<int32_t>(in.D);
  a.P = static_cast<int32_t>(in.P);
  a.lanes_per_key = lanes_per_key(k, in.D);
  return a;
}

void check_cls_cuda_shapes(const ClsScoreInputs& in) {
  TORCH_CHECK_VALUE(in.D <= kMaxHeadDim, "the CUDA cls_attention_scores kernels take head_dim <= ", kMaxHeadDim,
                    ", got ", in.D);
  // 32-bit positions inside a head: N * D and the loops' last step stay below 2**31
  TORCH_CHECK_VALUE(in.N * std::max<int64_t>(in.D, 1) < (int64_t{1} << 30),
                    "cls_attention_scores: N * head_dim must be below 2**30 for the CUDA kernels, got N = ", in.N,
                    ", head_dim = ", in.D);
  static_assert((kMaxHeadDim + kThreads) * 8 <= kSmemBudget, "the backward's shared memory must fit");
}

std::tuple<at::Tensor, at::Tensor> cls_attention_scores_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                                             int64_t num_prefix) {
  const ClsScoreInputs in = check_cls_scores_inputs(q, k, num_prefix);
  const auto acc_opts = q.options().dtype(in.acc);
  const int64_t M = in.N - in.P;
  at::Tensor scores = at::empty({in.B, M}, acc_opts);
  at::Tensor lse = at::empty({in.B, in.H}, acc_opts);
  if (in.B == 0) return {scores, lse};
  check_cls_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor probs = at::empty({in.B, in.H, in.N}, acc_opts);  // logits, then probabilities (workspace)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "effvit::cls_attention_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (in.H > 0) {
      cls_softmax_kernel<scalar_t, acc_t>
          <<<grid_of(in.B * in.H, "cls_attention_scores"), kThreads, in.D * sizeof(acc_t), stream>>>(
              make_cls_args<scalar_t>(in, q, k), static_cast<acc_t>(scale), probs.mutable_data_ptr<acc_t>(),
              lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = in.B * M;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t{1} << 16);  // grid-stride beyond
    cls_head_mean_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        probs.const_data_ptr<acc_t>(), static_cast<int32_t>(in.H), static_cast<int32_t>(in.N),
        static_cast<int32_t>(in.P), total, scores.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, lse};
}

std::tuple<at::Tensor, at::Tensor> cls_attention_scores_backward_cuda(const at::Tensor& grad_scores,
                                                                      const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& lse, double scale,
                                                                      int64_t num_prefix) {
  const ClsScoreInputs in = check_cls_scores_inputs(q, k, num_prefix);
  check_cls_scores_backward(in, grad_scores, q, lse);
  at::Tensor grad_q = at::empty({in.B, in.H, in.D}, q.options());
  at::Tensor grad_k = at::empty({in.B, in.H, in.N, in.D}, q.options());
  if (grad_k.numel() == 0) return {grad_q, grad_k};  // B, H or D is 0 (N >= 1): grad_q is empty too
  check_cls_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad_scores.to(in.acc);  // any float dtype in, acc dtype (same strides) out
  at::Tensor ds = at::empty({in.B, in.H, in.N}, q.options().dtype(in.acc));  // workspace
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "effvit::cls_attention_scores_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cls_backward_kernel<scalar_t, acc_t>
        <<<grid_of(in.B * in.H, "cls_attention_scores_backward"), kThreads, (in.D + kThreads) * sizeof(acc_t),
           stream>>>(make_cls_args<scalar_t>(in, q, k), static_cast<acc_t>(scale), g.const_data_ptr<acc_t>(),
                     g.stride(0), g.stride(1), lse.const_data_ptr<acc_t>(), lse.stride(0), lse.stride(1),
                     ds.mutable_data_ptr<acc_t>(), grad_q.mutable_data_ptr<scalar_t>(),
                     grad_k.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_k};
}

void check_drop_cuda_shapes(const DropInputs& in) {
  // 32-bit positions inside an image and a row: N, C and the loops' last step stay below 2**31
  TORCH_CHECK_VALUE(in.N < (int64_t{1} << 30) && in.C < (int64_t{1} << 30),
                    "drop_tokens: N and C must be below 2**30 for the CUDA kernels, got N = ", in.N, ", C = ", in.C);
}

std::tuple<at::Tensor, at::Tensor> drop_tokens_cuda(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                                    int64_t num_prefix, bool fuse, bool spatial_order) {
  const DropInputs in = check_drop_inputs(x, scores, keep, num_prefix);
  const int64_t out_rows = in.P + in.K + (fuse ? 1 : 0);
  at::Tensor out = at::empty({in.B, out_rows, in.C}, x.options());
  at::Tensor index = at::empty({in.B, in.K}, x.options().dtype(at::kLong));
  if (in.B == 0) return {out, index};
  check_drop_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int32_t M = static_cast<int32_t>(in.M), K = static_cast<int32_t>(in.K), P = static_cast<int32_t>(in.P);
  const int32_t C = static_cast<int32_t>(in.C);
  at::Tensor rank = at::empty({in.B, in.M}, x.options().dtype(at::kInt));  // workspace
  const int64_t rank_blocks = ceil_div(in.M, kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "effvit::drop_tokens_rank", [&] {
    drop_rank_kernel<scalar_t><<<grid_of(in.B * rank_blocks, "drop_tokens"), kThreads, 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), scores.stride(0), scores.stride(1), M, K,
        static_cast<int32_t>(rank_blocks), !spatial_order, rank.mutable_data_ptr<int32_t>(),
        index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (spatial_order) {
    drop_spatial_index_kernel<<<grid_of(in.B, "drop_tokens"), kThreads, 0, stream>>>(
        rank.const_data_ptr<int32_t>(), M, K, index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (in.C == 0) return {out, index};
  // the fused token's weights: the scores as given, in the accumulation dtype (no copy when they already are)
  const at::Tensor weight = fuse ? scores.to(in.acc) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::drop_tokens", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> xr = rows_of<scalar_t>(x);
    drop_gather_kernel<scalar_t><<<grid_of(in.B * (in.P + in.K), "drop_tokens"), row_threads(in.C), 0, stream>>>(
        xr, index.const_data_ptr<int64_t>(), P, K, C, static_cast<int32_t>(out_rows),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (fuse) {
      drop_fuse_kernel<scalar_t, acc_t>
          <<<grid_of(in.B * ceil_div(in.C, kFuseLanes), "drop_tokens"), dim3(kFuseLanes, kFuseSlices), 0, stream>>>(
              xr, rank.const_data_ptr<int32_t>(), weight.const_data_ptr<acc_t>(), weight.stride(0),
              weight.stride(1), P, M, K, C, static_cast<int32_t>(out_rows), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> drop_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& scores, const at::Tensor& index,
                                                             int64_t num_prefix, bool fuse) {
  const DropInputs in = check_drop_backward(grad_out, x, scores, index, num_prefix, fuse);
  at::Tensor grad_x = at::empty({in.B, in.N, in.C}, x.options());
  const auto scores_opts = scores.options().memory_format(at::MemoryFormat::Contiguous);
  if (in.B == 0) return {grad_x, at::empty({in.B, in.M}, scores_opts)};
  check_drop_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int32_t M = static_cast<int32_t>(in.M), K = static_cast<int32_t>(in.K);
  at::Tensor slot = at::empty({in.B, in.M}, x.options().dtype(at::kInt));  // workspace
  drop_slot_kernel<<<grid_of(in.B, "drop_tokens_backward"), kThreads, 0, stream>>>(
      index.const_data_ptr<int64_t>(), index.stride(0), index.stride(1), M, K, slot.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // with fuse: the weights of the fused token (scores in the acc dtype) and grad_scores in the acc dtype
  const at::Tensor weight = fuse ? scores.to(in.acc) : at::Tensor();
  at::Tensor grad_scores_acc = fuse ? at::empty({in.B, in.M}, x.options().dtype(in.acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::drop_tokens_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    drop_backward_kernel<scalar_t, acc_t>
        <<<grid_of(in.B * in.N, "drop_tokens_backward"), row_threads(in.C), 0, stream>>>(
            rows_of<scalar_t>(grad_out), rows_of<scalar_t>(x), slot.const_data_ptr<int32_t>(),
            fuse ? weight.const_data_ptr<acc_t>() : nullptr, fuse ? weight.stride(0) : 0,
            fuse ? weight.stride(1) : 0, static_cast<int32_t>(in.N), static_cast<int32_t>(in.P), K,
            static_cast<int32_t>(in.C), fuse, grad_x.mutable_data_ptr<scalar_t>(),
            fuse ? grad_scores_acc.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!fuse) return {grad_x, at::zeros({in.B, in.M}, scores_opts)};
  return {grad_x, grad_scores_acc.to(scores.scalar_type())};  // no copy when scores are in the acc dtype
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CUDA, m) {
  m.impl("cls_attention_scores", &cls_attention_scores_cuda);
  m.impl("cls_attention_scores_backward", &cls_attention_scores_backward_cuda);
  m.impl("drop_tokens", &drop_tokens_cuda);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cuda);
}

}  // namespace cuda
}  // namespace effvit
