"""LITv2 HiLo's Lo-Fi attention: Triton forward and backward kernels and their launchers.

Every query attends to every (pooled) key, per head, the scale applied after the product as LITv2 does
((q @ k^T) * scale):

  out[b, n, h*D:(h+1)*D] = softmax_j((q[b, n, h] . k[b, j, h]) * scale) @ v[b, :, h]

  q        [B, N, heads * D]        any float dtype; rows may be strided (a channel slice of a wider tensor)
  kv       [B, M, 2 * heads * D]    q's dtype; channels (2, heads, D) as LITv2's l_kv Linear lays them out:
                                    k of head h at h*D, v at heads*D + h*D; rows may be strided
  out      [B, N, heads * D]        q's dtype, contiguous
  lse      [B, heads, N]            accumulation dtype (float32; float64 for float64 q): log-sum-exp of each
                                    query's logits (q . k) * scale
  grad_q   [B, N, heads * D]        q's dtype, contiguous
  grad_kv  [B, M, 2 * heads * D]    q's dtype, contiguous (grad_k in the first half of channels, grad_v after)

Flash-attention style, no N x M tensor in memory. Forward: one program per (b, head, BLOCK_M queries),
walking keys in BLOCK_N chunks with the online softmax. Backward, recomputing P from lse: a dq kernel, one
program per (b, head, BLOCK_M queries) walking key chunks, whose prologue also writes
delta_i = sum_d dO[i, d] * O[i, d] for its queries; then a dk / dv kernel, one program per (b, head, BLOCK_N
keys) walking query chunks. Every output element is written by exactly one program: no atomics, results
are deterministic. Programs are numbered with the chunk index fastest, so the programs of one (b, head)
run together and share its k / v (or q / dO) in L2.

Matmuls go through common.py's ``matmul``, as window.py's do: tl.dot in the input dtype with fp32
accumulation for fp16/bf16 (P and dS cast to the input dtype first, as flash-attention does),
input_precision="ieee" for fp32 (TF32 would miss 1e-4) and float64 (common.FP64_TL_DOT = False selects a
broadcast-multiply-sum instead, should a GPU's tl.dot reject float64). They run on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (there bf16 matmuls are done in fp32 on bf16-rounded operands, the
interpreter having no bf16 dot).

Indexing: each program's base offsets (batch, and (b, head) rows of lse / delta) are 64-bit; offsets
within one sample (token * row stride + channel) are 32-bit, so one sample of q / kv / out must span
fewer than 2**31 elements (the whole tensors need not).

The launchers take and return logical tensors (fresh outputs, inputs never written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effvit.triton_kernels.common import (NEG_FILL, acc_dtypes, acc_scale, cdiv, dot_config, matmul, next_power_of_2,
                                          on_device, real_max, softmax_out, split_scale, to_acc)

# lse read for queries past N: exp(S - LSE_FILL) underflows to 0, so those rows of P (and dS) vanish
# without a where; finite, so no inf - inf
LSE_FILL = tl.constexpr(1.0e30)


@triton.jit
def _lofi_fwd_kernel(q_ptr, kv_ptr, out_ptr, lse_ptr,
                     N, M, heads, q_sb, q_sn, kv_sb, kv_sn, scale_hi, scale_lo,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
                     FMA: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK_M)
    bh = pid // nblk
    blk = pid - bh * nblk
    b = bh // heads
    h = bh - b * heads
    C = heads * HEAD_DIM
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    rm = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < N

    q_ptr += b.to(tl.int64) * q_sb + h * HEAD_DIM
    k_ptr = kv_ptr + b.to(tl.int64) * kv_sb + h * HEAD_DIM
    v_ptr = k_ptr + C
    q = tl.load(q_ptr + rm[:, None] * q_sn + d[None, :], mask=mm[:, None] & dm[None, :], other=0.0)

    # online softmax over key chunks (flash-attention); the running max starts at the finite NEG_FILL and
    # every chunk holds at least one key (n0 < M), so no exp(-inf - -inf)
    mx = tl.full([BLOCK_M], NEG_FILL, dtype=ACC)
    rmax = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < M
        kvm = nm[:, None] & dm[None, :]
        k = tl.load(k_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)
        v = tl.load(v_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)
        s = matmul(q, tl.trans(k), PREC, EMULATE, FMA).to(ACC) * scale
        s = tl.where(nm[None, :], s, NEG_FILL)
        mx_new = tl.maximum(mx, tl.max(s, axis=1))
        rmax = real_max(rmax, s, nm[None, :])
        alpha = tl.exp(mx - mx_new)
        p = tl.exp(s - mx_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # P in the input dtype for P @ V (as flash-attention does): unnormalized, in [0, 1]
        acc = acc * alpha[:, None] + matmul(p.to(DOT), v, PREC, EMULATE, FMA).to(ACC)
        mx = mx_new

    o, lse = softmax_out(acc, l, mx, rmax)
    out_rows = b.to(tl.int64) * N * C + h * HEAD_DIM
    tl.store(out_ptr + out_rows + rm[:, None] * C + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & dm[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rm, lse, mask=mm)


@triton.jit
def _lofi_bwd_dq_kernel(do_ptr, q_ptr, kv_ptr, out_ptr, lse_ptr, delta_ptr, dq_ptr,
                        N, M, heads, q_sb, q_sn, kv_sb, kv_sn, scale_hi, scale_lo,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
                        FMA: tl.constexpr, ACC: tl.constexpr):
    """delta = rowsum(dO * O) (stored for the dk / dv kernel); dP = dO V^T, dS = P * (dP - delta),
    dQ = scale dS K."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK_M)
    bh = pid // nblk
    blk = pid - bh * nblk
    b = bh // heads
    h = bh - b * heads
    C = heads * HEAD_DIM
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    rm = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < N
    qm = mm[:, None] & dm[None, :]

    q_ptr += b.to(tl.int64) * q_sb + h * HEAD_DIM
    k_ptr = kv_ptr + b.to(tl.int64) * kv_sb + h * HEAD_DIM
    v_ptr = k_ptr + C
    o_off = b.to(tl.int64) * N * C + h * HEAD_DIM + rm[:, None] * C + d[None, :]  # out, grad_out, grad_q
    q = tl.load(q_ptr + rm[:, None] * q_sn + d[None, :], mask=qm, other=0.0)
    do = tl.load(do_ptr + o_off, mask=qm, other=0.0)
    o = tl.load(out_ptr + o_off, mask=qm, other=0.0)
    delta = tl.sum(to_acc(do, ACC) * to_acc(o, ACC), axis=1)
    lse_off = bh.to(tl.int64) * N + rm
    tl.store(delta_ptr + lse_off, delta, mask=mm)
    lse = tl.load(lse_ptr + lse_off, mask=mm, other=LSE_FILL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < M
        kvm = nm[:, None] & dm[None, :]
        k = tl.load(k_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)
        v = tl.load(v_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)
        s = matmul(q, tl.trans(k), PREC, EMULATE, FMA).to(ACC) * scale
        # keys past M: P = exp(NEG_FILL - lse) = 0 (their v is 0, so dP is too: dS = 0)
        p = tl.exp(tl.where(nm[None, :], s, NEG_FILL) - lse[:, None])
        dp = matmul(do, tl.trans(v), PREC, EMULATE, FMA).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += matmul(ds.to(DOT), k, PREC, EMULATE, FMA).to(ACC)
    dq = dq * scale
    tl.store(dq_ptr + o_off, dq.to(dq_ptr.dtype.element_ty), mask=qm)


@triton.jit
def _lofi_bwd_dkdv_kernel(do_ptr, q_ptr, kv_ptr, lse_ptr, delta_ptr, dkv_ptr,
                          N, M, heads, q_sb, q_sn, kv_sb, kv_sn, scale_hi, scale_lo,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
                          FMA: tl.constexpr, ACC: tl.constexpr):
    """Transposed (keys as rows): S^T = K Q^T scale, P^T = exp(S^T - lse), dV = P^T dO,
    dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK = scale dS^T Q."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(M, BLOCK_N)
    bh = pid // nblk
    blk = pid - bh * nblk
    b = bh // heads
    h = bh - b * heads
    C = heads * HEAD_DIM
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < M
    kvm = nm[:, None] & dm[None, :]

    q_ptr += b.to(tl.int64) * q_sb + h * HEAD_DIM
    do_ptr += b.to(tl.int64) * N * C + h * HEAD_DIM
    k_ptr = kv_ptr + b.to(tl.int64) * kv_sb + h * HEAD_DIM
    v_ptr = k_ptr + C
    lse_ptr += bh.to(tl.int64) * N
    delta_ptr += bh.to(tl.int64) * N
    k = tl.load(k_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)
    v = tl.load(v_ptr + rn[:, None] * kv_sn + d[None, :], mask=kvm, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for m0 in range(0, N, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < N
        qm = mm[:, None] & dm[None, :]
        q = tl.load(q_ptr + rm[:, None] * q_sn + d[None, :], mask=qm, other=0.0)
        do = tl.load(do_ptr + rm[:, None] * C + d[None, :], mask=qm, other=0.0)
        # queries past N: lse = LSE_FILL zeroes their columns of P^T (and their dO is 0)
        lse = tl.load(lse_ptr + rm, mask=mm, other=LSE_FILL)
        delta = tl.load(delta_ptr + rm, mask=mm, other=0.0)
        st = matmul(k, tl.trans(q), PREC, EMULATE, FMA).to(ACC) * scale
        # keys past M (k = 0, S = 0) would get P = exp(-lse), inf where lse < -88: only in their own
        # unstored rows of dV / dK, but NEG_FILL keeps every value finite
        pt = tl.exp(tl.where(nm[:, None], st, NEG_FILL) - lse[None, :])
        dv += matmul(pt.to(DOT), do, PREC, EMULATE, FMA).to(ACC)
        dpt = matmul(v, tl.trans(do), PREC, EMULATE, FMA).to(ACC)
        dst = pt * (dpt - delta[None, :])
        dk += matmul(dst.to(DOT), q, PREC, EMULATE, FMA).to(ACC)
    dk = dk * scale

    gdt = dkv_ptr.dtype.element_ty
    g_off = b.to(tl.int64) * M * (2 * C) + h * HEAD_DIM + rn[:, None] * (2 * C) + d[None, :]
    tl.store(dkv_ptr + g_off, dk.to(gdt), mask=kvm)
    tl.store(dkv_ptr + g_off + C, dv.to(gdt), mask=kvm)


# ---- launchers ----------------------------------------------------------------------------------------


def _tiles(n: int, m: int, head_dim: int, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """Launch parameters (forward, backward dq, backward dk / dv) for n queries and m keys. BLOCK_D holds a
    head (a power of two >= 16, tl.dot's minimum; channels past head_dim are masked); BLOCK_M counts
    queries, BLOCK_N keys, each shrunk to the problem (>= 16) so that small stages (N = M = 49) do not
    compute mostly masked tiles. Sizes chosen from offline sm_90 compiles (ptxas registers and spills,
    shared memory: every choice compiles without spilling), not from timings:
    fp16 / bf16 run on tensor cores with flash-attention's tiles: 128 queries x 64 keys forward; 64 x 64
    for the backward's kernels, which hold two fp32 accumulators besides their operands, and at
    head_dim > 64 narrower (32 queries per dq program, 32 keys per dk / dv program) so they do not spill.
    8 warps from head_dim > 32 (at 4 warps the 64-wide tiles reach 255 registers and spill).
    fp32 (ieee) and float64 dots lower to FMA loops whose operands sit in shared memory and registers, so
    they take small tiles, as window.py's do."""
    bd = next_power_of_2(max(head_dim, 16))
    bm = lambda cap: min(cap, next_power_of_2(max(n, 16)))  # noqa: E731
    bn = lambda cap: min(cap, next_power_of_2(max(m, 16)))  # noqa: E731
    warps = 4 if bd <= 32 else 8
    if dtype in (torch.float16, torch.bfloat16):
        wide = bd > 64
        fwd = dict(BLOCK_M=bm(128), BLOCK_N=bn(64), num_stages=2 if wide else 3)
        dq = dict(BLOCK_M=bm(32 if wide else 64), BLOCK_N=bn(64), num_stages=2)
        dkdv = dict(BLOCK_M=bm(64), BLOCK_N=bn(32 if wide else 64), num_stages=2)
    else:
        side = 32 if bd <= 64 else 16
        fwd = dq = dkdv = dict(BLOCK_M=bm(side), BLOCK_N=bn(side), num_stages=1)
        if bd > 64 and dtype == torch.float32:
            dkdv = dict(dkdv, BLOCK_M=bm(32))  # 16 x 16 spills a little there
    return tuple(dict(t, BLOCK_D=bd, num_warps=warps) for t in (fwd, dq, dkdv))


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (pointer arithmetic takes stride(0), stride(1)); channels must be adjacent."""
    return t if t.stride(2) == 1 else t.contiguous()


def lofi_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float):
    """Returns (out [B, N, C], lse [B, heads, N]) of Lo-Fi attention (see the module docstring)."""
    with on_device(q):
        return _lofi_attention(q, kv, num_heads, scale)


def _lofi_attention(q, kv, num_heads, scale):
    B, N, C = q.shape
    M = kv.shape[1]
    head_dim = C // num_heads
    acc_tl, acc_torch = acc_dtypes(q.dtype)
    out = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, num_heads, N), dtype=acc_torch, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, kv = _channels_contiguous(q), _channels_contiguous(kv)
    tiles, _, _ = _tiles(N, M, head_dim, q.dtype)
    hi, lo = split_scale(scale)
    _lofi_fwd_kernel[(B * num_heads * cdiv(N, tiles["BLOCK_M"]),)](
        q, kv, out, lse, N, M, num_heads, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), hi, lo,
        HEAD_DIM=head_dim, **tiles, **dot_config(q.dtype, q.is_cuda), ACC=acc_tl)
    return out, lse


def lofi_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, num_heads: int, scale: float):
    """Returns (grad_q [B, N, C], grad_kv [B, M, 2C]) of Lo-Fi attention, P recomputed from lse."""
    with on_device(q):
        return _lofi_attention_backward(grad_out, q, kv, out, lse, num_heads, scale)


def _lofi_attention_backward(grad_out, q, kv, out, lse, num_heads, scale):
    B, N, C = q.shape
    M = kv.shape[1]
    head_dim = C // num_heads
    acc_tl, acc_torch = acc_dtypes(q.dtype)
    grad_q = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    if grad_q.numel() == 0:
        # no queries: k and v received no gradient (zeros, not left unwritten, when N = 0 < M)
        return grad_q, torch.zeros((B, M, 2 * C), dtype=q.dtype, device=q.device)
    grad_kv = torch.empty((B, M, 2 * C), dtype=q.dtype, device=q.device)
    delta = torch.empty((B, num_heads, N), dtype=acc_torch, device=q.device)
    q, kv = _channels_contiguous(q), _channels_contiguous(kv)
    grad_out = grad_out.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    lse = lse.to(acc_torch).contiguous()
    _, dq_tiles, dkdv_tiles = _tiles(N, M, head_dim, q.dtype)
    hi, lo = split_scale(scale)
    common = (N, M, num_heads, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), hi, lo)
    consts = dict(HEAD_DIM=head_dim, **dot_config(q.dtype, q.is_cuda), ACC=acc_tl)
    # the dq kernel writes delta, which the dk / dv kernel reads (same stream: in order)
    _lofi_bwd_dq_kernel[(B * num_heads * cdiv(N, dq_tiles["BLOCK_M"]),)](
        grad_out, q, kv, out, lse, delta, grad_q, *common, **dq_tiles, **consts)
    _lofi_bwd_dkdv_kernel[(B * num_heads * cdiv(M, dkdv_tiles["BLOCK_N"]),)](
        grad_out, q, kv, lse, delta, grad_kv, *common, **dkdv_tiles, **consts)
    return grad_q, grad_kv
