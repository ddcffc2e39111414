// CPU kernels of the token-drop ops (EViT token dropping).
//
// cls_attention_scores: per (image, head) one GEMV of the CLS query against the N keys, a softmax row (its
// log-sum-exp is kept for backward), then per image the mean over heads at the non-prefix keys. No [B, H, N, N]
// probabilities: the patched ViT runs its attention through SDPA, which never forms them.
// drop_tokens: per image, rank the scores (descending, ties to the lower position, NaN last), keep the first
// `keep`, copy the prefix and kept rows and sum the dropped ones weighted by their scores into the fused row.
// Both are memory-bound and small next to the block's GEMMs; the loops are plain and parallel over images (and
// heads), every output element written once, sums taken in a fixed order (deterministic).
#include <ATen/ATen.h>
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

namespace effvit {
namespace {

template <typename scalar_t>
using AccOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One head's CLS softmax row: prob[j] = softmax_j(scale * q . k_j) over the N keys; returns the log-sum-exp.
// q: D values at stride qd; k: N rows at stride kn, D values at stride kd.
template <typename scalar_t, typename acc_t>
acc_t cls_softmax_row(const scalar_t* q, int64_t qd, const scalar_t* k, int64_t kn, int64_t kd, int64_t N,
                      int64_t D, acc_t scale, acc_t* q_acc, acc_t* prob) {
  for (int64_t d = 0; d < D; ++d) q_acc[d] = static_cast<acc_t>(q[d * qd]);
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < N; ++j) {
    const scalar_t* kj = k + j * kn;
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += q_acc[d] * static_cast<acc_t>(kj[d * kd]);
    prob[j] = dot * scale;
    row_max = std::max(row_max, prob[j]);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < N; ++j) sum += std::exp(prob[j] - row_max);
  const acc_t lse = row_max + std::log(sum);
  for (int64_t j = 0; j < N; ++j) prob[j] = std::exp(prob[j] - lse);
  return lse;
}

std::tuple<at::Tensor, at::Tensor> cls_attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                                            int64_t num_prefix) {
  const ClsScoreInputs in = check_cls_scores_inputs(q, k, num_prefix);
  const auto acc_opts = q.options().dtype(in.acc);
  at::Tensor scores = at::empty({in.B, in.N - in.P}, acc_opts);
  at::Tensor lse = at::empty({in.B, in.H}, acc_opts);
  if (in.B == 0) return {scores, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cls_attention_scores_cpu", [&] {
    using acc_t = AccOf<scalar_t>;
    std::vector<acc_t> probs(in.B * in.H * in.N);
    acc_t* lse_out = lse.data_ptr<acc_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    at::parallel_for(0, in.B * in.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_acc(in.D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / in.H, h = bh % in.H;
        lse_out[bh] = cls_softmax_row(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                                      kp + b * k.stride(0) + h * k.stride(1), k.stride(2), k.stride(3), in.N, in.D,
                                      static_cast<acc_t>(scale), q_acc.data(), probs.data() + bh * in.N);
      }
    });
    acc_t* out = scores.data_ptr<acc_t>();
    const int64_t M = in.N - in.P;
    at::parallel_for(0, in.B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* row = out + b * M;
        std::fill(row, row + M, acc_t(0));
        for (int64_t h = 0; h < in.H; ++h) {  // heads in order: the same sum on every run
          const acc_t* p = probs.data() + (b * in.H + h) * in.N + in.P;
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
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const acc_t* gp = g_all.data_ptr<acc_t>();
    const acc_t* lp = lse_c.data_ptr<acc_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    const int64_t M = in.N - in.P;
    const acc_t sc = static_cast<acc_t>(scale), inv_heads = acc_t(1) / static_cast<acc_t>(in.H);
    at::parallel_for(0, in.B * in.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_acc(in.D), ds(in.N), dq(in.D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / in.H, h = bh % in.H;
        const scalar_t* qh = qp + b * q.stride(0) + h * q.stride(1);
        const scalar_t* kh = kp + b * k.stride(0) + h * k.stride(1);
        for (int64_t d = 0; d < in.D; ++d) q_acc[d] = static_cast<acc_t>(qh[d * q.stride(2)]);
        // p_j from the saved lse; ds_j = p_j (g_j - sum_i p_i g_i), g_j the score's gradient / H (0 on prefix keys)
        acc_t p_dot_g = 0;
        for (int64_t j = 0; j < in.N; ++j) {
          const scalar_t* kj = kh + j * k.stride(2);
          acc_t dot = 0;
          for (int64_t d = 0; d < in.D; ++d) dot += q_acc[d] * static_cast<acc_t>(kj[d * k.stride(3)]);
          const acc_t p = std::exp(dot * sc - lp[bh]);
          const acc_t g = j >= in.P ? gp[b * M + j - in.P] * inv_heads : acc_t(0);
          ds[j] = p;  // the probability now, ds once p_dot_g is known
          p_dot_g += p * g;
        }
        std::fill(dq.begin(), dq.end(), acc_t(0));
        scalar_t* gk_h = gk + bh * in.N * in.D;
        for (int64_t j = 0; j < in.N; ++j) {
          const acc_t g = j >= in.P ? gp[b * M + j - in.P] * inv_heads : acc_t(0);
          const acc_t dsj = ds[j] * (g - p_dot_g) * sc;
          const scalar_t* kj = kh + j * k.stride(2);
          for (int64_t d = 0; d < in.D; ++d) {
            dq[d] += dsj * static_cast<acc_t>(kj[d * k.stride(3)]);
            gk_h[j * in.D + d] = static_cast<scalar_t>(dsj * q_acc[d]);
          }
        }
        for (int64_t d = 0; d < in.D; ++d) gq[bh * in.D + d] = static_cast<scalar_t>(dq[d]);
      }
    });
  });
  return {grad_q, grad_k};
}

// Positions 0..M-1 with the `keep` best first (score descending, ties to the lower position, NaN last); the first
// `keep` entries of `order` are then the kept tokens, in score order or, with spatial_order, ascending.
void rank_tokens(const double* s, int64_t M, int64_t keep, bool spatial_order, std::vector<int64_t>& order) {
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

std::tuple<at::Tensor, at::Tensor> drop_tokens_cpu(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                                   int64_t num_prefix, bool fuse, bool spatial_order) {
  const DropInputs in = check_drop_inputs(x, scores, keep, num_prefix);
  at::Tensor out = at::empty({in.B, in.P + in.K + (fuse ? 1 : 0), in.C}, x.options());
  at::Tensor index = at::empty({in.B, in.K}, x.options().dtype(at::kLong));
  if (in.B == 0) return {out, index};
  // float64 for ranking: exact for every input dtype, so the order is the scores' own
  const at::Tensor s64 = scores.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_tokens_cpu", [&] {
    using acc_t = AccOf<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sn = x.stride(1), sc = x.stride(2);
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    const int64_t rows = out.size(1);
    at::parallel_for(0, in.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order;
      std::vector<char> kept(in.M);
      std::vector<acc_t> fused(in.C);
      for (int64_t b = begin; b < end; ++b) {
        const double* s = s64.data_ptr<double>() + b * in.M;
        rank_tokens(s, in.M, in.K, spatial_order, order);
        const scalar_t* xb = xp + b * sb;
        scalar_t* ob = op + b * rows * in.C;
        const auto copy_row = [&](int64_t src, int64_t dst) {
          const scalar_t* r = xb + src * sn;
          for (int64_t c = 0; c < in.C; ++c) ob[dst * in.C + c] = r[c * sc];
        };
        for (int64_t t = 0; t < in.P; ++t) copy_row(t, t);
        std::fill(kept.begin(), kept.end(), 0);
        for (int64_t i = 0; i < in.K; ++i) {
          ip[b * in.K + i] = order[i];
          kept[order[i]] = 1;
          copy_row(in.P + order[i], in.P + i);
        }
        if (!fuse) continue;
        std::fill(fused.begin(), fused.end(), acc_t(0));
        for (int64_t j = 0; j < in.M; ++j) {  // dropped tokens in position order
          if (kept[j]) continue;
          const acc_t w = static_cast<acc_t>(s[j]);
          const scalar_t* r = xb + (in.P + j) * sn;
          for (int64_t c = 0; c < in.C; ++c) fused[c] += w * static_cast<acc_t>(r[c * sc]);
        }
        for (int64_t c = 0; c < in.C; ++c) ob[(rows - 1) * in.C + c] = static_cast<scalar_t>(fused[c]);
      }
    });
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
