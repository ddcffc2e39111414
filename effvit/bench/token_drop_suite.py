"""Benchmark cases of the token-drop family: EViT's dropping step alone, and timm ViTs with token dropping.

ops:
  drop    one dropping step at keep 0.7 of a ViT's 196 patch tokens (+ CLS): the scores from the CLS query and keys
          (q, k views of a qkv Linear's output) and the top-k gather with the fused token. Peers: EViT's eager code,
          which reads its scores off the [B, H, N, N] attention probabilities its explicit attention has already
          made (they are an input here, not timed: the comparison favours it), and torch.compile of that code.
  model   timm vit_small_patch16_224 / vit_base_patch16_224 images/s, patched with token dropping (keep 0.7 at
          blocks 3, 6, 9: 197 -> 140 -> 100 -> 72 tokens) against the unpatched model (all 197 tokens through
          every block, SDPA attention) and EViT's own algorithm in eager PyTorch (explicit attention
          probabilities, topk, gathers) on the same weights.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

import effvit
from effvit.bench.cases import Case, SuiteOptions, add_compile_peer, element_size, kernel_impls, register_suite, \
    timed_step, timm_model_case
from effvit.reference import token_drop as reference

KEEP_RATE, DROP_LOC = 0.7, (3, 6, 9)
STAGES = {
    "vit_s": {"N": 197, "C": 384, "heads": 6},
    "vit_b": {"N": 197, "C": 768, "heads": 12},
    "vit_small_patch16_224": {"model": "vit_small_patch16_224", "img": 224, "gflops": 4.6},
    "vit_base_patch16_224": {"model": "vit_base_patch16_224", "img": 224, "gflops": 17.6},
}
OP_NAMES = ("vit_s", "vit_b")
DEFAULT_SHAPES = OP_NAMES + ("vit_small_patch16_224",)
DEFAULT_BATCHES = {"op": (1, 64), "model": (8,)}


def build(opts: SuiteOptions) -> Iterator[Case]:
    for name in opts.shapes or DEFAULT_SHAPES:
        stage = STAGES[name]
        kind = "model" if "model" in stage else "op"
        if opts.quick and kind == "model" and name != "vit_small_patch16_224":
            continue
        for B in opts.batches or DEFAULT_BATCHES[kind]:
            for dtype in opts.dtypes:
                for direction in opts.directions:
                    yield (_model_case if kind == "model" else _drop_case)(B, stage, dtype, opts, direction)


def _evit_eager(attn, x, keep):
    """EViT's dropping step: scores off the attention probabilities, topk, gathers, complement, fused token."""
    return reference.drop_tokens(x, attn[:, :, 0, 1:].mean(dim=1), keep, 1, True, False)[0]


def _drop_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    N, C, H = stage["N"], stage["C"], stage["heads"]
    D = C // H
    keep = math.ceil(KEEP_RATE * (N - 1))
    device, backward = opts.device, direction == "fwd+bwd"
    es = element_size(dtype)
    flops = 2.0 * B * H * N * D + 2.0 * B * (N - 1 - keep) * C      # CLS logits, fused token
    traffic = float(B * N * C * es * 2 + B * (keep + 2) * C * es)   # read k and x, write the kept rows
    if backward:
        flops, traffic = flops * 3, traffic * 2.5
    out_shape = (B, keep + 2, C)

    def make_inputs():
        qkv = torch.randn((B, N, 3, H, D), device=device, dtype=dtype)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        attn = ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(dim=-1)
        x = torch.randn((B, N, C), device=device, dtype=dtype)
        return qkv.requires_grad_(backward), attn.requires_grad_(backward), x.requires_grad_(backward)

    def effvit_step(backend):
        def fn(qkv, attn, x):
            q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
            scores = effvit.cls_attention_scores(q[:, :, 0], k, D ** -0.5, 1, backend=backend)
            return effvit.drop_tokens(x, scores, keep, 1, True, backend=backend)[0]
        return lambda: timed_step(fn, backward, out_shape, device, dtype)

    def eager_builder(fn):
        return lambda: timed_step(lambda qkv, attn, x: fn(attn, x, keep), backward, out_shape, device, dtype)

    impls, skipped = kernel_impls("token_drop", torch.empty((B, N, C), device=device, dtype=dtype), opts.backends,
                                  effvit_step)
    if opts.peers:
        impls["eager"] = eager_builder(_evit_eager)
        add_compile_peer(impls, skipped, _evit_eager, eager_builder)
    return Case(family="token_drop", op="drop", params={"B": B, "N": N, "C": C, "heads": H, "keep": keep},
                dtype=dtype, device=device, direction=direction, make_inputs=make_inputs, impls=impls,
                skipped=skipped, bytes=traffic, flops=flops, input_bytes=B * N * 4 * C * es)


def _model_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    """"eager" is timm's unpatched model: every token through every block."""
    return timm_model_case(
        "token_drop", B, stage["model"], stage["img"], stage["gflops"], dtype, opts, direction,
        probe_shape=(B, 197, 384), patch_kwargs={"keep_rate": KEEP_RATE, "drop_loc": DROP_LOC},
        extra_peers={"evit-eager": lambda model, x: reference.evit_forward(model, x, KEEP_RATE, DROP_LOC)},
        extra_skipped={"tome": "ToMe-style merging is not built in effvit"},
        title=f"{stage['model']}, EViT keep rate {KEEP_RATE} (eager: no dropping)")


register_suite("token_drop", build, STAGES)
