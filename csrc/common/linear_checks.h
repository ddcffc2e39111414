// Argument checks and strides of the linear attention ops, shared by the CPU and CUDA kernels.
//
// effvit/checks.py words the errors for users before any backend runs; these guard direct callers of
// torch.ops.effvit.linear_attention*, so a bad call raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string_view>

#include "shift_checks.h"
#include "window_checks.h"

namespace effvit {

enum class FeatureMap : int { kIdentity = 0, kRelu = 1, kEluPlusOne = 2 };

inline FeatureMap parse_feature_map(std::string_view name) {
  if (name == "identity") return FeatureMap::kIdentity;
  if (name == "relu") return FeatureMap::kRelu;
  if (name == "elu+1") return FeatureMap::kEluPlusOne;
  TORCH_CHECK_VALUE(false, "feature_map must be 'identity', 'relu' or 'elu+1', got '", name, "'");
}

// Element strides of a logical [B, H, N, D] tensor.
struct Strides4 {
  int64_t b = 0, h = 0, n = 0, d = 0;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), n(t.stride(2)), d(t.stride(3)) {}
  Strides4() = default;
};

struct LinearInputs {
  int64_t B = 0, H = 0, N = 0, D = 0, Dv = 0;
  FeatureMap phi = FeatureMap::kRelu;
  at::Tensor q, k, v;          // as given (any strides)
  at::Tensor temperature;      // [H] contiguous in the accumulation dtype, or undefined
  Strides4 qs, ks, vs;
};

inline LinearInputs prepare_linear_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& temperature,
                                          std::string_view feature_map) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "q, k and v must be 4-D (B, heads, N, head_dim), got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  check_float_tensor(q, "q");
  check_same_device_dtype(k, q, "k", "q");
  check_same_device_dtype(v, q, "v", "q");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
                    "v must be [B, heads, N, Dv] with q's B, heads and N ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(q.size(3) > 0 && v.size(3) > 0, "head dimensions must be > 0");
  LinearInputs in;
  in.B = q.size(0), in.H = q.size(1), in.N = q.size(2), in.D = q.size(3), in.Dv = v.size(3);
  in.phi = parse_feature_map(feature_map);
  in.q = q, in.k = k, in.v = v;
  in.qs = Strides4(q), in.ks = Strides4(k), in.vs = Strides4(v);
  if (const at::Tensor* t = optional_or_null(temperature)) {
    TORCH_CHECK_VALUE(t->numel() == in.H, "temperature must hold one value per head (", in.H, "), got shape ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), "temperature is on ", t->device(), " but q is on ", q.device());
    TORCH_CHECK_TYPE(t->scalar_type() == window_acc_dtype(q.scalar_type()), "temperature must be ",
                     window_acc_dtype(q.scalar_type()), " (the accumulation dtype) for ", q.scalar_type(),
                     " q, got ", t->scalar_type());
    in.temperature = t->reshape({in.H}).contiguous();
  }
  return in;
}

// The output [B, H, N, Dv] laid out in memory in q's dimension order (so (B, N, H, D) input gives (B, N, H, Dv)
// memory and (B, H, D, N) input gives (B, H, Dv, N)).
inline at::Tensor empty_like_layout(const at::Tensor& q, int64_t Dv) {
  std::array<int64_t, 4> order{0, 1, 2, 3};  // dims from outermost to innermost by q's strides
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  std::array<int64_t, 4> sizes{q.size(0), q.size(1), q.size(2), Dv};
  std::array<int64_t, 4> strides{};
  int64_t step = 1;
  for (int i = 3; i >= 0; --i) {
    strides[order[i]] = step;
    step *= sizes[order[i]];
  }
  return at::empty_strided(sizes, strides, q.options());
}

inline void check_linear_backward(const LinearInputs& in, const at::Tensor& grad_out, const at::Tensor& state) {
  check_same_device_dtype(grad_out, in.q, "grad_out", "q");
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == in.B && grad_out.size(1) == in.H &&
                        grad_out.size(2) == in.N && grad_out.size(3) == in.Dv,
                    "grad_out must have shape [", in.B, ", ", in.H, ", ", in.N, ", ", in.Dv, "], got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(state.dim() == 4 && state.size(0) == in.B && state.size(1) == in.H && state.size(2) == in.D &&
                        state.size(3) == in.Dv + 1,
                    "state must have shape [", in.B, ", ", in.H, ", ", in.D, ", ", in.Dv + 1, "], got ", state.sizes());
  TORCH_CHECK_VALUE(state.device() == in.q.device(), "state is on ", state.device(), " but q is on ", in.q.device());
  TORCH_CHECK_TYPE(state.scalar_type() == window_acc_dtype(in.q.scalar_type()), "state must be ",
                   window_acc_dtype(in.q.scalar_type()), ", got ", state.scalar_type());
}

}  // namespace effvit
