"""Argument checks shared by every backend, with errors that say what was expected.

They run before a backend is chosen, so the reference and every kernel reject the same inputs with the
same words. Wrong types raise TypeError, wrong values or shapes ValueError.
"""

from __future__ import annotations

import torch

LAYOUTS = ("NCHW", "NHWC")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_layout(layout) -> bool:
    """Returns True for the (B, H, W, C) layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' (B, C, H, W) or 'NHWC' (B, H, W, C), got {layout!r}")
    return layout == "NHWC"


def check_same_device(tensors: dict[str, torch.Tensor]) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to the same device")


def check_shift_input(x, n_div, layout: str = "NCHW", name: str = "x") -> tuple[int, bool]:
    """Checks a ShiftViT shift input; returns (channels per shifted group, nhwc)."""
    check_tensor(x, name)
    nhwc = check_layout(layout)
    if x.dim() != 4:
        dims = "(B, H, W, C)" if nhwc else "(B, C, H, W)"
        raise ValueError(f"{name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(x.shape)}")
    check_float(x, name)
    check_int(n_div, "n_div")
    channels = x.shape[3 if nhwc else 1]
    if not 4 <= n_div <= channels:
        raise ValueError(
            f"n_div must be in [4, C] = [4, {channels}] so that each of the four shifted groups "
            f"(C // n_div channels) is non-empty, got n_div={n_div} for C={channels}"
            + (" (is layout right? channels are dim 3 for 'NHWC', dim 1 for 'NCHW')" if channels < 4 else ""))
    return channels // n_div, nhwc


def check_channel_param(t, name: str, channels: int, x: torch.Tensor) -> None:
    check_tensor(t, name)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [C] = [{channels}], got {tuple(t.shape)}")
    check_float(t, name)
    check_same_device({"x": x, name: t})


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)
