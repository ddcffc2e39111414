"""Benchmark cases of the window family: Swin-T's stages (C = 96, 192, 384, 768 at 56, 28, 14, 7 tokens a
side, 3, 6, 12, 24 heads), window 7, shift 0 and 3 (timm clamps the window at 7x7 and drops the shift there).

ops:
  core   everything between the qkv and proj GEMMs, on qkv [B, H, W, 3C]. Peers: the eager reference
         (timm's code), torch.compile of it, timm's SDPA path (TIMM_FUSED_ATTN: bias + mask handed to
         scaled_dot_product_attention) and, on a GPU, FlexAttention (window as a mask_mod over the
         partitioned sequence, bias and shift mask as a score_mod).
  attn   a timm SwinTransformerBlock's whole attention path, _attn(x [B, H, W, C]), GEMMs included:
         effvit (the patched block) against timm eager, timm SDPA and torch.compile of timm eager.
  model  timm swin_tiny_patch4_window7_224 (swin_t, in the default run) and swin_small_patch4_window7_224 (swin_s),
         images/s: effvit.patch.timm against the unpatched model.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F

import effvit
from effvit.bench.cases import Case, SuiteOptions, add_compile_peer, compile_unavailable, compiled, element_size, \
    kernel_impls, register_suite, timed_step, timm_model_case, timm_unavailable
from effvit.reference import window as reference

STAGES = {
    "56x56x96": {"C": 96, "H": 56, "W": 56, "heads": 3},
    "28x28x192": {"C": 192, "H": 28, "W": 28, "heads": 6},
    "14x14x384": {"C": 384, "H": 14, "W": 14, "heads": 12},
    "7x7x768": {"C": 768, "H": 7, "W": 7, "heads": 24},
    "swin_t": {"model": "swin_tiny_patch4_window7_224", "short": "swin_t", "img": 224, "gflops": 4.5},
    "swin_s": {"model": "swin_small_patch4_window7_224", "short": "swin_s", "img": 224, "gflops": 8.7},
}
STAGE_NAMES = ("56x56x96", "28x28x192", "14x14x384", "7x7x768")
DEFAULT_BATCHES = (1, 8)
WINDOW = 7
SHIFTS = (0, 3)
OPS = ("core", "attn", "model")


def build(opts: SuiteOptions) -> Iterator[Case]:
    names = opts.shapes or STAGE_NAMES + ("swin_t",)
    batches = opts.batches or ((1,) if opts.quick else DEFAULT_BATCHES)
    for op in OPS:
        for name in names:
            stage = STAGES[name]
            if (op == "model") != ("model" in stage):
                continue
            for B in batches:
                for dtype in opts.dtypes:
                    for direction in opts.directions:
                        if op == "model":
                            yield _model_case(B, stage, dtype, opts, direction)
                            continue
                        for shift in SHIFTS:
                            if shift and not any(_geometry(stage, shift)[1]):
                                continue  # the map fits one window: timm drops the shift, the shift-0 case
                            yield (_core_case if op == "core" else _attn_case)(B, stage, shift, dtype, opts,
                                                                               direction)


def _geometry(stage: dict, shift: int):
    window, shift = reference.effective_window((stage["H"], stage["W"]), (WINDOW, WINDOW), (shift, shift))
    return window, shift


def _counts(B: int, stage: dict, window) -> tuple[float, float]:
    """FLOPs of q k^T and P v over the padded windows, and the bytes the fused core must move (read qkv,
    write the output and the log-sum-exp)."""
    C, H, W, heads = stage["C"], stage["H"], stage["W"], stage["heads"]
    n = window[0] * window[1]
    windows = B * math.ceil(H / window[0]) * math.ceil(W / window[1])
    return 4.0 * windows * heads * n * n * (C // heads), float(B * H * W)


def _sdpa_core(qkv, table, heads, window, shift, scale, pad, mask):
    """timm's fused_attn branch of WindowAttention.forward on the same partitioned qkv (its peer); mask: the
    shift mask made beforehand, as timm's attn_mask buffer."""
    B, H, W, C3 = qkv.shape
    windows, Hp, Wp = reference._pad_and_partition(qkv, window, shift, pad)
    B_, N, _ = windows.shape
    q, k, v = windows.reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn_mask = reference.relative_position_bias(table, window).unsqueeze(0).to(qkv.dtype)
    if mask is not None:
        nw = mask.shape[0]
        mask = mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, heads, -1, -1)
        attn_mask = attn_mask + mask.reshape(-1, heads, N, N)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    return reference._reverse_and_crop(x, window, shift, H, W, Hp, Wp)


def _flex_core_factory(B, stage, window, shift, scale, device):
    """FlexAttention on the rolled, padded, partitioned sequence: a block-diagonal mask_mod keeps each
    window to itself, a score_mod adds the relative-position bias and the shift mask. The BlockMask is built
    once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    H, W, heads = stage["H"], stage["W"], stage["heads"]
    Hp, Wp = reference.padded_size(H, W, window)
    n = window[0] * window[1]
    seq = (Hp // window[0]) * (Wp // window[1]) * n
    index = reference.relative_position_index(*window, device=device)
    region = reference.shift_region_mask(Hp, Wp, window, shift, device, torch.float32)
    nwin = seq // n
    region = torch.zeros(nwin, n, n, device=device) if region is None else region

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx // n == kv_idx // n

    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=device)
    flex = compiled(flex_attention)  # a frame of its own per case (see compiled)

    def core(qkv, table, pad):
        windows, _, _ = reference._pad_and_partition(qkv, window, shift, pad)       # [B*nW, N, 3C]
        q, k, v = windows.reshape(B, seq, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = table[index.view(-1)].view(n, n, heads).to(qkv.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            i, j = q_idx % n, kv_idx % n
            return score + bias[i, j, h] + region[q_idx // n, i, j].to(score.dtype)

        x = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        x = x.transpose(1, 2).reshape(B * nwin, n, -1)
        return reference._reverse_and_crop(x, window, shift, H, W, Hp, Wp)
    return core


def _core_case(B: int, stage: dict, shift_in: int, dtype, opts: SuiteOptions, direction: str) -> Case:
    C, H, W, heads = stage["C"], stage["H"], stage["W"], stage["heads"]
    window, shift = _geometry(stage, shift_in)
    device, backward = opts.device, direction == "fwd+bwd"
    scale = (C // heads) ** -0.5
    es = element_size(dtype)
    flops, pixels = _counts(B, stage, window)
    traffic = pixels * (4 * C * es + heads * 4)
    if backward:  # read qkv, out, grad_out, lse; write grad_qkv
        flops, traffic = flops * 3.5, traffic + pixels * (6 * C * es + heads * 4)
    probe = torch.empty((B, 1, 1, 3 * C), device=device, dtype=dtype)
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)

    def make_inputs():
        qkv = torch.randn((B, H, W, 3 * C), device=device, dtype=dtype).requires_grad_(backward)
        table = (torch.randn(rows, heads, device=device, dtype=dtype) * 0.02).requires_grad_(backward)
        pad = (torch.randn(3 * C, device=device, dtype=dtype) * 0.02).requires_grad_(backward)
        return qkv, table, pad

    def run(backend):
        return lambda qkv, table, pad: effvit.window_attention(qkv, heads, window, shift, table, pad, scale,
                                                               backend=backend)

    # Made once, as timm's SwinTransformerBlock keeps it (the attn_mask buffer), not on every call: the peers
    # pay for the attention, not for rebuilding the mask (which also made torch.compile emit ~18k lines of C++
    # per shape on CPU).
    Hp, Wp = reference.padded_size(H, W, window)
    shift_mask = reference.shift_region_mask(Hp, Wp, window, shift, device, dtype)

    def eager(qkv, table, pad):
        return reference.window_attention_core(qkv, table, heads, window, shift, scale, pad, shift_mask)

    def sdpa(qkv, table, pad):
        return _sdpa_core(qkv, table, heads, window, shift, scale, pad, shift_mask)

    def builder(fn):
        return lambda: timed_step(fn, backward, (B, H, W, C), device, dtype)

    impls, skipped = kernel_impls("window", probe, opts.backends, lambda backend: builder(run(backend)),
                                  args=(heads, window, shift))
    if opts.peers:
        impls["eager"] = builder(eager)
        impls["timm-sdpa"] = builder(sdpa)
        add_compile_peer(impls, skipped, eager, builder)
        if device == "cuda":
            impls["flex"] = lambda: timed_step(_flex_core_factory(B, stage, window, shift, scale, device), backward,
                                          (B, H, W, C), device, dtype)
        else:
            skipped["flex"] = "FlexAttention is a GPU peer"
    params = {"B": B, "H": H, "W": W, "C": C, "heads": heads, "ws": window[0], "shift": shift[0]}
    return Case(family="window", op="core", params=params, dtype=dtype, device=device, direction=direction,
                make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=float(traffic), flops=flops,
                input_bytes=int(pixels * 3 * C * es))


def _timm_block(stage: dict, shift: int, device, dtype, fused_attn: bool):
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(stage["C"], (stage["H"], stage["W"]), num_heads=stage["heads"],
                                 window_size=WINDOW, shift_size=shift).to(device=device, dtype=dtype)
    block.attn.fused_attn = fused_attn
    return block


def _attn_case(B: int, stage: dict, shift_in: int, dtype, opts: SuiteOptions, direction: str) -> Case:
    C, H, W, heads = stage["C"], stage["H"], stage["W"], stage["heads"]
    window, shift = _geometry(stage, shift_in)
    device, backward = opts.device, direction == "fwd+bwd"
    es = element_size(dtype)
    flops, pixels = _counts(B, stage, window)
    flops += 2.0 * pixels * C * 4 * C  # the qkv and proj GEMMs
    traffic = pixels * (2 * C * es + 4 * C * es * 2)  # x in, y out, qkv written and read
    if backward:
        flops, traffic = flops * 3, traffic * 3
    probe = torch.empty((B, 1, 1, 3 * C), device=device, dtype=dtype)
    impls, skipped = {}, {}

    @functools.cache
    def base():  # timm's block, made when the first implementation is built, not when the case is listed
        return _timm_block(stage, shift_in, device, dtype, fused_attn=False)

    def make_inputs():
        return (torch.randn((B, H, W, C), device=device, dtype=dtype).requires_grad_(backward),)

    def builder_for(block_fn):
        def build():
            return timed_step(block_fn(), backward, (B, H, W, C), device, dtype)
        return build

    def copy_of_base(fused_attn: bool = False):
        block = copy.deepcopy(base())
        block.attn.fused_attn = fused_attn
        return block

    why = timm_unavailable()
    if why:
        skipped["all"] = why
    else:
        def patched(backend):
            return builder_for(lambda: effvit.patch.timm(copy_of_base(), backend=backend)._attn)

        impls, skipped = kernel_impls("window", probe, opts.backends, patched, args=(heads, window, shift))
        if opts.peers:
            impls["eager"] = builder_for(lambda: base()._attn)
            impls["timm-sdpa"] = builder_for(lambda: copy_of_base(fused_attn=True)._attn)
            why = compile_unavailable()
            if why:
                skipped["compile"] = why
            else:
                impls["compile"] = builder_for(lambda: compiled(base()._attn))
    params = {"B": B, "H": H, "W": W, "C": C, "heads": heads, "ws": window[0], "shift": shift[0]}
    return Case(family="window", op="attn", params=params, dtype=dtype, device=device, direction=direction,
                make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=float(traffic), flops=flops,
                input_bytes=int(pixels * C * es))


def _model_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    return timm_model_case("window", B, stage["model"], stage["img"], stage["gflops"], dtype, opts, direction,
                           probe_shape=(B, 1, 1, 3 * 96), probe_args=(3, (7, 7), (3, 3)),
                           params={"B": B, "model": stage["short"], "img": stage["img"]})


register_suite("window", build, STAGES)
