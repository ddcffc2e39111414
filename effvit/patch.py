"""Swap effvit's fused kernels into models you already have, in place, and back.

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True)
    effvit.patch.timm(model)      # every Swin block's attention path runs the fused op
    effvit.unpatch(model)         # back to timm's own code

    vit = timm.create_model("vit_small_patch16_224", pretrained=True)
    effvit.patch.timm(vit, keep_rate=0.7, drop_loc=(3, 6, 9))   # EViT token dropping at blocks 3, 6, 9

Patched: timm's SwinTransformerBlock (its _attn: fused (shifted-)window attention) and EfficientViT (MIT)'s LiteMLA
(its forward: the fused linear attention, read in place from the multi-scale qkv), and in a timm VisionTransformer
the Blocks at drop_loc (EViT token dropping, effvit.nn.token_drop; the model itself gains ``keep_rate`` and
``token_drop``, the settings its dropping blocks share). Patching changes no parameter,
buffer or state_dict key: each patched module's class is swapped for a subclass that overrides only the attention
path (so deepcopy, pickling and state_dict all keep working), and unpatching swaps the class back.
"""

from __future__ import annotations

import importlib
import types

import torch.nn as nn

from effvit.nn.linear import TIMM_LITE_MLA_METHODS
from effvit.nn.token_drop import TIMM_BLOCK_METHODS
from effvit.nn.window import TIMM_SWIN_BLOCK_METHODS

_PATCHED: dict[type, type] = {}   # timm class -> its effvit subclass


def _get_keep_rate(self):
    return self.token_drop.keep_rate


def _set_keep_rate(self, value):
    from effvit.nn.token_drop import check_keep_rate

    self.token_drop.keep_rate = check_keep_rate(value)


def _vit_forward_intermediates(self, *args, **kwargs):
    if self.token_drop.keep_rate < 1:
        raise NotImplementedError("forward_intermediates reshapes every block's tokens to the patch grid, which "
                                  "token dropping shrinks: set model.keep_rate = 1 (or effvit.unpatch(model)) first")
    return type(self).__bases__[0].forward_intermediates(self, *args, **kwargs)


# what token dropping changes in a timm ViT class (TorchScript skips the keep_rate property)
_TOKEN_DROP_VIT_METHODS = {"keep_rate": property(_get_keep_rate, _set_keep_rate),
                           "__jit_unused_properties__": ["keep_rate"],
                           "forward_intermediates": _vit_forward_intermediates}

# subclass name -> (timm module, class, overridden methods, docstring, whether an instance is patched by the scan;
# the token-drop classes are patched by _patch_token_drop, at the blocks a caller names)
_TARGETS = {
    "FusedSwinTransformerBlock": ("timm.models.swin_transformer", "SwinTransformerBlock", TIMM_SWIN_BLOCK_METHODS,
                                  "timm's SwinTransformerBlock with effvit's fused (shifted-)window attention.",
                                  lambda m: True),
    "FusedLiteMLA": ("timm.models.efficientvit_mit", "LiteMLA", TIMM_LITE_MLA_METHODS,
                     "timm's EfficientViT LiteMLA with effvit's fused linear attention.",
                     lambda m: type(m.kernel_func) is nn.ReLU),
    "TokenDropBlock": ("timm.models.vision_transformer", "Block", TIMM_BLOCK_METHODS,
                       "timm's ViT Block with EViT token dropping after its attention (effvit.nn.token_drop).",
                       lambda m: False),
    "TokenDropVisionTransformer": ("timm.models.vision_transformer", "VisionTransformer", _TOKEN_DROP_VIT_METHODS,
                                   "timm's VisionTransformer whose Blocks at token_drop.drop_loc drop tokens.",
                                   lambda m: False),
    "TokenDropVisionTransformerDistilled": ("timm.models.deit", "VisionTransformerDistilled", _TOKEN_DROP_VIT_METHODS,
                                            "timm's VisionTransformerDistilled (DeiT) whose Blocks at "
                                            "token_drop.drop_loc drop tokens (CLS and distillation token kept).",
                                            lambda m: False),
}

# the timm ViT classes token dropping patches: VisionTransformer and its subclasses that keep its Blocks
_TOKEN_DROP_MODELS = ("TokenDropVisionTransformer", "TokenDropVisionTransformerDistilled")


def _named(member, name: str):
    """A function as the method ``name``: a copy with that __name__, since TorchScript compiles a method under its
    function's __name__ (timm's forward kept as _timm_forward would otherwise clash with the new forward)."""
    if not isinstance(member, types.FunctionType) or member.__name__ == name:
        return member
    copy = types.FunctionType(member.__code__, member.__globals__, name, member.__defaults__, member.__closure__)
    copy.__kwdefaults__, copy.__doc__, copy.__module__ = member.__kwdefaults__, member.__doc__, member.__module__
    copy.__dict__.update(member.__dict__)  # keeps torch.jit.unused's mark
    return copy


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
        # timm's own methods stay callable as _timm_<name> (_attn: _timm_attn): TorchScript, which has no super(), falls back to them
        originals = {"_timm_" + m.lstrip("_"): getattr(base, m) for m in methods if callable(getattr(base, m, None))}
        members = {k: _named(v, k) for k, v in {**originals, **methods}.items()}
        _PATCHED[base] = type(name, (base,), {**members, "__module__": __name__, "__doc__": doc})
    return _PATCHED[base]


def __getattr__(name: str):
    # lets pickle find the subclasses by name without importing timm when effvit is imported
    if name in _TARGETS:
        return _fused_class(name)
    raise AttributeError(name)


def _token_drop_model(model: nn.Module) -> str | None:
    """The name of the token-dropping subclass for ``model``'s class, or None when token dropping does not patch it."""
    for name in _TOKEN_DROP_MODELS:
        base = _base_class(name)
        if base is not None and type(model) in (base, _fused_class(name)):
            return name
    return None


def _check_drop_loc(drop_loc, depth: int) -> tuple[int, ...]:
    try:
        indices = list(drop_loc)
    except TypeError:
        raise TypeError(f"drop_loc must be a sequence of block indices (ints), got {drop_loc!r}") from None
    if any(isinstance(i, bool) or not hasattr(i, "__index__") for i in indices):
        raise TypeError(f"drop_loc must be a sequence of block indices (ints), got {drop_loc!r}")
    drop_loc = tuple(sorted({i.__index__() for i in indices}))
    if not drop_loc or any(not 0 <= i < depth for i in drop_loc):
        raise ValueError(f"drop_loc must name blocks of the model, indices in [0, {depth}), got {drop_loc}")
    return drop_loc


def _patch_token_drop(model: nn.Module, model_name: str, backend, keep_rate, drop_loc, fuse_token, spatial_order,
                      detach_scores, record_index) -> None:
    from effvit.nn.token_drop import TokenDropSettings, check_keep_rate

    keep_rate = check_keep_rate(keep_rate)
    drop_loc = _check_drop_loc(drop_loc, len(model.blocks))
    if model.num_prefix_tokens < 1:
        raise ValueError(f"EViT token dropping scores tokens by the CLS token's attention, and "
                         f"{type(model).__name__} has no prefix token (class_token=False)")
    block_base, vit_base = _base_class("TokenDropBlock"), _base_class(model_name)
    block_cls, vit_cls = _fused_class("TokenDropBlock"), _fused_class(model_name)
    attention_cls = getattr(importlib.import_module("timm.layers"), "Attention", None)
    for i in drop_loc:
        block = model.blocks[i]
        if type(block) not in (block_base, block_cls) or type(block.attn) is not attention_cls:
            raise ValueError(f"token dropping patches timm's Block with its Attention; blocks[{i}] is "
                             f"{type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}")
    settings = TokenDropSettings(keep_rate=keep_rate, drop_loc=drop_loc, fuse_token=bool(fuse_token),
                                 spatial_order=bool(spatial_order), detach_scores=bool(detach_scores),
                                 record_index=bool(record_index), num_prefix=model.num_prefix_tokens, backend=backend)
    for i, block in enumerate(model.blocks):
        if type(block) is block_cls:  # patched before, with other settings
            block.__class__ = block_base
            for key in ("_effvit_token_drop", "_effvit_block_index"):
                block.__dict__.pop(key, None)
        if i in drop_loc:
            block.__class__ = block_cls
            block._effvit_token_drop = settings
            block._effvit_block_index = i
    if type(model) is vit_base:
        model.__class__ = vit_cls
    model.token_drop = settings


def timm(model: nn.Module, backend: str | None = None, keep_rate: float = 0.7, drop_loc=(3, 6, 9),
         fuse_token: bool = True, spatial_order: bool = False, detach_scores: bool = False,
         record_index: bool = False) -> nn.Module:
    """Patches, in place, every timm SwinTransformerBlock (fused window attention) and EfficientViT LiteMLA (fused
    linear attention; those with a ReLU kernel function, as timm builds them) in ``model``; a timm
    VisionTransformer (``model``, or one it wraps, as features_only does) gets EViT token dropping in its Blocks at ``drop_loc`` (block indices), each keeping
    ceil(keep_rate * (N - P)) of its N - P non-prefix tokens (P: CLS, registers, distillation token), the dropped
    ones fused into one token with ``fuse_token``; kept tokens in score order, or image order with
    ``spatial_order``; ``detach_scores`` stops the gradient through the scores; ``record_index`` keeps each
    dropping block's kept index in ``model.token_drop.kept``. ``model.keep_rate`` changes the rate later.

    Weights, buffers and state_dict keys are untouched; returns ``model``. ``backend`` pins a backend
    (default: effvit's current choice). Raises ValueError when the model has nothing effvit patches. The patched
    model traces with torch.fx and scripts with TorchScript (docs/fx-torchscript.md).
    """
    try:
        importlib.import_module("timm")
    except ImportError as e:
        raise ImportError("effvit.patch.timm needs timm (pip install timm)") from e
    found = 0
    # the model, or one it wraps (features_only)
    for vit in [m for m in model.modules() if _token_drop_model(m) is not None]:
        _patch_token_drop(vit, _token_drop_model(vit), backend, keep_rate, drop_loc, fuse_token, spatial_order,
                          detach_scores, record_index)
        found += 1
    for name, (_, _, _, _, can_patch) in _TARGETS.items():
        base = _base_class(name)
        if base is None or name.startswith("TokenDrop"):
            continue
        fused = _fused_class(name)
        for module in model.modules():
            if type(module) is base and can_patch(module):
                module.__class__ = fused
            if type(module) is fused:
                module.effvit_backend = backend
                found += 1
    if not found:
        raise ValueError(f"effvit.patch.timm found nothing to patch in {type(model).__name__}; it patches timm's "
                         "swin_transformer models (swin_tiny_patch4_window7_224, ...), efficientvit_mit models "
                         "(efficientvit_b1, ...) and VisionTransformer models (vit_small_patch16_224, "
                         "deit_small_distilled_patch16_224, ...: token dropping)")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores every module effvit.patch changed in ``model`` to its original class; returns ``model``."""
    originals = {patched: base for base, patched in _PATCHED.items()}
    for module in model.modules():
        base = originals.get(type(module))
        if base is not None:
            module.__class__ = base
            for key in ("effvit_backend", "token_drop", "_effvit_token_drop", "_effvit_block_index",
                        "_effvit_script_kernels", "_effvit_script_settings"):
                module.__dict__.pop(key, None)
    return model
