"""The drop-in LITv2 HiLo module, with the official signature and parameter names."""

from __future__ import annotations

import torch

from effvit import checks
from effvit.ops import hilo as hilo_ops
from effvit.reference import hilo as reference


class HiLo(reference.HiLo):
    """LITv2 HiLo attention, fused: HiLo(dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.,
    proj_drop=0., window_size=2, alpha=0.5, backend=None).

    Same parameters and state_dict keys as ziplab/LITv2's HiLo (``h_qkv``, ``h_proj``, ``l_q``, ``l_kv``,
    ``l_proj``), so an official checkpoint's attention weights load unchanged. ``alpha`` is the share of Lo-Fi
    heads; ``window_size=1`` is plain multi-head attention on the l_* weights. forward(x [B, N, C], H, W) ->
    [B, N, C]; H and W need not be multiples of window_size (zero-padded and cropped, unmasked, as the official
    detection code does). ``backend`` picks the kernels (effvit.backends; None: the process default).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, window_size: int = 2, alpha: float = 0.5,
                 backend: str | None = None):
        checks.check_int(dim, "dim")
        checks.check_int(num_heads, "num_heads")
        checks.check_int(window_size, "window_size")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha (the share of Lo-Fi heads) must be in [0, 1], got {alpha!r}")
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, window_size, alpha)
        self.backend = backend

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return hilo_ops.hilo_attention(self, x, H, W, self.backend)
