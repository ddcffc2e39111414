"""Non-causal linear attention (EfficientViT's LiteMLA, L2ViT): Triton forward and backward kernels and their
launchers.

Per (b, h), phi in {identity, relu, elu+1}, a_i = phi(q_i * q_scale), b_j = phi(k_j * k_scale):

  S = sum_j b_j v_j^T [D, Dv],  z = sum_j b_j [D],  out_i = t_h * (a_i S) / max(a_i . z + eps, denom_min)

  q, k     [B, H, N, D]     fp16 / bf16 / fp32 / fp64, any strides (read through their four strides: (B, N, H, D)
                            memory and (B, H, D, N) memory are read in place, never copied)
  v        [B, H, N, Dv]    q's dtype, any strides; Dv may differ from D (both 1..128)
  temperature [H]           accumulation dtype (float32; float64 for float64 q) or None (t = 1)
  out      [B, H, N, Dv]    q's dtype, laid out in q's memory order (``effvit.ops.layout.empty_like_layout``)
  state    [B, H, D, Dv+1]  accumulation dtype, contiguous: S with z as its last column
  grad_q, grad_k [B, H, N, D], grad_v [B, H, N, Dv]: q's dtype, contiguous
  grad_temperature [H]      accumulation dtype ([0]-shaped when temperature is None)

Two passes over the tokens, as flash-linear-attention does for the non-causal case; every kernel's grid is
(b*h, token chunks), chunks fastest, each program walking its chunk in BLOCK_N-token blocks:
  forward   _state_kernel: per chunk, phi(k)^T v and sum phi(k) into a partial [B*H, chunks, D, Dv+1];
            torch sums the chunks (a fixed order) into state (with one chunk the kernel writes state itself);
            _out_kernel: a = phi(q q_scale), num = a @ S, den = a . z + eps, out = t num / max(den, denom_min).
  backward  _bwd_q_kernel: recomputes a, num, den; writes grad_q, and per chunk the partials of dS = a^T dnum,
            dz = a^T dden and grad_t (reduced by torch in a fixed order); _bwd_kv_kernel: grad_k, grad_v from
            dS, dz.
No atomics: the results are deterministic. Chunks (``_chunking``) are sized so that large-N problems have
about 4 programs per SM, and at least long enough that the partial states cost far less memory traffic than
the chunk's k and v; small problems get one chunk per (b, h).

Matmuls go through common.py's ``matmul`` with every operand in the accumulation dtype (phi values, the
fp32 state, dnum = t g / c, dS: none of them may be rounded to 16 bits — the state's entries grow with N and
would overflow fp16): input_precision="ieee" for fp32 (TF32 would miss 1e-5) and float64 (where
common.FP64_TL_DOT = False selects a broadcast-multiply-sum), "tf32x3" (three TF32 tensor-core products,
about fp32 accuracy) for fp16 / bf16 inputs with heads <= 64 ("ieee" above, see ``_config``), whose loads are converted to fp32 first (so no bf16 dot is
needed, and EMULATE is never set: the interpreter runs these dots in fp32).

Indexing: each program's base offset ((b, h) of each tensor) is 64-bit; offsets within one (b, h) (token *
token stride + channel * channel stride) are 32-bit, so one (b, h) slice of a tensor must span fewer than
2**31 elements (the whole tensors need not).

The launchers take and return logical tensors (fresh outputs, inputs never written).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from effvit.ops.layout import empty_like_layout
from effvit.triton_kernels.common import (acc_dtypes, acc_scale, cdiv, dot_config, matmul, next_power_of_2, on_device,
                                          sm_count, split_scale, to_acc)

FEATURE_MAPS = {"identity": 0, "relu": 1, "elu+1": 2}   # as csrc/common/linear_checks.h's FeatureMap


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x < 0, 0.0, x)   # NaN stays NaN, as torch's relu
    elif FEATURE == 2:
        return tl.where(x > 0, x + 1.0, (tl.exp(x) - 1.0) + 1.0)   # elu(x) + 1, rounded as torch's
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """phi'(x) (relu: 0 at x == 0, as torch's relu backward)."""
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, 0.0).to(x.dtype)
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, tl.exp(x))
    else:
        return tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def _load_rows(ptr, rn, nm, c, cm, sn, sc, ACC: tl.constexpr):
    """A [BLOCK_N, BLOCK_C] tile (tokens rn, channels c) through the strides, in the accumulation dtype."""
    x = tl.load(ptr + rn[:, None] * sn + c[None, :] * sc, mask=nm[:, None] & cm[None, :], other=0.0)
    return to_acc(x, ACC)


@triton.jit
def _load_state(st_ptr, d, dm, e, em, DV: tl.constexpr):
    """S [BLOCK_D, BLOCK_V] and z [BLOCK_D] of a [D, DV + 1] state (zero past D / DV)."""
    S = tl.load(st_ptr + d[:, None] * (DV + 1) + e[None, :], mask=dm[:, None] & em[None, :], other=0.0)
    z = tl.load(st_ptr + d * (DV + 1) + DV, mask=dm, other=0.0)
    return S, z


@triton.jit
def _store_state(st_ptr, S, z, d, dm, e, em, DV: tl.constexpr):
    tl.store(st_ptr + d[:, None] * (DV + 1) + e[None, :], S, mask=dm[:, None] & em[None, :])
    tl.store(st_ptr + d * (DV + 1) + DV, z, mask=dm)


@triton.jit
def _state_kernel(k_ptr, v_ptr, part_ptr, N, H, chunks, chunk_len,
                  k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd, ks_hi, ks_lo,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_V: tl.constexpr, FEATURE: tl.constexpr, PREC: tl.constexpr, FMA: tl.constexpr,
                  ACC: tl.constexpr):
    """part[bh, chunk] = [sum_j b_j v_j^T, sum_j b_j] over the chunk's tokens j."""
    pid = tl.program_id(0)
    bh = pid // chunks
    chunk = pid - bh * chunks
    b = bh // H
    h = bh - b * H
    ks = acc_scale(ks_hi, ks_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    e = tl.arange(0, BLOCK_V)
    em = e < DV
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    v_ptr += b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh

    S = tl.zeros([BLOCK_D, BLOCK_V], dtype=ACC)
    z = tl.zeros([BLOCK_D], dtype=ACC)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < end
        k = _load_rows(k_ptr, rn, nm, d, dm, k_sn, k_sd, ACC)
        v = _load_rows(v_ptr, rn, nm, e, em, v_sn, v_sd, ACC)
        bk = tl.where(nm[:, None], _phi(k * ks, FEATURE), 0.0)   # phi(0) = 1 for elu+1: zero padded rows
        S += matmul(tl.trans(bk), v, PREC, False, FMA).to(ACC)
        z += tl.sum(bk, axis=0)
    _store_state(part_ptr + pid.to(tl.int64) * (D * (DV + 1)), S, z, d, dm, e, em, DV)


@triton.jit
def _out_kernel(q_ptr, st_ptr, t_ptr, out_ptr, N, H, chunks, chunk_len,
                q_sb, q_sh, q_sn, q_sd, o_sb, o_sh, o_sn, o_sd,
                qs_hi, qs_lo, eps_hi, eps_lo, dmin_hi, dmin_lo,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_V: tl.constexpr, FEATURE: tl.constexpr, HAS_T: tl.constexpr, CLAMP: tl.constexpr,
                PREC: tl.constexpr, FMA: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // chunks
    chunk = pid - bh * chunks
    b = bh // H
    h = bh - b * H
    qs = acc_scale(qs_hi, qs_lo, ACC)
    eps = acc_scale(eps_hi, eps_lo, ACC)
    dmin = acc_scale(dmin_hi, dmin_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    e = tl.arange(0, BLOCK_V)
    em = e < DV
    S, z = _load_state(st_ptr + bh.to(tl.int64) * (D * (DV + 1)), d, dm, e, em, DV)
    if HAS_T:
        S = S * tl.load(t_ptr + h).to(ACC)
    q_ptr += b.to(tl.int64) * q_sb + h.to(tl.int64) * q_sh
    out_ptr += b.to(tl.int64) * o_sb + h.to(tl.int64) * o_sh

    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < end
        a = _phi(_load_rows(q_ptr, rn, nm, d, dm, q_sn, q_sd, ACC) * qs, FEATURE)
        num = matmul(a, S, PREC, False, FMA).to(ACC)
        den = tl.sum(a * z[None, :], axis=1) + eps
        if CLAMP:
            den = tl.maximum(den, dmin, propagate_nan=tl.PropagateNan.ALL)
        o = num / tl.where(nm, den, 1.0)[:, None]   # padded rows (not stored) must not make 0 / 0
        tl.store(out_ptr + rn[:, None] * o_sn + e[None, :] * o_sd, o.to(out_ptr.dtype.element_ty),
                 mask=nm[:, None] & em[None, :])


@triton.jit
def _bwd_q_kernel(do_ptr, q_ptr, st_ptr, t_ptr, dq_ptr, part_ptr, dt_ptr, N, H, chunks, chunk_len,
                  q_sb, q_sh, q_sn, q_sd, g_sb, g_sh, g_sn, g_sd,
                  qs_hi, qs_lo, eps_hi, eps_lo, dmin_hi, dmin_lo,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_V: tl.constexpr, FEATURE: tl.constexpr, HAS_T: tl.constexpr, CLAMP: tl.constexpr,
                  PREC: tl.constexpr, FMA: tl.constexpr, ACC: tl.constexpr):
    """grad_q of the chunk's queries; part[bh, chunk] = [sum_i a_i dnum_i^T, sum_i a_i dden_i] and
    dt[bh, chunk] = sum_i (g_i . num_i) / c_i."""
    pid = tl.program_id(0)
    bh = pid // chunks
    chunk = pid - bh * chunks
    b = bh // H
    h = bh - b * H
    qs = acc_scale(qs_hi, qs_lo, ACC)
    eps = acc_scale(eps_hi, eps_lo, ACC)
    dmin = acc_scale(dmin_hi, dmin_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    e = tl.arange(0, BLOCK_V)
    em = e < DV
    S, z = _load_state(st_ptr + bh.to(tl.int64) * (D * (DV + 1)), d, dm, e, em, DV)
    if HAS_T:
        t = tl.load(t_ptr + h).to(ACC)
    else:
        t = 1.0
    q_ptr += b.to(tl.int64) * q_sb + h.to(tl.int64) * q_sh
    do_ptr += b.to(tl.int64) * g_sb + h.to(tl.int64) * g_sh
    dq_ptr += bh.to(tl.int64) * N * D

    dS = tl.zeros([BLOCK_D, BLOCK_V], dtype=ACC)
    dz = tl.zeros([BLOCK_D], dtype=ACC)
    dt = tl.zeros([BLOCK_N], dtype=ACC)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < end
        x = _load_rows(q_ptr, rn, nm, d, dm, q_sn, q_sd, ACC) * qs
        a = tl.where(nm[:, None], _phi(x, FEATURE), 0.0)   # padded rows: no part in dS / dz
        g = _load_rows(do_ptr, rn, nm, e, em, g_sn, g_sd, ACC)
        num = matmul(a, S, PREC, False, FMA).to(ACC)
        den = tl.sum(a * z[None, :], axis=1) + eps
        c = den
        if CLAMP:
            c = tl.maximum(den, dmin, propagate_nan=tl.PropagateNan.ALL)
        r = 1.0 / tl.where(nm, c, 1.0)   # padded rows (g = 0) must not make 0 / 0
        gn = tl.sum(g * num, axis=1) * r   # (g . num) / c
        dnum = g * (t * r)[:, None]
        dden = -t * gn * r
        if CLAMP:
            dden = tl.where(den >= dmin, dden, 0.0)
        da = matmul(dnum, tl.trans(S), PREC, False, FMA).to(ACC) + dden[:, None] * z[None, :]
        dq = (qs * _dphi(x, FEATURE)) * da
        tl.store(dq_ptr + rn[:, None] * D + d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=nm[:, None] & dm[None, :])
        dS += matmul(tl.trans(a), dnum, PREC, False, FMA).to(ACC)
        dz += tl.sum(a * dden[:, None], axis=0)
        dt += gn
    _store_state(part_ptr + pid.to(tl.int64) * (D * (DV + 1)), dS, dz, d, dm, e, em, DV)
    tl.store(dt_ptr + pid, tl.sum(dt, axis=0))


@triton.jit
def _bwd_kv_kernel(k_ptr, v_ptr, ds_ptr, dk_ptr, dv_ptr, N, H, chunks, chunk_len,
                   k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd, ks_hi, ks_lo,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_V: tl.constexpr, FEATURE: tl.constexpr, PREC: tl.constexpr, FMA: tl.constexpr,
                   ACC: tl.constexpr):
    """grad_k_j = k_scale phi'(k_j k_scale) (dS v_j + dz), grad_v_j = dS^T b_j."""
    pid = tl.program_id(0)
    bh = pid // chunks
    chunk = pid - bh * chunks
    b = bh // H
    h = bh - b * H
    ks = acc_scale(ks_hi, ks_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    e = tl.arange(0, BLOCK_V)
    em = e < DV
    dS, dz = _load_state(ds_ptr + bh.to(tl.int64) * (D * (DV + 1)), d, dm, e, em, DV)
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    v_ptr += b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh
    dk_ptr += bh.to(tl.int64) * N * D
    dv_ptr += bh.to(tl.int64) * N * DV

    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nm = rn < end
        x = _load_rows(k_ptr, rn, nm, d, dm, k_sn, k_sd, ACC) * ks
        v = _load_rows(v_ptr, rn, nm, e, em, v_sn, v_sd, ACC)
        db = matmul(v, tl.trans(dS), PREC, False, FMA).to(ACC) + dz[None, :]
        dk = (ks * _dphi(x, FEATURE)) * db
        dv = matmul(_phi(x, FEATURE), dS, PREC, False, FMA).to(ACC)
        tl.store(dk_ptr + rn[:, None] * D + d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=nm[:, None] & dm[None, :])
        tl.store(dv_ptr + rn[:, None] * DV + e[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=nm[:, None] & em[None, :])


# ---- launchers ----------------------------------------------------------------------------------------


def _tiles(n: int, D: int, Dv: int, dtype: torch.dtype) -> dict:
    """Launch parameters shared by the four kernels. BLOCK_D / BLOCK_V hold a head (powers of two >= 16,
    tl.dot's minimum; channels past D / Dv are masked); BLOCK_N tokens per step, shrunk to small N. The
    programs hold a [BLOCK_D, BLOCK_V] fp32 state (two in the dq kernel: S and the dS accumulator) besides
    [BLOCK_N, BLOCK_D] and [BLOCK_N, BLOCK_V] tiles, so BLOCK_N shrinks and the warps double for heads > 32,
    and heads > 64 take one stage (no load pipelining: the shared memory would pass the 227 KB of sm_90);
    fp32 (ieee) and float64 dots are FMA loops, which take smaller token blocks. Chosen from offline sm_90
    compiles (ptxas registers, spills, shared memory), not from timings."""
    bd = next_power_of_2(max(D, 16))
    bv = next_power_of_2(max(Dv, 16))
    width = max(bd, bv)
    if dtype in (torch.float16, torch.bfloat16) and width <= 64:   # see _config
        cap = {16: 64, 32: 64, 64: 32}[width]
    else:
        cap = 32 if width <= 32 else 16
    return dict(BLOCK_N=min(cap, next_power_of_2(max(n, 16))), BLOCK_D=bd, BLOCK_V=bv,
                num_warps=4 if width <= 32 else 8, num_stages=2 if width <= 64 else 1)


def _chunking(BH: int, N: int, D: int, Dv: int, block_n: int, dtype: torch.dtype, device) -> tuple[int, int]:
    """(chunks, chunk_len): each (b, h)'s N tokens split into chunks of chunk_len (a multiple of block_n).
    About 4 programs per SM in all, but a chunk at least as long as makes its k / v traffic
    ((D + Dv) * itemsize bytes a token) 16 times its partial state's (written and read back: 8 D Dv bytes
    in fp32), so the partials never dominate; one chunk when BH alone fills the GPU or N is small."""
    sms = sm_count(device)
    blocks = cdiv(N, block_n)
    acc_size = 8 if dtype == torch.float64 else 4
    min_blocks = cdiv(cdiv(16 * 2 * acc_size * D * Dv, (D + Dv) * dtype.itemsize), block_n)
    chunks = min(cdiv(blocks, min_blocks), max(1, cdiv(4 * sms, BH)))
    chunk_len = cdiv(blocks, max(chunks, 1)) * block_n
    return cdiv(N, chunk_len), chunk_len


def _config(q: torch.Tensor, feature_map: str, D: int, Dv: int) -> dict:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
    acc_tl, _ = acc_dtypes(q.dtype)
    # tf32x3 for 16-bit inputs; heads > 64 take ieee (FMA) as fp32 does: tf32x3's hi / lo operand copies of
    # a 128 x 128 state pass sm_90's shared memory in the backward
    wide = max(D, Dv) > 64
    prec = "tf32x3" if q.dtype in (torch.float16, torch.bfloat16) and not wide else "ieee"
    return dict(FEATURE=FEATURE_MAPS[feature_map], PREC=prec, FMA=dot_config(q.dtype, q.is_cuda)["FMA"],
                ACC=acc_tl)


def _reduce_chunks(part: torch.Tensor, B: int, H: int, D: int, Dv: int) -> torch.Tensor:
    """[B*H, chunks, D, Dv+1] partials -> [B, H, D, Dv+1] (torch's reduction: a fixed order, no atomics)."""
    if part.shape[1] == 1:
        return part.view(B, H, D, Dv + 1)
    return part.sum(dim=1).view(B, H, D, Dv + 1)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor | None,
                     feature_map: str, q_scale: float, k_scale: float, eps: float, denom_min: float):
    """Returns (out [B, H, N, Dv], state [B, H, D, Dv + 1]) (see the module docstring)."""
    with on_device(q):
        return _linear_attention(q, k, v, temperature, feature_map, q_scale, k_scale, eps, denom_min)


def _linear_attention(q, k, v, temperature, feature_map, q_scale, k_scale, eps, denom_min):
    B, H, N, D = q.shape
    Dv = v.shape[3]
    cfg = _config(q, feature_map, D, Dv)
    _, acc_torch = acc_dtypes(q.dtype)
    out = empty_like_layout(q, Dv)
    if B * H == 0 or N == 0:
        return out, torch.zeros((B, H, D, Dv + 1), dtype=acc_torch, device=q.device)
    tiles = _tiles(N, D, Dv, q.dtype)
    chunks, chunk_len = _chunking(B * H, N, D, Dv, tiles["BLOCK_N"], q.dtype, q.device)
    part = torch.empty((B * H, chunks, D, Dv + 1), dtype=acc_torch, device=q.device)
    grid = (B * H * chunks,)
    consts = dict(D=D, DV=Dv, **tiles, **cfg)
    _state_kernel[grid](k, v, part, N, H, chunks, chunk_len, *k.stride(), *v.stride(), *split_scale(k_scale),
                        **consts)
    state = _reduce_chunks(part, B, H, D, Dv)
    has_t = temperature is not None
    t = temperature.reshape(H).to(acc_torch).contiguous() if has_t else state
    clamp = denom_min != float("-inf")
    _out_kernel[grid](q, state, t, out, N, H, chunks, chunk_len, *q.stride(), *out.stride(),
                      *split_scale(q_scale), *split_scale(eps), *(split_scale(denom_min) if clamp else (0.0, 0.0)),
                      HAS_T=has_t, CLAMP=clamp, **consts)
    return out, state


def linear_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              temperature: torch.Tensor | None, state: torch.Tensor, feature_map: str,
                              q_scale: float, k_scale: float, eps: float, denom_min: float):
    """Returns (grad_q, grad_k, grad_v, grad_temperature), a, num and den recomputed from q and state."""
    with on_device(q):
        return _linear_attention_backward(grad_out, q, k, v, temperature, state, feature_map, q_scale, k_scale,
                                          eps, denom_min)


def _linear_attention_backward(grad_out, q, k, v, temperature, state, feature_map, q_scale, k_scale, eps,
                               denom_min):
    B, H, N, D = q.shape
    Dv = v.shape[3]
    cfg = _config(q, feature_map, D, Dv)
    _, acc_torch = acc_dtypes(q.dtype)
    has_t = temperature is not None
    if B * H == 0 or N == 0:
        zeros = lambda *s: torch.zeros(s, dtype=q.dtype, device=q.device)  # noqa: E731
        grad_t = torch.zeros((H if has_t else 0,), dtype=acc_torch, device=q.device)
        return zeros(B, H, N, D), zeros(B, H, N, D), zeros(B, H, N, Dv), grad_t
    grad_q = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    grad_v = torch.empty((B, H, N, Dv), dtype=q.dtype, device=q.device)
    state = state.to(acc_torch).contiguous()
    tiles = _tiles(N, D, Dv, q.dtype)
    chunks, chunk_len = _chunking(B * H, N, D, Dv, tiles["BLOCK_N"], q.dtype, q.device)
    part = torch.empty((B * H, chunks, D, Dv + 1), dtype=acc_torch, device=q.device)
    dt_part = torch.empty((B, H, chunks), dtype=acc_torch, device=q.device)
    grid = (B * H * chunks,)
    consts = dict(D=D, DV=Dv, **tiles, **cfg)
    t = temperature.reshape(H).to(acc_torch).contiguous() if has_t else state
    clamp = denom_min != float("-inf")
    _bwd_q_kernel[grid](grad_out, q, state, t, grad_q, part, dt_part, N, H, chunks, chunk_len,
                        *q.stride(), *grad_out.stride(), *split_scale(q_scale), *split_scale(eps),
                        *(split_scale(denom_min) if clamp else (0.0, 0.0)), HAS_T=has_t, CLAMP=clamp, **consts)
    dstate = _reduce_chunks(part, B, H, D, Dv)
    _bwd_kv_kernel[grid](k, v, dstate, grad_k, grad_v, N, H, chunks, chunk_len, *k.stride(), *v.stride(),
                         *split_scale(k_scale), **consts)
    grad_t = dt_part.sum(dim=(0, 2)) if has_t else torch.zeros((0,), dtype=acc_torch, device=q.device)
    return grad_q, grad_k, grad_v, grad_t
