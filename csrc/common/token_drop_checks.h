// Argument checks of the token-drop ops (EViT), shared by the CPU and CUDA kernels.
//
// effvit/checks.py words the errors for users before any backend runs; these guard direct callers of
// torch.ops.effvit.cls_attention_scores* / drop_tokens*, so a bad call raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "shift_checks.h"
#include "window_checks.h"

namespace effvit {

struct ClsScoreInputs {
  int64_t B = 0, H = 0, N = 0, D = 0, P = 0;
  at::ScalarType acc = at::kFloat;
};

// q: [B, H, D], k: [B, H, N, D], any strides; 0 <= num_prefix < N (at least one token is scored).
inline ClsScoreInputs check_cls_scores_inputs(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D (B, heads, head_dim), the CLS query row, got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be 4-D (B, heads, N, head_dim), got ", k.sizes());
  check_float_tensor(q, "q");
  check_same_device_dtype(k, q, "k", "q");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(2),
                    "k must be [B, heads, N, head_dim] with q's B, heads and head_dim ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix < k.size(2), "num_prefix must be in [0, N) = [0, ", k.size(2),
                    "), got ", num_prefix);
  return {q.size(0), q.size(1), k.size(2), q.size(2), num_prefix, window_acc_dtype(q.scalar_type())};
}

inline void check_cls_scores_backward(const ClsScoreInputs& in, const at::Tensor& grad_scores, const at::Tensor& q,
                                      const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_scores.dim() == 2 && grad_scores.size(0) == in.B && grad_scores.size(1) == in.N - in.P,
                    "grad_scores must be [B, N - num_prefix] = [", in.B, ", ", in.N - in.P, "], got ",
                    grad_scores.sizes());
  TORCH_CHECK_VALUE(grad_scores.device() == q.device(), "grad_scores is on ", grad_scores.device(), " but q is on ",
                    q.device());
  check_float_tensor(grad_scores, "grad_scores");
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == in.B && lse.size(1) == in.H,
                    "lse must be [B, heads] = [", in.B, ", ", in.H, "], got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == in.acc, "lse must be ", in.acc, " for ", q.scalar_type(), " q, got ",
                   lse.scalar_type());
}

struct DropInputs {
  int64_t B = 0, N = 0, C = 0, P = 0, M = 0, K = 0;  // M = N - P scored tokens, K kept of them
  at::ScalarType acc = at::kFloat;
};

// x: [B, N, C] any strides; scores: [B, N - P] any float dtype on x's device; 1 <= keep <= N - P.
inline DropInputs check_drop_inputs(const at::Tensor& x, const at::Tensor& scores, int64_t keep, int64_t num_prefix) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be 3-D (B, N, C), got ", x.sizes());
  check_float_tensor(x, "x");
  check_float_tensor(scores, "scores");
  TORCH_CHECK_VALUE(scores.device() == x.device(), "scores is on ", scores.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix < x.size(1), "num_prefix must be in [0, N) = [0, ", x.size(1),
                    "), got ", num_prefix);
  const int64_t M = x.size(1) - num_prefix;
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == x.size(0) && scores.size(1) == M,
                    "scores must be [B, N - num_prefix] = [", x.size(0), ", ", M, "], got ", scores.sizes());
  TORCH_CHECK_VALUE(keep >= 1 && keep <= M, "keep must be in [1, N - num_prefix] = [1, ", M, "], got ", keep);
  return {x.size(0), x.size(1), x.size(2), num_prefix, M, keep, window_acc_dtype(x.scalar_type())};
}

// Checks the backward's arguments; keep is index.size(1).
inline DropInputs check_drop_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scores,
                                      const at::Tensor& index, int64_t num_prefix, bool fuse) {
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == x.size(0), "index must be [B, keep] with x's B = ",
                    x.size(0), ", got ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == x.device(), "index is on ", index.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  const DropInputs in = check_drop_inputs(x, scores, index.size(1), num_prefix);
  const int64_t rows = in.P + in.K + (fuse ? 1 : 0);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == in.B && grad_out.size(1) == rows &&
                        grad_out.size(2) == in.C,
                    "grad_out must be [B, num_prefix + keep + fuse, C] = [", in.B, ", ", rows, ", ", in.C, "], got ",
                    grad_out.sizes());
  check_same_device_dtype(grad_out, x, "grad_out", "x");
  return in;
}

}  // namespace effvit
