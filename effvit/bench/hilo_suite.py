"""Benchmark cases of the HiLo family: LITv2's HiLo attention layer and its Lo-Fi core.

ops:
  layer   the whole HiLo(x [B, N, C], H, W), Linears included: effvit.nn.HiLo against the official module (eager)
          and torch.compile of it, at LITv2-S's HiLo stages (stage 3: 14x14, C 384, 12 heads, ws 2, alpha 0.9;
          stage 4: 7x7, C 768, 24 heads, ws 1, i.e. plain multi-head attention on the l_* weights) and a 28x28
          stage-2-sized map.
  lofi    the Lo-Fi attention between the Linears, q [B, N, C_l] to the pooled kv [B, N/4, 2 C_l]: peers the eager
          reference, torch.compile of it and PyTorch's scaled_dot_product_attention on the same tensors.
  table   the HiLo paper's single-layer comparison (HubHop/vit-attention-benchmark): 14x14 tokens, dim 768,
          12 heads, batch 64; HiLo (ws 2, alpha 0.9; effvit and the official eager module) against eager
          spatial-reduction attention (PVT's SRA, sr_ratio 2), local-window attention (ws 7) and plain MHSA,
          all in the same run. Their published CPU ordering: HiLo 1.4x SRA's and 1.6x local window's images/s.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import effvit
from effvit.bench.cases import Case, SuiteOptions, add_compile_peer, element_size, kernel_impls, register_suite, \
    timed_step
from effvit.reference import hilo as reference

STAGES = {
    "28x28x192": {"C": 192, "H": 28, "W": 28, "heads": 6, "ws": 2, "alpha": 0.9},
    "14x14x384": {"C": 384, "H": 14, "W": 14, "heads": 12, "ws": 2, "alpha": 0.9},
    "7x7x768": {"C": 768, "H": 7, "W": 7, "heads": 24, "ws": 1, "alpha": 0.9},
    "table": {"C": 768, "H": 14, "W": 14, "heads": 12, "ws": 2, "alpha": 0.9, "table": True},
}
STAGE_NAMES = ("28x28x192", "14x14x384", "7x7x768")
DEFAULT_BATCHES = (1, 16)
TABLE_BATCH = 64
OPS = ("layer", "lofi", "table")


def build(opts: SuiteOptions) -> Iterator[Case]:
    names = opts.shapes or STAGE_NAMES + ("table",)
    batches = opts.batches or ((1,) if opts.quick else DEFAULT_BATCHES)
    for op in OPS:
        for name in names:
            stage = STAGES[name]
            if (op == "table") != ("table" in stage):
                continue
            if op == "lofi" and stage["ws"] == 1 and len(names) > 1:
                continue  # the same core as a plain attention: layer covers it
            for B in ((TABLE_BATCH,) if op == "table" and not opts.batches else batches):
                for dtype in opts.dtypes:
                    for direction in opts.directions:
                        yield {"layer": _layer_case, "lofi": _lofi_case, "table": _table_case}[op](
                            B, stage, dtype, opts, direction)


def _heads(stage: dict) -> tuple[int, int, int]:
    h, l = reference.split_heads(stage["heads"], stage["ws"], stage["alpha"])
    return h, l, stage["C"] // stage["heads"]


def _layer_counts(B: int, stage: dict) -> tuple[float, float]:
    """FLOPs of the HiLo layer (Linears and both attentions, multiply-adds counted twice) and the bytes a fused
    layer must move at least (x in, y out, and each Linear's output written once and read once)."""
    C, H, W, ws = stage["C"], stage["H"], stage["W"], stage["ws"]
    h, l, d = _heads(stage)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    n, m = Hp * Wp, (Hp // ws) * (Wp // ws)
    hd, ld = h * d, l * d
    flops = 2.0 * (n * C * 3 * hd + n * hd * hd + n * C * ld + m * C * 2 * ld + n * ld * ld)
    flops += 4.0 * (n * ws * ws * hd + n * m * ld)
    words = n * C * 2 + n * 3 * hd * 2 + n * hd * 2 + n * ld * 2 + m * 2 * ld * 2 + n * ld * 2
    return B * flops, float(B * words)


def _layer_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    C, H, W, heads, ws, alpha = (stage[k] for k in ("C", "H", "W", "heads", "ws", "alpha"))
    device, backward = opts.device, direction == "fwd+bwd"
    flops, words = _layer_counts(B, stage)
    es = element_size(dtype)
    if backward:
        flops, words = flops * 3, words * 3
    official = reference.HiLo(C, heads, True, None, 0.0, 0.0, ws, alpha).to(device=device, dtype=dtype)
    probe = torch.empty((B, H * W, C), device=device, dtype=dtype)

    def make_inputs():
        return (torch.randn((B, H * W, C), device=device, dtype=dtype).requires_grad_(backward),)

    def builder(module):
        return lambda: timed_step(lambda x: module(x, H, W), backward, (B, H * W, C), device, dtype)

    def ours(backend):
        module = effvit.nn.HiLo(C, heads, True, None, 0.0, 0.0, ws, alpha, backend=backend)
        module.load_state_dict(official.state_dict())
        return builder(module.to(device=device, dtype=dtype))

    impls, skipped = kernel_impls("hilo", probe, opts.backends, ours, args=(C // heads, ws))
    if opts.peers:
        impls["eager"] = builder(official)
        add_compile_peer(impls, skipped, official, builder)
    params = {"B": B, "H": H, "W": W, "C": C, "heads": heads, "ws": ws, "alpha": alpha}
    return Case(family="hilo", op="layer", params=params, dtype=dtype, device=device, direction=direction,
                make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=float(words * es), flops=flops,
                input_bytes=B * H * W * C * es)


def _lofi_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    C, H, W, ws = stage["C"], stage["H"], stage["W"], stage["ws"]
    _, l, d = _heads(stage)
    device, backward = opts.device, direction == "fwd+bwd"
    N, M = H * W, math.ceil(H / ws) * math.ceil(W / ws)
    scale, es = d ** -0.5, element_size(dtype)
    flops, words = 4.0 * B * l * N * M * d, B * (2 * N * l * d + 2 * M * l * d)
    if backward:  # read q, kv, out, grad_out; write grad_q, grad_kv
        flops, words = flops * 2.5, words * 3
    probe = torch.empty((B, N, l * d), device=device, dtype=dtype)

    def make_inputs():
        q = torch.randn((B, N, l * d), device=device, dtype=dtype).requires_grad_(backward)
        kv = torch.randn((B, M, 2 * l * d), device=device, dtype=dtype).requires_grad_(backward)
        return q, kv

    def eager(q, kv):
        return reference.lofi_attention(q, kv, l, scale)

    def sdpa(q, kv):
        qh = q.view(B, N, l, d).transpose(1, 2)
        k, v = kv.view(B, M, 2, l, d).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(qh, k, v, scale=scale).transpose(1, 2).reshape(B, N, l * d)

    def builder(fn):
        return lambda: timed_step(fn, backward, (B, N, l * d), device, dtype)

    impls, skipped = kernel_impls(
        "hilo", probe, opts.backends,
        lambda backend: builder(lambda q, kv: effvit.lofi_attention(q, kv, l, scale, backend=backend)),
        args=(d, ws))
    if opts.peers:
        impls["eager"] = builder(eager)
        impls["sdpa"] = builder(sdpa)
        add_compile_peer(impls, skipped, eager, builder)
    params = {"B": B, "N": N, "M": M, "heads": l, "head_dim": d}
    return Case(family="hilo", op="lofi", params=params, dtype=dtype, device=device, direction=direction,
                make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=float(words * es), flops=flops,
                input_bytes=B * (N + 2 * M) * l * d * es)


# ---- the paper's single-layer peers (eager PyTorch, written here after the benchmark's definitions) -------

class SpatialReductionAttention(nn.Module):
    """PVT's SRA: queries from every token; keys and values from the map reduced by a stride-sr convolution
    and a LayerNorm."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 2):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x_ = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))
        kv = self.kv(x_).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(B, N, C))


class LocalWindowAttention(nn.Module):
    """Attention inside non-overlapping ws x ws windows (Twins' LSA / Swin's W-MSA without bias)."""

    def __init__(self, dim: int, num_heads: int, ws: int = 7):
        super().__init__()
        self.num_heads, self.ws, self.scale = num_heads, ws, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        ws, hg, wg = self.ws, H // self.ws, W // self.ws
        x = x.reshape(B, hg, ws, wg, ws, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, hg * wg, ws * ws, 3, self.num_heads, C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ qkv[2]).transpose(2, 3).reshape(B, hg, wg, ws, ws, C).transpose(2, 3).reshape(B, N, C)
        return self.proj(x)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))


def _table_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    case = _layer_case(B, stage, dtype, opts, direction)
    C, H, W, heads = stage["C"], stage["H"], stage["W"], stage["heads"]
    device, backward = opts.device, direction == "fwd+bwd"
    if opts.peers:
        for name, module in (("sra", SpatialReductionAttention(C, heads, 2)),
                             ("local-window", LocalWindowAttention(C, heads, 7)),
                             ("mhsa", MultiHeadSelfAttention(C, heads))):
            module = module.to(device=device, dtype=dtype)
            case.impls[name] = (lambda m: lambda: timed_step(lambda x: m(x, H, W), backward, (B, H * W, C),
                                                             device, dtype))(module)
        case.skipped.pop("compile", None)
        case.impls.pop("compile", None)  # the table compares attention designs, all eager
        case.other_designs = ("sra", "local-window", "mhsa")
    case.op = "table"
    return case


register_suite("hilo", build, STAGES)
