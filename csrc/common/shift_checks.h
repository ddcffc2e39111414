// Argument checks and layout handling shared by the CPU and CUDA shift ops.
//
// The Python layer (effvit/checks.py) validates arguments before any backend runs and words the
// errors for users; these checks guard callers of torch.ops.effvit.* directly, so that a bad call
// raises (ValueError / TypeError in Python) instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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
inline int64_t check_shift_input(const at::Tensor& x, int64_t n_div, bool channels_last, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (", channels_last ? "B, H, W, C" : "B, C, H, W",
                    "), got ", x.dim(), "-D with shape ", x.sizes());
  check_float_tensor(x, name);
  const int64_t channels = x.size(channels_last ? 3 : 1);
  TORCH_CHECK_VALUE(n_div >= 4 && n_div <= channels, "n_div must be in [4, C] = [4, ", channels,
                    "] so that each of the four shifted groups (C // n_div channels) is non-empty, got ",
                    n_div);
  return channels / n_div;
}

// A logical [B, C, H, W] view of a tensor in either layout (no copy).
inline at::Tensor as_bchw(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.permute({0, 3, 1, 2}) : t;
}

// Accumulation type of the GroupNorm statistics returned by the ops.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace effvit
