"""Swin (shifted-)window attention: Triton forward and backward kernels and their launchers.

The op is effvit/reference/window.py's ``window_attention_core`` (timm's SwinTransformerBlock._attn between
the qkv and proj GEMMs) with the roll / pad / partition / reverse / crop done by index arithmetic, as
csrc/common/window_geometry.h spells it (restated in ``_token_geometry``):

  qkv        [B, H, W, 3C]                       channels (3, heads, head_dim), C = heads * head_dim
  bias_table [(2wh-1)(2ww-1), heads]             accumulation dtype (float32; float64 for float64 qkv) or None
  pad_qkv    [3C]                                qkv dtype: the qkv of a padding token, or None (zeros)
  out        [B, H, W, C]                        qkv dtype
  lse        [B, heads, H, W]                    accumulation dtype: log-sum-exp of each query's logits
  grad_qkv   [B, H, W, 3C]                       qkv dtype
  grad_bias_table [(2wh-1)(2ww-1), heads]        accumulation dtype (empty when bias_table is None)
  grad_pad_qkv    [3C]                           accumulation dtype (its q third is 0: padded queries are cropped)

One program per (image, window, head), heads fastest (they share each pixel's qkv row); the window's tokens
are gathered by computed pointers. Queries go through in BLOCK_M chunks and keys in BLOCK_KN <= 64 chunks
(``_tiles``), so registers and shared memory stay bounded for any window: a window of <= 64 tokens
(Swin's 7x7, 8x8) is usually one key chunk, with k / v loaded once and a plain softmax; larger windows
use flash-attention's online softmax. The backward recomputes the probabilities from lse (no N x N
tensor is saved): it walks key chunks, accumulating dk / dv over query chunks; with one key chunk dq is
complete per query chunk and is written there, otherwise a second pass over query chunks computes dq.
The relative-position bias gradient goes through a [stripes, heads, N, N] buffer of dS sums (atomics;
within a program every (i, j) is its own address, and windows spread over up to 32 stripes) that torch
sums and a tiny index_add_ folds into table rows; the padding tokens' dk / dv sum atomically into
grad_pad_qkv.

Matmuls go through common.py's ``matmul`` (shared with hilo.py): tl.dot in the input dtype with fp32
accumulation for fp16/bf16 (P and dS cast to the input dtype first, as flash-attention does),
input_precision="ieee" for fp32 (TF32 would miss 1e-4) and float64 (where common.FP64_TL_DOT = False selects
a broadcast-multiply-sum instead, should a GPU's tl.dot reject float64).
They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests run them without a
GPU; there bf16 matmuls are done in fp32 on bf16-rounded operands, the interpreter having no bf16 dot).

The launchers take and return logical tensors; torch.library registration lives in effvit/ops/window.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effvit.triton_kernels.common import (NEG_FILL, acc_dtypes, acc_scale, cdiv, dot_config, matmul, next_power_of_2,
                                          on_device, real_max, softmax_out, split_scale, to_acc)

# (tl.constexpr: compiled kernels may only read globals that are)
MASK_VALUE = tl.constexpr(-100.0)  # Swin's logit offset between tokens of different shift regions


@triton.jit
def _token_geometry(win, t, H, W, nww, Hp, Wp, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
                    SW: tl.constexpr):
    """Token t of window win (row-major within the image): its input pixel y * W + x (meaningful when real),
    whether it is a token of the window (t < N), whether it is real (not padding), and its shift region.
    Restates window_geometry.h: padded-shifted position (r, c) = (wy*wh + t // ww, wx*ww + t % ww), read
    from ((r + sh) % H, (c + sw) % W) when r < H and c < W."""
    wy = win // nww
    wx = win - wy * nww
    r = wy * WH + t // WW
    c = wx * WW + t % WW
    in_win = t < WH * WW
    real = in_win & (r < H) & (c < W)
    pix = ((r + SH) % H) * W + (c + SW) % W
    # timm's get_attn_mask regions on the padded size; an unshifted dimension is one region
    if SH > 0:
        rh = (r >= Hp - WH).to(tl.int32) + (r >= Hp - SH).to(tl.int32)
    else:
        rh = tl.zeros_like(r)
    if SW > 0:
        rw = (c >= Wp - WW).to(tl.int32) + (c >= Wp - SW).to(tl.int32)
    else:
        rw = tl.zeros_like(c)
    return pix, in_win, real, rh * 3 + rw


@triton.jit
def _load_tokens(qkv_ptr, pad_ptr, rows, in_win, real, col0, d, dm, C3, HAS_PAD: tl.constexpr):
    """[tokens, BLOCK_D] of qkv channels col0 + d: rows (b * H * W + pixel) for real tokens, pad_qkv (or
    zeros) for padding tokens, zeros past the window or head_dim."""
    x = tl.load(qkv_ptr + rows[:, None] * C3 + col0 + d[None, :], mask=real[:, None] & dm[None, :], other=0.0)
    if HAS_PAD:
        pv = tl.load(pad_ptr + col0 + d, mask=dm, other=0.0)
        x = tl.where((in_win & (real == 0))[:, None], pv[None, :], x)
    return x


@triton.jit
def _logits(q, k, tm, tn, reg_m, reg_n, table_ptr, h, heads, scale,
            WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr,
            PREC: tl.constexpr, EMULATE: tl.constexpr, FMA: tl.constexpr, ACC: tl.constexpr):
    """S = scale * q @ k^T + bias_table[bias_row(i, j), h] + region mask; NEG_FILL past the window."""
    N: tl.constexpr = WH * WW
    s = matmul(q, tl.trans(k), PREC, EMULATE, FMA).to(ACC) * scale
    if HAS_BIAS:
        row = ((tm[:, None] // WW - tn[None, :] // WW + (WH - 1)) * (2 * WW - 1)
               + (tm[:, None] % WW - tn[None, :] % WW + (WW - 1)))
        bmask = (tm < N)[:, None] & (tn < N)[None, :]
        s += tl.load(table_ptr + row * heads + h, mask=bmask, other=0.0)
    if SHIFTED:
        s = tl.where(reg_m[:, None] != reg_n[None, :], s + MASK_VALUE, s)
    return tl.where((tn < N)[None, :], s, NEG_FILL)


@triton.jit
def _window_fwd_kernel(qkv_ptr, table_ptr, pad_ptr, out_ptr, lse_ptr,
                       H, W, nww, nw, Hp, Wp, heads, scale_hi, scale_lo,
                       WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_KN: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr, FMA: tl.constexpr,
                       ACC: tl.constexpr):
    N: tl.constexpr = WH * WW
    SHIFTED: tl.constexpr = SH > 0 or SW > 0
    KEYS_WHOLE: tl.constexpr = BLOCK_KN >= N  # one key chunk: plain softmax, k / v loaded once
    pid = tl.program_id(0)
    h = pid % heads
    bw = pid // heads
    b = bw // nw
    win = bw - b * nw
    C = heads * HEAD_DIM
    C3 = 3 * C
    base = b.to(tl.int64) * H * W
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM

    if KEYS_WHOLE:
        tn = tl.arange(0, BLOCK_KN)
        pix_n, in_n, real_n, reg_n = _token_geometry(win, tn, H, W, nww, Hp, Wp, WH, WW, SH, SW)
        k = _load_tokens(qkv_ptr, pad_ptr, base + pix_n, in_n, real_n, C + h * HEAD_DIM, d, dm, C3, HAS_PAD)
        v = _load_tokens(qkv_ptr, pad_ptr, base + pix_n, in_n, real_n, 2 * C + h * HEAD_DIM, d, dm, C3, HAS_PAD)
    for m0 in range(0, N, BLOCK_M):
        tm = m0 + tl.arange(0, BLOCK_M)
        pix_m, in_m, real_m, reg_m = _token_geometry(win, tm, H, W, nww, Hp, Wp, WH, WW, SH, SW)
        q = _load_tokens(qkv_ptr, pad_ptr, base + pix_m, in_m, real_m, h * HEAD_DIM, d, dm, C3, HAS_PAD)
        if KEYS_WHOLE:
            s = _logits(q, k, tm, tn, reg_m, reg_n, table_ptr, h, heads, scale,
                        WH, WW, SHIFTED, HAS_BIAS, PREC, EMULATE, FMA, ACC)
            mx = tl.max(s, axis=1)
            rmax = real_max(tl.full([BLOCK_M], float("-inf"), dtype=ACC), s, (tn < N)[None, :])
            p = tl.exp(s - mx[:, None])
            l = tl.sum(p, axis=1)
            # P in the input dtype for P @ V (as flash-attention does): unnormalized, in [0, 1]
            acc = matmul(p.to(DOT), v, PREC, EMULATE, FMA).to(ACC)
        else:
            # online softmax over key chunks (flash-attention); the running max starts at the finite
            # NEG_FILL, and every chunk holds a key of the window, so no exp(-inf - -inf)
            mx = tl.full([BLOCK_M], NEG_FILL, dtype=ACC)
            rmax = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
            l = tl.zeros([BLOCK_M], dtype=ACC)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
            for n0 in range(0, N, BLOCK_KN):
                tn = n0 + tl.arange(0, BLOCK_KN)
                pix_n, in_n, real_n, reg_n = _token_geometry(win, tn, H, W, nww, Hp, Wp, WH, WW, SH, SW)
                k = _load_tokens(qkv_ptr, pad_ptr, base + pix_n, in_n, real_n, C + h * HEAD_DIM, d, dm, C3,
                                 HAS_PAD)
                v = _load_tokens(qkv_ptr, pad_ptr, base + pix_n, in_n, real_n, 2 * C + h * HEAD_DIM, d, dm, C3,
                                 HAS_PAD)
                s = _logits(q, k, tm, tn, reg_m, reg_n, table_ptr, h, heads, scale,
                            WH, WW, SHIFTED, HAS_BIAS, PREC, EMULATE, FMA, ACC)
                mx_new = tl.maximum(mx, tl.max(s, axis=1))
                rmax = real_max(rmax, s, (tn < N)[None, :])
                alpha = tl.exp(mx - mx_new)
                p = tl.exp(s - mx_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + matmul(p.to(DOT), v, PREC, EMULATE, FMA).to(ACC)
                mx = mx_new
        o, lse = softmax_out(acc, l, mx, rmax)
        rows = base + pix_m
        tl.store(out_ptr + rows[:, None] * C + h * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=real_m[:, None] & dm[None, :])
        tl.store(lse_ptr + (b.to(tl.int64) * heads + h) * H * W + pix_m, lse, mask=real_m)


@triton.jit
def _query_chunk(qkv_ptr, pad_ptr, do_ptr, out_ptr, lse_ptr, win, tm, base, b, h, H, W, nww, Hp, Wp, heads,
                 d, dm, C, C3, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, ACC: tl.constexpr):
    """What the backward needs of a chunk of queries: q, dO (zero for padded queries, which are cropped),
    lse, D = rowsum(dO * O), real mask, region and rows."""
    pix_m, in_m, real_m, reg_m = _token_geometry(win, tm, H, W, nww, Hp, Wp, WH, WW, SH, SW)
    rows = base + pix_m
    q = _load_tokens(qkv_ptr, pad_ptr, rows, in_m, real_m, h * HEAD_DIM, d, dm, C3, HAS_PAD)
    om = real_m[:, None] & dm[None, :]
    o_off = rows[:, None] * C + h * HEAD_DIM + d[None, :]
    do = tl.load(do_ptr + o_off, mask=om, other=0.0)
    o = tl.load(out_ptr + o_off, mask=om, other=0.0)
    dsum = tl.sum(to_acc(do, ACC) * to_acc(o, ACC), axis=1)
    lse = tl.load(lse_ptr + (b.to(tl.int64) * heads + h) * H * W + pix_m, mask=real_m, other=0.0)
    return q, do, lse, dsum, real_m, reg_m, rows


@triton.jit
def _window_bwd_kernel(do_ptr, qkv_ptr, table_ptr, pad_ptr, out_ptr, lse_ptr, dqkv_ptr, dbias_ptr, dpad_ptr,
                       H, W, nww, nw, Hp, Wp, heads, scale_hi, scale_lo, stripes,
                       WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_KN: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr, FMA: tl.constexpr,
                       ACC: tl.constexpr):
    """dP = dO V^T, dS = P * (dP - D), dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K, dbias = sum dS."""
    N: tl.constexpr = WH * WW
    SHIFTED: tl.constexpr = SH > 0 or SW > 0
    KEYS_WHOLE: tl.constexpr = BLOCK_KN >= N  # one key chunk: dq is complete per query chunk
    pid = tl.program_id(0)
    h = pid % heads
    bw = pid // heads
    b = bw // nw
    win = bw - b * nw
    C = heads * HEAD_DIM
    C3 = 3 * C
    base = b.to(tl.int64) * H * W
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    gdt = dqkv_ptr.dtype.element_ty
    # dS sums go to stripe (image, window) % stripes of a [stripes, heads, N, N] buffer: fewer programs
    # contend for each address than if all added into one [heads, N, N]
    if HAS_BIAS:
        dbias_ptr += ((bw % stripes) * heads + h).to(tl.int64) * (N * N)

    for n0 in range(0, N, BLOCK_KN):
        tn = n0 + tl.arange(0, BLOCK_KN)
        pix_n, in_n, real_n, reg_n = _token_geometry(win, tn, H, W, nww, Hp, Wp, WH, WW, SH, SW)
        rows_n = base + pix_n
        k = _load_tokens(qkv_ptr, pad_ptr, rows_n, in_n, real_n, C + h * HEAD_DIM, d, dm, C3, HAS_PAD)
        v = _load_tokens(qkv_ptr, pad_ptr, rows_n, in_n, real_n, 2 * C + h * HEAD_DIM, d, dm, C3, HAS_PAD)
        dk = tl.zeros([BLOCK_KN, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_KN, BLOCK_D], dtype=ACC)
        for m0 in range(0, N, BLOCK_M):
            tm = m0 + tl.arange(0, BLOCK_M)
            q, do, lse, dsum, real_m, reg_m, rows_m = _query_chunk(
                qkv_ptr, pad_ptr, do_ptr, out_ptr, lse_ptr, win, tm, base, b, h, H, W, nww, Hp, Wp, heads,
                d, dm, C, C3, WH, WW, SH, SW, HEAD_DIM, HAS_PAD, ACC)
            s = _logits(q, k, tm, tn, reg_m, reg_n, table_ptr, h, heads, scale,
                        WH, WW, SHIFTED, HAS_BIAS, PREC, EMULATE, FMA, ACC)
            # padded / out-of-window queries have no stored lse (0 here): zero their P rather than risk
            # exp(S - 0) overflowing into inf * 0
            p = tl.where(real_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv += matmul(tl.trans(p.to(DOT)), do, PREC, EMULATE, FMA).to(ACC)
            dp = matmul(do, tl.trans(v), PREC, EMULATE, FMA).to(ACC)
            ds = p * (dp - dsum[:, None])
            dk += matmul(tl.trans(ds.to(DOT)), q, PREC, EMULATE, FMA).to(ACC)
            if HAS_BIAS:
                # within a program every (i, j) is its own address
                tl.atomic_add(dbias_ptr + tm[:, None] * N + tn[None, :], ds, mask=real_m[:, None] & in_n[None, :],
                              sem="relaxed")
            if KEYS_WHOLE:
                dq = matmul(ds.to(DOT), k, PREC, EMULATE, FMA).to(ACC) * scale
                tl.store(dqkv_ptr + rows_m[:, None] * C3 + h * HEAD_DIM + d[None, :], dq.to(gdt),
                         mask=real_m[:, None] & dm[None, :])
        dk = dk * scale
        nm = real_n[:, None] & dm[None, :]
        tl.store(dqkv_ptr + rows_n[:, None] * C3 + C + h * HEAD_DIM + d[None, :], dk.to(gdt), mask=nm)
        tl.store(dqkv_ptr + rows_n[:, None] * C3 + 2 * C + h * HEAD_DIM + d[None, :], dv.to(gdt), mask=nm)
        # padding keys all read pad_qkv: their dk / dv sum into its gradient (only windows with padding add)
        pad_n = in_n & (real_n == 0)
        any_pad = tl.sum(pad_n.to(tl.int32), axis=0) > 0
        pad = pad_n[:, None]
        tl.atomic_add(dpad_ptr + C + h * HEAD_DIM + d, tl.sum(tl.where(pad, dk, 0.0), axis=0), mask=dm & any_pad,
                      sem="relaxed")
        tl.atomic_add(dpad_ptr + 2 * C + h * HEAD_DIM + d, tl.sum(tl.where(pad, dv, 0.0), axis=0),
                      mask=dm & any_pad, sem="relaxed")

    if not KEYS_WHOLE:
        # second pass for dq: each query chunk against every key chunk, P and dS recomputed
        for m0 in range(0, N, BLOCK_M):
            tm = m0 + tl.arange(0, BLOCK_M)
            q, do, lse, dsum, real_m, reg_m, rows_m = _query_chunk(
                qkv_ptr, pad_ptr, do_ptr, out_ptr, lse_ptr, win, tm, base, b, h, H, W, nww, Hp, Wp, heads,
                d, dm, C, C3, WH, WW, SH, SW, HEAD_DIM, HAS_PAD, ACC)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
            for n0 in range(0, N, BLOCK_KN):
                tn = n0 + tl.arange(0, BLOCK_KN)
                pix_n, in_n, real_n, reg_n = _token_geometry(win, tn, H, W, nww, Hp, Wp, WH, WW, SH, SW)
                rows_n = base + pix_n
                k = _load_tokens(qkv_ptr, pad_ptr, rows_n, in_n, real_n, C + h * HEAD_DIM, d, dm, C3, HAS_PAD)
                v = _load_tokens(qkv_ptr, pad_ptr, rows_n, in_n, real_n, 2 * C + h * HEAD_DIM, d, dm, C3,
                                 HAS_PAD)
                s = _logits(q, k, tm, tn, reg_m, reg_n, table_ptr, h, heads, scale,
                            WH, WW, SHIFTED, HAS_BIAS, PREC, EMULATE, FMA, ACC)
                p = tl.where(real_m[:, None], tl.exp(s - lse[:, None]), 0.0)
                dp = matmul(do, tl.trans(v), PREC, EMULATE, FMA).to(ACC)
                ds = p * (dp - dsum[:, None])
                dq += matmul(ds.to(DOT), k, PREC, EMULATE, FMA).to(ACC)
            dq = dq * scale
            tl.store(dqkv_ptr + rows_m[:, None] * C3 + h * HEAD_DIM + d[None, :], dq.to(gdt),
                     mask=real_m[:, None] & dm[None, :])


# ---- launchers ----------------------------------------------------------------------------------------

def _tiles(n: int, head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Launch parameters (forward, backward). BLOCK_D holds a head; keys go in chunks of BLOCK_KN <= 64 and
    queries in chunks of BLOCK_M, so registers and shared memory stay bounded whatever the window (a
    window of <= 64 tokens is one key chunk unless the head is wide). Sizes chosen from offline sm_90
    compiles (ptxas spills, shared memory), not from timings: fp32 (ieee) and float64 dots lower to FMA
    loops whose operands sit in shared memory and registers, so they take small chunks."""
    bd = next_power_of_2(max(head_dim, 16))
    chunk = min(next_power_of_2(max(n, 16)), 64)
    warps = 4 if chunk * bd <= 1024 else 8
    if dtype in (torch.float16, torch.bfloat16):
        fwd = dict(BLOCK_M=chunk if bd <= 64 else min(chunk, 32), BLOCK_KN=chunk, num_stages=2)
        bwd = dict(BLOCK_M=chunk if chunk * bd <= 2048 else min(chunk, 32),
                   BLOCK_KN=chunk if bd <= 64 else min(chunk, 32), num_stages=2)
    else:
        kn = chunk if bd <= 32 else min(chunk, 32 if bd <= 64 else 16)
        fwd = bwd = dict(BLOCK_M=16, BLOCK_KN=kn, num_stages=1)
    return dict(fwd, BLOCK_D=bd, num_warps=warps), dict(bwd, BLOCK_D=bd, num_warps=warps)


def _geometry(qkv: torch.Tensor, num_heads: int, window, shift):
    B, H, W, C3 = qkv.shape
    wh, ww = int(window[0]), int(window[1])
    nwh, nww = cdiv(H, wh), cdiv(W, ww)
    return dict(B=B, H=H, W=W, C=C3 // 3, head_dim=C3 // (3 * num_heads), wh=wh, ww=ww,
                sh=int(shift[0]), sw=int(shift[1]), nwh=nwh, nww=nww, Hp=nwh * wh, Wp=nww * ww)


def window_attention(qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None,
                     num_heads: int, window: list[int], shift: list[int], scale: float):
    """Returns (out [B, H, W, C], lse [B, heads, H, W]) as effvit::window_attention."""
    with on_device(qkv):
        return _window_attention(qkv, bias_table, pad_qkv, num_heads, window, shift, scale)


def _window_attention(qkv, bias_table, pad_qkv, num_heads, window, shift, scale):
    g = _geometry(qkv, num_heads, window, shift)
    acc_tl, acc_torch = acc_dtypes(qkv.dtype)
    out = qkv.new_empty((g["B"], g["H"], g["W"], g["C"]))
    lse = qkv.new_empty((g["B"], num_heads, g["H"], g["W"]), dtype=acc_torch)
    if out.numel() == 0:
        return out, lse
    qkv = qkv.contiguous()
    table = bias_table.to(acc_torch).contiguous() if bias_table is not None else None
    pad = pad_qkv.to(qkv.dtype).contiguous() if pad_qkv is not None else None
    tiles, _ = _tiles(g["wh"] * g["ww"], g["head_dim"], qkv.dtype)
    nw = g["nwh"] * g["nww"]
    hi, lo = split_scale(scale)
    _window_fwd_kernel[(g["B"] * nw * num_heads,)](
        qkv, table if table is not None else qkv, pad if pad is not None else qkv, out, lse,
        g["H"], g["W"], g["nww"], nw, g["Hp"], g["Wp"], num_heads, hi, lo,
        WH=g["wh"], WW=g["ww"], SH=g["sh"], SW=g["sw"], HEAD_DIM=g["head_dim"],
        HAS_BIAS=table is not None, HAS_PAD=pad is not None,
        **tiles, **dot_config(qkv.dtype, qkv.is_cuda), ACC=acc_tl)
    return out, lse


def window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor | None,
                              pad_qkv: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                              num_heads: int, window: list[int], shift: list[int], scale: float):
    """Returns (grad_qkv, grad_bias_table, grad_pad_qkv) as effvit::window_attention_backward."""
    with on_device(qkv):
        return _window_attention_backward(grad_out, qkv, bias_table, pad_qkv, out, lse, num_heads, window,
                                          shift, scale)


def _relative_position_index(wh: int, ww: int, device) -> torch.Tensor:
    """[N * N] bias-table row of each (query i, key j), as window_geometry.h's bias_row."""
    i = torch.arange(wh * ww, device=device)
    yi, xi = i // ww, i % ww
    return ((yi[:, None] - yi[None, :] + wh - 1) * (2 * ww - 1) + (xi[:, None] - xi[None, :] + ww - 1)).view(-1)


def _window_attention_backward(grad_out, qkv, bias_table, pad_qkv, out, lse, num_heads, window, shift, scale):
    g = _geometry(qkv, num_heads, window, shift)
    acc_tl, acc_torch = acc_dtypes(qkv.dtype)
    n = g["wh"] * g["ww"]
    rows = (2 * g["wh"] - 1) * (2 * g["ww"] - 1)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    grad_pad = torch.zeros((3 * g["C"],), dtype=acc_torch, device=qkv.device)
    has_bias = bias_table is not None
    nw = g["nwh"] * g["nww"]
    # stripes of the dS-sum buffer (see the kernel), at most ~4M values in all
    stripes = max(1, min(g["B"] * nw, 32, (1 << 22) // max(1, num_heads * n * n)))
    dbias = torch.zeros((stripes, num_heads, n, n) if has_bias else (0,), dtype=acc_torch, device=qkv.device)
    if grad_qkv.numel() == 0:
        grad_table = (torch.zeros((rows, num_heads), dtype=acc_torch, device=qkv.device) if has_bias
                      else qkv.new_empty((0,), dtype=acc_torch))
        return grad_qkv, grad_table, grad_pad
    qkv = qkv.contiguous()
    table = bias_table.to(acc_torch).contiguous() if has_bias else None
    pad = pad_qkv.to(qkv.dtype).contiguous() if pad_qkv is not None else None
    _, tiles = _tiles(n, g["head_dim"], qkv.dtype)
    hi, lo = split_scale(scale)
    _window_bwd_kernel[(g["B"] * nw * num_heads,)](
        grad_out.to(qkv.dtype).contiguous(), qkv, table if has_bias else qkv, pad if pad is not None else qkv,
        out.to(qkv.dtype).contiguous(), lse.to(acc_torch).contiguous(), grad_qkv, dbias, grad_pad,
        g["H"], g["W"], g["nww"], nw, g["Hp"], g["Wp"], num_heads, hi, lo, stripes,
        WH=g["wh"], WW=g["ww"], SH=g["sh"], SW=g["sw"], HEAD_DIM=g["head_dim"],
        HAS_BIAS=has_bias, HAS_PAD=pad is not None,
        **tiles, **dot_config(qkv.dtype, qkv.is_cuda), ACC=acc_tl)
    if has_bias:
        # fold the per-(i, j) sums into table rows: [N * N, heads] -> [(2wh-1)(2ww-1), heads]
        grad_table = torch.zeros((rows, num_heads), dtype=acc_torch, device=qkv.device)
        grad_table.index_add_(0, _relative_position_index(g["wh"], g["ww"], qkv.device),
                              dbias.sum(0).view(num_heads, n * n).t())
    else:
        grad_table = qkv.new_empty((0,), dtype=acc_torch)
    return grad_qkv, grad_table, grad_pad
