"""ShiftViT shift and fused shift + GroupNorm(1, C): registration, autograd and the public functions.

Layers, bottom up:
  effvit::shift, effvit::shift_group_norm, effvit::shift_group_norm_backward
      C++ ops (schemas in csrc/effvit_ops.cpp, kernels in csrc/cpu/shift.cpp and csrc/cuda/shift.cu);
      their fake kernels are registered here.
  effvit::triton_shift, effvit::triton_shift_group_norm, effvit::triton_shift_group_norm_backward
      the Triton kernels (effvit/triton_kernels/shift.py) behind torch.library.custom_op, same signatures.
  ShiftFunction, ShiftGroupNormFunction
      the autograd.Functions: forward and backward call the ops of the backend chosen for the input.
  shift(), shift_group_norm()
      check the arguments, choose the backend (effvit.backends) and run.
"""

from __future__ import annotations

import torch

from effvit import backends, checks
from effvit.ops import registry
from effvit.reference import shift as reference

_OPS = ("shift", "shift_group_norm", "shift_group_norm_backward")


# ---- fake kernels: shapes, dtypes and strides of the outputs, for torch.compile and opcheck -----------

def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_shift(x, n_div, nhwc=False, reverse=False):
    return torch.empty_like(x)


def _fake_shift_group_norm(x, n_div, weight, bias, eps, nhwc=False):
    stats = x.new_empty((x.shape[0],), dtype=_stats_dtype(x.dtype))
    return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_shift_group_norm_backward(grad_shifted, grad_normalized, shifted, weight, mean, rstd, n_div,
                                    nhwc=False):
    return torch.empty_like(shifted), torch.empty_like(weight), torch.empty_like(weight)


_FAKES = {"shift": _fake_shift, "shift_group_norm": _fake_shift_group_norm,
          "shift_group_norm_backward": _fake_shift_group_norm_backward}


# ---- Triton kernels as custom ops ----------------------------------------------------------------------

try:
    from effvit.triton_kernels import shift as _triton
except ImportError:  # Triton not installed: the backend reports it (effvit.backends)
    _triton = None

if _triton is not None:
    @torch.library.custom_op("effvit::triton_shift", mutates_args=())
    def _triton_shift(x: torch.Tensor, n_div: int, nhwc: bool = False,
                      reverse: bool = False) -> torch.Tensor:
        return _triton.shift(x, n_div, nhwc, reverse)

    @torch.library.custom_op("effvit::triton_shift_group_norm", mutates_args=())
    def _triton_shift_group_norm(x: torch.Tensor, n_div: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                                 nhwc: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton.shift_group_norm(x, n_div, weight, bias, eps, nhwc)

    @torch.library.custom_op("effvit::triton_shift_group_norm_backward", mutates_args=())
    def _triton_shift_group_norm_backward(grad_shifted: torch.Tensor | None, grad_normalized: torch.Tensor,
                                          shifted: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                          rstd: torch.Tensor, n_div: int, nhwc: bool = False
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton.shift_group_norm_backward(grad_shifted, grad_normalized, shifted, weight, mean, rstd, n_div,
                                                 nhwc)


registry.register_fakes(_OPS, _FAKES, _triton is not None)
_OP_TABLE = registry.resolve_ops(_OPS, _triton)


def op(backend: str, name: str):
    """The registered op ``name`` of a kernel backend ("cpu" and "cuda" share the C++ op)."""
    return _OP_TABLE[backend][name]


# ---- what each backend supports ----------------------------------------------------------------------

def _grid_limit(x: torch.Tensor, *args) -> str | None:
    """The CUDA kernels: a grid row per sample, 32-bit indices within a sample."""
    if checks.at_least(x.shape[0], 65536):
        return f"batch size {x.shape[0]} exceeds the GPU grid limit of 65535 samples per call"
    per_sample = x[0].numel() if x.shape[0] else 0
    if checks.at_least(per_sample, checks.INDEX_LIMIT):
        return f"one sample has {per_sample} values; the GPU kernels index up to 2**31 - 1 per sample"
    return None


def _triton_limits(x: torch.Tensor, *args) -> str | None:
    """The Triton kernels index within a sample in int32."""
    span = sum((n - 1) * abs(s) for n, s in zip(x.shape[1:], x.stride()[1:]) if n > 0)
    if checks.at_least(span, checks.INDEX_LIMIT):
        return f"one sample spans {span} elements in memory; the Triton kernels index up to 2**31 - 1"
    return _grid_limit(x)


FAMILY = backends.register_family(
    "shift",
    kernels=[
        backends.KernelSpec("cpu", ops=_OPS),
        backends.KernelSpec("cuda", ops=_OPS, check=_grid_limit),
        backends.KernelSpec("triton", ops=(), check=_triton_limits),
    ],
    # bench/results: the C++ kernels beat the Triton ones on the shapes measured so far
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)
if _triton is None:
    FAMILY.kernels["triton"].unavailable = "Triton is not installed (pip install triton)"


# ---- autograd ---------------------------------------------------------------------------------------

class ShiftFunction(torch.autograd.Function):
    """out = shift(x), or its adjoint with reverse=True. The shift is linear and its gradient is the
    reverse shift, computed by this same Function, so gradients of any order work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n_div: int, nhwc: bool, reverse: bool, backend: str) -> torch.Tensor:
        ctx.n_div, ctx.nhwc, ctx.reverse, ctx.backend = n_div, nhwc, reverse, backend
        return op(backend, "shift")(x, n_div, nhwc, reverse)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = ShiftFunction.apply(grad_out, ctx.n_div, ctx.nhwc, not ctx.reverse, ctx.backend)
        return grad_x, None, None, None, None


class ShiftGroupNormFunction(torch.autograd.Function):
    """(shifted, normalized, mean, rstd) = shift_group_norm(x); saves the shifted tensor, not x."""

    @staticmethod
    def forward(ctx, x, n_div, weight, bias, eps, nhwc, backend):
        shifted, normalized, mean, rstd = op(backend, "shift_group_norm")(x, n_div, weight, bias, eps, nhwc)
        ctx.save_for_backward(shifted, weight, mean, rstd)
        ctx.n_div, ctx.nhwc, ctx.backend = n_div, nhwc, backend
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return shifted, normalized, mean, rstd

    @staticmethod
    @registry.first_order_only("shift_group_norm")
    def backward(ctx, grad_shifted, grad_normalized, _grad_mean, _grad_rstd):
        shifted, weight, mean, rstd = ctx.saved_tensors
        if grad_shifted is None and grad_normalized is None:
            return None, None, None, None, None, None, None
        if grad_normalized is None:
            grad_normalized = torch.zeros_like(shifted)
        grad_x, grad_weight, grad_bias = op(ctx.backend, "shift_group_norm_backward")(
            grad_shifted, grad_normalized, shifted, weight, mean, rstd, ctx.n_div, ctx.nhwc)
        return (grad_x, None, grad_weight if ctx.needs_input_grad[2] else None,
                grad_bias if ctx.needs_input_grad[3] else None, None, None, None)


# ---- public functions ------------------------------------------------------------------------------

def shift(x: torch.Tensor, n_div: int = 12, layout: str = "NCHW", backend: str | None = None) -> torch.Tensor:
    """ShiftViT's shift token mixer.

    x: [B, C, H, W] (layout="NCHW") or [B, H, W, C] (layout="NHWC"), any strides. Channel group
    g = C // n_div: group 0 moves one pixel left, 1 right, 2 up, 3 down (zero fill), the rest is copied.
    Returns a new tensor of x's shape (and memory format, when x is dense).
    """
    n_div, nhwc = checks.check_shift_input(x, n_div, layout)
    chosen = backends.select("shift", backend, x)
    if chosen == "torch":
        return reference.shift(x, n_div, layout)
    if not registry.needs_autograd(x):
        return op(chosen, "shift")(x, n_div, nhwc, False)
    return ShiftFunction.apply(x, n_div, nhwc, False, chosen)


def shift_group_norm(x: torch.Tensor, n_div: int, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, eps: float = 1e-5, layout: str = "NCHW",
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift, then GroupNorm(1, C) of the shifted tensor, in one fused op.

    x: [B, C, H, W] (or [B, H, W, C] with layout="NHWC"); weight, bias: [C] or None.
    Returns (shifted, normalized): the ShiftViT block's shortcut and its norm2 output.
    """
    n_div, nhwc = checks.check_shift_input(x, n_div, layout)
    channels = x.shape[3 if nhwc else 1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            checks.check_channel_param(t, name, channels, x)
    eps = checks.check_eps(eps)
    if x.shape[1] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"shift_group_norm needs C, H and W > 0 (GroupNorm over an empty sample), got shape "
                         f"{tuple(x.shape)}")
    chosen = backends.select("shift", backend, x)
    if chosen == "torch":
        # torch's group_norm takes parameters in x's dtype, or float32 ones with half/bfloat16 x; the kernels any
        weight, bias = (t if t is None or t.dtype == x.dtype
                        or (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))
                        else t.to(x.dtype) for t in (weight, bias))
        return reference.shift_group_norm(x, n_div, weight, bias, eps, layout)
    if weight is None:
        weight = x.new_ones((channels,))
    if bias is None:
        bias = x.new_zeros((channels,))
    if not registry.needs_autograd(x, weight, bias):
        shifted, normalized, _, _ = op(chosen, "shift_group_norm")(x, n_div, weight, bias, eps, nhwc)
        return shifted, normalized
    shifted, normalized, _, _ = ShiftGroupNormFunction.apply(x, n_div, weight, bias, eps, nhwc, chosen)
    return shifted, normalized
