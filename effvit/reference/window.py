"""Swin (shifted-)window attention, as timm 1.0.x's SwinTransformerBlock._attn and WindowAttention compute it.

The path on x: [B, H, W, C] (after norm1):
roll by (-sh, -sw) -> zero-pad right/bottom to multiples of the window -> partition -> qkv Linear ->
q * scale -> q @ k^T + relative_position_bias_table[relative_position_index] + shift mask (-100.0 between
tokens of different regions, regions built on the padded size) -> softmax -> @ v -> proj -> reverse ->
crop -> roll by (+sh, +sw).

``window_attention_core`` is the part effvit fuses: everything between the qkv GEMM and the proj GEMM,
written on qkv: [B, H, W, 3C] (the qkv Linear applied to the unpadded map; the padded tokens' qkv is the
Linear's bias, ``pad_qkv``, because the official code pads x with zeros before the Linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_VALUE = -100.0  # Swin's value between tokens of different shift regions (not -inf)


def effective_window(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                     always_partition: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's SwinTransformerBlock._calc_window_shift: a window is clamped to the resolution in each
    dimension where the resolution is <= the window, and that dimension is then not shifted."""
    if always_partition:
        return tuple(window), tuple(shift)
    win = tuple(r if r <= w else w for r, w in zip(resolution, window))
    sh = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift))
    return win, sh


def padded_size(H: int, W: int, window: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(H / window[0]) * window[0], math.ceil(W / window[1]) * window[1]


def relative_position_index(win_h: int, win_w: int, device=None) -> torch.Tensor:
    """[N, N] index into the (2*win_h - 1) * (2*win_w - 1) rows of the bias table, N = win_h * win_w:
    token i = (ih, iw) and j = (jh, jw) read row (ih - jh + win_h - 1) * (2*win_w - 1) + (iw - jw + win_w - 1)."""
    ih, iw = torch.meshgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device), indexing="ij")
    ih, iw = ih.flatten(), iw.flatten()
    dh = ih[:, None] - ih[None, :] + (win_h - 1)
    dw = iw[:, None] - iw[None, :] + (win_w - 1)
    return dh * (2 * win_w - 1) + dw


def relative_position_bias(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """table: [(2*wh-1)*(2*ww-1), nH] -> bias [nH, N, N]."""
    n = window[0] * window[1]
    index = relative_position_index(*window, device=table.device)
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """x: [B, Hp, Wp, C] -> [B * nW, wh, ww, C], windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.view(B, H // window[0], window[0], W // window[1], window[1], C)
    num_windows = (H // window[0]) * (W // window[1])
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B * num_windows, window[0], window[1], C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """windows: [B * nW, wh, ww, C] -> [B, H, W, C] (H, W: the padded size)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // window[0]) * (W // window[1]))   # timm's view(-1, ...), defined at batch 0 too
    x = windows.view(B, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)


def shift_region_mask(Hp: int, Wp: int, window: tuple[int, int], shift: tuple[int, int], device=None,
                      dtype=torch.float32) -> torch.Tensor | None:
    """timm's get_attn_mask on the padded size: [nW, N, N], 0 within a region, -100.0 across regions.
    None when there is no shift. A dimension whose shift is 0 is one region (timm's slices do that)."""
    if not any(shift):
        return None
    img = torch.zeros((1, Hp, Wp, 1), dtype=dtype, device=device)
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            img[:, hs[0]:hs[1], ws[0]:ws[1], :] = count
            count += 1
    regions = window_partition(img, window).view(-1, window[0] * window[1])
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0)


def _windowed_attention(qkv_windows: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
                        num_heads: int, scale: float, attn_drop: nn.Module | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """WindowAttention.forward's eager path between its two Linears (attn_drop: its attention dropout).

    qkv_windows: [B_, N, 3C] -> (x [B_, N, C], logits [B_, nH, N, N] before the softmax)."""
    B_, N, C3 = qkv_windows.shape
    qkv = qkv_windows.reshape(B_, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(B_ // num_win, num_win, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(B_, num_heads, N, N)
    logits = attn
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    x = attn @ v
    return x.transpose(1, 2).reshape(B_, N, C3 // 3), logits


def _pad_and_partition(t: torch.Tensor, window, shift, pad_value: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    B, H, W, C = t.shape
    if any(shift):
        t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h = (window[0] - H % window[0]) % window[0]
    pad_w = (window[1] - W % window[1]) % window[1]
    t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
    if pad_value is not None and (pad_h or pad_w):
        filled = torch.zeros((1, H + pad_h, W + pad_w, 1), dtype=torch.bool, device=t.device)
        filled[:, H:] = True
        filled[:, :, W:] = True
        t = torch.where(filled, pad_value.to(t.dtype), t)
    _, Hp, Wp, _ = t.shape
    return window_partition(t, window).view(B * (Hp // window[0]) * (Wp // window[1]), window[0] * window[1], C), Hp, Wp


def _reverse_and_crop(windows: torch.Tensor, window, shift, H: int, W: int, Hp: int, Wp: int) -> torch.Tensor:
    x = window_reverse(windows.view(windows.shape[0], window[0], window[1], windows.shape[-1]), window, Hp, Wp)
    x = x[:, :H, :W, :].contiguous()
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x


def window_attention_core(qkv: torch.Tensor, bias_table: torch.Tensor | None, num_heads: int,
                          window: tuple[int, int], shift: tuple[int, int], scale: float,
                          pad_qkv: torch.Tensor | None = None, shift_mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """The fused op's reference. qkv: [B, H, W, 3C] (channels ordered (3, nH, head_dim) as timm's reshape
    reads them); bias_table: [(2*wh-1)*(2*ww-1), nH] or None; pad_qkv: [3C], the qkv of a zero token
    (the Linear's bias), or None for zeros; shift_mask: shift_region_mask's [nW, N, N] made beforehand, as
    timm keeps it (its attn_mask buffer, made once per block), or None to make it here. Returns [B, H, W, C],
    before proj."""
    B, H, W, _ = qkv.shape
    windows, Hp, Wp = _pad_and_partition(qkv, window, shift, pad_qkv)
    bias = relative_position_bias(bias_table, window) if bias_table is not None else None
    mask = shift_region_mask(Hp, Wp, window, shift, qkv.device, qkv.dtype) if shift_mask is None else shift_mask
    x, _ = _windowed_attention(windows, bias, mask, num_heads, scale)
    return _reverse_and_crop(x, window, shift, H, W, Hp, Wp)


def window_attention_lse(qkv: torch.Tensor, bias_table: torch.Tensor | None, num_heads: int,
                         window: tuple[int, int], shift: tuple[int, int], scale: float,
                         pad_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """The log-sum-exp of each query's logits, as the fused op saves it: [B, nH, H, W] (float32; float64
    for float64 input), at the query's position in the input map."""
    B, H, W, C3 = qkv.shape
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    windows, Hp, Wp = _pad_and_partition(qkv.to(acc), window, shift, None if pad_qkv is None else pad_qkv.to(acc))
    bias = relative_position_bias(bias_table.to(acc), window) if bias_table is not None else None
    mask = shift_region_mask(Hp, Wp, window, shift, qkv.device, acc)
    _, logits = _windowed_attention(windows, bias, mask, num_heads, scale)
    lse = logits.logsumexp(-1)                                      # [B_, nH, N]
    lse = lse.transpose(1, 2).reshape(lse.shape[0], window[0] * window[1], num_heads)
    return _reverse_and_crop(lse, window, shift, H, W, Hp, Wp).permute(0, 3, 1, 2).contiguous()


def swin_attention(x: torch.Tensor, attn: nn.Module, window: tuple[int, int], shift: tuple[int, int],
                   dynamic_mask: bool = True) -> torch.Tensor:
    """timm SwinTransformerBlock._attn with a WindowAttention-like ``attn`` (qkv, proj, bias table,
    num_heads, scale): x: [B, H, W, C] -> [B, H, W, C]."""
    B, H, W, C = x.shape
    windows, Hp, Wp = _pad_and_partition(x, window, shift, None)
    mask = shift_region_mask(Hp, Wp, window, shift, x.device, x.dtype)
    qkv = attn.qkv(windows)
    bias = relative_position_bias(attn.relative_position_bias_table, window)
    out, _ = _windowed_attention(qkv, bias, mask, attn.num_heads, attn.scale, attn.attn_drop)
    out = attn.proj_drop(attn.proj(out))
    return _reverse_and_crop(out, window, shift, H, W, Hp, Wp)


class WindowAttention(nn.Module):
    """timm's WindowAttention (eager path), on windows: x: [B_, N, C] -> [B_, N, C]; mask [nW, N, N]."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = relative_position_bias(self.relative_position_bias_table, self.window_size)
        out, _ = _windowed_attention(self.qkv(x), bias, mask, self.num_heads, self.scale, self.attn_drop)
        return self.proj_drop(self.proj(out))
