"""Swap effvit's fused kernels into models you already have, in place, and back.

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True)
    effvit.patch.timm(model)      # every Swin block's attention path runs the fused op
    effvit.unpatch(model)         # back to timm's own code

Patched: timm's SwinTransformerBlock (its _attn: fused (shifted-)window attention) and EfficientViT (MIT)'s LiteMLA
(its forward: the fused linear attention, read in place from the multi-scale qkv). Patching changes no parameter,
buffer or state_dict key: each patched module's class is swapped for a subclass that overrides only the attention
path (so deepcopy, pickling and state_dict all keep working), and unpatching swaps the class back.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

_PATCHED: dict[type, type] = {}   # timm class -> its effvit subclass


def _swin_attn(self, x):
    from effvit.nn.window import fused_swin_attention

    # timm's block has already clamped window_size / shift_size to the input resolution
    return fused_swin_attention(x, self.attn, self.window_size, self.shift_size, always_partition=True,
                                backend=getattr(self, "effvit_backend", None))


def _lite_mla_forward(self, x):
    from effvit.nn.linear import fused_lite_mla

    return fused_lite_mla(self, x, backend=getattr(self, "effvit_backend", None))


# subclass name -> (timm module, class, overridden methods, docstring, whether an instance can be patched)
_TARGETS = {
    "FusedSwinTransformerBlock": ("timm.models.swin_transformer", "SwinTransformerBlock", {"_attn": _swin_attn},
                                  "timm's SwinTransformerBlock with effvit's fused (shifted-)window attention.",
                                  lambda m: True),
    "FusedLiteMLA": ("timm.models.efficientvit_mit", "LiteMLA", {"forward": _lite_mla_forward},
                     "timm's EfficientViT LiteMLA with effvit's fused linear attention.",
                     lambda m: type(m.kernel_func) is nn.ReLU),
}


def _base_class(name: str) -> type | None:
    module_name, class_name = _TARGETS[name][:2]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


def _fused_class(name: str) -> type:
    base = _base_class(name)
    if base is None:
        raise ImportError(f"effvit.patch.timm needs timm with {'.'.join(_TARGETS[name][:2])} (pip install timm)")
    if base not in _PATCHED:
        methods, doc = _TARGETS[name][2], _TARGETS[name][3]
        _PATCHED[base] = type(name, (base,), {**methods, "__module__": __name__, "__doc__": doc})
    return _PATCHED[base]


def __getattr__(name: str):
    # lets pickle find the subclasses by name without importing timm when effvit is imported
    if name in _TARGETS:
        return _fused_class(name)
    raise AttributeError(name)


def timm(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Patches, in place, every timm SwinTransformerBlock (fused window attention) and EfficientViT LiteMLA (fused
    linear attention; those with a ReLU kernel function, as timm builds them) in ``model``.

    Weights, buffers and state_dict keys are untouched; returns ``model``. ``backend`` pins a backend
    (default: effvit's current choice). Raises ValueError when the model has nothing effvit patches.
    """
    try:
        importlib.import_module("timm")
    except ImportError as e:
        raise ImportError("effvit.patch.timm needs timm (pip install timm)") from e
    found = 0
    for name, (_, _, _, _, can_patch) in _TARGETS.items():
        base = _base_class(name)
        if base is None:
            continue
        fused = _fused_class(name)
        for module in model.modules():
            if type(module) is base and can_patch(module):
                module.__class__ = fused
            if type(module) is fused:
                module.effvit_backend = backend
                found += 1
    if not found:
        raise ValueError(f"effvit.patch.timm found no timm SwinTransformerBlock or EfficientViT LiteMLA in "
                         f"{type(model).__name__}; it patches timm's swin_transformer models "
                         "(swin_tiny_patch4_window7_224, ...) and efficientvit_mit models (efficientvit_b1, ...)")
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
