// Argument checks of the window attention ops, shared by the CPU and CUDA kernels.
//
// effvit/checks.py words the errors for users before any backend runs; these guard direct callers of
// torch.ops.effvit.window_attention*, so a bad call raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "shift_checks.h"
#include "window_geometry.h"

namespace effvit {

// The dtype of the log-sum-exp, the bias table and the accumulators: float64 for float64 input, else float32.
inline at::ScalarType window_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline const at::Tensor* optional_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

struct WindowInputs {
  WindowGeometry geo;
  at::Tensor qkv;         // contiguous [B, H, W, 3C]
  at::Tensor bias_table;  // contiguous [(2wh-1)(2ww-1), heads] in the accumulation dtype, or undefined
  at::Tensor pad_qkv;     // contiguous [3C] in qkv's dtype, or undefined (zeros)
};

inline WindowInputs prepare_window_inputs(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                                          const std::optional<at::Tensor>& pad_qkv, int64_t num_heads,
                                          at::IntArrayRef window, at::IntArrayRef shift) {
  TORCH_CHECK_VALUE(qkv.dim() == 4, "qkv must be 4-D (B, H, W, 3C), got shape ", qkv.sizes());
  check_float_tensor(qkv, "qkv");
  TORCH_CHECK_VALUE(window.size() == 2 && shift.size() == 2, "window and shift must have two values (h, w)");
  TORCH_CHECK_VALUE(num_heads > 0, "num_heads must be > 0, got ", num_heads);
  const int64_t c3 = qkv.size(3);
  TORCH_CHECK_VALUE(c3 % (3 * num_heads) == 0 && c3 > 0, "qkv's last dimension (", c3,
                    ") must be 3 * num_heads * head_dim with num_heads = ", num_heads);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(window[d] >= 1 && window[d] <= 64, "window must be in [1, 64], got ", window);
    TORCH_CHECK_VALUE(shift[d] >= 0 && shift[d] < window[d], "shift must be in [0, window), got shift ", shift,
                      " for window ", window);
  }
  TORCH_CHECK_VALUE(qkv.numel() < (int64_t{1} << 31), "qkv has ", qkv.numel(),
                    " values; the window kernels index up to 2**31 - 1");
  WindowInputs in;
  WindowGeometry& g = in.geo;
  g.B = static_cast<int32_t>(qkv.size(0));
  g.H = static_cast<int32_t>(qkv.size(1));
  g.W = static_cast<int32_t>(qkv.size(2));
  g.heads = static_cast<int32_t>(num_heads);
  g.head_dim = static_cast<int32_t>(c3 / (3 * num_heads));
  g.wh = static_cast<int32_t>(window[0]);
  g.ww = static_cast<int32_t>(window[1]);
  g.sh = static_cast<int32_t>(shift[0]);
  g.sw = static_cast<int32_t>(shift[1]);
  g.nwh = (g.H + g.wh - 1) / g.wh;
  g.nww = (g.W + g.ww - 1) / g.ww;
  g.Hp = g.nwh * g.wh;
  g.Wp = g.nww * g.ww;
  g.N = g.wh * g.ww;
  g.shifted = g.sh > 0 || g.sw > 0;
  in.qkv = qkv.contiguous();
  if (const at::Tensor* table = optional_or_null(bias_table)) {
    TORCH_CHECK_VALUE(table->dim() == 2 && table->size(0) == g.table_rows() && table->size(1) == num_heads,
                      "bias_table must have shape [(2*wh-1)*(2*ww-1), num_heads] = [", g.table_rows(), ", ",
                      num_heads, "], got ", table->sizes());
    TORCH_CHECK_VALUE(table->device() == qkv.device(), "bias_table is on ", table->device(), " but qkv is on ",
                      qkv.device());
    TORCH_CHECK_TYPE(table->scalar_type() == window_acc_dtype(qkv.scalar_type()), "bias_table must be ",
                     window_acc_dtype(qkv.scalar_type()), " (the accumulation dtype) for ", qkv.scalar_type(),
                     " qkv, got ", table->scalar_type());
    in.bias_table = table->contiguous();
  }
  if (const at::Tensor* pad = optional_or_null(pad_qkv)) {
    TORCH_CHECK_VALUE(pad->dim() == 1 && pad->size(0) == c3, "pad_qkv must have shape [3C] = [", c3, "], got ",
                      pad->sizes());
    check_same_device_dtype(*pad, qkv, "pad_qkv", "qkv");
    in.pad_qkv = pad->contiguous();
  }
  return in;
}

// window_attention_backward's extra inputs: shapes must match the forward's outputs.
inline void check_window_backward(const WindowInputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse) {
  const WindowGeometry& g = in.geo;
  const std::vector<int64_t> out_shape{g.B, g.H, g.W, g.C()};
  const std::vector<int64_t> lse_shape{g.B, g.heads, g.H, g.W};
  check_same_device_dtype(grad_out, in.qkv, "grad_out", "qkv");
  check_same_device_dtype(out, in.qkv, "out", "qkv");
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape ",
                    at::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "out must have shape ", at::IntArrayRef(out_shape),
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "lse must have shape ", at::IntArrayRef(lse_shape),
                    ", got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == in.qkv.device(), "lse is on ", lse.device(), " but qkv is on ",
                    in.qkv.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == window_acc_dtype(in.qkv.scalar_type()), "lse must be ",
                   window_acc_dtype(in.qkv.scalar_type()), ", got ", lse.scalar_type());
}

}  // namespace effvit
