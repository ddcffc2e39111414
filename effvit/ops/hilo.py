"""LITv2 HiLo attention: registration, autograd and the public functions.

Layers, bottom up:
  effvit::lofi_attention, effvit::lofi_attention_backward
      C++ ops (schemas in csrc/effvit_ops.cpp, kernels in csrc/cpu/hilo.cpp and csrc/cuda/hilo.cu); their fake
      kernels are registered here. The Hi-Fi half is effvit::window_attention (no shift, no table).
  effvit::triton_lofi_attention, effvit::triton_lofi_attention_backward
      the Triton kernels (effvit/triton_kernels/hilo.py) behind torch.library.custom_op, same signatures.
  LofiAttentionFunction
      forward saves q, kv, the output and the log-sum-exp (no attention matrix); backward recomputes it.
  lofi_attention(), hilo_attention()
      check the arguments, choose the backend (effvit.backends, family "hilo") and run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effvit import backends, checks
from effvit.ops import registry
from effvit.ops import window as window_ops
from effvit.reference import hilo as reference

_OPS = ("lofi_attention", "lofi_attention_backward")


# ---- fake kernels: shapes, dtypes and strides of the outputs, for torch.compile and opcheck -----------

def _fake_lofi_attention(q, kv, num_heads, scale):
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B, num_heads, N), dtype=window_ops.acc_dtype(q.dtype))


def _fake_lofi_attention_backward(grad_out, q, kv, out, lse, num_heads, scale):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


_FAKES = {"lofi_attention": _fake_lofi_attention, "lofi_attention_backward": _fake_lofi_attention_backward}


# ---- Triton kernels as custom ops ----------------------------------------------------------------------

try:
    from effvit.triton_kernels import hilo as _triton
except ImportError:  # Triton not installed: the backend reports it (effvit.backends)
    _triton = None

if _triton is not None:
    @torch.library.custom_op("effvit::triton_lofi_attention", mutates_args=())
    def _triton_lofi_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.lofi_attention(q, kv, num_heads, scale)

    @torch.library.custom_op("effvit::triton_lofi_attention_backward", mutates_args=())
    def _triton_lofi_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                                        out: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.lofi_attention_backward(grad_out, q, kv, out, lse, num_heads, scale)


registry.register_fakes(_OPS, _FAKES, _triton is not None)
_OP_TABLE = registry.resolve_ops(_OPS, _triton)


def op(backend: str, name: str):
    """The registered op ``name`` of a kernel backend ("cpu" and "cuda" share the C++ op)."""
    return _OP_TABLE[backend][name]


# ---- what each backend supports ----------------------------------------------------------------------
# select() passes (head_dim, window_size) after the input.

def _int32_limit(x: torch.Tensor, head_dim: int, ws: int) -> str | None:
    return checks.index_limit("the input's q, k and v together", 3 * x.numel())


def _gpu_limits(x: torch.Tensor, head_dim: int, ws: int) -> str | None:
    """The CUDA and Triton kernels hold one head's row of head_dim values, and a Hi-Fi window, in one program."""
    if head_dim > 128:
        return f"head_dim {head_dim} is more than the 128 the GPU kernels hold"
    if ws * ws > 256:
        return f"a window of {ws}x{ws} = {ws * ws} tokens is more than the 256 the GPU kernels hold"
    return _int32_limit(x, head_dim, ws)


FAMILY = backends.register_family(
    "hilo",
    kernels=[
        backends.KernelSpec("cpu", ops=_OPS + window_ops._OPS, check=_int32_limit),
        backends.KernelSpec("cuda", ops=_OPS + window_ops._OPS, check=_gpu_limits),
        backends.KernelSpec("triton", ops=(), check=_gpu_limits),
    ],
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)
if _triton is None or window_ops._triton is None:
    FAMILY.kernels["triton"].unavailable = "Triton is not installed (pip install triton)"


# ---- autograd ---------------------------------------------------------------------------------------

class LofiAttentionFunction(torch.autograd.Function):
    """out = Lo-Fi attention(q, kv); saves q, kv, out and the log-sum-exp [B, heads, N] (flash style)."""

    @staticmethod
    def forward(ctx, q, kv, num_heads, scale, backend):
        out, lse = op(backend, "lofi_attention")(q, kv, num_heads, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.args = (num_heads, scale, backend)
        return out

    @staticmethod
    @registry.first_order_only("lofi_attention")
    def backward(ctx, grad_out):
        q, kv, out, lse = ctx.saved_tensors
        num_heads, scale, backend = ctx.args
        grad_q, grad_kv = op(backend, "lofi_attention_backward")(grad_out, q, kv, out, lse, num_heads, scale)
        need = ctx.needs_input_grad
        return grad_q if need[0] else None, grad_kv if need[1] else None, None, None, None


def _lofi(q, kv, num_heads: int, scale: float, backend: str) -> torch.Tensor:
    if registry.needs_autograd(q, kv):
        return LofiAttentionFunction.apply(q, kv, num_heads, scale, backend)
    return op(backend, "lofi_attention")(q, kv, num_heads, scale)[0]


# ---- public functions ------------------------------------------------------------------------------

def lofi_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """HiLo's Lo-Fi attention between the Linears, fused: softmax((q @ k^T) * scale) @ v per head.

    q: [B, N, heads*D] (l_q's output; rows may be strided); kv: [B, M, 2*heads*D] with channels (2, heads, D)
    (l_kv's output on the M pooled tokens); scale: head_dim ** -0.5 by default. Returns [B, N, heads*D].
    """
    num_heads, scale = checks.check_lofi_attention(q, kv, num_heads, scale)
    chosen = backends.select("hilo", backend, q, q.shape[2] // num_heads, 1)
    if chosen == "torch":
        return reference.lofi_attention(q, kv, num_heads, scale)
    return _lofi(q, kv, num_heads, scale, chosen)


def average_pool(x: torch.Tensor, ws: int) -> torch.Tensor:
    """x: [B, H, W, C] -> [B, ceil(H/ws), ceil(W/ws), C]: ws x ws means of the map zero-padded to multiples of ws.

    Pooling the channels-last view keeps the input and output in place (no NCHW copy); windows past the edge
    divide by ws * ws, which is what zero padding gives, without padding a copy of the map.
    """
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), ws, ws, ceil_mode=True, divisor_override=ws * ws)
    return pooled.permute(0, 2, 3, 1)


def hilo_attention(module, x: torch.Tensor, H: int, W: int, backend: str | None = None) -> torch.Tensor:
    """The forward of a LITv2 HiLo ``module`` (h_qkv, h_proj, l_q, l_kv, l_proj, ws, scale, ...) on x: [B, N, C].

    The Linears run on BLAS; between them, the Hi-Fi windows run through effvit::window_attention (padding tokens
    take h_qkv's bias, as zero padding before the Linear gives) and the Lo-Fi heads through effvit::lofi_attention
    with keys and values from the zero-padded, average-pooled map. Returns [B, N, C].
    """
    H, W = checks.check_hilo_input(x, H, W, module.dim)
    chosen = backends.select("hilo", backend, x, module.head_dim, module.ws)
    if chosen == "torch":
        return reference.HiLo.forward(module, x, H, W)
    B, N, C = x.shape
    xm = x.view(B, H, W, C)
    outs = []
    if module.h_heads > 0:
        qkv = F.linear(xm, module.h_qkv.weight, module.h_qkv.bias)
        pad = None if module.h_qkv.bias is None else module.h_qkv.bias.to(qkv.dtype)
        win = [module.ws, module.ws]
        if registry.needs_autograd(qkv, pad):
            att = window_ops.WindowAttentionFunction.apply(qkv, None, pad, module.h_heads, win, [0, 0], module.scale,
                                                           chosen)
        else:
            att = window_ops.op(chosen, "window_attention")(qkv, None, pad, module.h_heads, win, [0, 0],
                                                            module.scale)[0]
        outs.append(F.linear(att, module.h_proj.weight, module.h_proj.bias).view(B, N, module.h_dim))
    if module.l_heads > 0:
        q = F.linear(x, module.l_q.weight, module.l_q.bias)
        source = average_pool(xm, module.ws).flatten(1, 2) if module.ws > 1 else x
        kv = F.linear(source, module.l_kv.weight, module.l_kv.bias)
        att = _lofi(q, kv, module.l_heads, module.scale, chosen)
        outs.append(F.linear(att, module.l_proj.weight, module.l_proj.bias))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
