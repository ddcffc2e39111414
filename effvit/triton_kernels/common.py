"""Triton helpers the families' kernels share."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_acc(v, ACC: tl.constexpr):
    """Converts loaded values to the accumulation type (bf16 via fp32: the interpreter has no bf16 maths)."""
    if v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(ACC)
