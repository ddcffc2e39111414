"""ShiftViT shift and fused shift + GroupNorm(1, C): Triton kernels and their launchers.

The kernels mirror csrc/cuda/shift.cu: one lane per output value, walked in the output's memory order,
reading its source through the shift mapping. The fused op reads x twice, for the GroupNorm statistics
(float64 sums per program, reduced per sample by a few tiny torch ops on B or B x C values), then to write
both outputs, so no output is read back. They run on CUDA tensors,
and on CPU tensors under TRITON_INTERPRET=1 (which is how the tests run them without a GPU).

The launchers take and return logical tensors; torch.library registration (custom ops, fakes) lives in
effvit/ops/shift.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effvit.triton_kernels.common import acc_dtypes, cdiv, on_device, to_acc

BLOCK = 1024


@triton.jit
def _decode(i, C, H, W, CHANNEL_INNER: tl.constexpr):
    """Coordinates (c, h, w) of the i-th value of a sample in the walk's memory order."""
    if CHANNEL_INNER:
        c = i % C
        t = i // C
        w = t % W
        h = t // W
    else:
        w = i % W
        t = i // W
        h = t % H
        c = t // H
    return c, h, w


@triton.jit
def _shift_source(c, h, w, group, H, W, REVERSE: tl.constexpr):
    """Source pixel of output (c, h, w) under the shift (group 0 left, 1 right, 2 up, 3 down)."""
    k = tl.where(c < 4 * group, c // tl.maximum(group, 1), 4)
    dw = tl.where(k == 0, 1, tl.where(k == 1, -1, 0))
    dh = tl.where(k == 2, 1, tl.where(k == 3, -1, 0))
    if REVERSE:
        dh = -dh
        dw = -dw
    sh = h + dh
    sw = w + dw
    valid = (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
    return sh, sw, valid


@triton.jit
def _shift_kernel(x_ptr, out_ptr, partial_ptr, C, H, W, group, sample_numel,
                  xs_b, xs_c, xs_h, xs_w, os_b, os_c, os_h, os_w,
                  CHANNEL_INNER: tl.constexpr, REVERSE: tl.constexpr, STATS_ONLY: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = shift(x); with STATS_ONLY, instead of writing, partial[b, pid] = (sum, sum of squares) of
    the shifted values (os_* then give the walk's memory order)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = i < sample_numel
    c, h, w = _decode(i, C, H, W, CHANNEL_INNER)
    sh, sw, valid = _shift_source(c, h, w, group, H, W, REVERSE)
    v = tl.load(x_ptr + b * xs_b + c * xs_c + sh * xs_h + sw * xs_w, mask=in_range & valid, other=0.0)
    if STATS_ONLY:
        d = to_acc(v, tl.float64)
        slot = partial_ptr + (b * tl.num_programs(0) + pid) * 2
        tl.store(slot, tl.sum(d, axis=0))
        tl.store(slot + 1, tl.sum(d * d, axis=0))
    else:
        tl.store(out_ptr + b * os_b + c * os_c + h * os_h + w * os_w, v, mask=in_range)


@triton.jit
def _shift_affine_kernel(x_ptr, s_ptr, y_ptr, coef_ptr, C, H, W, group, sample_numel,
                         xs_b, xs_c, xs_h, xs_w, os_b, os_c, os_h, os_w,
                         CHANNEL_INNER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """s = shift(x) and y = s * coef[b, 0, c] + coef[b, 1, c], both from one read of x (s and y share
    the strides os_*)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = i < sample_numel
    c, h, w = _decode(i, C, H, W, CHANNEL_INNER)
    sh, sw, valid = _shift_source(c, h, w, group, H, W, False)
    v = tl.load(x_ptr + b * xs_b + c * xs_c + sh * xs_h + sw * xs_w, mask=in_range & valid, other=0.0)
    out = b * os_b + c * os_c + h * os_h + w * os_w
    tl.store(s_ptr + out, v, mask=in_range)
    a = tl.load(coef_ptr + b * 2 * C + c, mask=in_range, other=0.0)
    shift = tl.load(coef_ptr + (b * 2 + 1) * C + c, mask=in_range, other=0.0)
    y = to_acc(v, ACC) * a + shift
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _channel_sums_kernel(dy_ptr, s_ptr, out_ptr, C, H, W,
                         ds_b, ds_c, ds_h, ds_w, ss_b, ss_c, ss_h, ss_w, BLOCK: tl.constexpr):
    """out[b, c] = (sum_hw dy * s, sum_hw dy)."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_a = tl.zeros([BLOCK], dtype=tl.float64)
    acc_g = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, H * W, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < H * W
        h = i // W
        w = i % W
        g = to_acc(tl.load(dy_ptr + b * ds_b + c * ds_c + h * ds_h + w * ds_w, mask=m, other=0.0), tl.float64)
        v = to_acc(tl.load(s_ptr + b * ss_b + c * ss_c + h * ss_h + w * ss_w, mask=m, other=0.0), tl.float64)
        acc_a += g * v
        acc_g += g
    slot = out_ptr + (b * C + c) * 2
    tl.store(slot, tl.sum(acc_a, axis=0))
    tl.store(slot + 1, tl.sum(acc_g, axis=0))


@triton.jit
def _shift_grad_kernel(gs_ptr, gy_ptr, s_ptr, dx_ptr, p_ptr, qr_ptr, C, H, W, group, sample_numel,
                       gss_b, gss_c, gss_h, gss_w, gys_b, gys_c, gys_h, gys_w,
                       ss_b, ss_c, ss_h, ss_w, dxs_b, dxs_c, dxs_h, dxs_w,
                       CHANNEL_INNER: tl.constexpr, HAS_GS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dx = reverse_shift(g_s + p[b, c] * g_y + q[b] + r[b] * s)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = i < sample_numel
    c, h, w = _decode(i, C, H, W, CHANNEL_INNER)
    sh, sw, valid = _shift_source(c, h, w, group, H, W, True)
    m = in_range & valid
    gy = to_acc(tl.load(gy_ptr + b * gys_b + c * gys_c + sh * gys_h + sw * gys_w, mask=m, other=0.0), ACC)
    s = to_acc(tl.load(s_ptr + b * ss_b + c * ss_c + sh * ss_h + sw * ss_w, mask=m, other=0.0), ACC)
    p = tl.load(p_ptr + b * C + c, mask=in_range, other=0.0)
    q = tl.load(qr_ptr + b * 2)
    r = tl.load(qr_ptr + b * 2 + 1)
    v = p * gy + q + r * s
    if HAS_GS:
        gs = tl.load(gs_ptr + b * gss_b + c * gss_c + sh * gss_h + sw * gss_w, mask=m, other=0.0)
        v += to_acc(gs, ACC)
    v = tl.where(m, v, 0.0)
    tl.store(dx_ptr + b * dxs_b + c * dxs_c + h * dxs_h + w * dxs_w, v.to(dx_ptr.dtype.element_ty), mask=in_range)


# ---- launchers ----------------------------------------------------------------------------------------

def _bchw(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if nhwc else t


def _channel_inner(out_bchw: torch.Tensor) -> bool:
    return out_bchw.shape[1] > 1 and out_bchw.stride(1) < out_bchw.stride(3)


def _grid(t_bchw: torch.Tensor) -> tuple[int, int]:
    B = t_bchw.shape[0]
    return cdiv(t_bchw.numel() // B, BLOCK), B


def shift(x: torch.Tensor, n_div: int, nhwc: bool = False, reverse: bool = False) -> torch.Tensor:
    """x: [B, C, H, W] (or [B, H, W, C] with nhwc) -> shifted, same shape."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    xv, ov = _bchw(x, nhwc), _bchw(out, nhwc)
    B, C, H, W = xv.shape
    with on_device(x):
        _shift_kernel[_grid(xv)](xv, ov, ov, C, H, W, C // n_div, xv.numel() // B, *xv.stride(), *ov.stride(),
                                 CHANNEL_INNER=_channel_inner(ov), REVERSE=reverse, STATS_ONLY=False, BLOCK=BLOCK)
    return out


def shift_group_norm(x: torch.Tensor, n_div: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     nhwc: bool = False):
    """Returns (shifted, normalized, mean [B], rstd [B]) as effvit::shift_group_norm."""
    with on_device(x):
        return _shift_group_norm(x, n_div, weight, bias, eps, nhwc)


def _shift_group_norm(x, n_div, weight, bias, eps, nhwc):
    shifted, normalized = torch.empty_like(x), torch.empty_like(x)
    xv, sv, yv = _bchw(x, nhwc), _bchw(shifted, nhwc), _bchw(normalized, nhwc)
    B, C, H, W = xv.shape
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if B == 0:
        empty = x.new_empty((0,), dtype=stats_dtype)
        return shifted, normalized, empty, empty.clone()
    grid = _grid(xv)
    partial = torch.empty((B, grid[0], 2), dtype=torch.float64, device=x.device)
    # pass 1 reads x for the statistics, pass 2 reads it again and writes both outputs
    _shift_kernel[grid](xv, sv, partial, C, H, W, C // n_div, xv.numel() // B, *xv.stride(), *sv.stride(),
                        CHANNEL_INNER=_channel_inner(sv), REVERSE=False, STATS_ONLY=True, BLOCK=BLOCK)
    mean, rstd = _moments(partial.sum(1), xv.numel() // B, eps)
    a = rstd[:, None] * weight.to(torch.float64)[None, :]
    coef = torch.stack([a, bias.to(torch.float64)[None, :] - mean[:, None] * a], 1).to(acc_torch).contiguous()
    _shift_affine_kernel[grid](xv, sv, yv, coef, C, H, W, C // n_div, xv.numel() // B, *xv.stride(), *sv.stride(),
                               CHANNEL_INNER=_channel_inner(sv), ACC=acc_tl, BLOCK=BLOCK)
    return shifted, normalized, mean.to(stats_dtype), rstd.to(stats_dtype)


def shift_group_norm_backward(grad_shifted: torch.Tensor | None, grad_normalized: torch.Tensor,
                              shifted: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                              n_div: int, nhwc: bool = False):
    """Returns (grad_x, grad_weight, grad_bias) as effvit::shift_group_norm_backward."""
    with on_device(shifted):
        return _shift_group_norm_backward(grad_shifted, grad_normalized, shifted, weight, mean, rstd, n_div,
                                          nhwc)


def _shift_group_norm_backward(grad_shifted, grad_normalized, shifted, weight, mean, rstd, n_div, nhwc):
    grad_x = torch.empty_like(shifted)
    sv = _bchw(shifted, nhwc)
    B, C, H, W = sv.shape
    if B == 0 or sv.numel() == 0:
        return grad_x.zero_(), weight.new_zeros((C,)), weight.new_zeros((C,))
    gyv, dxv = _bchw(grad_normalized, nhwc), _bchw(grad_x, nhwc)
    gsv = _bchw(grad_shifted, nhwc) if grad_shifted is not None else None
    acc_tl, acc_torch = acc_dtypes(shifted.dtype)
    sums = torch.empty((B, C, 2), dtype=torch.float64, device=shifted.device)
    _channel_sums_kernel[(C, B)](gyv, sv, sums, C, H, W, *gyv.stride(), *sv.stride(), BLOCK=256)
    p, qr, grad_weight, grad_bias = _backward_coeffs(sums[..., 0], sums[..., 1], weight.to(torch.float64),
                                                     mean.to(torch.float64), rstd.to(torch.float64), H * W * C)
    _shift_grad_kernel[_grid(sv)](
        gsv if gsv is not None else gyv, gyv, sv, dxv, p.to(acc_torch).contiguous(), qr.to(acc_torch).contiguous(),
        C, H, W, C // n_div, sv.numel() // B, *(gsv.stride() if gsv is not None else (0, 0, 0, 0)), *gyv.stride(),
        *sv.stride(), *dxv.stride(), CHANNEL_INNER=_channel_inner(dxv), HAS_GS=gsv is not None, ACC=acc_tl,
        BLOCK=BLOCK)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


# GroupNorm(1, C) per-sample arithmetic, the same as csrc/common/group_norm_math.h (see its comment).

def _moments(sums: torch.Tensor, count: int, eps: float):
    mean = sums[:, 0] / count
    var = (sums[:, 1] / count - mean * mean).clamp_min(0.0)
    return mean, torch.rsqrt(var + eps)


def _backward_coeffs(a_sums, g_sums, weight, mean, rstd, count: int):
    centered = rstd[:, None] * (a_sums - mean[:, None] * g_sums)  # sum_hw dy * xhat, [B, C]
    s1 = (weight[None, :] * g_sums).sum(1)
    s2 = (weight[None, :] * centered).sum(1)
    r = -rstd * rstd * s2 / count
    q = -rstd * s1 / count - r * mean
    p = rstd[:, None] * weight[None, :]
    return p, torch.stack([q, r], 1), centered.sum(0), g_sums.sum(0)
