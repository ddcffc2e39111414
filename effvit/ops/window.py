"""Swin (shifted-)window attention between the qkv and proj GEMMs: registration, autograd and the public function.

Layers, bottom up:
  effvit::window_attention, effvit::window_attention_backward
      C++ ops (schemas in csrc/effvit_ops.cpp, kernels in csrc/cpu/window.cpp and csrc/cuda/window.cu);
      their fake kernels are registered here.
  effvit::triton_window_attention, effvit::triton_window_attention_backward
      the Triton kernels (effvit/triton_kernels/window.py) behind torch.library.custom_op, same signatures.
  WindowAttentionFunction
      forward saves qkv, the output and the log-sum-exp (no attention matrix); backward recomputes it.
  window_attention()
      checks the arguments, chooses the backend (effvit.backends) and runs.
  script_window_attention()
      the C++ op as TorchScript calls it (effvit.nn.window.window_attention_core).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from effvit import backends, checks
from effvit.ops import registry
from effvit.reference import window as reference

_OPS = ("window_attention", "window_attention_backward")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp, the bias table the kernels read and their accumulators."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels: shapes, dtypes and strides of the outputs, for torch.compile and opcheck -----------

def _fake_window_attention(qkv, bias_table, pad_qkv, num_heads, window, shift, scale):
    B, H, W, C3 = qkv.shape
    out = qkv.new_empty((B, H, W, C3 // 3))
    lse = qkv.new_empty((B, num_heads, H, W), dtype=acc_dtype(qkv.dtype))
    return out, lse


def _fake_window_attention_backward(grad_out, qkv, bias_table, pad_qkv, out, lse, num_heads, window, shift, scale):
    acc = acc_dtype(qkv.dtype)
    table_shape = tuple(bias_table.shape) if bias_table is not None else (0,)
    return (qkv.new_empty(qkv.shape), qkv.new_empty(table_shape, dtype=acc),
            qkv.new_empty((qkv.shape[3],), dtype=acc))


_FAKES = {"window_attention": _fake_window_attention, "window_attention_backward": _fake_window_attention_backward}


# ---- Triton kernels as custom ops ----------------------------------------------------------------------

try:
    from effvit.triton_kernels import window as _triton
except ImportError:  # Triton not installed: the backend reports it (effvit.backends)
    _triton = None

if _triton is not None:
    @torch.library.custom_op("effvit::triton_window_attention", mutates_args=())
    def _triton_window_attention(qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None,
                                 num_heads: int, window: list[int], shift: list[int], scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.window_attention(qkv, bias_table, pad_qkv, num_heads, window, shift, scale)

    @torch.library.custom_op("effvit::triton_window_attention_backward", mutates_args=())
    def _triton_window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor | None,
                                          pad_qkv: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                                          num_heads: int, window: list[int], shift: list[int], scale: float
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton.window_attention_backward(grad_out, qkv, bias_table, pad_qkv, out, lse, num_heads, window,
                                                 shift, scale)


registry.register_fakes(_OPS, _FAKES, _triton is not None)
_OP_TABLE = registry.resolve_ops(_OPS, _triton)


def op(backend: str, name: str):
    """The registered op ``name`` of a kernel backend ("cpu" and "cuda" share the C++ op)."""
    return _OP_TABLE[backend][name]


# ---- what each backend supports ----------------------------------------------------------------------
# select() passes (num_heads, window, shift) after qkv.

def _head_dim(qkv: torch.Tensor, num_heads: int) -> int:
    return qkv.shape[3] // (3 * num_heads)


def _int32_limit(qkv: torch.Tensor, *args) -> str | None:
    return checks.index_limit("qkv", qkv.numel())


def _gpu_limits(qkv: torch.Tensor, num_heads: int, window, shift) -> str | None:
    """The CUDA and Triton kernels hold one (window, head) in one program. ``window``: an int or (wh, ww), as
    window_attention takes it (effvit.explain passes the caller's)."""
    window = checks.check_pair(window, "window_size", 1)
    n, head_dim = window[0] * window[1], _head_dim(qkv, num_heads)
    if n > 256:
        return f"a window of {window[0]}x{window[1]} = {n} tokens is more than the 256 the GPU kernels hold"
    if head_dim > 128:
        return f"head_dim {head_dim} is more than the 128 the GPU kernels hold"
    return _int32_limit(qkv)


FAMILY = backends.register_family(
    "window",
    kernels=[
        backends.KernelSpec("cpu", ops=_OPS, check=_int32_limit),
        backends.KernelSpec("cuda", ops=_OPS, check=_gpu_limits),
        backends.KernelSpec("triton", ops=(), check=_gpu_limits),
    ],
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)
if _triton is None:
    FAMILY.kernels["triton"].unavailable = "Triton is not installed (pip install triton)"


# ---- autograd ---------------------------------------------------------------------------------------

class WindowAttentionFunction(torch.autograd.Function):
    """out = window attention core(qkv); saves qkv, out and the log-sum-exp [B, heads, H, W] (flash style)."""

    @staticmethod
    def forward(ctx, qkv, bias_table, pad_qkv, num_heads, window, shift, scale, backend):
        out, lse = op(backend, "window_attention")(qkv, bias_table, pad_qkv, num_heads, window, shift, scale)
        ctx.save_for_backward(qkv, bias_table, pad_qkv, out, lse)
        ctx.args = (num_heads, window, shift, scale, backend)
        return out

    @staticmethod
    @registry.first_order_only("window_attention")
    def backward(ctx, grad_out):
        qkv, bias_table, pad_qkv, out, lse = ctx.saved_tensors
        num_heads, window, shift, scale, backend = ctx.args
        grad_qkv, grad_table, grad_pad = op(backend, "window_attention_backward")(
            grad_out, qkv, bias_table, pad_qkv, out, lse, num_heads, window, shift, scale)
        need = ctx.needs_input_grad
        return (grad_qkv if need[0] else None,
                grad_table if need[1] else None,
                grad_pad.to(pad_qkv.dtype) if need[2] else None,
                None, None, None, None, None)


# ---- public function -------------------------------------------------------------------------------

def window_attention(qkv: torch.Tensor, num_heads: int, window_size, shift_size=0,
                     relative_position_bias_table: torch.Tensor | None = None,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                     always_partition: bool = False, backend: str | None = None) -> torch.Tensor:
    """Swin's (shifted-)window attention between the qkv and proj Linears, fused.

    qkv: [B, H, W, 3C], the qkv Linear applied to the (B, H, W, C) map (channels ordered (3, heads,
    head_dim), as timm reads them); relative_position_bias_table: [(2*wh-1)*(2*ww-1), heads] or None;
    qkv_bias: [3C], the qkv Linear's bias, which is what a padding token's qkv is (the official code pads
    the map with zeros before the Linear), or None; scale: head_dim ** -0.5 by default.
    Returns [B, H, W, C]: timm's roll -> pad -> partition -> softmax(q*scale @ k^T + bias + shift mask) @ v
    -> reverse -> crop -> roll back, before proj. The shift mask (-100.0 between shift regions, on the
    padded size) applies when shift_size is non-zero. A window larger than the map raises unless
    always_partition=True (then the map is padded up to one window, as timm's always_partition does).
    """
    num_heads, window, shift, scale = checks.check_window_attention(qkv, num_heads, window_size, shift_size,
                                                         relative_position_bias_table, qkv_bias, scale,
                                                         always_partition)
    chosen = backends.select("window", backend, qkv, num_heads, window, shift)
    if chosen == "torch":
        # the reference multiplies in qkv's dtype: a float32 table (as under autocast) would not mix with half qkv
        table = None if relative_position_bias_table is None else relative_position_bias_table.to(qkv.dtype)
        return reference.window_attention_core(qkv, table, num_heads, window, shift, scale, qkv_bias)
    table = None if relative_position_bias_table is None else relative_position_bias_table.to(acc_dtype(qkv.dtype))
    pad = None if qkv_bias is None else qkv_bias.to(qkv.dtype)
    window, shift = list(window), list(shift)
    if not registry.needs_autograd(qkv, table, pad):
        return op(chosen, "window_attention")(qkv, table, pad, num_heads, window, shift, scale)[0]
    return WindowAttentionFunction.apply(qkv, table, pad, num_heads, window, shift, scale, chosen)


def _script_window_attention(qkv: torch.Tensor, num_heads: int, window: List[int], shift: List[int],
                             bias_table: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor], scale: float
                             ) -> torch.Tensor:
    # the kernel reads the table in the accumulation dtype and the padding token's qkv in qkv's, as above
    table = None if bias_table is None else bias_table.to(acc_dtype(qkv.dtype))
    pad = None if qkv_bias is None else qkv_bias.to(qkv.dtype)
    return torch.ops.effvit.window_attention(qkv, table, pad, num_heads, window, shift, scale)[0]


# window_attention's C++ kernel (CPU or CUDA, by qkv's device) as TorchScript calls it: no argument checks, backend
# choice or backward, which TorchScript cannot run
script_window_attention = registry.script_kernel(_script_window_attention, _OPS)
