"""Non-causal linear attention (EfficientViT's LiteMLA, L2ViT): registration, autograd and the public function.

Layers, bottom up:
  effvit::linear_attention, effvit::linear_attention_backward
      C++ ops (schemas in csrc/effvit_ops.cpp, kernels in csrc/cpu/linear.cpp and csrc/cuda/linear.cu); their fake
      kernels are registered here.
  effvit::triton_linear_attention, effvit::triton_linear_attention_backward
      the Triton kernels (effvit/triton_kernels/linear.py) behind torch.library.custom_op, same signatures.
  LinearAttentionFunction
      forward saves q, k, v and the state [B, H, D, Dv + 1] (O(N) memory); backward recomputes from them.
  linear_attention()
      checks the arguments, chooses the backend (effvit.backends, family "linear") and runs.
  script_linear_attention()
      the C++ op as TorchScript calls it (effvit.nn.linear.lite_mla_attention).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from effvit import backends, checks
from effvit.ops import registry
from effvit.ops.layout import empty_like_layout
from effvit.ops.window import acc_dtype
from effvit.reference import linear as reference

_OPS = ("linear_attention", "linear_attention_backward")

# "No clamp" as the lowest float32 rather than -inf: AOTInductor's proxy executor stores a non-finite float argument
# of a custom op as a JSON string and then fails to load the package; max(den, -FLT_MAX) is den for any finite den.
NO_CLAMP = -torch.finfo(torch.float32).max


# ---- fake kernels ---------------------------------------------------------------------------------------

def _fake_linear_attention(q, k, v, temperature, feature_map, q_scale, k_scale, eps, denom_min):
    B, H, N, D = q.shape
    return empty_like_layout(q, v.shape[3]), q.new_empty((B, H, D, v.shape[3] + 1), dtype=acc_dtype(q.dtype))


def _fake_linear_attention_backward(grad_out, q, k, v, temperature, state, feature_map, q_scale, k_scale, eps,
                                    denom_min):
    t_shape = (q.shape[1],) if temperature is not None else (0,)
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape),
            q.new_empty(t_shape, dtype=acc_dtype(q.dtype)))


_FAKES = {"linear_attention": _fake_linear_attention, "linear_attention_backward": _fake_linear_attention_backward}


# ---- Triton kernels as custom ops ----------------------------------------------------------------------

try:
    from effvit.triton_kernels import linear as _triton
except ImportError:  # Triton not installed: the backend reports it (effvit.backends)
    _triton = None

if _triton is not None:
    @torch.library.custom_op("effvit::triton_linear_attention", mutates_args=())
    def _triton_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor | None,
                                 feature_map: str, q_scale: float, k_scale: float, eps: float, denom_min: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.linear_attention(q, k, v, temperature, feature_map, q_scale, k_scale, eps, denom_min)

    @torch.library.custom_op("effvit::triton_linear_attention_backward", mutates_args=())
    def _triton_linear_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                          temperature: torch.Tensor | None, state: torch.Tensor, feature_map: str,
                                          q_scale: float, k_scale: float, eps: float, denom_min: float
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton.linear_attention_backward(grad_out, q, k, v, temperature, state, feature_map, q_scale, k_scale,
                                                 eps, denom_min)


registry.register_fakes(_OPS, _FAKES, _triton is not None)
_OP_TABLE = registry.resolve_ops(_OPS, _triton)


def op(backend: str, name: str):
    return _OP_TABLE[backend][name]


# ---- what each backend supports (select() passes (head_dim, value_dim) after q) --------------------------

def _int32_limit(q: torch.Tensor, head_dim: int, value_dim: int) -> str | None:
    return checks.index_limit("q", q.numel())


def _gpu_limits(q: torch.Tensor, head_dim: int, value_dim: int) -> str | None:
    if max(head_dim, value_dim) > 128:
        return f"head_dim {head_dim} / value dim {value_dim}: the GPU kernels hold up to 128"
    return _int32_limit(q, head_dim, value_dim)


def _triton_limits(q: torch.Tensor, head_dim: int, value_dim: int) -> str | None:
    if q.dtype == torch.float64 and max(head_dim, value_dim) > 64:
        return "float64 with head dims above 64: the Triton backward needs more shared memory than a GPU has"
    return _gpu_limits(q, head_dim, value_dim)


# On a GPU the Triton kernels (tl.dot tiles) take a third to half of the CUDA kernels' time on large inputs
# but ~120-170 us of host time a call (two launches of ~20 arguments), so CUDA is faster below ~2**18 rows of q
# (B * H * N). H100, 8 heads x 32, float32, per call: 1 x 12544 (100k rows) CUDA 112 / Triton 157 us forward;
# 64 x 784 (401k) 363 / 167 us, forward+backward 1564 / 774 us; 1 x 50176 344 / 158 us; 64 x 3136 1225 / 372 us;
# bf16 64 x 784 409 / 146 us (bench/results/nvidia-h100-80gb-hbm3/linear-dispatch).
TRITON_FROM_ROWS = 2**18


def _prefer(device: str, q: torch.Tensor, head_dim: int, value_dim: int) -> tuple[str, ...] | None:
    if (device == "cuda" and q.shape[0] * q.shape[1] * q.shape[2] >= TRITON_FROM_ROWS
            and max(head_dim, value_dim) <= 64 and q.dtype != torch.float64):
        return ("triton", "cuda")
    return None


FAMILY = backends.register_family(
    "linear",
    kernels=[
        backends.KernelSpec("cpu", ops=_OPS, check=_int32_limit),
        backends.KernelSpec("cuda", ops=_OPS, check=_gpu_limits),
        backends.KernelSpec("triton", ops=(), check=_triton_limits),
    ],
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    prefer=_prefer,
)
if _triton is None:
    FAMILY.kernels["triton"].unavailable = "Triton is not installed (pip install triton)"


# ---- autograd ---------------------------------------------------------------------------------------

class LinearAttentionFunction(torch.autograd.Function):
    """out = linear attention(q, k, v); saves q, k, v and the state [B, H, D, Dv + 1] (no N x N, O(N) memory)."""

    @staticmethod
    def forward(ctx, q, k, v, temperature, feature_map, q_scale, k_scale, eps, denom_min, backend):
        out, state = op(backend, "linear_attention")(q, k, v, temperature, feature_map, q_scale, k_scale, eps,
                                                     denom_min)
        ctx.save_for_backward(q, k, v, temperature, state)
        ctx.args = (feature_map, q_scale, k_scale, eps, denom_min, backend)
        return out

    @staticmethod
    @registry.first_order_only("linear_attention")
    def backward(ctx, grad_out):
        q, k, v, temperature, state = ctx.saved_tensors
        feature_map, q_scale, k_scale, eps, denom_min, backend = ctx.args
        gq, gk, gv, gt = op(backend, "linear_attention_backward")(grad_out, q, k, v, temperature, state, feature_map,
                                                                  q_scale, k_scale, eps, denom_min)
        need = ctx.needs_input_grad
        return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None,
                gt if need[3] else None, None, None, None, None, None, None)


# ---- public function -------------------------------------------------------------------------------

def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "relu",
                     temperature: torch.Tensor | None = None, q_scale: float = 1.0, k_scale: float = 1.0,
                     eps: float = 0.0, denom_min: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Non-causal linear attention, fused: out_i = t * (a_i S) / max(a_i . z + eps, denom_min) per head, with
    a = phi(q * q_scale), b = phi(k * k_scale), S = sum_j b_j v_j^T, z = sum_j b_j (in float32).

    q, k: [B, H, N, D]; v: [B, H, N, Dv] — any strides: (B, N, H, D) memory (``x.view(B, N, H, D).transpose(1,
    2)``) and EfficientViT's (B, H, D, N) memory (``x.transpose(-1, -2)``) are read in place. feature_map: "relu",
    "elu+1" or "identity"; temperature: [H] (or [H, 1, 1]) per-head factor on S, as L2ViT's; denom_min: clamp of the
    denominator (L2ViT: 100), None for none. EfficientViT: feature_map="relu", eps=1e-5. L2ViT: feature_map="relu",
    temperature=t, denom_min=100. Returns [B, H, N, Dv] in q's dtype and memory order.
    """
    q_scale, k_scale, eps, denom_min = checks.check_linear_attention(q, k, v, feature_map, temperature, q_scale,
                                                                     k_scale, eps, denom_min)
    chosen = backends.select("linear", backend, q, q.shape[3], v.shape[3])
    if chosen == "torch":
        # the reference multiplies in q's dtype; the kernels take the temperature in the accumulation dtype
        temperature = None if temperature is None else temperature.to(q.dtype)
        return reference.linear_attention(q, k, v, temperature, feature_map, q_scale, k_scale, eps,
                                          None if math.isinf(denom_min) else denom_min)
    t = None if temperature is None else temperature.reshape(-1).to(acc_dtype(q.dtype))
    args = (feature_map, q_scale, k_scale, eps, NO_CLAMP if math.isinf(denom_min) and denom_min < 0 else denom_min)
    if registry.needs_autograd(q, k, v, t):
        return LinearAttentionFunction.apply(q, k, v, t, *args, chosen)
    return op(chosen, "linear_attention")(q, k, v, t, *args)[0]


def _script_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: Optional[torch.Tensor],
                             feature_map: str, q_scale: float, k_scale: float, eps: float, denom_min: float
                             ) -> torch.Tensor:
    t = None if temperature is None else temperature.reshape(-1).to(acc_dtype(q.dtype))
    return torch.ops.effvit.linear_attention(q, k, v, t, feature_map, q_scale, k_scale, eps, denom_min)[0]


# linear_attention's C++ kernel as TorchScript calls it (denom_min: -inf for no clamp), without argument checks,
# backend choice or backward, which TorchScript cannot run; the reference (same arguments) without effvit._C
script_linear_attention = registry.script_kernel(_script_linear_attention, _OPS, fallback=reference.linear_attention)
