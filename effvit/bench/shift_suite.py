"""Benchmark cases of the shift family: ShiftViT's stages (ShiftViT-T: C = 96, 192, 384, 768 at
56, 28, 14, 7 pixels a side, n_div 12).

ops: "shift" (the token mixer alone) and "shift_group_norm" (the block's shift followed by its norm2,
GroupNorm(1, C)); the eager peer runs the official code (shift_feat, then F.group_norm).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import effvit
from effvit.bench.cases import Case, SuiteOptions, add_compile_peer, element_size, kernel_impls, register_suite, \
    timed_step
from effvit.reference import shift as reference

STAGES = {
    "56x56x96": {"C": 96, "H": 56, "W": 56},
    "28x28x192": {"C": 192, "H": 28, "W": 28},
    "14x14x384": {"C": 384, "H": 14, "W": 14},
    "7x7x768": {"C": 768, "H": 7, "W": 7},
}
DEFAULT_SHAPES = ("56x56x96", "28x28x192")
DEFAULT_BATCHES = (1, 32)
N_DIV = 12
OPS = ("shift", "shift_group_norm")


def _eager_shift(x):
    return reference.shift_feat(x, N_DIV)


def _eager_shift_group_norm(x, w, b):
    shifted = reference.shift_feat(x, N_DIV)
    return shifted, F.group_norm(shifted, 1, w, b, 1e-5)


def build(opts: SuiteOptions) -> Iterator[Case]:
    shape_names = opts.shapes or DEFAULT_SHAPES
    batches = opts.batches or ((1,) if opts.quick else DEFAULT_BATCHES)
    for op in OPS:
        for name in shape_names:
            stage = STAGES[name]
            for B in batches:
                for dtype in opts.dtypes:
                    for direction in opts.directions:
                        yield _case(op, B, stage, dtype, opts, direction)


def _case(op: str, B: int, stage: dict, dtype: torch.dtype, opts: SuiteOptions, direction: str) -> Case:
    C, H, W = stage["C"], stage["H"], stage["W"]
    device, backward = opts.device, direction == "fwd+bwd"
    n = B * C * H * W
    es = element_size(dtype)
    probe = torch.empty((B, C, 1, 1), device=device, dtype=dtype)  # what the backends' checks read
    n_out = 1 if op == "shift" else 2

    def make_inputs():
        x = torch.randn((B, C, H, W), device=device, dtype=dtype).requires_grad_(backward)
        if op == "shift":
            return (x,)
        w = torch.randn(C, device=device, dtype=dtype).requires_grad_(backward)
        b = torch.randn(C, device=device, dtype=dtype).requires_grad_(backward)
        return (x, w, b)

    if op == "shift":
        def run(backend):
            return lambda x: effvit.shift(x, N_DIV, "NCHW", backend)
        eager = _eager_shift
        # forward: read x, write out; backward: read the gradient, write its reverse shift
        traffic, flops = 2 * n * es, 0.0
        if backward:
            traffic *= 2
    else:
        def run(backend):
            return lambda x, w, b: effvit.shift_group_norm(x, N_DIV, w, b, 1e-5, "NCHW", backend)
        eager = _eager_shift_group_norm
        # forward: read x, write shifted and normalized; backward: read both gradients and shifted, write dx
        traffic, flops = 3 * n * es, 5.0 * n
        if backward:
            traffic, flops = traffic + 4 * n * es, flops + 8.0 * n

    def builder(fn):
        return lambda: timed_step(fn, backward, (B, C, H, W), device, dtype, n_out)

    impls, skipped = kernel_impls("shift", probe, opts.backends, lambda backend: builder(run(backend)))
    if opts.peers:
        if op == "shift" and not backward:
            impls["floor:clone"] = builder(lambda x: x.clone())  # the same bytes moved, no shifting
        impls["eager"] = builder(eager)
        add_compile_peer(impls, skipped, eager, builder)
    return Case(family="shift", op=op, params={"B": B, "C": C, "H": H, "W": W, "n_div": N_DIV}, dtype=dtype,
                device=device, direction=direction, make_inputs=make_inputs, impls=impls, skipped=skipped,
                bytes=float(traffic), flops=flops, input_bytes=n * es)


register_suite("shift", build, STAGES)
