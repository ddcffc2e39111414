"""LITv2's HiLo attention, as ziplab/LITv2 computes it (hilo.py; the detection/segmentation backbones' padding).

x: [B, N, C] with N = H * W. Heads split in two groups of head_dim = C // num_heads channels each:
  Lo-Fi, l_heads = int(num_heads * alpha): q from every token (l_q), k and v (l_kv) from the map average-pooled
        over ws x ws; softmax((q @ k^T) * scale) @ v, then l_proj.
  Hi-Fi, h_heads = num_heads - l_heads: attention inside each ws x ws window (no shift, no bias),
        softmax((q @ k^T) * scale) @ v with qkv from h_qkv, then h_proj.
Output: cat([Hi-Fi, Lo-Fi], -1), no shared projection. ws == 1 is plain multi-head attention on the l_* weights.
The scale multiplies the product (Swin's multiplies q). When H or W is not a multiple of ws the map is zero-padded
right/bottom before either branch and cropped after, unmasked: padded tokens take part with the Linears' biases as
their q, k, v, and the zeros count in the average pool (the official detection and segmentation code; the
classification code only sees multiples of ws). attn_drop and proj_drop are accepted and unused, as officially.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(num_heads: int, window_size: int, alpha: float) -> tuple[int, int]:
    """(h_heads, l_heads) of the official constructor: ws == 1 makes every head Lo-Fi."""
    if window_size == 1:
        return 0, num_heads
    l_heads = int(num_heads * alpha)
    return num_heads - l_heads, l_heads


def pad_to_window(x: torch.Tensor, ws: int) -> torch.Tensor:
    """x: [B, H, W, C] zero-padded right and bottom to multiples of ws."""
    H, W = x.shape[1:3]
    pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_r or pad_b else x


def lofi_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Lo-Fi attention between the Linears. q: [B, N, heads*D], kv: [B, M, 2*heads*D] (channels (2, heads, D))
    -> [B, N, heads*D]: softmax((q @ k^T) * scale) @ v per head."""
    B, N, C = q.shape
    D = C // num_heads
    q = q.reshape(B, N, num_heads, D).permute(0, 2, 1, 3)
    kv = kv.reshape(B, kv.shape[1], 2, num_heads, D).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def lofi_attention_lse(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The log-sum-exp of each query's Lo-Fi logits, [B, heads, N] (what the kernels save for backward)."""
    B, N, C = q.shape
    D = C // num_heads
    q = q.reshape(B, N, num_heads, D).permute(0, 2, 1, 3)
    k = kv.reshape(B, kv.shape[1], 2, num_heads, D)[:, :, 0].permute(0, 2, 1, 3)
    return ((q @ k.transpose(-2, -1)) * scale).logsumexp(-1)


class HiLo(nn.Module):
    """LITv2's HiLo attention with the official signature and parameter names (h_qkv, h_proj, l_q, l_kv, l_proj).

    forward(x [B, N, C], H, W) -> [B, N, C].
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, window_size: int = 2, alpha: float = 0.5):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        head_dim = int(dim / num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.ws = window_size
        self.alpha = alpha
        self.h_heads, self.l_heads = split_heads(num_heads, window_size, alpha)
        self.h_dim, self.l_dim = self.h_heads * head_dim, self.l_heads * head_dim
        self.scale = qk_scale or head_dim ** -0.5
        if self.l_heads > 0:
            if self.ws != 1:
                self.sr = nn.AvgPool2d(kernel_size=window_size, stride=window_size)
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, self.l_dim * 2, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, self.h_dim * 3, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] with H, W multiples of ws -> [B, H, W, h_dim]."""
        B, H, W, C = x.shape
        ws, hg, wg = self.ws, H // self.ws, W // self.ws
        x = x.reshape(B, hg, ws, wg, ws, C).transpose(2, 3)
        qkv = self.h_qkv(x).reshape(B, hg * wg, ws * ws, 3, self.h_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, windows, h_heads, ws*ws, head_dim]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = (attn @ v).transpose(2, 3).reshape(B, hg, wg, ws, ws, self.h_dim)
        x = attn.transpose(2, 3).reshape(B, hg * ws, wg * ws, self.h_dim)
        return self.h_proj(x)

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] with H, W multiples of ws -> [B, H, W, l_dim]."""
        B, H, W, C = x.shape
        q = self.l_q(x).reshape(B, H * W, self.l_dim)
        if self.ws > 1:
            pooled = self.sr(x.permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)
            kv = self.l_kv(pooled)
        else:
            kv = self.l_kv(x).reshape(B, H * W, 2 * self.l_dim)
        out = lofi_attention(q, kv, self.l_heads, self.scale)
        return self.l_proj(out.reshape(B, H, W, self.l_dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = pad_to_window(x.reshape(B, H, W, C), self.ws)
        if self.h_heads == 0:
            out = self.lofi(x)
        elif self.l_heads == 0:
            out = self.hifi(x)
        else:
            out = torch.cat((self.hifi(x), self.lofi(x)), dim=-1)
        return out[:, :H, :W].reshape(B, N, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.ws}, alpha={self.alpha} "
                f"(h_heads={self.h_heads}, l_heads={self.l_heads})")
