"""Drop-in modules for linear attention: L2ViT's LinearAttention, and EfficientViT's LiteMLA through effvit.patch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from effvit import checks
from effvit.nn.common import prepare_scriptable
from effvit.ops import linear as linear_ops
from effvit.reference import linear as reference

L2VIT_DENOM_MIN = 100.0  # L2ViT clamps the denominator at 1e2


class LinearAttention(reference.LinearAttention):
    """L2ViT's linear global attention, fused: LinearAttention(dim, num_heads=8, qkv_bias=False, qk_scale=None,
    attn_drop=0., proj_drop=0., backend=None).

    Same parameters and state_dict keys as ChuanyangZheng/L2ViT's (``qkv``, ``proj``, ``temperature``), so its
    weights load unchanged. forward(x [B, N, C]) -> [B, N, C]: relu features, the per-head temperature on k^T v, the
    denominator clamped at 100, computed by effvit.linear_attention on q, k, v read in place from the qkv Linear.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str | None = None):
        checks.check_int(dim, "dim")
        checks.check_int(num_heads, "num_heads")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.qkv.in_features:
            raise ValueError(f"x must be [B, N, C] with C = {self.qkv.in_features}, got {tuple(x.shape)}")
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = linear_ops.linear_attention(q, k, v, "relu", self.temperature, denom_min=L2VIT_DENOM_MIN,
                                          backend=self.backend)
        # out is laid out like q, (B, N, H, D): back to [B, N, C] without a copy
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


@torch.fx.wrap
def lite_mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                       backend: Optional[str] = None) -> torch.Tensor:
    """EfficientViT's ReLU linear attention as timm's LiteMLA computes it (relu on q and k, v's ones column, eps,
    float32 accumulation): q, k, v [B, H, N, D] (any strides) -> [B, H, N, D]; one call in torch.fx graphs and in
    TorchScript.

    torch.fx records it as a leaf (torch.fx.wrap). Run from Python it is effvit.linear_attention; compiled by
    TorchScript it calls the C++ kernel, or the reference where a gradient is needed (TorchScript cannot run the
    kernel's backward).
    """
    if torch.jit.is_scripting():
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return reference.lite_mla_attention(torch.relu(q), torch.relu(k), v, eps)
        return linear_ops.script_linear_attention(q, k, v, None, "relu", 1.0, 1.0, eps, float("-inf"))
    return _lite_mla_attention(q, k, v, eps, backend)


@torch.jit.unused
def _lite_mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                        backend: Optional[str]) -> torch.Tensor:
    return linear_ops.linear_attention(q, k, v, "relu", eps=eps, backend=backend)


def fused_lite_mla(self, x: torch.Tensor) -> torch.Tensor:
    """forward of timm's EfficientViT LiteMLA patched by effvit.patch.timm (``self``, with its ``effvit_backend``),
    with the fused linear attention: x [B, C, H, W] -> [B, C_out, H, W].

    q, k and v are read in place from the multi-scale qkv ((B, heads, D, N) memory), relu'd inside the kernel, with
    the ones column, float32 accumulation and eps as timm's _attn; the output comes back in the same layout, so the
    reshape to [B, heads * D, H, W] for proj needs no copy. Compiled by TorchScript: timm's own forward where
    effvit's kernels cannot serve (see effvit.nn.common.prepare_scriptable).
    """
    if torch.jit.is_scripting() and not self._effvit_script_kernels:
        return self._timm_forward(x)
    B, _, H, W = x.shape
    qkv = self.qkv(x)
    multi_scale_qkv = [qkv]
    for op in self.aggreg:
        multi_scale_qkv.append(op(qkv))
    qkv = torch.cat(multi_scale_qkv, dim=1)
    qkv = qkv.reshape(B, qkv.shape[1] // (3 * self.dim), 3 * self.dim, H * W).transpose(-1, -2)
    q, k, v = qkv.chunk(3, dim=-1)
    out = lite_mla_attention(q, k, v, self.eps, self.effvit_backend)
    return self.proj(out.transpose(-1, -2).reshape(B, out.shape[1] * out.shape[3], H, W))


# the methods of the patched LiteMLA (effvit.patch adds _timm_forward, timm's own forward)
TIMM_LITE_MLA_METHODS = {"forward": fused_lite_mla, "__prepare_scriptable__": prepare_scriptable}
