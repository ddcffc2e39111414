"""ShiftViT's shift token mixer and block, as microsoft/SPACH models/shiftvit.py computes them.

shift_feat follows ShiftViTBlock.shift_feat: g = C // n_div channels per group, group 0 moves one pixel
left, 1 right, 2 up, 3 down, zero fill, the rest copied. The block is
``x = shift(x); x = x + drop_path(mlp(norm2(x)))`` with norm2 = GroupNorm(1, C): the shortcut is the
shifted tensor, and the norm sees its zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def shift_feat(x: torch.Tensor, n_div: int) -> torch.Tensor:
    """x: [B, C, H, W] -> [B, C, H, W]."""
    B, C, H, W = x.shape
    g = C // n_div
    out = torch.zeros_like(x)
    out[:, 0 * g:1 * g, :, :-1] = x[:, 0 * g:1 * g, :, 1:]  # left
    out[:, 1 * g:2 * g, :, 1:] = x[:, 1 * g:2 * g, :, :-1]  # right
    out[:, 2 * g:3 * g, :-1, :] = x[:, 2 * g:3 * g, 1:, :]  # up
    out[:, 3 * g:4 * g, 1:, :] = x[:, 3 * g:4 * g, :-1, :]  # down
    out[:, 4 * g:, :, :] = x[:, 4 * g:, :, :]  # copied
    return out


def shift_feat_nhwc(x: torch.Tensor, n_div: int) -> torch.Tensor:
    """The same shift for channels-last activations: x: [B, H, W, C] -> [B, H, W, C]."""
    B, H, W, C = x.shape
    g = C // n_div
    out = torch.zeros_like(x)
    out[:, :, :-1, 0 * g:1 * g] = x[:, :, 1:, 0 * g:1 * g]  # left
    out[:, :, 1:, 1 * g:2 * g] = x[:, :, :-1, 1 * g:2 * g]  # right
    out[:, :-1, :, 2 * g:3 * g] = x[:, 1:, :, 2 * g:3 * g]  # up
    out[:, 1:, :, 3 * g:4 * g] = x[:, :-1, :, 3 * g:4 * g]  # down
    out[:, :, :, 4 * g:] = x[:, :, :, 4 * g:]  # copied
    return out


def shift(x: torch.Tensor, n_div: int, layout: str = "NCHW") -> torch.Tensor:
    return shift_feat_nhwc(x, n_div) if layout == "NHWC" else shift_feat(x, n_div)


def shift_group_norm(x: torch.Tensor, n_div: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float = 1e-5, layout: str = "NCHW") -> tuple[torch.Tensor, torch.Tensor]:
    """(shifted, GroupNorm(1, C)(shifted)): the block's shortcut and its norm2 output."""
    shifted = shift(x, n_div, layout)
    if layout == "NHWC":
        normalized = F.group_norm(shifted.permute(0, 3, 1, 2), 1, weight, bias, eps).permute(0, 2, 3, 1)
    else:
        normalized = F.group_norm(shifted, 1, weight, bias, eps)
    return shifted, normalized


class Mlp(nn.Module):
    """The ShiftViT MLP: 1x1 convolutions fc1 -> act -> drop -> fc2 -> drop on [B, C, H, W]."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ShiftViTBlock(nn.Module):
    """ShiftViT's block with its GroupNorm(1, C) norm (the model's 'GN1' norm_layer); x: [B, C, H, W]."""

    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        from effvit.nn.common import DropPath

        self.dim = dim
        self.n_div = n_div
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = shift_feat(x, self.n_div)
        shortcut = x
        return shortcut + self.drop_path(self.mlp(self.norm2(x)))
