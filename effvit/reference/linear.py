"""Non-causal linear attention as the official code computes it: the generic form, EfficientViT's LiteMLA (timm's
efficientvit_mit) and L2ViT's LinearAttention (ChuanyangZheng/L2ViT classification/models/l2vit.py).

Per head, with a = phi(q * q_scale) and b = phi(k * k_scale):
    out_i = t * (a_i S) / max(a_i . z + eps, denom_min),   S = sum_j b_j v_j^T,   z = sum_j b_j
EfficientViT: phi = relu, t = 1, eps = 1e-5, no clamp, computed in float32 with autocast off (timm's _attn on v
padded with a ones column: the last column of k^T [v, 1] is z). L2ViT: phi = relu, t = a learnable per-head
temperature (initialised head_dim ** -0.5) on k^T v only, eps = 0, the denominator clamped at min 100.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_MAPS = ("identity", "relu", "elu+1")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "elu+1":
        return F.elu(x) + 1
    return x


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor | None = None,
                     feature: str = "relu", q_scale: float = 1.0, k_scale: float = 1.0, eps: float = 0.0,
                     denom_min: float | None = None) -> torch.Tensor:
    """q, k: [B, H, N, D], v: [B, H, N, Dv] -> [B, H, N, Dv], "kv first" as both official codes order it."""
    a, b = feature_map(q * q_scale, feature), feature_map(k * k_scale, feature)
    kv = b.transpose(-2, -1) @ v
    if temperature is not None:
        kv = kv * temperature.reshape(-1, 1, 1)
    num = a @ kv
    den = a @ b.sum(dim=-2).unsqueeze(-1) + eps
    if denom_min is not None:
        den = torch.clamp(den, min=denom_min)
    return num / den


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, feature: str = "relu", k_scale: float = 1.0
                           ) -> torch.Tensor:
    """The state the kernels save: [B, H, D, Dv + 1] = phi(k)^T [v, 1] (S with z as its last column)."""
    b = feature_map(k * k_scale, feature)
    return b.transpose(-2, -1) @ F.pad(v, (0, 1), value=1.0)


def lite_mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """timm's LiteMLA attention after its kernel_func: q, k [B, H, N, D] already relu'd, v [B, H, N, D] (not yet
    padded); float32 with v's ones column, as LiteMLA._attn, back to v's dtype."""
    dtype = v.dtype
    v = F.pad(v, (0, 1), mode="constant", value=1.0)
    q, k, v = q.float(), k.float(), v.float()
    kv = k.transpose(-1, -2) @ v
    out = q @ kv
    out = out[..., :-1] / (out[..., -1:] + eps)
    return out.to(dtype)


class LinearAttention(nn.Module):
    """L2ViT's linear global attention with the official signature and parameter names (qkv, proj, temperature).
    forward(x [B, N, C]) -> [B, N, C]. attn_drop is accepted and unused, as officially."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1) * self.scale)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.relu(qkv[0]), F.relu(qkv[1]), qkv[2]
        denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
        attn = (k.transpose(-2, -1) @ v) * self.temperature
        x = (q @ attn) / denom
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
