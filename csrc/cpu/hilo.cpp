// LITv2 HiLo's Lo-Fi attention (every query to every pooled key): CPU kernels.
//
// One task is one (image, head, chunk of queries). It gathers the head's keys (transposed) and values once into
// zero-padded float buffers, then walks its queries in blocks of `rows` (sized so a block's logits stay in L1/L2):
// logits from the GEMM micro-kernel of attention_tile.h starting from a row that masks the padded key columns,
// softmax with the vectorised exp, P @ V, and the output row written to its place in [B, N, heads * D]. Only the
// log-sum-exp of each query outlives the task.
//
// q is read times `scale`, so the logits are (q * scale) . k: LITv2 multiplies after the product, which differs
// only in rounding (the tests hold it to the official module within 1e-5 relative in float32).
//
// The backward recomputes P from the log-sum-exp per query block and accumulates dK and dV over the task's
// queries (the forward's output is not read: each row's sum_j P dP comes from the row itself); when an image's heads are too few to keep every thread busy, queries are split into chunks whose
// dK / dV partial sums are added in chunk order afterwards, so results never depend on thread timing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/lofi_checks.h"
#include "attention_tile.h"
#include "cpu_isa.h"

namespace effvit {
namespace {

constexpr int kLogitBudget = 16384;  // floats of logits per query block (64 KB): fits L2 with room for K and V
constexpr int kMinChunkRows = 64;    // fewer queries per task would gather K and V more often than it pays

// What every task of one call shares (read-only).
template <typename scalar_t, typename acc_t>
struct LofiCall {
  int B = 0, N = 0, M = 0, heads = 0, D = 0;
  int Mp = 0, Dp = 0;      // padded key count and head_dim
  int rows = 0;            // queries per block (a multiple of kRows)
  int chunks = 1;          // query chunks per (image, head)
  acc_t scale = 1;
  const scalar_t* q = nullptr;
  const scalar_t* kv = nullptr;
  int64_t q_sb = 0, q_sn = 0, kv_sb = 0, kv_sn = 0;
  const acc_t* mask = nullptr;  // [rows, Mp]: 0 for real keys, -1e30 for padded ones (the logits' start)
  int C() const { return heads * D; }
  int64_t tasks() const { return int64_t{B} * heads * chunks; }
  int chunk_begin(int chunk) const { return static_cast<int>(int64_t{N} * chunk / chunks); }
};

struct LofiTask {
  int b, h, chunk;
};

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE LofiTask lofi_task(const LofiCall<scalar_t, acc_t>& c, int64_t t) {
  LofiTask ti;
  ti.chunk = static_cast<int>(t % c.chunks);
  t /= c.chunks;
  ti.h = static_cast<int>(t % c.heads);
  ti.b = static_cast<int>(t / c.heads);
  return ti;
}

// Per-thread buffers.
template <typename acc_t>
struct LofiScratch {
  std::vector<acc_t> k, kt, v, q, s, o;  // K [Mp, Dp] and K^T, V [Mp, Dp], Q block [rows, Dp], logits [rows, Mp], O block
  std::vector<acc_t> vt, dout, dp, dq, dk, dv, tmp;  // backward only
  LofiScratch(int rows, int Mp, int Dp, bool backward)
      : kt(int64_t{Dp} * Mp, 0), v(int64_t{Mp} * Dp, 0), q(int64_t{rows} * Dp, 0), s(int64_t{rows} * Mp, 0),
        o(int64_t{rows} * Dp, 0) {
    k.assign(int64_t{Mp} * Dp, 0);
    if (!backward) return;
    for (auto* b : {&dk, &dv, &tmp}) b->assign(int64_t{Mp} * Dp, 0);
    vt.assign(int64_t{Dp} * Mp, 0);
    for (auto* b : {&dout, &dq}) b->assign(int64_t{rows} * Dp, 0);
    dp.assign(int64_t{rows} * Mp, 0);
  }
};

// K (into k, and transposed into kt), V (into v, and transposed into vt when asked) of head h of image b; padded
// entries stay zero from the allocation (every task writes the same real ones).
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void gather_kv(const LofiCall<scalar_t, acc_t>& c, const LofiTask& ti, LofiScratch<acc_t>& s,
                                    bool backward) {
  const int D = c.D, Dp = c.Dp, Mp = c.Mp, C = c.C();
  const scalar_t* base = c.kv + ti.b * c.kv_sb + ti.h * D;
  for (int j = 0; j < c.M; ++j) {
    const scalar_t* row = base + j * c.kv_sn;
    load_row(row, s.k.data() + int64_t{j} * Dp, D, acc_t(1));
    load_row(row + C, s.v.data() + int64_t{j} * Dp, D, acc_t(1));
  }
  transpose(s.k.data(), Dp, s.kt.data(), Mp, c.M, D);
  if (backward) transpose(s.v.data(), Dp, s.vt.data(), Mp, c.M, D);
}

// Queries [i0, i0 + n) of the task, times scale, into s.q; rows past n are zero.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void load_queries(const LofiCall<scalar_t, acc_t>& c, const LofiTask& ti, int i0, int n,
                                       LofiScratch<acc_t>& s) {
  const scalar_t* base = c.q + ti.b * c.q_sb + ti.h * c.D;
  for (int i = 0; i < n; ++i) load_row(base + (i0 + i) * c.q_sn, s.q.data() + int64_t{i} * c.Dp, c.D, c.scale);
  std::fill(s.q.begin() + int64_t{n} * c.Dp, s.q.begin() + int64_t{c.rows} * c.Dp, acc_t(0));
}

template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void lofi_forward_body(const LofiCall<scalar_t, acc_t>* call, scalar_t* out, acc_t* lse,
                                            int64_t begin, int64_t end) {
  const LofiCall<scalar_t, acc_t>& c = *call;
  const int Mp = c.Mp, Dp = c.Dp, D = c.D, C = c.C();
  LofiScratch<acc_t> s(c.rows, Mp, Dp, false);
  std::vector<acc_t> inv_sum(c.rows), maxima(c.rows), sums(c.rows);
  for (int64_t t = begin; t < end; ++t) {
    const LofiTask ti = lofi_task(c, t);
    gather_kv(c, ti, s, false);
    const int first = c.chunk_begin(ti.chunk), last = c.chunk_begin(ti.chunk + 1);
    acc_t* lse_row = lse + (int64_t{ti.b} * c.heads + ti.h) * c.N;
    for (int i0 = first; i0 < last; i0 += c.rows) {
      const int n = std::min(c.rows, last - i0), n4 = round_up(n, kRows);
      load_queries(c, ti, i0, n, s);
      gemm_nn(s.q.data(), Dp, s.kt.data(), Mp, s.s.data(), Mp, n4, D, Mp, c.mask);
      for (int i = 0; i < n; ++i) {
        acc_t* row = s.s.data() + int64_t{i} * Mp;
        maxima[i] = padded_row_max(row, c.M, Mp);
        sums[i] = exp_row(row, Mp, maxima[i]);
      }
      finish_rows(sums.data(), maxima.data(), n, inv_sum.data(), lse_row + i0);
      gemm_nn(s.s.data(), Mp, s.v.data(), Dp, s.o.data(), Dp, n4, c.M, Dp);
      for (int i = 0; i < n; ++i)
        store_row(s.o.data() + int64_t{i} * Dp, out + (int64_t{ti.b} * c.N + i0 + i) * C + ti.h * D, D, inv_sum[i]);
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(lofi_forward_range, lofi_forward_body)

// dst[k] += src[k] over n values (a multiple of the vector width).
template <typename acc_t>
EFFVIT_ALWAYS_INLINE void add_into(acc_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  for (int64_t k = 0; k < n; k += L) vstore(dst + k, vload<V>(dst + k) + vload<V>(src + k));
}

// dK, dV of the task's queries go to grad_kv directly (one chunk per head) or to this task's slot of the
// partial sums [tasks, M, 2, D].
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void lofi_backward_body(const LofiCall<scalar_t, acc_t>* call, const scalar_t* grad_out,
                                             const acc_t* lse, scalar_t* grad_q,
                                             scalar_t* grad_kv, acc_t* partial_kv, int64_t begin, int64_t end) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const LofiCall<scalar_t, acc_t>& c = *call;
  const int Mp = c.Mp, Dp = c.Dp, D = c.D, C = c.C();
  LofiScratch<acc_t> s(c.rows, Mp, Dp, true);
  std::vector<acc_t> p_sum(c.rows);
  for (int64_t t = begin; t < end; ++t) {
    const LofiTask ti = lofi_task(c, t);
    gather_kv(c, ti, s, true);
    std::fill(s.dk.begin(), s.dk.end(), acc_t(0));
    std::fill(s.dv.begin(), s.dv.end(), acc_t(0));
    const int first = c.chunk_begin(ti.chunk), last = c.chunk_begin(ti.chunk + 1);
    const acc_t* lse_row = lse + (int64_t{ti.b} * c.heads + ti.h) * c.N;
    for (int i0 = first; i0 < last; i0 += c.rows) {
      const int n = std::min(c.rows, last - i0), n4 = round_up(n, kRows);
      load_queries(c, ti, i0, n, s);
      // P from the saved log-sum-exp and dO (rows past n zero)
      gemm_nn(s.q.data(), Dp, s.kt.data(), Mp, s.s.data(), Mp, n4, D, Mp, c.mask);
      for (int i = 0; i < n4; ++i) {
        acc_t* prow = s.s.data() + int64_t{i} * Mp;
        acc_t* dorow = s.dout.data() + int64_t{i} * Dp;
        if (i >= n) {
          std::fill(prow, prow + Mp, acc_t(0));
          std::fill(dorow, dorow + Dp, acc_t(0));
          continue;
        }
        p_sum[i] = exp_row(prow, Mp, lse_row[i0 + i]);
        load_row(grad_out + (int64_t{ti.b} * c.N + i0 + i) * C + ti.h * D, dorow, D, acc_t(1));
      }
      // dV += P^T dO
      gemm_nn<true>(s.s.data(), Mp, s.dout.data(), Dp, s.tmp.data(), Dp, Mp, n4, Dp);
      add_into(s.dv.data(), s.tmp.data(), int64_t{Mp} * Dp);
      // dS = P * (dP - D_i) with dP = dO V^T and D_i = sum_j P_ij dP_ij / sum_j P_ij: the softmax backward as eager
      // autograd computes it (the whole row is at hand; unlike dO . O it owes nothing to the rounded output), over
      // the recomputed row's own sum, which differs from 1 by exp's rounding of logits that may be large. Rows of
      // dS then sum to 0 up to rounding, as they must: the keys' bias gradient, sum_ij dS_ij q_i, cancels to ~0.
      gemm_nn(s.dout.data(), Dp, s.vt.data(), Mp, s.dp.data(), Mp, n4, D, Mp);
      for (int i = 0; i < n4; ++i) {
        acc_t* ds = s.dp.data() + int64_t{i} * Mp;
        const acc_t* p = s.s.data() + int64_t{i} * Mp;
        const acc_t delta = i < n ? dot_padded(p, ds, Mp) / p_sum[i] : acc_t(0);
        for (int j = 0; j < Mp; j += L) vstore(ds + j, vload<V>(p + j) * (vload<V>(ds + j) - delta));
      }
      // dQ = scale dS K; dK += dS^T (q * scale)
      gemm_nn(s.dp.data(), Mp, s.k.data(), Dp, s.dq.data(), Dp, n4, c.M, Dp);
      for (int i = 0; i < n; ++i)
        store_row(s.dq.data() + int64_t{i} * Dp, grad_q + (int64_t{ti.b} * c.N + i0 + i) * C + ti.h * D, D,
                  c.scale);
      gemm_nn<true>(s.dp.data(), Mp, s.q.data(), Dp, s.tmp.data(), Dp, Mp, n4, Dp);
      add_into(s.dk.data(), s.tmp.data(), int64_t{Mp} * Dp);
    }
    for (int j = 0; j < c.M; ++j) {
      const acc_t* dk = s.dk.data() + int64_t{j} * Dp;
      const acc_t* dv = s.dv.data() + int64_t{j} * Dp;
      if (partial_kv != nullptr) {
        acc_t* dst = partial_kv + (t * c.M + j) * 2 * D;
        std::copy(dk, dk + D, dst);
        std::copy(dv, dv + D, dst + D);
      } else {
        scalar_t* dst = grad_kv + (int64_t{ti.b} * c.M + j) * 2 * C + ti.h * D;
        store_row(dk, dst, D, acc_t(1));
        store_row(dv, dst + C, D, acc_t(1));
      }
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(lofi_backward_range, lofi_backward_body)

// The per-call shared state: sizes, block and chunk counts, and the masking row block.
template <typename scalar_t, typename acc_t>
struct LofiCallStorage {
  LofiCall<scalar_t, acc_t> call;
  std::vector<acc_t> mask;

  LofiCallStorage(const LofiInputs& in, double scale) {
    LofiCall<scalar_t, acc_t>& c = call;
    c.B = static_cast<int>(in.B), c.N = static_cast<int>(in.N), c.M = static_cast<int>(in.M);
    c.heads = static_cast<int>(in.heads), c.D = static_cast<int>(in.head_dim);
    c.Mp = round_up(c.M, kPad);
    c.Dp = round_up(c.D, kPad);
    c.rows = std::clamp(kLogitBudget / c.Mp / kRows * kRows, kRows, 64);
    c.rows = std::min(c.rows, round_up(c.N, kRows));
    // split queries into chunks only when (image, head) pairs are too few to give each thread several tasks
    const int64_t pairs = int64_t{c.B} * c.heads, want = 4 * int64_t{at::get_num_threads()};
    if (pairs < want) c.chunks = static_cast<int>(std::clamp<int64_t>(
        std::min<int64_t>((want + pairs - 1) / pairs, c.N / kMinChunkRows), 1, 1 << 16));
    c.scale = static_cast<acc_t>(scale);
    c.q = in.q.data_ptr<scalar_t>();
    c.kv = in.kv.data_ptr<scalar_t>();
    c.q_sb = in.q_sb, c.q_sn = in.q_sn, c.kv_sb = in.kv_sb, c.kv_sn = in.kv_sn;
    mask.assign(int64_t{c.rows} * c.Mp, acc_t(0));
    for (int i = 0; i < c.rows; ++i)
      for (int j = c.M; j < c.Mp; ++j) mask[int64_t{i} * c.Mp + j] = static_cast<acc_t>(kMaskedColumn);
    c.mask = mask.data();
  }
};

std::tuple<at::Tensor, at::Tensor> lofi_attention_cpu(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads,
                                                      double scale) {
  const LofiInputs in = prepare_lofi_inputs(q, kv, num_heads);
  auto out = at::empty({in.B, in.N, in.C()}, in.q.options());
  auto lse = at::empty({in.B, in.heads, in.N}, in.q.options().dtype(window_acc_dtype(in.q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "lofi_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const LofiCallStorage<scalar_t, acc_t> storage(in, scale);
    const auto* call = &storage.call;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, call->tasks(), 1, [&](int64_t begin, int64_t end) {
      lofi_forward_range(call, out_ptr, lse_ptr, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> lofi_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q,
                                                               const at::Tensor& kv, const at::Tensor& out_in,
                                                               const at::Tensor& lse_in, int64_t num_heads,
                                                               double scale) {
  const LofiInputs in = prepare_lofi_inputs(q, kv, num_heads);
  check_lofi_backward(in, grad_out_in, out_in, lse_in);
  auto grad_q = at::empty({in.B, in.N, in.C()}, in.q.options());
  auto grad_kv = at::empty({in.B, in.M, 2 * in.C()}, in.q.options());
  if (grad_q.numel() == 0) {
    grad_kv.zero_();
    return {grad_q, grad_kv};
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), lse = lse_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "lofi_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const LofiCallStorage<scalar_t, acc_t> storage(in, scale);
    const auto* call = &storage.call;
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gkv = grad_kv.data_ptr<scalar_t>();
    std::vector<acc_t> partial(call->chunks > 1 ? call->tasks() * in.M * 2 * in.head_dim : 0);
    acc_t* part = partial.empty() ? nullptr : partial.data();
    at::parallel_for(0, call->tasks(), 1, [&](int64_t begin, int64_t end) {
      lofi_backward_range(call, go, l, gq, gkv, part, begin, end);
    });
    if (part == nullptr) return;
    // chunk partials [B, heads, chunks, M, 2, D] summed in chunk order into grad_kv [B, M, 2, heads, D]
    const int64_t M = in.M, D = in.head_dim, C = in.C(), chunks = call->chunks;
    at::parallel_for(0, in.B * in.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(2 * D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / in.heads, h = bh % in.heads;
        for (int64_t j = 0; j < M; ++j) {
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t ch = 0; ch < chunks; ++ch) {
            const acc_t* src = part + ((bh * chunks + ch) * M + j) * 2 * D;
            for (int64_t d = 0; d < 2 * D; ++d) sum[d] += src[d];
          }
          scalar_t* dst = gkv + (b * M + j) * 2 * C + h * D;
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(sum[d]);
            dst[C + d] = static_cast<scalar_t>(sum[D + d]);
          }
        }
      }
    });
  });
  return {grad_q, grad_kv};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CPU, m) {
  m.impl("lofi_attention", &lofi_attention_cpu);
  m.impl("lofi_attention_backward", &lofi_attention_backward_cpu);
}

}  // namespace effvit
