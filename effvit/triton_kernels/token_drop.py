"""EViT token dropping: Triton kernels of the CLS attention scores and of the top-k token gather, forward and
backward, and their launchers.

  q        [B, H, D]        the CLS query row, fp16 / bf16 / fp32 / fp64, any strides
  k        [B, H, N, D]     q's dtype, any strides (a permuted (B, N, H, D) view is read in place)
  scores   [B, N - P]       accumulation dtype (float32; float64 for float64 q), contiguous:
                            scores[b, j - P] = mean_h softmax_j(scale * q[b, h] . k[b, h, j]) for j >= P
  lse      [B, H]           accumulation dtype: log-sum-exp over all N keys of each head's CLS logits
  x        [B, N, C]        any float dtype, any strides (a slice of a wider tensor is read in place)
  out      [B, P + K + F, C] x's dtype, contiguous: P prefix rows, the K kept rows, with fuse (F = 1) the
                            row sum_{j dropped} scores[j] * x[P + j] (summed in x's accumulation dtype)
  index    [B, K]           int64: the kept rows' positions among the N - P scored tokens, by descending
                            score (ties: lower position first) or, with spatial_order, ascending

Scores (``cls_attention_scores``): q . k is one row per head (a matrix-vector product), so the kernels
multiply and sum over a [BLOCK_N keys, BLOCK_D] tile in the accumulation dtype (exact fp32 products for
16-bit inputs, no tl.dot: nothing to gain on tensor cores with a single query). _cls_logits_kernel, one
program per (b, h), walks the keys in BLOCK_N blocks with an online max / sum (torch.logsumexp's rule for
infinite logits), writes the scaled logits of the scored keys to a [B, H, N - P] workspace, lse, and the
running max and sum to a [B, H, 2] one; _cls_mean_kernel, one program per (b, BLOCK_M scored keys), sums
exp(logit - max) / sum over the heads in order and divides by H. Backward (P recomputed from lse,
g_j = grad_scores[j - P] / H, 0 for prefix keys, delta = sum_j p_j g_j, ds_j = p_j (g_j - delta)):
_cls_bwd_q_kernel, one program per (b, h), reads k once, writing p to a [B, H, N] workspace and delta, and
gets grad_q = scale (sum_j p_j g_j k_j - delta sum_j p_j k_j) from its two running sums (so no second pass
over k); _cls_bwd_k_kernel, one program per (b, h, BLOCK_N keys), writes grad_k_j = scale ds_j q from p,
without reading k. The tiles hold a whole head (BLOCK_D = next power of two of D); BLOCK_N shrinks as
heads widen so that a tile stays at 4096 values (2048 in float64).

Dropping (``drop_tokens``): _rank_kernel, one program per (b, BLOCK_J scored tokens), gives each token its
rank #{i : s_i > s_j or (s_i == s_j and i < j)} by comparing its block with every BLOCK_I block of the
image (a [BLOCK_J, BLOCK_I] tile; O((N - P)^2) compares, no sort, no host synchronisation). Scores are
compared through an integer key of their bits with the float order (-0 == +0; NaN below -inf: NaN scores
are dropped first, as the CPU and CUDA kernels do), so the ranks are a permutation and every index slot is
written exactly once.
It writes slot[b, j] = rank_j if rank_j < K else -1 to a [B, N - P] int32 workspace and, in score order,
index[b, rank_j] = j. _drop_kernel, one program per (b, chunk of tokens, BLOCK_C channels), walks its
chunk in BLOCK_R-row blocks: it copies the kept rows to their output rows (a scatter store: every output
row has one source), with spatial_order numbering them by a running count of kept rows (tl.cumsum per
block, the count of kept rows before the chunk read from the slots first; the channel-block-0 programs
also write index), and sums the dropped rows weighted by their scores in the accumulation dtype; the
chunk-0 programs copy the prefix rows. The tokens are split into chunks only when B * channel blocks
would leave the GPU short of programs (``_chunking``; each chunk at least MIN_CHUNK_BLOCKS row blocks);
then each chunk writes its partial fused row to a [B, chunks, C] workspace, which torch sums (a fixed
order). Backward: _inverse_index_kernel scatters src[b, index[b, i]] = i into a -1-filled [B, N - P] int32
workspace; _drop_bwd_kernel, one program per (b, BLOCK_R rows of x), walks the channels in BLOCK_C blocks:
prefix and kept rows take their grad_out row, dropped rows scores[j] * grad_out[P + K] (with fuse, else
0); with fuse a second walk gives grad_scores[j] = x[P + j] . grad_out[P + K] for dropped j (reading only
the dropped rows of x; 0 otherwise), converted to 16-bit scores through fp32 as torch converts float64.
Every output element is written by exactly one program: no atomics, the results are deterministic.
Tile sizes (``_cls_tiles``, ``_rank_tiles``, ``_drop_tiles``) were chosen from offline sm_90 compiles
(ptxas registers and spills, none spilling), not from timings.

float64: accumulation in float64 throughout (the scale reaches the kernels as an fp32 hi + lo split,
common.py's split_scale / acc_scale); float64 scores rank by 64-bit keys. bf16 loads go to fp32 through
common.py's to_acc (the interpreter has no bf16 arithmetic). No matmul is done, so common.FP64_TL_DOT
does not apply.

Indexing: each program's base offsets (sample b, or (b, h)) are 64-bit; offsets within one sample
(token * token stride + channel * channel stride) are 32-bit, so one sample of x / grad_out, one (b, h)
slice of k, must span fewer than 2**31 elements (the whole tensors need not).

The launchers take and return logical tensors (fresh outputs, inputs never written); argument checks
happen before them (effvit/ops/token_drop.py, csrc/common/token_drop_checks.h).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from effvit.triton_kernels.common import (acc_dtypes, acc_scale, cdiv, next_power_of_2, on_device, sm_count,
                                          split_scale, to_acc)

MIN_CHUNK_BLOCKS = 8   # a token chunk of _drop_kernel spans at least this many BLOCK_R-row blocks
COUNT_BLOCK = 512      # slots read per step when counting the kept rows before a chunk (spatial order)


# ---- CLS attention scores ---------------------------------------------------------------------------


@triton.jit
def _load_q(q_ptr, b, h, q_sb, q_sh, q_sd, d, dm, ACC: tl.constexpr):
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + h.to(tl.int64) * q_sh + d * q_sd, mask=dm, other=0.0)
    return to_acc(q, ACC)


@triton.jit
def _cls_logits(k_ptr, q, rn, nm, k_sn, kd, dm, scale, ACC: tl.constexpr):
    """scale * (q . k_j) of keys rn (k_ptr at the (b, h) slice, kd the channel offsets) and the k tile."""
    kt = tl.load(k_ptr + (rn * k_sn)[:, None] + kd[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
    kt = to_acc(kt, ACC)
    return tl.sum(kt * q[None, :], axis=1) * scale, kt


@triton.jit
def _cls_logits_kernel(q_ptr, k_ptr, logit_ptr, stat_ptr, lse_ptr, N, H, P,
                       q_sb, q_sh, q_sd, k_sb, k_sh, k_sn, k_sd, scale_hi, scale_lo,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """logit[bh, j - P] = scale q . k_j for j >= P; lse[bh] over all N keys (online max / sum), and
    stat[bh] = (shift, sum_j exp(logit_j - shift)) for the probabilities."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh - b * H
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = _load_q(q_ptr, b, h, q_sb, q_sh, q_sd, d, dm, ACC)
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    kd = d * k_sd
    logit_ptr += bh.to(tl.int64) * (N - P)

    # online log-sum-exp, sums taken relative to the running max or, while that is +-inf, to 0
    # (torch.logsumexp's rule: every logit -inf gives lse = -inf, one +inf gives +inf, never nan)
    mx = tl.full([], float("-inf"), ACC)
    shift = tl.zeros([], ACC)
    l = tl.zeros([], ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < N
        s, _ = _cls_logits(k_ptr, q, rn, nm, k_sn, kd, dm, scale, ACC)
        tl.store(logit_ptr + (rn - P), s, mask=nm & (rn >= P))
        mx = tl.maximum(mx, tl.max(tl.where(nm, s, float("-inf")), axis=0))
        shift_new = tl.where((mx == float("inf")) | (mx == float("-inf")), 0.0, mx)
        l = tl.where(l == 0, 0.0, l * tl.exp(shift - shift_new))   # l = 0: no 0 * inf
        l += tl.sum(tl.where(nm, tl.exp(s - shift_new), 0.0), axis=0)
        shift = shift_new
    tl.store(lse_ptr + bh, shift + tl.log(l))
    tl.store(stat_ptr + 2 * bh, shift)
    # a +inf logit makes the softmax itself nan (exp(inf - inf)), as torch's: every probability of the row
    tl.store(stat_ptr + 2 * bh + 1, tl.where(mx == float("inf"), float("nan"), l))


@triton.jit
def _cls_mean_kernel(logit_ptr, stat_ptr, scores_ptr, M, H, BLOCK_M: tl.constexpr):
    """scores[b, j] = sum_h exp(logit[b, h, j] - shift[b, h]) / l[b, h] / H, the heads summed in order
    (the softmax as torch takes it, relative to the max: exp(logit - lse) would lose the probabilities of
    logits so large that lse = max + log(l) rounds to max)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    jm = j < M
    acc = tl.zeros([BLOCK_M], dtype=scores_ptr.dtype.element_ty)
    for h in range(0, H):
        row = b * H + h
        shift = tl.load(stat_ptr + 2 * row)
        l = tl.load(stat_ptr + 2 * row + 1)
        acc += tl.exp(tl.load(logit_ptr + row * M + j, mask=jm, other=0.0) - shift) / l
    tl.store(scores_ptr + b * M + j, acc / H, mask=jm)


@triton.jit
def _load_g(gs_ptr, b, rn, nm, P, H, gs_sb, gs_sm, ACC: tl.constexpr):
    """g_j = grad_scores[b, j - P] / H for the keys rn (0 for prefix keys and past N)."""
    g = tl.load(gs_ptr + b.to(tl.int64) * gs_sb + (rn - P) * gs_sm, mask=nm & (rn >= P),
                other=0.0)
    return to_acc(g, ACC) / H


@triton.jit
def _cls_bwd_q_kernel(gs_ptr, q_ptr, k_ptr, lse_ptr, p_ptr, delta_ptr, dq_ptr, N, H, P, gs_sb, gs_sm,
                      q_sb, q_sh, q_sd, k_sb, k_sh, k_sn, k_sd, scale_hi, scale_lo,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """p[bh, j] = exp(scale q . k_j - lse), delta[bh] = sum_j p_j g_j,
    grad_q = scale (sum_j p_j g_j k_j - delta sum_j p_j k_j) = scale sum_j p_j (g_j - delta) k_j."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh - b * H
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = _load_q(q_ptr, b, h, q_sb, q_sh, q_sd, d, dm, ACC)
    lse = tl.load(lse_ptr + bh)
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    kd = d * k_sd
    p_ptr += bh.to(tl.int64) * N

    delta = tl.zeros([], ACC)
    pgk = tl.zeros([BLOCK_D], ACC)
    pk = tl.zeros([BLOCK_D], ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < N
        s, kt = _cls_logits(k_ptr, q, rn, nm, k_sn, kd, dm, scale, ACC)
        p = tl.where(nm, tl.exp(s - lse), 0.0)   # keys past N: 0 (whatever lse is)
        tl.store(p_ptr + rn, p, mask=nm)
        pg = p * _load_g(gs_ptr, b, rn, nm, P, H, gs_sb, gs_sm, ACC)
        delta += tl.sum(pg, axis=0)
        pgk += tl.sum(pg[:, None] * kt, axis=0)
        pk += tl.sum(p[:, None] * kt, axis=0)
    dq = (pgk - delta * pk) * scale
    tl.store(dq_ptr + bh.to(tl.int64) * D + d, dq.to(dq_ptr.dtype.element_ty), mask=dm)
    tl.store(delta_ptr + bh, delta)


@triton.jit
def _cls_bwd_k_kernel(gs_ptr, q_ptr, p_ptr, delta_ptr, dk_ptr, N, H, P, gs_sb, gs_sm, q_sb, q_sh, q_sd,
                      scale_hi, scale_lo,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """grad_k_j = scale p_j (g_j - delta) q."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh - b * H
    scale = acc_scale(scale_hi, scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    q = _load_q(q_ptr, b, h, q_sb, q_sh, q_sd, d, dm, ACC)
    delta = tl.load(delta_ptr + bh)
    p = tl.load(p_ptr + bh.to(tl.int64) * N + rn, mask=nm, other=0.0)
    ds = p * (_load_g(gs_ptr, b, rn, nm, P, H, gs_sb, gs_sm, ACC) - delta) * scale
    dk = ds[:, None] * q[None, :]
    dk_ptr += bh.to(tl.int64) * N * D
    tl.store(dk_ptr + (rn * D)[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=nm[:, None] & dm[None, :])


# ---- token dropping ---------------------------------------------------------------------------------


_KEY32_NAN = tl.constexpr(-2**31)   # the smallest key: below -inf's
_KEY64_NAN = tl.constexpr(-2**63)


@triton.jit
def _order_key(s):
    """A signed integer with the order of the float s (fp32 or fp64): -0 == +0 (they tie, as in torch's
    comparisons), NaN below every number, -inf included (NaN scores are dropped first, as the CPU and CUDA
    kernels do)."""
    if s.dtype == tl.float64:
        bits = s.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)   # negative floats: magnitude order flipped
        key = tl.where(s == 0, 0, key)
        key = tl.where(s != s, _KEY64_NAN, key)
    else:
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(s == 0, 0, key)
        key = tl.where(s != s, _KEY32_NAN, key)
    return key


@triton.jit
def _load_keys(s_ptr, j, jm, s_sm, SACC: tl.constexpr):
    return _order_key(to_acc(tl.load(s_ptr + j * s_sm, mask=jm, other=0.0), SACC))


@triton.jit
def _rank_kernel(s_ptr, slot_ptr, index_ptr, M, K, s_sb, s_sm,
                 BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, SPATIAL: tl.constexpr, SACC: tl.constexpr):
    """rank_j = #{i : s_i > s_j or (s_i == s_j and i < j)}; slot[b, j] = rank_j < K ? rank_j : -1;
    in score order index[b, rank_j] = j for the kept j."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < M
    s_ptr += b * s_sb
    kj = _load_keys(s_ptr, j, jm, s_sm, SACC)
    rank = tl.zeros([BLOCK_J], dtype=tl.int32)
    for i0 in range(0, M, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        im = i < M
        ki = _load_keys(s_ptr, i, im, s_sm, SACC)
        ahead = (ki[None, :] > kj[:, None]) | ((ki[None, :] == kj[:, None]) & (i[None, :] < j[:, None]))
        rank += tl.sum((ahead & im[None, :]).to(tl.int32), axis=1)
    kept = jm & (rank < K)
    tl.store(slot_ptr + b * M + j, tl.where(kept, rank, -1), mask=jm)
    if not SPATIAL:
        tl.store(index_ptr + b * K + rank, j.to(tl.int64), mask=kept)


@triton.jit
def _drop_kernel(x_ptr, s_ptr, slot_ptr, out_ptr, index_ptr, part_ptr, M, C, P, K, rows_out, chunk_len,
                 x_sb, x_sn, x_sc, s_sb, s_sm,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COUNT_BLOCK: tl.constexpr,
                 FUSE: tl.constexpr, SPATIAL: tl.constexpr, CHUNKED: tl.constexpr, ACC: tl.constexpr):
    """Copies the prefix (chunk 0) and the chunk's kept rows of sample b, channels of block cb, to out; sums
    the dropped rows weighted by their scores (to out's fused row, or the chunk's partial row)."""
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    cb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    xc = c * x_sc
    x_ptr += b * x_sb
    out_ptr += b * rows_out * C
    slot_ptr += b * M
    odt = out_ptr.dtype.element_ty

    if ch == 0:
        for r0 in range(0, P, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r < P)[:, None] & cm[None, :]
            v = tl.load(x_ptr + (r * x_sn)[:, None] + xc[None, :], mask=m, other=0.0)
            tl.store(out_ptr + (r * C)[:, None] + c[None, :], v.to(odt), mask=m)

    start = ch * chunk_len
    end = tl.minimum(start + chunk_len, M)
    if SPATIAL:   # kept rows before the chunk: its first output row
        carry = tl.zeros([], tl.int32)
        for i0 in range(0, start, COUNT_BLOCK):
            i = i0 + tl.arange(0, COUNT_BLOCK)
            sl = tl.load(slot_ptr + i, mask=i < start, other=-1)
            carry += tl.sum((sl >= 0).to(tl.int32), axis=0)
    if FUSE:
        acc = tl.zeros([BLOCK_C], dtype=ACC)
        s_ptr += b * s_sb
    for j0 in range(start, end, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        jm = j < end
        sl = tl.load(slot_ptr + j, mask=jm, other=-1)
        kept = sl >= 0
        if SPATIAL:
            k32 = kept.to(tl.int32)
            dest = carry + tl.cumsum(k32, axis=0) - 1
            carry += tl.sum(k32, axis=0)
            if cb == 0:
                tl.store(index_ptr + b * K + dest, j.to(tl.int64), mask=kept)
        else:
            dest = sl
        rows = (P + j) * x_sn
        if FUSE:
            v = tl.load(x_ptr + rows[:, None] + xc[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            dropped = jm & (sl < 0)
            w = to_acc(tl.load(s_ptr + j * s_sm, mask=dropped, other=0.0), ACC)
            # where, not w = 0: a kept row's inf / nan must not reach the sum
            acc += tl.sum(tl.where(dropped[:, None], w[:, None] * to_acc(v, ACC), 0.0), axis=0)
        else:
            v = tl.load(x_ptr + rows[:, None] + xc[None, :], mask=kept[:, None] & cm[None, :], other=0.0)
        orow = (P + dest) * C
        tl.store(out_ptr + orow[:, None] + c[None, :], v.to(odt), mask=kept[:, None] & cm[None, :])
    if FUSE:
        if CHUNKED:
            tl.store(part_ptr + (b * tl.num_programs(1) + ch) * C + c, acc, mask=cm)
        else:
            tl.store(out_ptr + (P + K) * C + c, acc.to(odt), mask=cm)


@triton.jit
def _inverse_index_kernel(index_ptr, src_ptr, M, K, i_sb, i_sk, BLOCK: tl.constexpr):
    """src[b, index[b, i]] = i (indices outside [0, M) are skipped, never stored out of bounds)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    im = i < K
    idx = tl.load(index_ptr + b * i_sb + i * i_sk, mask=im, other=-1)
    ok = im & (idx >= 0) & (idx < M)
    tl.store(src_ptr + b * M + idx, i, mask=ok)


@triton.jit
def _drop_bwd_kernel(go_ptr, x_ptr, s_ptr, src_ptr, gx_ptr, gs_ptr, N, C, P, K,
                     go_sb, go_sn, go_sc, x_sb, x_sn, x_sc, s_sb, s_sm,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FUSE: tl.constexpr, ACC: tl.constexpr):
    """Rows r of grad_x[b]: prefix -> grad_out[r]; kept -> grad_out[P + src]; dropped -> scores[j] * the
    fused row's grad (0 without fuse); grad_scores[j] = x[P + j] . the fused row's grad for dropped j."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < N
    M = N - P
    j = r - P
    scored = rm & (r >= P)
    src = tl.load(src_ptr + b * M + j, mask=scored, other=-1)
    copy = rm & ((r < P) | (src >= 0))
    dropped = scored & (src < 0)
    go_ptr += b * go_sb
    go_rows = tl.where(r < P, r, P + src) * go_sn
    gx_ptr += b * N * C
    gx_rows = r * C
    gdt = gx_ptr.dtype.element_ty
    if FUSE:
        w = to_acc(tl.load(s_ptr + b * s_sb + j * s_sm, mask=dropped, other=0.0), ACC)
        fused = go_ptr + (P + K) * go_sn
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        g = tl.load(go_ptr + go_rows[:, None] + (c * go_sc)[None, :], mask=copy[:, None] & cm[None, :], other=0.0)
        if FUSE:
            gf = to_acc(tl.load(fused + c * go_sc, mask=cm, other=0.0), ACC)
            val = tl.where(copy[:, None], to_acc(g, ACC), w[:, None] * gf[None, :]).to(gdt)
        else:
            val = g.to(gdt)   # dropped rows: 0
        tl.store(gx_ptr + gx_rows[:, None] + c[None, :], val, mask=rm[:, None] & cm[None, :])
    if FUSE:   # a second walk over the channels (fewer live registers than one fused loop)
        x_ptr += b * x_sb
        x_rows = r * x_sn
        dot = tl.zeros([BLOCK_R], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            gf = to_acc(tl.load(fused + c * go_sc, mask=cm, other=0.0), ACC)
            xt = tl.load(x_ptr + x_rows[:, None] + (c * x_sc)[None, :], mask=dropped[:, None] & cm[None, :],
                         other=0.0)
            dot += tl.sum(to_acc(xt, ACC) * gf[None, :], axis=1)
    gs_dt = gs_ptr.dtype.element_ty
    if FUSE:
        gsv = tl.where(dropped, dot, 0.0)
        if gs_dt.primitive_bitwidth == 16:   # float64 to 16 bits through fp32, as torch converts
            gsv = gsv.to(tl.float32)
        gsv = gsv.to(gs_dt)
    else:
        gsv = tl.zeros([BLOCK_R], dtype=gs_dt)
    tl.store(gs_ptr + b * M + j, gsv, mask=scored)


# ---- launchers ----------------------------------------------------------------------------------------


def _cls_tiles(N: int, D: int, dtype: torch.dtype) -> dict:
    """A whole head per tile (BLOCK_D); BLOCK_N keys, the tile at most 4096 values (2048 in float64),
    shrunk to small N. The kernels are memory bound: 4 warps."""
    bd = next_power_of_2(max(D, 1))
    cap = (2048 if dtype == torch.float64 else 4096) // bd
    bn = max(1, min(64, cap, next_power_of_2(max(N, 16))))
    return dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=4)


def cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int):
    """Returns (scores [B, N - P], lse [B, H]), both in the accumulation dtype (see the module docstring)."""
    with on_device(q):
        return _cls_attention_scores(q, k, scale, num_prefix)


def _cls_attention_scores(q, k, scale, P):
    B, H, N, D = k.shape
    M = N - P
    acc_tl, acc_torch = acc_dtypes(q.dtype)
    lse = torch.empty((B, H), dtype=acc_torch, device=q.device)
    if B == 0 or H == 0:   # the mean over no heads is nan, as torch's
        return torch.full((B, M), float("nan"), dtype=acc_torch, device=q.device), lse
    scores = torch.empty((B, M), dtype=acc_torch, device=q.device)
    logits = torch.empty((B, H, M), dtype=acc_torch, device=q.device)
    stat = torch.empty((B, H, 2), dtype=acc_torch, device=q.device)
    tiles = _cls_tiles(N, D, q.dtype)
    _cls_logits_kernel[(B * H,)](q, k, logits, stat, lse, N, H, P, *q.stride(), *k.stride(), *split_scale(scale),
                                 D=D, **tiles, ACC=acc_tl)
    block_m = min(256, next_power_of_2(max(M, 16)))
    _cls_mean_kernel[(B, cdiv(M, block_m))](logits, stat, scores, M, H, BLOCK_M=block_m, num_warps=4)
    return scores, lse


def cls_attention_scores_backward(grad_scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                                  scale: float, num_prefix: int):
    """Returns (grad_q [B, H, D], grad_k [B, H, N, D]), contiguous, in q's dtype; P recomputed from lse."""
    with on_device(q):
        return _cls_attention_scores_backward(grad_scores, q, k, lse, scale, num_prefix)


def _cls_attention_scores_backward(grad_scores, q, k, lse, scale, P):
    B, H, N, D = k.shape
    acc_tl, acc_torch = acc_dtypes(q.dtype)
    grad_q = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if B * H == 0:
        return grad_q, grad_k
    lse = lse.to(acc_torch).contiguous()
    p = torch.empty((B, H, N), dtype=acc_torch, device=q.device)
    delta = torch.empty((B, H), dtype=acc_torch, device=q.device)
    tiles = _cls_tiles(N, D, q.dtype)
    hi, lo = split_scale(scale)
    _cls_bwd_q_kernel[(B * H,)](grad_scores, q, k, lse, p, delta, grad_q, N, H, P, *grad_scores.stride(),
                                *q.stride(), *k.stride(), hi, lo, D=D, **tiles, ACC=acc_tl)
    _cls_bwd_k_kernel[(B * H, cdiv(N, tiles["BLOCK_N"]))](
        grad_scores, q, p, delta, grad_k, N, H, P, *grad_scores.stride(), *q.stride(), hi, lo,
        D=D, **tiles, ACC=acc_tl)
    return grad_q, grad_k


def _drop_tiles(C: int, dtype: torch.dtype) -> dict:
    """BLOCK_R rows (16) by BLOCK_C channels (128; 64 in float64), 4 warps (memory bound). Chosen from
    offline sm_90 compiles (ptxas registers and spills), not from timings: 32-row tiles, or the backward's
    grad_x and grad_scores in one channel loop, pass 200 registers (and spill at 32 rows)."""
    cap = 64 if dtype == torch.float64 else 128
    return dict(BLOCK_R=16, BLOCK_C=min(cap, next_power_of_2(max(C, 1))), num_warps=4)


def _rank_tiles(M: int) -> dict:
    """[BLOCK_J, BLOCK_I] compare tiles of up to 64 x 64, shrunk to small M."""
    side = min(64, next_power_of_2(max(M, 16)))
    return dict(BLOCK_J=side, BLOCK_I=side, num_warps=4)


def _chunking(B: int, cblocks: int, M: int, block_r: int, device) -> tuple[int, int]:
    """(chunks, chunk_len): the M scored tokens split so that B * cblocks * chunks is about 4 programs per
    SM, each chunk at least MIN_CHUNK_BLOCKS row blocks long (chunk_len a multiple of block_r); one chunk
    when B * cblocks alone fills the GPU or M is small."""
    sms = sm_count(device)
    blocks = cdiv(M, block_r)
    chunks = max(1, min(cdiv(blocks, MIN_CHUNK_BLOCKS), cdiv(4 * sms, B * cblocks)))
    chunk_len = cdiv(blocks, chunks) * block_r
    return cdiv(M, chunk_len), chunk_len


def drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int, fuse: bool,
                spatial_order: bool):
    """Returns (out [B, P + keep + fuse, C] in x's dtype, index [B, keep] int64) (see the module docstring)."""
    with on_device(x):
        return _drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)


def _drop_tokens(x, scores, K, P, fuse, spatial):
    B, N, C = x.shape
    M = N - P
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    sacc_tl, _ = acc_dtypes(scores.dtype)
    out = torch.empty((B, P + K + int(fuse), C), dtype=x.dtype, device=x.device)
    index = torch.empty((B, K), dtype=torch.int64, device=x.device)
    if B == 0:
        return out, index
    slot = torch.empty((B, M), dtype=torch.int32, device=x.device)
    rt = _rank_tiles(M)
    _rank_kernel[(B, cdiv(M, rt["BLOCK_J"]))](scores, slot, index, M, K, *scores.stride(),
                                                     **rt, SPATIAL=spatial, SACC=sacc_tl)
    tiles = _drop_tiles(C, x.dtype)
    cblocks = max(1, cdiv(C, tiles["BLOCK_C"]))   # C == 0: one program per chunk still writes index
    chunks, chunk_len = _chunking(B, cblocks, M, tiles["BLOCK_R"], x.device)
    chunked = fuse and chunks > 1
    part = torch.empty((B, chunks, C) if chunked else (0,), dtype=acc_torch, device=x.device)
    _drop_kernel[(B, chunks, cblocks)](x, scores, slot, out, index, part, M, C, P, K, out.shape[1], chunk_len,
                                       *x.stride(), *scores.stride(), **tiles, COUNT_BLOCK=COUNT_BLOCK,
                                       FUSE=fuse, SPATIAL=spatial, CHUNKED=chunked, ACC=acc_tl)
    if chunked:
        out[:, P + K] = part.sum(dim=1)   # the chunks' partial fused rows, in a fixed order
    return out, index


def drop_tokens_backward(grad_out: torch.Tensor, x: torch.Tensor, scores: torch.Tensor, index: torch.Tensor,
                         num_prefix: int, fuse: bool):
    """Returns (grad_x [B, N, C] in x's dtype, grad_scores [B, N - P] in scores' dtype), contiguous."""
    with on_device(x):
        return _drop_tokens_backward(grad_out, x, scores, index, num_prefix, fuse)


def _drop_tokens_backward(grad_out, x, scores, index, P, fuse):
    B, N, C = x.shape
    M = N - P
    K = index.shape[1]
    acc_tl, _ = acc_dtypes(x.dtype)
    grad_x = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    grad_scores = torch.empty((B, M), dtype=scores.dtype, device=x.device)
    if B == 0:
        return grad_x, grad_scores
    src = torch.full((B, M), -1, dtype=torch.int32, device=x.device)
    if K > 0:
        block = min(256, next_power_of_2(max(K, 16)))
        _inverse_index_kernel[(B, cdiv(K, block))](index, src, M, K, *index.stride(), BLOCK=block,
                                                          num_warps=4)
    tiles = _drop_tiles(C, x.dtype)
    _drop_bwd_kernel[(B, cdiv(N, tiles["BLOCK_R"]))](
        grad_out, x, scores, src, grad_x, grad_scores, N, C, P, K, *grad_out.stride(), *x.stride(),
        *scores.stride(), **tiles, FUSE=fuse, ACC=acc_tl)
    return grad_x, grad_scores
