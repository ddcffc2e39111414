// Every effvit op's schema, in one place.
//
// Kernels register against these names per device in csrc/cpu/<family>.cpp and
// csrc/cuda/<family>.cu; fake (meta) kernels for torch.compile live beside the autograd.Functions in
// effvit/ops/<family>.py. Ops never write into their inputs and always return fresh tensors.
// Layout flags: `nhwc=False` means a logical (B, C, H, W) tensor, `True` a logical (B, H, W, C) one as timm
// keeps them; either may have any strides (a torch.channels_last NCHW tensor is nhwc=False).
#include <torch/library.h>

TORCH_LIBRARY(effvit, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};

  // ---- shift (ShiftViT) ----
  // out: ShiftViT's shift_feat of x; reverse=True applies the adjoint (every direction flipped),
  // which is the backward of the forward shift.
  m.def("shift(Tensor x, int n_div, bool nhwc=False, bool reverse=False) -> Tensor", tags);
  // Shift followed by GroupNorm(1, C) in one op: returns (shifted, normalized, mean [B], rstd [B]);
  // the shifted tensor is the ShiftViT block's shortcut, so it is an output too.
  m.def(
      "shift_group_norm(Tensor x, int n_div, Tensor weight, Tensor bias, float eps, bool nhwc=False)"
      " -> (Tensor shifted, Tensor normalized, Tensor mean, Tensor rstd)",
      tags);
  // Gradients of shift_group_norm from the saved shifted tensor and statistics; grad_shifted is
  // None when the shortcut output was not used.
  m.def(
      "shift_group_norm_backward(Tensor? grad_shifted, Tensor grad_normalized, Tensor shifted, Tensor weight,"
      " Tensor mean, Tensor rstd, int n_div, bool nhwc=False)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
      tags);

  // ---- window (Swin (shifted-)window attention; the Hi-Fi half of HiLo) ----
  // Everything between the qkv and proj GEMMs of timm's SwinTransformerBlock._attn: roll by -shift, pad to
  // multiples of the window, partition, softmax(q*scale @ k^T + bias_table[relative index] + region mask) @ v,
  // reverse, crop, roll back, all by index arithmetic. qkv: [B, H, W, 3C] with channels (3, heads, head_dim);
  // bias_table: [(2wh-1)(2ww-1), heads] in the accumulation dtype (float32, float64 for float64 qkv) or
  // None; pad_qkv: [3C], the qkv of a padding token (the qkv Linear's bias), None for zeros. The region
  // mask (-100.0 across regions) applies when any shift is non-zero.
  // Returns out [B, H, W, C] and the log-sum-exp of each query's logits, lse [B, heads, H, W], for backward.
  m.def(
      "window_attention(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int num_heads, int[2] window,"
      " int[2] shift, float scale) -> (Tensor out, Tensor lse)",
      tags);
  // Gradients recomputed from lse (no attention matrix is kept): grad_qkv [B, H, W, 3C] in qkv's dtype,
  // grad_bias_table [(2wh-1)(2ww-1), heads] ([0] when bias_table is None) and grad_pad_qkv [3C], both in
  // the accumulation dtype.
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, Tensor out,"
      " Tensor lse, int num_heads, int[2] window, int[2] shift, float scale)"
      " -> (Tensor grad_qkv, Tensor grad_bias_table, Tensor grad_pad_qkv)",
      tags);

  // ---- hilo (LITv2 HiLo; its Hi-Fi half is window_attention with no shift and no table) ----
  // Lo-Fi attention: every query attends to every pooled key, softmax((q @ k^T) * scale) @ v per head, the scale
  // applied after the product as LITv2 does. q: [B, N, heads * D] (l_q's output); kv: [B, M, 2 * heads * D] with
  // channels (2, heads, D) (l_kv's output on the pooled map). Rows may be strided, channels must be contiguous.
  // Returns out [B, N, heads * D] in q's dtype and the log-sum-exp of each query's logits, lse [B, heads, N], in
  // the accumulation dtype (float32; float64 for float64 input), for backward.
  m.def("lofi_attention(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor out, Tensor lse)", tags);
  // Gradients recomputed from lse (no attention matrix is kept): grad_q [B, N, heads * D] and
  // grad_kv [B, M, 2 * heads * D], contiguous, in q's dtype.
  m.def(
      "lofi_attention_backward(Tensor grad_out, Tensor q, Tensor kv, Tensor out, Tensor lse, int num_heads,"
      " float scale) -> (Tensor grad_q, Tensor grad_kv)",
      tags);

  // ---- linear (non-causal linear attention: EfficientViT's LiteMLA, L2ViT's LinearAttention) ----
  // Per head, with a = phi(q * q_scale), b = phi(k * k_scale) and phi one of "identity", "relu", "elu+1":
  //   out_i = t_h * (a_i S) / max(a_i . z + eps, denom_min),  S = sum_j b_j v_j^T,  z = sum_j b_j
  // (t_h the optional per-head temperature, 1 without). q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, Dv] as
  // logical shapes with any strides, so (B, N, H, D) and (B, H, D, N) memory are both read in place. S and z are
  // accumulated in the accumulation dtype (float32; float64 for float64) and returned as the state
  // [B, H, D, Dv + 1] (z as the last column, EfficientViT's ones column), which the backward reads.
  // out: [B, H, N, Dv] in q's dtype, laid out in memory in q's dimension order.
  m.def(
      "linear_attention(Tensor q, Tensor k, Tensor v, Tensor? temperature, str feature_map, float q_scale,"
      " float k_scale, float eps, float denom_min) -> (Tensor out, Tensor state)",
      tags);
  // Gradients from q, k, v and the saved state (O(N) memory): grad_q, grad_k, grad_v in the inputs' dtype and
  // shapes (contiguous), grad_temperature [H] in the accumulation dtype ([0] without a temperature).
  m.def(
      "linear_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? temperature, Tensor state,"
      " str feature_map, float q_scale, float k_scale, float eps, float denom_min)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_temperature)",
      tags);
}
