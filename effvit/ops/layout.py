"""Output layouts shared by an op's fake kernel and its kernels (torch only, so the Triton launchers can use it)."""

from __future__ import annotations

import torch


def empty_like_layout(q: torch.Tensor, last: int) -> torch.Tensor:
    """An empty [B, H, N, last] tensor laid out in memory in q's dimension order (ties keep the logical order, as
    csrc/common/linear_checks.h's empty_like_layout does): the linear attention's output."""
    order = sorted(range(4), key=lambda d: -q.stride(d))
    sizes = list(q.shape[:3]) + [last]
    return q.new_empty([sizes[d] for d in order]).permute(*[order.index(d) for d in range(4)])
