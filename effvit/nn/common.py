"""Small building blocks shared by the drop-in modules, and what the modules effvit.patch swaps in share under
torch.jit.script."""

from __future__ import annotations

import torch
import torch.nn as nn

from effvit import _extension, backends

def prepare_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of the modules effvit.patch swaps in; torch.jit.script calls it on each module before
    compiling. Records in ``_effvit_script_kernels`` (a bool, which TorchScript can read) whether the scripted module
    may call effvit's C++ kernels: effvit._C is loaded and the module's backend (its own, else the process-wide
    default at scripting time) is not "torch". Returns the module itself: torch.jit.script puts what this returns
    into the parent's submodules, the caller's eager model included."""
    backend = getattr(module, "effvit_backend", None) or backends.get_backend()
    module._effvit_script_kernels = _extension.available() and backend != "torch"
    return module


class DropPath(nn.Module):
    """Stochastic depth per sample (as timm's DropPath): zeroes whole samples of a residual branch."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
