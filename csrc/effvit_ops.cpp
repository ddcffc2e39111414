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

  // ---- token_drop (EViT token dropping) ----
  // The EViT score of every non-prefix token: the CLS row of the attention probabilities, averaged over heads,
  //   scores[b, j - P] = mean_h softmax_j(scale * q[b, h] . k[b, h, j])   (softmax over all N keys, j >= P),
  // without the [B, H, N, N] probabilities. q: [B, H, D] (the CLS query row, any strides); k: [B, H, N, D] (any
  // strides). Returns scores [B, N - P] and the log-sum-exp of each head's CLS logits, lse [B, H], both in the
  // accumulation dtype (float32; float64 for float64 input).
  m.def(
      "cls_attention_scores(Tensor q, Tensor k, float scale, int num_prefix) -> (Tensor scores, Tensor lse)",
      tags);
  // Gradients from the saved lse: grad_q [B, H, D] and grad_k [B, H, N, D], contiguous, in q's dtype.
  m.def(
      "cls_attention_scores_backward(Tensor grad_scores, Tensor q, Tensor k, Tensor lse, float scale,"
      " int num_prefix) -> (Tensor grad_q, Tensor grad_k)",
      tags);
  // Keep the `keep` best-scored non-prefix tokens of x: [B, N, C] (any strides) by scores: [B, N - P] (any float
  // dtype), 1 <= keep <= N - P. Returns index [B, keep] int64, the kept tokens' positions among the non-prefix
  // tokens in descending score order (ties: lower position first) or, with spatial_order, ascending; and
  // out [B, P + keep + fuse, C] in x's dtype, contiguous: the P prefix tokens, the kept tokens in index order and,
  // with fuse, one token sum_{j dropped} scores[j] * x[P + j] (summed in the accumulation dtype, weights as given).
  m.def(
      "drop_tokens(Tensor x, Tensor scores, int keep, int num_prefix, bool fuse, bool spatial_order)"
      " -> (Tensor out, Tensor index)",
      tags);
  // Gradients of drop_tokens: grad_x [B, N, C] in x's dtype (prefix and kept rows routed back, dropped rows
  // scores[j] * grad of the fused token), grad_scores [B, N - P] in scores' dtype (x[P + j] . grad of the fused
  // token for dropped j, 0 for kept j; all 0 without fuse). Both contiguous.
  m.def(
      "drop_tokens_backward(Tensor grad_out, Tensor x, Tensor scores, Tensor index, int num_prefix, bool fuse)"
      " -> (Tensor grad_x, Tensor grad_scores)",
      tags);
}
