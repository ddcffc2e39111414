"""effvit: fused kernels for the attention layers of efficient vision transformers.

    import effvit
    y = effvit.shift(x, n_div=12)                 # functional, x: [B, C, H, W]
    block = effvit.nn.ShiftBlock(96, n_div=12)    # drop-in module, official parameter names
    effvit.patch.timm(swin_model)                 # fused window attention in a timm Swin, in place
    effvit.patch.timm(vit, keep_rate=0.7)         # EViT token dropping in a timm ViT, in place
    with effvit.use_backend("torch"): ...         # reference PyTorch code instead of kernels

`python -m effvit.info` shows how effvit was built and which backend serves which op here.
"""

from effvit import _extension  # first: loads effvit._C, which registers the C++ ops
from effvit._extension import ExtensionWarning
from effvit.backends import BackendNotSupported, explain, get_backend, set_backend, use_backend
from effvit.ops.hilo import lofi_attention
from effvit.ops.linear import linear_attention
from effvit.ops.shift import shift, shift_group_norm
from effvit.ops.token_drop import cls_attention_scores, drop_tokens
from effvit.ops.window import window_attention
from effvit import nn, patch, reference  # noqa: E402
from effvit.patch import unpatch

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupported",
    "ExtensionWarning",
    "cls_attention_scores",
    "drop_tokens",
    "explain",
    "get_backend",
    "linear_attention",
    "lofi_attention",
    "nn",
    "patch",
    "reference",
    "set_backend",
    "shift",
    "shift_group_norm",
    "unpatch",
    "use_backend",
    "window_attention",
]


def extension_available() -> bool:
    """Whether the compiled CPU/CUDA kernels are loaded (see effvit._extension.missing_reason())."""
    return _extension.available()
