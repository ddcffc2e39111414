"""Drop-in nn.Modules with the official parameter names, backed by effvit's kernels."""

from effvit.nn.common import DropPath
from effvit.nn.hilo import HiLo
from effvit.nn.linear import LinearAttention
from effvit.nn.shift import Shift, ShiftBlock
from effvit.nn.window import WindowAttention

__all__ = ["DropPath", "HiLo", "LinearAttention", "Shift", "ShiftBlock", "WindowAttention"]
