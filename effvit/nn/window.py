"""Drop-in modules for Swin's (shifted-)window attention, with timm's parameter names, and the methods
effvit.patch.timm gives timm's SwinTransformerBlock."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from effvit import checks
from effvit.nn.common import prepare_scriptable
from effvit.ops import window as window_ops
from effvit.reference import window as reference


@torch.fx.wrap
def window_attention_core(qkv: torch.Tensor, num_heads: int, window: List[int], shift: List[int],
                          bias_table: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor], scale: float,
                          always_partition: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """effvit.window_attention with typed arguments (window and shift as [h, w] lists), as one call in torch.fx
    graphs and in TorchScript.

    torch.fx records it as a leaf (torch.fx.wrap), so a traced graph calls it, and effvit's kernels, instead of
    tracing into its argument checks and backend choice. Run from Python (eagerly, or in an fx graph) it is
    effvit.window_attention; compiled by TorchScript it calls the C++ kernel of qkv's device, forward only.
    """
    if torch.jit.is_scripting():
        if torch.is_grad_enabled() and (qkv.requires_grad or (bias_table is not None and bias_table.requires_grad)):
            raise RuntimeError(
                "effvit's window attention runs its C++ kernel under TorchScript, which has no backward there: run "
                "the scripted graph under torch.no_grad() or torch.inference_mode(), or train the eager one (a model "
                "patched by effvit.patch.timm and scripted as a whole runs timm's own code where gradients are needed)")
        return window_ops.script_window_attention(qkv, num_heads, window, shift, bias_table, qkv_bias, scale)
    return _window_attention(qkv, num_heads, window, shift, bias_table, qkv_bias, scale, always_partition, backend)


@torch.jit.unused
def _window_attention(qkv: torch.Tensor, num_heads: int, window: List[int], shift: List[int],
                      bias_table: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor], scale: float,
                      always_partition: bool, backend: Optional[str]) -> torch.Tensor:
    return window_ops.window_attention(qkv, num_heads, window, shift, bias_table, qkv_bias, scale, always_partition,
                                       backend)


def fused_swin_attention(x: torch.Tensor, attn: nn.Module, window, shift, always_partition: bool = True,
                         backend: str | None = None) -> torch.Tensor:
    """timm's SwinTransformerBlock._attn with the fused core: x: [B, H, W, C] -> [B, H, W, C].

    ``attn`` is a timm-style WindowAttention (``qkv``, ``proj``, ``relative_position_bias_table``,
    ``num_heads``, ``scale``); ``window`` and ``shift`` are the block's (already clamped) sizes. The qkv Linear
    runs on the unpadded map and proj on the output tokens only; the core never materialises the rolled,
    padded or partitioned map. Attention dropout in training is not fused: that case runs the reference.
    """
    attn_drop = getattr(attn, "attn_drop", None)
    if attn.training and isinstance(attn_drop, nn.Dropout) and attn_drop.p > 0:
        return reference.swin_attention(x, attn, window, shift)
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    out = window_attention_core(qkv, attn.num_heads, list(window), list(shift), attn.relative_position_bias_table,
                                attn.qkv.bias, attn.scale, always_partition, backend)
    return attn.proj_drop(attn.proj(out))


class WindowAttention(reference.WindowAttention):
    """Window multi-head self-attention with relative position bias (W-MSA / SW-MSA), fused.

    Same parameters and state_dict keys as timm's and the official WindowAttention (``qkv.*``, ``proj.*``,
    ``relative_position_bias_table``), so their weights load unchanged.

    forward(x [B_, N, C], mask=None): timm's signature, on windows that are already partitioned.
    forward_map(x [B, H, W, C], shift_size=0): the whole (shifted-)window path of a Swin block (roll, pad,
    partition, attention, reverse, crop, roll back) with the fused core; this is the fast path.
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str | None = None):
        checks.check_int(dim, "dim")
        checks.check_int(num_heads, "num_heads")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, checks.check_pair(window_size, "window_size", 1), num_heads, qkv_bias, qk_scale,
                         attn_drop, proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.window_size[0] * self.window_size[1] or x.shape[2] != self.dim:
            raise ValueError(f"x must be windows [B_, N, C] with N = {self.window_size[0] * self.window_size[1]} "
                             f"and C = {self.dim}, got {tuple(x.shape)} (for a [B, H, W, C] map use forward_map)")
        if mask is not None or (self.training and self.attn_drop.p > 0):
            # an arbitrary additive mask or attention dropout: the reference path
            return super().forward(x, mask)
        B_ = x.shape[0]
        out = fused_swin_attention(x.view(B_, *self.window_size, self.dim), self, self.window_size, (0, 0),
                                   backend=self.backend)
        return out.view(B_, self.window_size[0] * self.window_size[1], self.dim)

    def forward_map(self, x: torch.Tensor, shift_size=0, always_partition: bool = False) -> torch.Tensor:
        if x.dim() != 4 or x.shape[3] != self.dim:
            raise ValueError(f"x must be a [B, H, W, C] map with C = {self.dim}, got {tuple(x.shape)}")
        return fused_swin_attention(x, self, self.window_size, checks.check_pair(shift_size, "shift_size", 0),
                                    always_partition, self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


# ---- timm's SwinTransformerBlock, patched (effvit.patch.timm swaps its class for a subclass with these methods) ----

def _block_attn(self, x: torch.Tensor) -> torch.Tensor:
    """_attn of a patched block: fused_swin_attention. Compiled by TorchScript: the C++ kernel, or timm's own _attn
    where the kernels cannot serve (see prepare_scriptable), in training with attention dropout, or where a gradient
    is needed (TorchScript cannot run the kernel's backward)."""
    if not torch.jit.is_scripting():
        return self._effvit_attn(x)
    attn = self.attn
    table, qkv_bias = attn.relative_position_bias_table, attn.qkv.bias
    if (not self._effvit_script_kernels or (attn.training and attn.attn_drop.p > 0)
            or (torch.is_grad_enabled() and (x.requires_grad or attn.qkv.weight.requires_grad or table.requires_grad
                                             or (qkv_bias is not None and qkv_bias.requires_grad)))):
        return self._timm_attn(x)
    out = window_attention_core(F.linear(x, attn.qkv.weight, qkv_bias), attn.num_heads,
                                [self.window_size[0], self.window_size[1]], [self.shift_size[0], self.shift_size[1]],
                                table, qkv_bias, attn.scale)
    return attn.proj_drop(attn.proj(out))


@torch.jit.unused
def _block_fused_attn(self, x: torch.Tensor) -> torch.Tensor:
    # timm's block has already clamped window_size / shift_size to the input resolution
    return fused_swin_attention(x, self.attn, self.window_size, self.shift_size, always_partition=True,
                                backend=getattr(self, "effvit_backend", None))


# the methods of the patched block (effvit.patch adds _timm_attn, timm's own _attn)
TIMM_SWIN_BLOCK_METHODS = {"_attn": _block_attn, "_effvit_attn": _block_fused_attn,
                           "__prepare_scriptable__": prepare_scriptable}
