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
}
