"""Drop-in nn.Modules with the official parameter names, backed by effvit's kernels; token dropping helpers."""

from effvit.nn.common import DropPath
from effvit.nn.hilo import HiLo
from effvit.nn.linear import LinearAttention
from effvit.nn.shift import Shift, ShiftBlock
from effvit.nn.token_drop import TokenDropSettings, cls_attention_map, guided
from effvit.nn.window import WindowAttention

__all__ = ["DropPath", "HiLo", "LinearAttention", "Shift", "ShiftBlock", "TokenDropSettings", "WindowAttention",
           "cls_attention_map", "guided"]
