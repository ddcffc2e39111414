"""Drop-in modules for ShiftViT (microsoft/SPACH models/shiftvit.py)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from effvit import checks
from effvit.nn.common import DropPath
from effvit.ops import shift as shift_ops
from effvit.reference.shift import Mlp


class Shift(nn.Module):
    """ShiftViT's zero-parameter token mixer; x: [B, C, H, W] (or [B, H, W, C] with layout="NHWC")."""

    def __init__(self, n_div: int = 12, layout: str = "NCHW", backend: str | None = None):
        super().__init__()
        checks.check_int(n_div, "n_div")
        if n_div < 4:
            raise ValueError(f"n_div must be >= 4 (four shifted groups of C // n_div channels), got {n_div}")
        checks.check_layout(layout)
        self.n_div, self.layout, self.backend = n_div, layout, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_ops.shift(x, self.n_div, self.layout, self.backend)

    def extra_repr(self) -> str:
        return f"n_div={self.n_div}, layout={self.layout!r}, backend={self.backend!r}"


class ShiftBlock(nn.Module):
    """ShiftViT's block, ``x = shift(x); x = x + drop_path(mlp(norm2(x)))``, on [B, C, H, W].

    Same parameters and state_dict keys as the official ShiftViTBlock (``norm2.*``, ``mlp.fc1.*``,
    ``mlp.fc2.*``), so its weights load unchanged. With the default GroupNorm(1, C) norm the shift and
    the norm run as one fused op; any other ``norm_layer`` (e.g. nn.BatchNorm2d) runs unfused.
    """

    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] | None = None, input_resolution=None,
                 backend: str | None = None):
        super().__init__()
        checks.check_int(dim, "dim")
        checks.check_int(n_div, "n_div")
        if not 4 <= n_div <= dim:
            raise ValueError(f"n_div must be in [4, dim] = [4, {dim}], got {n_div}")
        self.dim, self.n_div, self.mlp_ratio, self.backend = dim, n_div, mlp_ratio, backend
        self.input_resolution = input_resolution  # accepted as the official block does (FLOP counting only)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim) if norm_layer is not None else nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def _fusable_norm(self) -> bool:
        # GroupNorm(1, C) or a subclass that keeps its forward, as SPACH's own GroupNorm(num_channels, 1)
        norm = self.norm2
        return (isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
                and type(norm).forward is nn.GroupNorm.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable_norm():
            shortcut, y = shift_ops.shift_group_norm(x, self.n_div, self.norm2.weight, self.norm2.bias,
                                                     self.norm2.eps, "NCHW", self.backend)
        else:
            shortcut = shift_ops.shift(x, self.n_div, "NCHW", self.backend)
            y = self.norm2(shortcut)
        return shortcut + self.drop_path(self.mlp(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_div={self.n_div}, shift percentage={4.0 / self.n_div * 100:.1f}%"
