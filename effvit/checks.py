"""Argument checks shared by every backend, with errors that say what was expected.

They run before a backend is chosen, so the reference and every kernel reject the same inputs with the
same words. Wrong types raise TypeError, wrong values or shapes ValueError.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

LAYOUTS = ("NCHW", "NHWC")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def is_integral(value) -> bool:
    """An int or any integral number (NumPy integers, 0-d integer tensors: whatever has __index__), not a bool."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def check_int(value, name: str) -> int:
    """``value`` as a Python int; any integral type (NumPy integers included) is accepted, bool is not."""
    if not is_integral(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return operator.index(value)


def check_real(value, name: str, expected: str = "a float") -> float:
    """``value`` as a Python float; any real number (NumPy floats included) is accepted, bool is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return float(value)


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
    """Checks a ShiftViT shift input; returns (n_div as an int, nhwc)."""
    check_tensor(x, name)
    nhwc = check_layout(layout)
    if x.dim() != 4:
        dims = "(B, H, W, C)" if nhwc else "(B, C, H, W)"
        raise ValueError(f"{name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(x.shape)}")
    check_float(x, name)
    n_div = check_int(n_div, "n_div")
    channels = x.shape[3 if nhwc else 1]
    if not 4 <= n_div <= channels:
        raise ValueError(
            f"n_div must be in [4, C] = [4, {channels}] so that each of the four shifted groups "
            f"(C // n_div channels) is non-empty, got n_div={n_div} for C={channels}"
            + (" (is layout right? channels are dim 3 for 'NHWC', dim 1 for 'NCHW')" if channels < 4 else ""))
    return n_div, nhwc


def check_channel_param(t, name: str, channels: int, x: torch.Tensor) -> None:
    check_tensor(t, name)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [C] = [{channels}], got {tuple(t.shape)}")
    check_float(t, name)
    check_same_device({"x": x, name: t})


def check_eps(eps) -> float:
    eps = check_real(eps, "eps")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def check_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (h, w), each >= minimum."""
    pair = (value, value) if is_integral(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_integral(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    pair = operator.index(pair[0]), operator.index(pair[1])
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_window_attention(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, scale,
                           always_partition: bool) -> tuple[int, tuple[int, int], tuple[int, int], float]:
    """Checks fused window attention's arguments; returns (num_heads, window, shift, scale)."""
    check_tensor(qkv, "qkv")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be 4-D (B, H, W, 3C), the qkv Linear's output on the (B, H, W, C) map, "
                         f"got shape {tuple(qkv.shape)}" + (" (windows [B_, N, 3C]? use effvit.nn.WindowAttention)"
                                                            if qkv.dim() == 3 else ""))
    check_float(qkv, "qkv")
    num_heads = check_int(num_heads, "num_heads")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if qkv.shape[3] % (3 * num_heads):
        raise ValueError(f"qkv's last dimension ({qkv.shape[3]}) must be 3 * num_heads * head_dim; it is not "
                         f"divisible by 3 * num_heads = {3 * num_heads}")
    if qkv.shape[3] == 0:
        raise ValueError("qkv's last dimension is 0: head_dim must be >= 1")
    window = check_pair(window_size, "window_size", 1)
    shift = check_pair(shift_size, "shift_size", 0)
    if any(s >= w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size {shift} must be smaller than window_size {window} in each dimension")
    H, W = qkv.shape[1], qkv.shape[2]
    if not always_partition and (window[0] > H or window[1] > W):
        raise ValueError(
            f"window_size {window} is larger than the {H}x{W} map; timm clamps the window to the map (and drops "
            "the shift) there: effvit.reference.window.effective_window((H, W), window, shift) does the same. "
            "Pass always_partition=True to pad the map up to a whole window instead.")
    if max(window) > 64:
        raise ValueError(f"window_size {window} is too large: the kernels take windows up to 64 per side")
    heads = num_heads
    if bias_table is not None:
        check_tensor(bias_table, "relative_position_bias_table")
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        if tuple(bias_table.shape) != (rows, heads):
            raise ValueError(f"relative_position_bias_table must have shape [(2*wh-1)*(2*ww-1), num_heads] = "
                             f"[{rows}, {heads}] for window {window}, got {tuple(bias_table.shape)}")
        check_float(bias_table, "relative_position_bias_table")
    if qkv_bias is not None:
        check_tensor(qkv_bias, "qkv_bias")
        if tuple(qkv_bias.shape) != (qkv.shape[3],):
            raise ValueError(f"qkv_bias (the qkv Linear's bias, the qkv of a padding token) must have shape "
                             f"[3C] = [{qkv.shape[3]}], got {tuple(qkv_bias.shape)}")
        check_float(qkv_bias, "qkv_bias")
    check_same_device({"qkv": qkv, "relative_position_bias_table": bias_table, "qkv_bias": qkv_bias})
    return num_heads, window, shift, check_scale(scale, qkv.shape[3] // (3 * num_heads))


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    return check_real(scale, "scale", "a float or None (head_dim ** -0.5)")


def check_lofi_attention(q, kv, num_heads, scale) -> tuple[int, float]:
    """Checks Lo-Fi attention's arguments (q: [B, N, heads*D], kv: [B, M, 2*heads*D]); returns (num_heads, scale)."""
    check_tensor(q, "q")
    check_tensor(kv, "kv")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (B, N, heads * head_dim), got shape {tuple(q.shape)}")
    if kv.dim() != 3:
        raise ValueError(f"kv must be 3-D (B, M, 2 * heads * head_dim), the l_kv Linear's output on the pooled "
                         f"tokens, got shape {tuple(kv.shape)}")
    check_float(q, "q")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv must have q's dtype {q.dtype}, got {kv.dtype}")
    check_same_device({"q": q, "kv": kv})
    num_heads = check_int(num_heads, "num_heads")
    if num_heads < 1 or q.shape[2] % num_heads or q.shape[2] == 0:
        raise ValueError(f"q's last dimension ({q.shape[2]}) must be num_heads * head_dim with num_heads = "
                         f"{num_heads} >= 1")
    if kv.shape[0] != q.shape[0]:
        raise ValueError(f"kv's batch ({kv.shape[0]}) must equal q's ({q.shape[0]})")
    if kv.shape[2] != 2 * q.shape[2]:
        raise ValueError(f"kv's last dimension ({kv.shape[2]}) must be twice q's ({q.shape[2]}): keys then values")
    if kv.shape[1] == 0 and q.numel() > 0:
        raise ValueError("kv must hold at least one token")
    return num_heads, check_scale(scale, q.shape[2] // num_heads)


def check_hilo_input(x, H, W, dim: int) -> tuple[int, int]:
    """HiLo's forward(x [B, N, C], H, W): N must be H * W and C the module's dim."""
    check_tensor(x, "x")
    H, W = check_int(H, "H"), check_int(W, "W")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, N, C) tokens of an H x W map, got shape {tuple(x.shape)}")
    check_float(x, "x")
    if H < 1 or W < 1 or x.shape[1] != H * W:
        raise ValueError(f"x has N = {x.shape[1]} tokens but H * W = {H} * {W} = {H * W}; pass the map's "
                         "height and width")
    if x.shape[2] != dim:
        raise ValueError(f"x has {x.shape[2]} channels but the module's dim is {dim}")
    return H, W


def check_linear_attention(q, k, v, feature_map, temperature, q_scale, k_scale, eps, denom_min
                           ) -> tuple[float, float, float, float]:
    """Checks linear attention's arguments; returns (q_scale, k_scale, eps, denom_min) with -inf for no clamp."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, N, head_dim), got shape {tuple(t.shape)}")
    check_float(q, "q")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} (B, heads, N, head_dim), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have q's batch, heads and N {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("head dimensions must be > 0")
    if feature_map not in ("relu", "elu+1", "identity"):
        raise ValueError(f"feature_map must be 'relu', 'elu+1' or 'identity', got {feature_map!r}")
    if temperature is not None:
        check_tensor(temperature, "temperature")
        if temperature.numel() != q.shape[1]:
            raise ValueError(f"temperature must hold one value per head ({q.shape[1]}), got shape "
                             f"{tuple(temperature.shape)}")
        check_float(temperature, "temperature")
    check_same_device({"q": q, "k": k, "v": v, "temperature": temperature})
    eps = check_eps(eps)
    denom_min = float("-inf") if denom_min is None else check_real(denom_min, "denom_min", "a float or None")
    if math.isnan(denom_min):
        raise ValueError("denom_min must be a number (the denominator's lower clamp) or None for no clamp, got nan")
    return check_real(q_scale, "q_scale"), check_real(k_scale, "k_scale"), eps, denom_min


def check_cls_attention_scores(q, k, scale, num_prefix) -> tuple[float, int]:
    """Checks the CLS-score op's arguments; returns (scale, num_prefix)."""
    check_tensor(q, "q")
    check_tensor(k, "k")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (B, heads, head_dim): the CLS token's query row, e.g. q[:, :, 0] of a "
                         f"[B, heads, N, head_dim] q; got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be 4-D (B, heads, N, head_dim), got shape {tuple(k.shape)}")
    check_float(q, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; pass both in one dtype")
    check_same_device({"q": q, "k": k})
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[2]:
        raise ValueError(f"k must be [B, heads, N, head_dim] with q's B, heads and head_dim {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    if q.shape[2] == 0:
        raise ValueError("q and k have head_dim 0: head_dim must be >= 1")
    num_prefix = check_int(num_prefix, "num_prefix")
    if not 0 <= num_prefix < k.shape[2]:
        raise ValueError(f"num_prefix (the CLS/register tokens that are not scored) must be in [0, N) = "
                         f"[0, {k.shape[2]}), got {num_prefix}")
    return check_scale(scale, q.shape[2]), num_prefix


def check_drop_tokens(x, scores, keep, num_prefix) -> tuple[int, int]:
    """Checks drop_tokens' arguments; returns (keep, num_prefix)."""
    check_tensor(x, "x")
    check_tensor(scores, "scores")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, N, C), the tokens of the residual stream, got shape {tuple(x.shape)}")
    check_float(x, "x")
    check_float(scores, "scores")
    check_same_device({"x": x, "scores": scores})
    num_prefix = check_int(num_prefix, "num_prefix")
    B, N, _ = x.shape
    if not 0 <= num_prefix < N:
        raise ValueError(f"num_prefix (the CLS/register tokens, always kept) must be in [0, N) = [0, {N}), "
                         f"got {num_prefix}")
    if tuple(scores.shape) != (B, N - num_prefix):
        raise ValueError(f"scores must be [B, N - num_prefix] = [{B}, {N - num_prefix}] (one per non-prefix token), "
                         f"got {tuple(scores.shape)}")
    keep = check_int(keep, "keep")
    if not 1 <= keep <= N - num_prefix:
        raise ValueError(f"keep must be in [1, N - num_prefix] = [1, {N - num_prefix}], got {keep}")
    return keep, num_prefix


INDEX_LIMIT = 2**31   # the kernels index with 32-bit integers: up to INDEX_LIMIT - 1


def index_limit(name: str, values) -> str | None:
    """Why kernels that index with 32 bits cannot take ``values`` elements of ``name``, or None when they can."""
    if at_least(values, INDEX_LIMIT):
        return f"{name} has {values} values; the kernels index up to 2**31 - 1"
    return None


def at_least(size, limit: int) -> bool:
    """size >= limit, for a kernel's size limit. A symbolic size (a dynamic batch under torch.export or
    torch.compile(dynamic=True)) counts as below the limit unless it provably is not: deciding it would add a guard
    that bounds the dynamic dimension (torch.export rejects the program), and the kernels that index in 32 bits
    check their sizes again when they run."""
    if isinstance(size, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(size >= limit)
    return size >= limit
