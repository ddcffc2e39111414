// CPU kernels of the token-drop ops (EViT token dropping).
//
// cls_attention_scores: per (image, head) one GEMV of the CLS query against the N keys (vector dot products on
// keys converted to the accumulation type), a softmax row with the vectorised exp of attention_tile.h (its
// log-sum-exp is kept for backward), then per image the mean over heads at the non-prefix keys. No [B, H, N, N]
// probabilities: the patched ViT runs its attention through SDPA, which never forms them.
// drop_tokens: per image, rank the scores (descending, ties to the lower position, NaN last), keep the first
// `keep`, copy the prefix and kept rows and sum the dropped ones weighted by their scores into the fused row.
// Both are memory-bound and small next to the block's GEMMs; the loops are plain and parallel over images (and
// heads), every output element written once, sums taken in a fixed order (deterministic).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common/token_drop_checks.h"
#include "attention_tile.h"
#include "cpu_isa.h"

namespace effvit {
namespace {

template <typename scalar_t>
using AccOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// What the score kernels read: q [B, H, D] and k [B, H, N, D] through their strides.
template <typename scalar_t, typename acc_t>
struct ClsCall {
  const scalar_t* q = nullptr;
  const scalar_t* k = nullptr;
  int64_t qb = 0, qh = 0, qd = 0, kb = 0, kh = 0, kn = 0, kd = 0;
  int64_t H = 0, N = 0, D = 0, P = 0;
  int Dp = 0, Np = 0;  // D and N padded to kPad (vector multiples)
  acc_t scale = 1;
};

template <typename scalar_t, typename acc_t>
ClsCall<scalar_t, acc_t> make_cls_call(const ClsScoreInputs& in, const at::Tensor& q, const at::Tensor& k,
                                       double scale) {
  ClsCall<scalar_t, acc_t> c;
  c.q = q.data_ptr<scalar_t>(), c.k = k.data_ptr<scalar_t>();
  c.qb = q.stride(0), c.qh = q.stride(1), c.qd = q.stride(2);
  c.kb = k.stride(0), c.kh = k.stride(1), c.kn = k.stride(2), c.kd = k.stride(3);
  c.H = in.H, c.N = in.N, c.D = in.D, c.P = in.P;
  c.Dp = round_up(static_cast<int>(in.D), kPad), c.Np = round_up(static_cast<int>(in.N), kPad);
  c.scale = static_cast<acc_t>(scale);
  return c;
}

// One head's CLS logits, scale * q . k_j, into row[Np] (padded columns kMaskedColumn). q_acc [Dp] gets q in acc_t
// and keys the keys (zero-padded): all N of them, [N x Dp], with keep_keys (the backward reuses them), else one row.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void cls_logits(const ClsCall<scalar_t, acc_t>& c, int64_t bh, acc_t* q_acc, acc_t* keys,
                                     bool keep_keys, acc_t* row) {
  const int64_t b = bh / c.H, h = bh % c.H;
  const scalar_t* q = c.q + b * c.qb + h * c.qh;
  const scalar_t* k = c.k + b * c.kb + h * c.kh;
  for (int64_t d = 0; d < c.D; ++d) q_acc[d] = static_cast<acc_t>(q[d * c.qd]);
  if constexpr (std::is_same_v<scalar_t, float>) {
    // float keys read in place, sixteen rows' products in flight at once (a timm ViT's k rows lie 3 C apart in
    // the qkv output: one row at a time waited on each; ViT-S batch 1: 40 -> 10 µs)
    if (!keep_keys && c.kd == 1 && c.D == c.Dp && c.kn <= std::numeric_limits<int>::max()) {
      dot_rows(k, static_cast<int>(c.kn), q_acc, c.Dp, static_cast<int>(c.N), row);
      for (int64_t j = 0; j < c.N; ++j) row[j] *= c.scale;
      for (int64_t j = c.N; j < c.Np; ++j) row[j] = static_cast<acc_t>(kMaskedColumn);
      return;
    }
  }
  for (int64_t j = 0; j < c.N; ++j) {
    const scalar_t* kj = k + j * c.kn;
    acc_t* key = keep_keys ? keys + j * c.Dp : keys;
    if (c.kd == 1)
      load_row(kj, key, static_cast<int>(c.D), acc_t(1));
    else
      for (int64_t d = 0; d < c.D; ++d) key[d] = static_cast<acc_t>(kj[d * c.kd]);
    row[j] = dot_padded(q_acc, key, c.Dp) * c.scale;
  }
  for (int64_t j = c.N; j < c.Np; ++j) row[j] = static_cast<acc_t>(kMaskedColumn);
}

// Scratch of one thread: q_acc [Dp] and keys [key_rows x Dp], zero-padded.
template <typename acc_t>
struct ClsScratch {
  std::vector<acc_t> q_acc, keys;
  ClsScratch(int Dp, int64_t key_rows) : q_acc(Dp, acc_t(0)), keys(key_rows * Dp, acc_t(0)) {}
};

// probs[bh] (rows of Np) = the softmax of each head's CLS logits; lse[bh] its log-sum-exp.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void cls_forward_body(const ClsCall<scalar_t, acc_t>* call, acc_t* probs, acc_t* lse,
                                           int64_t begin, int64_t end) {
  const auto& c = *call;
  ClsScratch<acc_t> s(c.Dp, 1);
  for (int64_t bh = begin; bh < end; ++bh) {
    acc_t* row = probs + bh * c.Np;
    cls_logits(c, bh, s.q_acc.data(), s.keys.data(), false, row);
    const acc_t shift = padded_row_max(row, static_cast<int>(c.N), c.Np);
    const acc_t sum = exp_row(row, c.Np, shift);
    lse[bh] = shift + std::log(sum);
    const acc_t inv = acc_t(1) / sum;
    for (int j = 0; j < c.Np; ++j) row[j] *= inv;
  }
}
EFFVIT_CPU_ISA_VARIANTS(cls_forward_range, cls_forward_body)

// grad_q, grad_k of (b, h) from the recomputed probabilities: ds_j = p_j (g_j - sum_i p_i g_i), g_j the
// score's gradient / H (0 on prefix keys); grad_q = scale * sum_j ds_j k_j, grad_k_j = scale * ds_j q.
template <typename scalar_t, typename acc_t>
EFFVIT_ALWAYS_INLINE void cls_backward_body(const ClsCall<scalar_t, acc_t>* call, const acc_t* lse,
                                            const acc_t* grad, scalar_t* gq, scalar_t* gk, int64_t begin,
                                            int64_t end) {
  const auto& c = *call;
  ClsScratch<acc_t> s(c.Dp, c.N);
  std::vector<acc_t> row(c.Np), dq(c.Dp);
  const int64_t M = c.N - c.P;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(c.H);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / c.H;
    cls_logits(c, bh, s.q_acc.data(), s.keys.data(), true, row.data());
    exp_row(row.data(), c.Np, lse[bh]);  // the probabilities
    const acc_t* g = grad + b * M - c.P;  // g[j] for j >= P
    acc_t p_dot_g = 0;
    for (int64_t j = c.P; j < c.N; ++j) p_dot_g += row[j] * g[j] * inv_heads;
    std::fill(dq.begin(), dq.end(), acc_t(0));
    scalar_t* gk_h = gk + bh * c.N * c.D;
    for (int64_t j = 0; j < c.N; ++j) {
      const acc_t gj = j >= c.P ? g[j] * inv_heads : acc_t(0);
      const acc_t ds = row[j] * (gj - p_dot_g) * c.scale;
      const acc_t* key = s.keys.data() + j * c.Dp;
      for (int d = 0; d < c.Dp; ++d) dq[d] += ds * key[d];
      store_row(s.q_acc.data(), gk_h + j * c.D, static_cast<int>(c.D), ds);
    }
    store_row(dq.data(), gq + bh * c.D, static_cast<int>(c.D), acc_t(1));
  }
}
EFFVIT_CPU_ISA_VARIANTS(cls_backward_range, cls_backward_body)

// Heads per parallel task: one (b, h) is a few microseconds, and splitting even a batch-1 call over the cores
// measured faster than one thread (2-core EPYC, ViT-S/B shapes, inputs not in cache: the two cores' loads
// overlap; a grain of ~256k multiply-adds, one thread at batch 1, made ViT-B's step 1.5-3x slower).
constexpr int64_t kHeadsPerTask = 2;

// Fewest channels of the fused row one part of an image sums (drop_parts): one part's share starts at a multiple
// of this, a whole number of cache lines in every dtype.
constexpr int64_t kMinFusedChannels = 64;

int64_t round_down_to(int64_t v, int64_t m) { return v / m * m; }

std::tuple<at::Tensor, at::Tensor> cls_attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                                            int64_t num_prefix) {
  const ClsScoreInputs in = check_cls_scores_inputs(q, k, num_prefix);
  const auto acc_opts = q.options().dtype(in.acc);
  at::Tensor scores = at::empty({in.B, in.N - in.P}, acc_opts);
  at::Tensor lse = at::empty({in.B, in.H}, acc_opts);
  if (in.B == 0) return {scores, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cls_attention_scores_cpu", [&] {
    using acc_t = AccOf<scalar_t>;
    const auto c = make_cls_call<scalar_t, acc_t>(in, q, k, scale);
    const auto* call = &c;
    std::vector<acc_t> probs(in.B * in.H * c.Np);
    acc_t* probs_ptr = probs.data();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, in.B * in.H, kHeadsPerTask, [&](int64_t begin, int64_t end) {
      cls_forward_range(call, probs_ptr, lse_ptr, begin, end);
    });
    acc_t* out = scores.data_ptr<acc_t>();
    const int64_t M = in.N - in.P;
    at::parallel_for(0, in.B, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* row = out + b * M;
        std::fill(row, row + M, acc_t(0));
        for (int64_t h = 0; h < in.H; ++h) {  // heads in order: the same sum on every run
          const acc_t* p = probs_ptr + (b * in.H + h) * c.Np + in.P;
          for (int64_t j = 0; j < M; ++j) row[j] += p[j];
        }
        for (int64_t j = 0; j < M; ++j) row[j] /= static_cast<acc_t>(in.H);
      }
    });
  });
  return {scores, lse};
}

std::tuple<at::Tensor, at::Tensor> cls_attention_scores_backward_cpu(const at::Tensor& grad_scores,
                                                                     const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& lse, double scale,
                                                                     int64_t num_prefix) {
  const ClsScoreInputs in = check_cls_scores_inputs(q, k, num_prefix);
  check_cls_scores_backward(in, grad_scores, q, lse);
  at::Tensor grad_q = at::empty({in.B, in.H, in.D}, q.options());
  at::Tensor grad_k = at::empty({in.B, in.H, in.N, in.D}, q.options());
  if (in.B == 0) return {grad_q, grad_k};
  const at::Tensor g_all = grad_scores.to(in.acc).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cls_attention_scores_backward_cpu", [&] {
    using acc_t = AccOf<scalar_t>;
    const auto c = make_cls_call<scalar_t, acc_t>(in, q, k, scale);
    const auto* call = &c;
    const acc_t* lse_ptr = lse_c.data_ptr<acc_t>();
    const acc_t* g_ptr = g_all.data_ptr<acc_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    at::parallel_for(0, in.B * in.H, kHeadsPerTask, [&](int64_t begin, int64_t end) {
      cls_backward_range(call, lse_ptr, g_ptr, gq, gk, begin, end);
    });
  });
  return {grad_q, grad_k};
}

// Positions 0..M-1 with the `keep` best first (score descending, ties to the lower position, NaN last); the first
// `keep` entries of `order` are then the kept tokens, in score order or, with spatial_order, ascending.
template <typename score_t>
void rank_tokens(const score_t* s, int64_t M, int64_t keep, bool spatial_order, std::vector<int64_t>& order) {
  order.resize(M);
  std::iota(order.begin(), order.end(), int64_t{0});
  const auto better = [s](int64_t a, int64_t b) {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;  // a number beats NaN
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  };
  if (keep < M) std::nth_element(order.begin(), order.begin() + keep, order.end(), better);
  if (spatial_order)
    std::sort(order.begin(), order.begin() + keep);
  else
    std::sort(order.begin(), order.begin() + keep, better);
}

// Channels [c0, c1) of the fused row: f[c] = sum over the dropped tokens j (kept[j] == 0, in position order) of
// s[j] * x[P + j, c], one image's rows at xb with token stride sn and channel stride sc. The AVX2 and AVX-512
// variants fuse the multiply-add (FMA), so their fused row can differ from the baseline's in the last bit.
template <typename scalar_t, typename acc_t, typename score_t>
EFFVIT_ALWAYS_INLINE void fused_sum_body(const scalar_t* xb, int64_t sn, int64_t sc, const score_t* s,
                                         const char* kept, int64_t M, int64_t P, int64_t c0, int64_t c1,
                                         acc_t* __restrict__ f) {
  std::fill(f + c0, f + c1, acc_t(0));
  for (int64_t j = 0; j < M; ++j) {
    if (kept[j]) continue;
    const acc_t w = static_cast<acc_t>(s[j]);
    const scalar_t* r = xb + (P + j) * sn;
    if (sc == 1)
      for (int64_t c = c0; c < c1; ++c) f[c] += w * static_cast<acc_t>(r[c]);
    else
      for (int64_t c = c0; c < c1; ++c) f[c] += w * static_cast<acc_t>(r[c * sc]);
  }
}
EFFVIT_CPU_ISA_VARIANTS(fused_sum, fused_sum_body)

// Parts per image for drop_tokens: when images are fewer than threads, each image is shared out, every part
// ranking the image itself (a few microseconds, run side by side) and then copying its share of the rows and
// summing its share of the fused row's channels. ViT-B batch 1 on the 2-core EPYC: one thread per image left
// the other idle through ~20 µs of copies.
int64_t drop_parts(int64_t B, int64_t C) {
  const int64_t threads = at::get_num_threads();
  if (B >= threads) return 1;
  return std::clamp<int64_t>(threads / B, 1, std::max<int64_t>(C / kMinFusedChannels, 1));
}

template <typename scalar_t, typename score_t>
void drop_tokens_kernel(const DropInputs& in, const at::Tensor& x, const at::Tensor& s_rank, bool fuse,
                        bool spatial_order, int64_t parts, at::Tensor& out, at::Tensor& index) {
  using acc_t = AccOf<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sb = x.stride(0), sn = x.stride(1), sc = x.stride(2);
  scalar_t* op = out.data_ptr<scalar_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  const int64_t rows = out.size(1), copied = in.P + in.K;
  at::parallel_for(0, in.B * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    std::vector<char> kept(in.M);
    std::vector<acc_t> fused(in.C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const score_t* s = s_rank.data_ptr<score_t>() + b * in.M;
      rank_tokens(s, in.M, in.K, spatial_order, order);
      const scalar_t* xb = xp + b * sb;
      scalar_t* ob = op + b * rows * in.C;
      // output rows [row0, row1) of the P + K copied ones: source token of output row r
      const int64_t row0 = copied * part / parts, row1 = copied * (part + 1) / parts;
      for (int64_t r = row0; r < row1; ++r) {
        const scalar_t* src = xb + (r < in.P ? r : in.P + order[r - in.P]) * sn;
        scalar_t* dst = ob + r * in.C;
        if (sc == 1)
          std::copy(src, src + in.C, dst);
        else
          for (int64_t c = 0; c < in.C; ++c) dst[c] = src[c * sc];
      }
      if (part == 0)
        for (int64_t i = 0; i < in.K; ++i) ip[b * in.K + i] = order[i];
      if (!fuse) continue;
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t i = 0; i < in.K; ++i) kept[order[i]] = 1;
      // channels [c0, c1) of the fused row, whole vectors per part
      const int64_t c0 = round_down_to(in.C * part / parts, kMinFusedChannels);
      const int64_t c1 = part + 1 == parts ? in.C : round_down_to(in.C * (part + 1) / parts, kMinFusedChannels);
      fused_sum(xb, sn, sc, s, kept.data(), in.M, in.P, c0, c1, fused.data());
      for (int64_t c = c0; c < c1; ++c) ob[(rows - 1) * in.C + c] = static_cast<scalar_t>(fused[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> drop_tokens_cpu(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                                   int64_t num_prefix, bool fuse, bool spatial_order) {
  const DropInputs in = check_drop_inputs(x, scores, keep, num_prefix);
  at::Tensor out = at::empty({in.B, in.P + in.K + (fuse ? 1 : 0), in.C}, x.options());
  at::Tensor index = at::empty({in.B, in.K}, x.options().dtype(at::kLong));
  if (in.B == 0) return {out, index};
  // ranked and weighted in float, or double for double scores: exact for every scores dtype, so the order and
  // the weights are the scores' own (a float64 copy cost ~2.5 us of a ~15 us ViT-S batch-1 call)
  const bool double_scores = scores.scalar_type() == at::kDouble;
  const at::Tensor s_rank = scores.to(double_scores ? at::kDouble : at::kFloat).contiguous();
  const int64_t parts = drop_parts(in.B, in.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_tokens_cpu", [&] {
    if (double_scores)
      drop_tokens_kernel<scalar_t, double>(in, x, s_rank, fuse, spatial_order, parts, out, index);
    else
      drop_tokens_kernel<scalar_t, float>(in, x, s_rank, fuse, spatial_order, parts, out, index);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> drop_tokens_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& scores, const at::Tensor& index,
                                                            int64_t num_prefix, bool fuse) {
  const DropInputs in = check_drop_backward(grad_out, x, scores, index, num_prefix, fuse);
  at::Tensor grad_x = at::empty({in.B, in.N, in.C}, x.options());
  at::Tensor grad_s = at::empty({in.B, in.M}, scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (in.B == 0) return {grad_x, grad_s};
  const at::Tensor idx = index.contiguous();
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor s_acc = scores.to(in.acc).contiguous();
  at::Tensor gs_acc = at::empty({in.B, in.M}, x.options().dtype(in.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_tokens_backward_cpu", [&] {
    using acc_t = AccOf<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sn = x.stride(1), sc = x.stride(2);
    const scalar_t* gop = go.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const acc_t* sp = s_acc.data_ptr<acc_t>();
    acc_t* gsp = gs_acc.data_ptr<acc_t>();
    const int64_t rows = go.size(1);
    at::parallel_for(0, in.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> kept(in.M);
      std::vector<acc_t> g_fused(in.C);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gob = gop + b * rows * in.C;
        scalar_t* gxb = gxp + b * in.N * in.C;
        std::copy(gob, gob + in.P * in.C, gxb);
        std::fill(kept.begin(), kept.end(), 0);
        for (int64_t i = 0; i < in.K; ++i) {
          const int64_t j = ip[b * in.K + i];
          TORCH_CHECK_INDEX(j >= 0 && j < in.M, "index holds ", j, ", outside [0, N - num_prefix) = [0, ", in.M, ")");
          kept[j] = 1;
          std::copy(gob + (in.P + i) * in.C, gob + (in.P + i + 1) * in.C, gxb + (in.P + j) * in.C);
        }
        if (fuse)
          for (int64_t c = 0; c < in.C; ++c) g_fused[c] = static_cast<acc_t>(gob[(rows - 1) * in.C + c]);
        for (int64_t j = 0; j < in.M; ++j) {
          acc_t* gs = gsp + b * in.M + j;
          if (kept[j]) {
            *gs = 0;
            continue;
          }
          scalar_t* gx = gxb + (in.P + j) * in.C;
          if (!fuse) {
            std::fill(gx, gx + in.C, scalar_t(0));
            *gs = 0;
            continue;
          }
          const acc_t w = sp[b * in.M + j];
          const scalar_t* r = xp + b * sb + (in.P + j) * sn;
          acc_t dot = 0;
          for (int64_t c = 0; c < in.C; ++c) {
            gx[c] = static_cast<scalar_t>(w * g_fused[c]);
            dot += g_fused[c] * static_cast<acc_t>(r[c * sc]);
          }
          *gs = dot;
        }
      }
    });
  });
  grad_s.copy_(gs_acc);
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CPU, m) {
  m.impl("cls_attention_scores", &cls_attention_scores_cpu);
  m.impl("cls_attention_scores_backward", &cls_attention_scores_backward_cpu);
  m.impl("drop_tokens", &drop_tokens_cpu);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cpu);
}

}  // namespace effvit
