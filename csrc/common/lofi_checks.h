// Argument checks and strides of the Lo-Fi attention ops (the HiLo family), shared by the CPU and CUDA kernels.
//
// effvit/checks.py words the errors for users before any backend runs; these guard direct callers of
// torch.ops.effvit.lofi_attention*, so a bad call raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "shift_checks.h"
#include "window_checks.h"

namespace effvit {

// q: [B, N, heads * D]; kv: [B, M, 2 * heads * D] with channels (2, heads, D) as LITv2's l_kv Linear lays them
// out. Rows may be strided (q may be a channel slice of a wider Linear output); channels are contiguous.
struct LofiInputs {
  int64_t B = 0, N = 0, M = 0, heads = 0, head_dim = 0;
  at::Tensor q, kv;                  // channel stride 1
  int64_t q_sb = 0, q_sn = 0;        // q's batch and token strides, in elements
  int64_t kv_sb = 0, kv_sn = 0;      // kv's
  int64_t C() const { return heads * head_dim; }
};

inline at::Tensor channels_contiguous(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

inline LofiInputs prepare_lofi_inputs(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D (B, N, heads * head_dim), got shape ", q.sizes());
  TORCH_CHECK_VALUE(kv.dim() == 3, "kv must be 3-D (B, M, 2 * heads * head_dim), got shape ", kv.sizes());
  check_float_tensor(q, "q");
  check_same_device_dtype(kv, q, "kv", "q");
  TORCH_CHECK_VALUE(num_heads > 0, "num_heads must be > 0, got ", num_heads);
  TORCH_CHECK_VALUE(q.size(2) % num_heads == 0 && q.size(2) > 0, "q's last dimension (", q.size(2),
                    ") must be num_heads * head_dim with num_heads = ", num_heads);
  TORCH_CHECK_VALUE(kv.size(0) == q.size(0), "kv's batch (", kv.size(0), ") must equal q's (", q.size(0), ")");
  TORCH_CHECK_VALUE(kv.size(2) == 2 * q.size(2), "kv's last dimension (", kv.size(2),
                    ") must be twice q's (", q.size(2), "): keys then values");
  TORCH_CHECK_VALUE(kv.size(1) > 0 || q.size(1) == 0 || q.size(0) == 0, "kv must hold at least one token");
  LofiInputs in;
  in.B = q.size(0);
  in.N = q.size(1);
  in.M = kv.size(1);
  in.heads = num_heads;
  in.head_dim = q.size(2) / num_heads;
  in.q = channels_contiguous(q);
  in.kv = channels_contiguous(kv);
  in.q_sb = in.q.stride(0), in.q_sn = in.q.stride(1);
  in.kv_sb = in.kv.stride(0), in.kv_sn = in.kv.stride(1);
  const auto span = [](const at::Tensor& t) {
    int64_t s = 1;
    for (int d = 0; d < t.dim(); ++d) s += (t.size(d) - 1) * t.stride(d);
    return t.numel() == 0 ? int64_t{0} : s;
  };
  TORCH_CHECK_VALUE(span(in.q) < (int64_t{1} << 31) && span(in.kv) < (int64_t{1} << 31),
                    "q and kv must span fewer than 2**31 elements (the kernels index with 32 bits)");
  return in;
}

// lofi_attention_backward's extra inputs: shapes must match the forward's outputs.
inline void check_lofi_backward(const LofiInputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                                const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{in.B, in.N, in.C()};
  const std::vector<int64_t> lse_shape{in.B, in.heads, in.N};
  check_same_device_dtype(grad_out, in.q, "grad_out", "q");
  check_same_device_dtype(out, in.q, "out", "q");
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape ",
                    at::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "out must have shape ", at::IntArrayRef(out_shape),
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "lse must have shape ", at::IntArrayRef(lse_shape),
                    ", got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == in.q.device(), "lse is on ", lse.device(), " but q is on ", in.q.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == window_acc_dtype(in.q.scalar_type()), "lse must be ",
                   window_acc_dtype(in.q.scalar_type()), ", got ", lse.scalar_type());
}

}  // namespace effvit
