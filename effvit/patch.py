"""Swap effvit's fused kernels into models you already have, in place, and back.

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True)
    effvit.patch.timm(model)      # every Swin block's attention path runs the fused op
    effvit.unpatch(model)         # back to timm's own code

Patching changes no parameter, buffer or state_dict key: each patched module's class is swapped for a
subclass that overrides only the attention path (so deepcopy, pickling and state_dict all keep working),
and unpatching swaps the class back.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

_PATCHED: dict[type, type] = {}   # timm class -> its effvit subclass


def _swin_block_class() -> type:
    try:
        module = importlib.import_module("timm.models.swin_transformer")
    except ImportError as e:
        raise ImportError("effvit.patch.timm needs timm (pip install timm)") from e
    return module.SwinTransformerBlock


def _fused_swin_block_class() -> type:
    """The subclass of timm's SwinTransformerBlock whose _attn runs the fused window attention."""
    base = _swin_block_class()
    if base not in _PATCHED:
        from effvit.nn.window import fused_swin_attention

        def _attn(self, x):
            # timm's block has already clamped window_size / shift_size to the input resolution
            return fused_swin_attention(x, self.attn, self.window_size, self.shift_size, always_partition=True,
                                        backend=getattr(self, "effvit_backend", None))

        cls = type("FusedSwinTransformerBlock", (base,), {
            "_attn": _attn, "__module__": __name__,
            "__doc__": "timm's SwinTransformerBlock with effvit's fused (shifted-)window attention.",
        })
        _PATCHED[base] = cls
    return _PATCHED[base]


def __getattr__(name: str):
    # lets pickle find the subclass by name without importing timm when effvit is imported
    if name == "FusedSwinTransformerBlock":
        return _fused_swin_block_class()
    raise AttributeError(name)


def timm(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Patches every timm SwinTransformerBlock in ``model`` (in place) to run effvit's fused window attention.

    Weights, buffers and state_dict keys are untouched; returns ``model``. ``backend`` pins a backend
    (default: effvit's current choice). Raises ValueError when the model has no Swin block.
    """
    base = _swin_block_class()
    fused = _fused_swin_block_class()
    found = 0
    for module in model.modules():
        if type(module) is base:
            module.__class__ = fused
        if type(module) is fused:
            module.effvit_backend = backend
            found += 1
    if not found:
        raise ValueError(f"effvit.patch.timm found no timm SwinTransformerBlock in {type(model).__name__}; "
                         "it patches timm's swin_transformer models (swin_tiny_patch4_window7_224, ...)")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores every module effvit.patch changed in ``model`` to its original class; returns ``model``."""
    originals = {patched: base for base, patched in _PATCHED.items()}
    for module in model.modules():
        base = originals.get(type(module))
        if base is not None:
            module.__class__ = base
            module.__dict__.pop("effvit_backend", None)
    return model
