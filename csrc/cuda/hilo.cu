// LITv2 HiLo's Lo-Fi attention: CUDA kernels (forward, and a flash-style backward from the log-sum-exp).
//
// Every query attends to every (pooled) key of its image, per head, the scale applied after the product:
//   out[b, n, h] = softmax_j((q[b, n, h] . k[b, j, h]) * scale) @ v[b, :, h],   lse[b, h, n] = log sum_j exp(...)
// q [B, N, heads * D] and kv [B, M, 2 * heads * D] (channels (2, heads, D)) may have strided rows (channels are
// contiguous, see csrc/common/lofi_checks.h); out, lse and the gradients are contiguous. 32-bit index math
// throughout: prepare_lofi_inputs keeps q and kv under 2^31 values, and the host checks the outputs' sizes.
//
// Blocks: one per (batch, tile of `rows` own rows, head), blockIdx.x = (b * tiles + tile) * heads + head, heads
// innermost so that neighbouring blocks read neighbouring channels of the same token rows. The own rows are
// queries in the forward and the dq kernel, keys in the dk/dv kernel; the other side streams through shared
// memory in tiles of up to tile_rows tokens (fitted to the default 48 KB of dynamic shared memory). The work
// split is window.cu's, with the helpers of attention_tile.cuh: each own row belongs to G adjacent lanes of a
// warp, each holding DPT of its head_dim values in registers (DPT = 32, or 16 for head_dim <= 16, double, and
// the dk/dv kernel); dot products are summed over the G lanes with xor shuffles; shared tile rows are hd_pad =
// G * DPT values (zeros past head_dim and past the sequence), read as 16-byte vectors broadcast to the lanes of
// different rows. A block has 32 to 256 threads (rows = threads / G): fewer where the grid would otherwise not
// fill the GPU (make_plan). The results do not depend on the block or tile size: the other side is always
// summed in token order, in steps aligned to multiples of kStep.
//
//   forward:  online softmax over the key tiles (running max m and sum l per query row, rescaled once per
//             kStep keys), out = o / l and lse = m + log(l).
//   backward: no N x M tensor is kept; P = exp(scale * q.k - lse) is recomputed. Two kernels, in order:
//     dq:    per query row, over the key tiles: Delta = dO . O (saved to `delta`), dS = P * (dO . v - Delta),
//            grad_q = scale * sum_j dS k_j.
//     dk/dv: per key row, over the query tiles (their lse and Delta staged in shared memory):
//            grad_v = sum_i P dO_i, grad_k = scale * sum_i dS q_i. Each key row has one owner: no atomics.
//   Every element of grad_q and grad_kv is written exactly once, so they need no zeroing; deterministic.
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

#include "../common/lofi_checks.h"
#include "attention_tile.cuh"

namespace effvit {
namespace cuda {
namespace {

using namespace attn;

// ---- BEGIN lofi device code ---------------------------------------------------------------------------

constexpr int kMaxThreads = 256;            // threads per block, a power of two
constexpr int kMinThreads = 32;             // one warp
constexpr int kStep = 8;                    // other-side tokens per forward inner-loop step; tile_rows is a multiple
constexpr int kBackwardStep = 4;            // the backward kernels' step (divides kStep): fewer registers
constexpr int kMaxHeadDim = 256;            // up to here a tile of kStep rows fits any plan (hd_pad <= 256)
constexpr int64_t kSmemBudget = 48 * 1024;  // dynamic shared memory usable without cudaFuncSetAttribute

enum class LofiKernel { kForward, kBackwardDq, kBackwardDkv };

// Values of a token row per lane (DPT): 32 where a lane holds two or three row slices of floats, 16 where
// it holds four (dk/dv kernel: k, v, dk, dv) or doubles, which would otherwise spill registers (window.cu's).
inline int lofi_slice_width(int64_t head_dim, bool is_double, LofiKernel kind) {
  return head_dim <= 16 || is_double || kind == LofiKernel::kBackwardDkv ? 16 : 32;
}

// The launch shape, chosen on the host (make_lofi_plan) and read by the kernels.
struct LofiPlan {
  int32_t G;          // lanes per own row
  int32_t hd_pad;     // G * DPT, a power of two: the row stride of the shared tiles
  int32_t hd_shift;   // log2(hd_pad)
  int32_t threads;    // blockDim.x
  int32_t rows;       // own rows per block, threads / G
  int32_t tiles;      // blocks per (batch, head): ceil(own / rows)
  int32_t tile_rows;  // other-side tokens per shared tile, a multiple of kStep (0: head_dim too large)
  int32_t row_stats;  // 1: per-tile-row lse and delta in shared memory (the dk/dv kernel)
};

// own: the rows the blocks split (N, or M for the dk/dv kernel); other: the rows streamed through shared
// memory. Blocks shrink from 256 threads (by halves, to one warp) while a block would be mostly idle rows or
// the grid would have fewer than two blocks per SM (sms: the device's multiprocessor count).
inline LofiPlan make_lofi_plan(int64_t head_dim, int dpt, int64_t acc_size, int64_t batch_heads, int64_t own,
                               int64_t other, bool row_stats, int64_t sms) {
  LofiPlan p{};
  p.G = 1;
  while (p.G * dpt < head_dim) p.G *= 2;
  p.hd_pad = p.G * dpt;
  p.hd_shift = 0;
  while ((1 << p.hd_shift) < p.hd_pad) ++p.hd_shift;
  const auto blocks = [&](int64_t threads) { return batch_heads * ((own + threads / p.G - 1) / (threads / p.G)); };
  int64_t threads = kMaxThreads;
  while (threads > kMinThreads && ((threads / 2) / p.G >= own || blocks(threads) < 2 * sms)) {
    threads /= 2;
  }
  p.threads = static_cast<int32_t>(threads);
  p.rows = p.threads / p.G;
  p.tiles = static_cast<int32_t>((own + p.rows - 1) / p.rows);
  p.row_stats = row_stats ? 1 : 0;
  const int64_t per_row = (2 * int64_t{p.hd_pad} + 2 * p.row_stats) * acc_size;
  const int64_t fit = kSmemBudget / per_row / kStep * kStep;
  const int64_t other_rows = (other + kStep - 1) / kStep * kStep;
  p.tile_rows = static_cast<int32_t>(std::min(fit, std::max<int64_t>(other_rows, kStep)));
  return p;
}

// Shared memory: two tiles of tile_rows x hd_pad values, then (row_stats) lse and delta per tile row, all
// acc_t. The host sizes the allocation with bytes() and the kernels carve it with the constructor.
template <typename acc_t>
struct LofiSmem {
  acc_t *tile_a, *tile_b, *row_lse, *row_delta;

  static int64_t bytes(const LofiPlan& p) {
    return (2 * int64_t{p.tile_rows} * p.hd_pad + 2 * int64_t{p.row_stats} * p.tile_rows) * int64_t{sizeof(acc_t)};
  }
  __device__ __forceinline__ LofiSmem(unsigned char* base, const LofiPlan& p) {
    tile_a = reinterpret_cast<acc_t*>(base);  // 16-byte aligned; tile_rows * hd_pad is a multiple of 16
    tile_b = tile_a + p.tile_rows * p.hd_pad;
    row_lse = tile_b + p.tile_rows * p.hd_pad;
    row_delta = row_lse + p.row_stats * p.tile_rows;
  }
};

template <typename scalar_t, typename acc_t>
struct LofiArgs {
  LofiPlan plan;
  const scalar_t* q;   // [B, N, heads * hd], strides (q_sb, q_sn, 1)
  const scalar_t* kv;  // [B, M, 2 * heads * hd], strides (kv_sb, kv_sn, 1)
  int32_t N, M, heads, hd;
  int32_t q_sb, q_sn, kv_sb, kv_sn;
  acc_t scale;
  bool vec4;  // hd % 4 == 0 and every row 4-value aligned: rows move as Pack4
};

// rows [0, count) of a strided sequence; row(r) is nullptr (zeros) past the end.
template <typename scalar_t>
struct RowRange {
  const scalar_t* base;
  int32_t stride, count;
  __device__ __forceinline__ const scalar_t* row(int32_t r) const { return r < count ? base + r * stride : nullptr; }
};

struct BlockTile {
  int32_t b, tile, h;
};

__device__ __forceinline__ BlockTile block_tile(int32_t heads, int32_t tiles) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  BlockTile bt;
  bt.h = block % heads;
  const int32_t bt_index = block / heads;
  bt.b = bt_index / tiles;
  bt.tile = bt_index - bt.b * tiles;
  return bt;
}

// out [B, N, C] and lse [B, heads, N]. One thread group per query row, online softmax over key tiles.
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    lofi_forward_kernel(const LofiArgs<scalar_t, acc_t> a, scalar_t* __restrict__ out, acc_t* __restrict__ lse) {
  const LofiPlan& p = a.plan;
  const BlockTile bt = block_tile(a.heads, p.tiles);
  const int32_t hd = a.hd, C = a.heads * hd, N = a.N, M = a.M, h = bt.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const LofiSmem<acc_t> sm(dynamic_smem(), p);

  const int32_t i = bt.tile * p.rows + static_cast<int32_t>(threadIdx.x) / p.G;
  const bool active = i < N;  // idle rows compute on zeros and write nothing
  acc_t q[DPT], o[DPT];
  load_row<DPT>(q, active ? a.q + bt.b * a.q_sb + i * a.q_sn + h * hd : nullptr, hd, a.vec4, ln);
#pragma unroll
  for (int k = 0; k < DPT; ++k) o[k] = 0;
  acc_t m = -infinity<acc_t>(), l = 0;

  const scalar_t* k_rows = a.kv + bt.b * a.kv_sb + h * hd;
  const scalar_t* v_rows = k_rows + C;
  for (int32_t k0 = 0; k0 < M; k0 += p.tile_rows) {
    const int32_t len = std::min(p.tile_rows, M - k0);
    if (k0 > 0) __syncthreads();  // the previous tile is no longer read
    load_tile_pair<scalar_t>(p.tile_rows, p.hd_shift, hd, a.vec4, RowRange<scalar_t>{k_rows + k0 * a.kv_sn, a.kv_sn, len},
                             sm.tile_a, RowRange<scalar_t>{v_rows + k0 * a.kv_sn, a.kv_sn, len}, sm.tile_b);
    __syncthreads();
    for (int32_t j0 = 0; j0 < len; j0 += kStep) {
      acc_t s[kStep];
      acc_t mx = m;
#pragma unroll
      for (int u = 0; u < kStep; ++u) {
        const int32_t j = j0 + u;  // < tile_rows; rows >= len are zeros and get no weight
        const acc_t dot = row_sum(dot_row<DPT>(q, sm.tile_a + (j << p.hd_shift), ln), p.G);
        s[u] = j < len ? a.scale * dot : -infinity<acc_t>();
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
  if (active) {
    store_row<DPT>(out + (bt.b * N + i) * C + h * hd, o, acc_t(1) / l, hd, a.vec4, ln);
    if (ln.part == 0) lse[(bt.b * a.heads + h) * N + i] = m + acc_log(l);
  }
}

// grad_q [B, N, C] and delta = dO . O [B, heads, N] for the dk/dv kernel. One thread group per query row,
// over key tiles. grad_out and out are contiguous [B, N, C].
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    lofi_backward_dq_kernel(const LofiArgs<scalar_t, acc_t> a, const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ out, const acc_t* __restrict__ lse,
                            scalar_t* __restrict__ grad_q, acc_t* __restrict__ delta) {
  const LofiPlan& p = a.plan;
  const BlockTile bt = block_tile(a.heads, p.tiles);
  const int32_t hd = a.hd, C = a.heads * hd, N = a.N, M = a.M, h = bt.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const LofiSmem<acc_t> sm(dynamic_smem(), p);

  const int32_t i = bt.tile * p.rows + static_cast<int32_t>(threadIdx.x) / p.G;
  const bool active = i < N;
  const int32_t row = (bt.b * N + (active ? i : 0)) * C + h * hd;  // in out, grad_out and grad_q
  acc_t q[DPT], dout[DPT], dq[DPT];
  load_row<DPT>(q, active ? a.q + bt.b * a.q_sb + i * a.q_sn + h * hd : nullptr, hd, a.vec4, ln);
  load_row<DPT>(dout, active ? grad_out + row : nullptr, hd, a.vec4, ln);
  load_row<DPT>(dq, active ? out + row : nullptr, hd, a.vec4, ln);  // O, for Delta; dq starts below
  acc_t D = 0;
#pragma unroll
  for (int k = 0; k < DPT; ++k) D += dout[k] * dq[k];
  D = row_sum(D, p.G);
#pragma unroll
  for (int k = 0; k < DPT; ++k) dq[k] = 0;
  const acc_t lse_i = active ? lse[(bt.b * a.heads + h) * N + i] : acc_t(0);

  const scalar_t* k_rows = a.kv + bt.b * a.kv_sb + h * hd;
  const scalar_t* v_rows = k_rows + C;
  for (int32_t k0 = 0; k0 < M; k0 += p.tile_rows) {
    const int32_t len = std::min(p.tile_rows, M - k0);
    if (k0 > 0) __syncthreads();
    load_tile_pair<scalar_t>(p.tile_rows, p.hd_shift, hd, a.vec4, RowRange<scalar_t>{k_rows + k0 * a.kv_sn, a.kv_sn, len},
                             sm.tile_a, RowRange<scalar_t>{v_rows + k0 * a.kv_sn, a.kv_sn, len}, sm.tile_b);
    __syncthreads();
    for (int32_t j0 = 0; j0 < len; j0 += kBackwardStep) {
#pragma unroll
      for (int u = 0; u < kBackwardStep; ++u) {
        const int32_t j = j0 + u;  // < tile_rows; rows >= len are zeros, and get dS = 0 below
        const acc_t* k_row = sm.tile_a + (j << p.hd_shift);
        const acc_t qk = row_sum(dot_row<DPT>(q, k_row, ln), p.G);
        const acc_t dp = row_sum(dot_row<DPT>(dout, sm.tile_b + (j << p.hd_shift), ln), p.G);
        const acc_t ds = active && j < len ? acc_exp(a.scale * qk - lse_i) * (dp - D) : acc_t(0);
        axpy_row<DPT>(ds, k_row, dq, ln);
      }
    }
  }
  if (active) {
    store_row<DPT>(grad_q + row, dq, a.scale, hd, a.vec4, ln);
    if (ln.part == 0) delta[(bt.b * a.heads + h) * N + i] = D;
  }
}

// grad_kv [B, M, 2C]: one thread group per key row, over query tiles, with the tile's q and dO rows and its
// queries' lse and delta in shared memory. grad_out is contiguous [B, N, C].
template <typename scalar_t, typename acc_t, int DPT>
__global__ void __launch_bounds__(kMaxThreads)
    lofi_backward_dkv_kernel(const LofiArgs<scalar_t, acc_t> a, const scalar_t* __restrict__ grad_out,
                             const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                             scalar_t* __restrict__ grad_kv) {
  const LofiPlan& p = a.plan;
  const BlockTile bt = block_tile(a.heads, p.tiles);
  const int32_t hd = a.hd, C = a.heads * hd, N = a.N, M = a.M, h = bt.h;
  const Lane ln{static_cast<int32_t>(threadIdx.x) % p.G, p.G};
  const LofiSmem<acc_t> sm(dynamic_smem(), p);

  const int32_t j = bt.tile * p.rows + static_cast<int32_t>(threadIdx.x) / p.G;
  const bool active = j < M;  // idle rows compute on zeros and write nothing
  const scalar_t* kv_row = a.kv + bt.b * a.kv_sb + (active ? j : 0) * a.kv_sn + h * hd;
  acc_t k[DPT], v[DPT], dk[DPT], dv[DPT];
  load_row<DPT>(k, active ? kv_row : nullptr, hd, a.vec4, ln);
  load_row<DPT>(v, active ? kv_row + C : nullptr, hd, a.vec4, ln);
#pragma unroll
  for (int c = 0; c < DPT; ++c) dk[c] = 0, dv[c] = 0;

  const scalar_t* q_rows = a.q + bt.b * a.q_sb + h * hd;
  const scalar_t* do_rows = grad_out + bt.b * N * C + h * hd;
  const acc_t* lse_bh = lse + (bt.b * a.heads + h) * N;
  const acc_t* delta_bh = delta + (bt.b * a.heads + h) * N;
  for (int32_t t0 = 0; t0 < N; t0 += p.tile_rows) {
    const int32_t len = std::min(p.tile_rows, N - t0);
    if (t0 > 0) __syncthreads();
    load_tile_pair<scalar_t>(p.tile_rows, p.hd_shift, hd, a.vec4, RowRange<scalar_t>{q_rows + t0 * a.q_sn, a.q_sn, len},
                             sm.tile_a, RowRange<scalar_t>{do_rows + t0 * C, C, len}, sm.tile_b);
    // rows past the sequence (zeros) get lse = +inf: P = dS = 0
    for (int32_t t = threadIdx.x; t < p.tile_rows; t += blockDim.x) {
      sm.row_lse[t] = t < len ? lse_bh[t0 + t] : infinity<acc_t>();
      sm.row_delta[t] = t < len ? delta_bh[t0 + t] : acc_t(0);
    }
    __syncthreads();
    for (int32_t i0 = 0; i0 < len; i0 += kBackwardStep) {
#pragma unroll
      for (int u = 0; u < kBackwardStep; ++u) {
        const int32_t i = i0 + u;  // < tile_rows
        const acc_t* q_row = sm.tile_a + (i << p.hd_shift);
        const acc_t* do_row = sm.tile_b + (i << p.hd_shift);
        const acc_t qk = row_sum(dot_row<DPT>(k, q_row, ln), p.G);
        const acc_t dp = row_sum(dot_row<DPT>(v, do_row, ln), p.G);
        const acc_t pr = acc_exp(a.scale * qk - sm.row_lse[i]);
        const acc_t ds = pr * (dp - sm.row_delta[i]);
        axpy_row<DPT>(pr, do_row, dv, ln);
        axpy_row<DPT>(ds, q_row, dk, ln);
      }
    }
  }
  if (active) {
    scalar_t* dst = grad_kv + (bt.b * M + j) * 2 * C + h * hd;
    store_row<DPT>(dst, dk, a.scale, hd, a.vec4, ln);
    store_row<DPT>(dst + C, dv, acc_t(1), hd, a.vec4, ln);
  }
}

// ---- END lofi device code -----------------------------------------------------------------------------

// ---- host code --------------------------------------------------------------------------------------

// The shapes the kernels take, and the 32-bit index range of the contiguous outputs.
void check_lofi_cuda_shapes(const LofiInputs& in) {
  TORCH_CHECK_VALUE(in.head_dim <= kMaxHeadDim, "the CUDA Lo-Fi attention kernels take head_dim <= ", kMaxHeadDim,
                    ", got ", in.head_dim);
  TORCH_CHECK_VALUE(in.B * in.N * in.C() < (int64_t{1} << 31) && in.B * in.M * 2 * in.C() < (int64_t{1} << 31),
                    "lofi_attention: out and grad_kv must hold fewer than 2**31 elements (the kernels index with "
                    "32 bits)");
}

template <typename acc_t>
LofiPlan checked_plan(const LofiInputs& in, int dpt, LofiKernel kind) {
  const bool dkv = kind == LofiKernel::kBackwardDkv;
  const LofiPlan plan = make_lofi_plan(in.head_dim, dpt, sizeof(acc_t), in.B * in.heads, dkv ? in.M : in.N,
                                       dkv ? in.N : in.M, dkv, multiprocessor_count());
  TORCH_INTERNAL_ASSERT(plan.tile_rows >= kStep && LofiSmem<acc_t>::bytes(plan) <= kSmemBudget,
                        "lofi attention: no shared-memory plan for head_dim ", in.head_dim);
  const int64_t blocks = in.B * in.heads * int64_t{plan.tiles};
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "lofi attention: ", blocks,
                    " blocks exceed the CUDA grid");
  return plan;
}

// Whether rows can move as Pack4: head_dim % 4 == 0 makes every channel offset a multiple of four values; the
// row strides (of dims longer than 1) and the tensors' data must be multiples of four values too.
bool lofi_rows_are_vec4(const LofiInputs& in, std::initializer_list<const at::Tensor*> tensors) {
  if (in.head_dim % 4 != 0) return false;
  if ((in.B > 1 && (in.q_sb % 4 != 0 || in.kv_sb % 4 != 0)) || (in.N > 1 && in.q_sn % 4 != 0) ||
      (in.M > 1 && in.kv_sn % 4 != 0)) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (4 * t->element_size()) != 0) return false;
  }
  return true;
}

template <typename scalar_t, typename acc_t>
LofiArgs<scalar_t, acc_t> make_lofi_args(const LofiInputs& in, const LofiPlan& plan, double scale, bool vec4) {
  LofiArgs<scalar_t, acc_t> args;
  args.plan = plan;
  args.q = in.q.const_data_ptr<scalar_t>();
  args.kv = in.kv.const_data_ptr<scalar_t>();
  args.N = static_cast<int32_t>(in.N);
  args.M = static_cast<int32_t>(in.M);
  args.heads = static_cast<int32_t>(in.heads);
  args.hd = static_cast<int32_t>(in.head_dim);
  args.q_sb = static_cast<int32_t>(in.q_sb);  // < 2^31: prepare_lofi_inputs bounds the spans
  args.q_sn = static_cast<int32_t>(in.q_sn);
  args.kv_sb = static_cast<int32_t>(in.kv_sb);
  args.kv_sn = static_cast<int32_t>(in.kv_sn);
  args.scale = static_cast<acc_t>(scale);
  args.vec4 = vec4;
  return args;
}

std::tuple<at::Tensor, at::Tensor> lofi_attention_cuda(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                       double scale) {
  const LofiInputs in = prepare_lofi_inputs(q, kv, num_heads);
  const auto acc_opts = in.q.options().dtype(window_acc_dtype(in.q.scalar_type()));
  at::Tensor out = at::empty({in.B, in.N, in.C()}, in.q.options());
  at::Tensor lse = at::empty({in.B, in.heads, in.N}, acc_opts);
  if (out.numel() == 0) return {out, lse};
  check_lofi_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(in.q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec4 = lofi_rows_are_vec4(in, {&in.q, &in.kv, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "effvit::lofi_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDouble = std::is_same_v<acc_t, double>;
    with_slice_width<!kDouble>(lofi_slice_width(in.head_dim, kDouble, LofiKernel::kForward), [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const LofiPlan plan = checked_plan<acc_t>(in, DPT, LofiKernel::kForward);
      lofi_forward_kernel<scalar_t, acc_t, DPT>
          <<<static_cast<unsigned>(in.B * in.heads * plan.tiles), plan.threads, LofiSmem<acc_t>::bytes(plan), stream>>>(
              make_lofi_args<scalar_t, acc_t>(in, plan, scale, vec4), out.mutable_data_ptr<scalar_t>(),
              lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> lofi_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                const at::Tensor& kv, const at::Tensor& out,
                                                                const at::Tensor& lse, int64_t num_heads,
                                                                double scale) {
  const LofiInputs in = prepare_lofi_inputs(q, kv, num_heads);
  check_lofi_backward(in, grad_out, out, lse);
  // every element is written exactly once, so neither needs zeroing (but with no queries, grad_kv is zero)
  at::Tensor grad_q = at::empty({in.B, in.N, in.C()}, in.q.options());
  if (grad_q.numel() == 0) return {grad_q, at::zeros({in.B, in.M, 2 * in.C()}, in.q.options())};
  at::Tensor grad_kv = at::empty({in.B, in.M, 2 * in.C()}, in.q.options());
  check_lofi_cuda_shapes(in);
  const c10::cuda::CUDAGuard guard(in.q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad_out_c = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const at::Tensor delta = at::empty({in.B, in.heads, in.N}, lse_c.options());  // dO . O, from the dq kernel
  const bool vec4 = lofi_rows_are_vec4(in, {&in.q, &in.kv, &grad_out_c, &out_c, &grad_q, &grad_kv});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "effvit::lofi_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDouble = std::is_same_v<acc_t, double>;
    with_slice_width<!kDouble>(lofi_slice_width(in.head_dim, kDouble, LofiKernel::kBackwardDq), [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const LofiPlan plan = checked_plan<acc_t>(in, DPT, LofiKernel::kBackwardDq);
      lofi_backward_dq_kernel<scalar_t, acc_t, DPT>
          <<<static_cast<unsigned>(in.B * in.heads * plan.tiles), plan.threads, LofiSmem<acc_t>::bytes(plan), stream>>>(
              make_lofi_args<scalar_t, acc_t>(in, plan, scale, vec4), grad_out_c.const_data_ptr<scalar_t>(),
              out_c.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<acc_t>(), grad_q.mutable_data_ptr<scalar_t>(),
              delta.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // reads delta, so it runs after the dq kernel (same stream)
    with_slice_width<false>(lofi_slice_width(in.head_dim, kDouble, LofiKernel::kBackwardDkv), [&](auto width) {
      constexpr int DPT = decltype(width)::value;
      const LofiPlan plan = checked_plan<acc_t>(in, DPT, LofiKernel::kBackwardDkv);
      lofi_backward_dkv_kernel<scalar_t, acc_t, DPT>
          <<<static_cast<unsigned>(in.B * in.heads * plan.tiles), plan.threads, LofiSmem<acc_t>::bytes(plan), stream>>>(
              make_lofi_args<scalar_t, acc_t>(in, plan, scale, vec4), grad_out_c.const_data_ptr<scalar_t>(),
              lse_c.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), grad_kv.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_kv};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CUDA, m) {
  m.impl("lofi_attention", &lofi_attention_cuda);
  m.impl("lofi_attention_backward", &lofi_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace effvit
