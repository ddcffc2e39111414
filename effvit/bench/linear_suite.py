"""Benchmark cases of the linear family: non-causal linear attention across token counts, and EfficientViT.

ops:
  core    linear attention between the Linears on q, k, v [B, H, N, D] read from a qkv Linear's output ((B, N, H, D)
          memory), relu features, eps 1e-5 (EfficientViT's form), N = 196 ... 50176 (224 ... 896 pixel images at patch
          4), 8 heads, D 32. Peers: the eager official code (EfficientViT's float32 _attn: kv first, ones column),
          torch.compile of it, and softmax attention through scaled_dot_product_attention at the same shapes — the
          reason linear attention exists (it is left out where its N x N cost would take minutes).
  model   timm efficientvit_b1 images/s, effvit.patch.timm against the unpatched model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import effvit
from effvit.bench.cases import Case, SuiteOptions, add_compile_peer, element_size, kernel_impls, register_suite, \
    timed_step, timm_model_case
from effvit.reference import linear as reference

STAGES = {f"N{n}": {"N": n, "heads": 8, "D": 32} for n in (196, 784, 3136, 12544, 50176)}
STAGES["efficientvit_b1"] = {"model": "efficientvit_b1", "img": 224}
CORE_NAMES = tuple(name for name in STAGES if name.startswith("N"))
DEFAULT_BATCHES = (1,)
# softmax attention's N x N cost: beyond these it takes minutes (and gigabytes, with backward) on a 2-core CPU
SDPA_MAX_TOKENS = {("cpu", "fwd"): 12544, ("cpu", "fwd+bwd"): 3136, ("cuda", "fwd"): 50176, ("cuda", "fwd+bwd"): 50176}


def build(opts: SuiteOptions) -> Iterator[Case]:
    names = opts.shapes or CORE_NAMES + ("efficientvit_b1",)
    batches = opts.batches or DEFAULT_BATCHES
    for name in names:
        stage = STAGES[name]
        if opts.quick and stage.get("N", 0) > 3136:
            continue
        for B in batches:
            for dtype in opts.dtypes:
                for direction in opts.directions:
                    yield (_model_case if "model" in stage else _core_case)(B, stage, dtype, opts, direction)


def _eager(q, k, v):
    """EfficientViT's LiteMLA attention as timm writes it (relu, ones column, float32, kv first)."""
    return reference.lite_mla_attention(F.relu(q), F.relu(k), v, 1e-5)


def _core_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    N, H, D = stage["N"], stage["heads"], stage["D"]
    device, backward = opts.device, direction == "fwd+bwd"
    es = element_size(dtype)
    flops = 4.0 * B * H * N * D * (D + 1)          # phi(k)^T [v, 1] and phi(q) [S | z]
    traffic = float(B * N * H * D * 4 * es)        # read q, k, v; write out
    if backward:
        flops, traffic = flops * 3, traffic * 2.75
    probe = torch.empty((B, H, N, D), device=device, dtype=dtype)

    def make_inputs():
        qkv = torch.randn((B, N, 3, H, D), device=device, dtype=dtype).requires_grad_(backward)
        return (qkv,)

    def split(qkv):
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: [B, H, N, D] views of (B, N, H, D) memory

    def builder(fn):
        return lambda: timed_step(lambda qkv: fn(*split(qkv)), backward, (B, H, N, D), device, dtype)

    impls, skipped = kernel_impls(
        "linear", probe, opts.backends,
        lambda backend: builder(lambda q, k, v: effvit.linear_attention(q, k, v, "relu", eps=1e-5, backend=backend)),
        args=(D, D))
    if opts.peers:
        impls["eager"] = builder(_eager)
        add_compile_peer(impls, skipped, _eager, builder)
        if N <= SDPA_MAX_TOKENS.get((device, direction), 0):
            impls["sdpa-softmax"] = builder(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
        else:
            skipped["sdpa-softmax"] = f"softmax attention's N x N cost at N = {N} takes minutes here"
    params = {"B": B, "N": N, "heads": H, "D": D}
    return Case(family="linear", op="core", params=params, dtype=dtype, device=device, direction=direction,
                make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=traffic, flops=flops,
                input_bytes=B * N * 3 * H * D * es, other_designs=("sdpa-softmax",))


def _model_case(B: int, stage: dict, dtype, opts: SuiteOptions, direction: str) -> Case:
    return timm_model_case("linear", B, stage["model"], stage["img"], 1.6, dtype, opts, direction,
                           probe_shape=(B, 16, 64, 8), probe_args=(8, 8))


register_suite("linear", build, STAGES)
