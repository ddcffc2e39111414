// Argument checks and layout handling shared by the CPU and CUDA shift ops.
//
// The Python layer (effvit/checks.py) validates arguments before any backend runs and words the
// errors for users; these checks guard callers of torch.ops.effvit.* directly, so that a bad call
// raises (ValueError / TypeError in Python) instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>

namespace effvit {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   name, " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                                    const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type());
}

// Checks a shift input and returns the channel group size g = C / n_div.
inline int64_t check_shift_input(const at::Tensor& x, int64_t n_div, bool nhwc, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (", nhwc ? "B, H, W, C" : "B, C, H, W",
                    "), got ", x.dim(), "-D with shape ", x.sizes());
  check_float_tensor(x, name);
  const int64_t channels = x.size(nhwc ? 3 : 1);
  TORCH_CHECK_VALUE(n_div >= 4 && n_div <= channels, "n_div must be in [4, C] = [4, ", channels,
                    "] so that each of the four shifted groups (C // n_div channels) is non-empty, got ",
                    n_div);
  return channels / n_div;
}

// A logical [B, C, H, W] view of a tensor in either layout (no copy).
inline at::Tensor as_bchw(const at::Tensor& t, bool nhwc) {
  return nhwc ? t.permute({0, 3, 1, 2}) : t;
}

inline void check_channel_vector(const at::Tensor& t, const at::Tensor& x, int64_t channels, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, name, " must have shape [C] = [", channels, "], got ",
                    t.sizes());
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

// Accumulation type of the GroupNorm statistics returned by the ops.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// shift_group_norm's checks and outputs (shifted, normalized, mean [B], rstd [B]), shared by the devices.
struct ShiftGroupNormForward {
  int64_t group;
  at::Tensor shifted, normalized, mean, rstd;
};

inline ShiftGroupNormForward prepare_shift_group_norm(const at::Tensor& x, int64_t n_div, const at::Tensor& weight,
                                                      const at::Tensor& bias, double eps, bool nhwc) {
  const int64_t group = check_shift_input(x, n_div, nhwc);
  const int64_t B = x.size(0), C = x.size(nhwc ? 3 : 1);
  check_channel_vector(weight, x, C, "weight");
  check_channel_vector(bias, x, C, "bias");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(B == 0 || x.numel() > 0, "shift_group_norm needs C, H and W > 0, got shape ", x.sizes());
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  return {group, at::empty_like(x), at::empty_like(x), at::empty({B}, stats_opts), at::empty({B}, stats_opts)};
}

// shift_group_norm_backward's checks; returns the group size, and grad_shifted or nullptr.
inline int64_t check_shift_group_norm_backward(const std::optional<at::Tensor>& grad_shifted,
                                               const at::Tensor& grad_normalized, const at::Tensor& shifted,
                                               const at::Tensor& weight, const at::Tensor& mean,
                                               const at::Tensor& rstd, int64_t n_div, bool nhwc,
                                               const at::Tensor** grad_shifted_or_null) {
  const int64_t group = check_shift_input(shifted, n_div, nhwc, "shifted");
  check_same_device_dtype(grad_normalized, shifted, "grad_normalized", "shifted");
  TORCH_CHECK_VALUE(grad_normalized.sizes() == shifted.sizes(), "grad_normalized has shape ", grad_normalized.sizes(),
                    " but shifted has shape ", shifted.sizes());
  *grad_shifted_or_null = grad_shifted.has_value() && grad_shifted->defined() ? &*grad_shifted : nullptr;
  if (*grad_shifted_or_null) {
    check_same_device_dtype(**grad_shifted_or_null, shifted, "grad_shifted", "shifted");
    TORCH_CHECK_VALUE(grad_shifted->sizes() == shifted.sizes(), "grad_shifted has shape ", grad_shifted->sizes(),
                      " but shifted has shape ", shifted.sizes());
  }
  const int64_t B = shifted.size(0), C = shifted.size(nhwc ? 3 : 1);
  check_channel_vector(weight, shifted, C, "weight");
  TORCH_CHECK_VALUE(mean.numel() == B && rstd.numel() == B, "mean and rstd must have B = ", B, " values, got ",
                    mean.numel(), " and ", rstd.numel());
  TORCH_CHECK_VALUE(mean.device() == shifted.device() && rstd.device() == shifted.device(),
                    "mean and rstd must be on ", shifted.device(), " with shifted, got ", mean.device(), " and ",
                    rstd.device());
  return group;
}

}  // namespace effvit
