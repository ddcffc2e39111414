"""EViT token dropping: registration, autograd and the public functions.

Layers, bottom up:
  effvit::cls_attention_scores(_backward), effvit::drop_tokens(_backward)
      C++ ops (schemas in csrc/effvit_ops.cpp, kernels in csrc/cpu/token_drop.cpp and csrc/cuda/token_drop.cu); their
      fake kernels are registered here.
  effvit::triton_cls_attention_scores(_backward), effvit::triton_drop_tokens(_backward)
      the Triton kernels (effvit/triton_kernels/token_drop.py) behind torch.library.custom_op, same signatures.
  ClsAttentionScoresFunction, DropTokensFunction
      the scores save q, k and the per-head log-sum-exp (no N x N); the drop saves x, scores and the kept index.
  cls_attention_scores(), drop_tokens()
      check the arguments, choose the backend (effvit.backends, family "token_drop") and run.
  script_cls_attention_scores(), script_drop_tokens()
      the C++ ops as TorchScript calls them (effvit.nn.token_drop.drop_by_cls_attention).
"""

from __future__ import annotations

from typing import Tuple

import torch

from effvit import backends, checks
from effvit.ops import registry
from effvit.ops.window import acc_dtype
from effvit.reference import token_drop as reference

_OPS = ("cls_attention_scores", "cls_attention_scores_backward", "drop_tokens", "drop_tokens_backward")


# ---- fake kernels ---------------------------------------------------------------------------------------

def _fake_cls_attention_scores(q, k, scale, num_prefix):
    B, H, N, _ = k.shape
    acc = acc_dtype(q.dtype)
    return q.new_empty((B, N - num_prefix), dtype=acc), q.new_empty((B, H), dtype=acc)


def _fake_cls_attention_scores_backward(grad_scores, q, k, lse, scale, num_prefix):
    return q.new_empty(q.shape), q.new_empty(k.shape)


def _fake_drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order):
    B, _, C = x.shape
    return x.new_empty((B, num_prefix + keep + int(fuse), C)), x.new_empty((B, keep), dtype=torch.int64)


def _fake_drop_tokens_backward(grad_out, x, scores, index, num_prefix, fuse):
    return x.new_empty(x.shape), scores.new_empty(scores.shape)


_FAKES = {"cls_attention_scores": _fake_cls_attention_scores,
          "cls_attention_scores_backward": _fake_cls_attention_scores_backward,
          "drop_tokens": _fake_drop_tokens, "drop_tokens_backward": _fake_drop_tokens_backward}


# ---- Triton kernels as custom ops ----------------------------------------------------------------------

try:
    from effvit.triton_kernels import token_drop as _triton
except ImportError:  # Triton not installed: the backend reports it (effvit.backends)
    _triton = None

if _triton is not None:
    @torch.library.custom_op("effvit::triton_cls_attention_scores", mutates_args=())
    def _triton_cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.cls_attention_scores(q, k, scale, num_prefix)

    @torch.library.custom_op("effvit::triton_cls_attention_scores_backward", mutates_args=())
    def _triton_cls_attention_scores_backward(grad_scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                              lse: torch.Tensor, scale: float, num_prefix: int
                                              ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.cls_attention_scores_backward(grad_scores, q, k, lse, scale, num_prefix)

    @torch.library.custom_op("effvit::triton_drop_tokens", mutates_args=())
    def _triton_drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int, fuse: bool,
                            spatial_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)

    @torch.library.custom_op("effvit::triton_drop_tokens_backward", mutates_args=())
    def _triton_drop_tokens_backward(grad_out: torch.Tensor, x: torch.Tensor, scores: torch.Tensor,
                                     index: torch.Tensor, num_prefix: int, fuse: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton.drop_tokens_backward(grad_out, x, scores, index, num_prefix, fuse)


registry.register_fakes(_OPS, _FAKES, _triton is not None)
_OP_TABLE = registry.resolve_ops(_OPS, _triton)


def op(backend: str, name: str):
    return _OP_TABLE[backend][name]


# ---- what each backend supports ---------------------------------------------------------------------------

def _int32_limit(t: torch.Tensor) -> str | None:
    return checks.index_limit("the input", t.numel())


FAMILY = backends.register_family(
    "token_drop",
    kernels=[
        backends.KernelSpec("cpu", ops=_OPS, check=_int32_limit),
        backends.KernelSpec("cuda", ops=_OPS, check=_int32_limit),
        backends.KernelSpec("triton", ops=(), check=_int32_limit),
    ],
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)
if _triton is None:
    FAMILY.kernels["triton"].unavailable = "Triton is not installed (pip install triton)"


# ---- autograd ---------------------------------------------------------------------------------------

class ClsAttentionScoresFunction(torch.autograd.Function):
    """scores = mean over heads of the CLS softmax row; saves q, k and the per-head log-sum-exp [B, H]."""

    @staticmethod
    def forward(ctx, q, k, scale, num_prefix, backend):
        scores, lse = op(backend, "cls_attention_scores")(q, k, scale, num_prefix)
        ctx.save_for_backward(q, k, lse)
        ctx.args = (scale, num_prefix, backend)
        return scores

    @staticmethod
    @registry.first_order_only("cls_attention_scores")
    def backward(ctx, grad_scores):
        q, k, lse = ctx.saved_tensors
        scale, num_prefix, backend = ctx.args
        gq, gk = op(backend, "cls_attention_scores_backward")(grad_scores, q, k, lse, scale, num_prefix)
        return gq, gk, None, None, None


class DropTokensFunction(torch.autograd.Function):
    """(out, index) = drop_tokens(x, scores); saves x, scores and index (gradients are a scatter and, for the fused
    token, a weighted copy and a dot product per dropped token)."""

    @staticmethod
    def forward(ctx, x, scores, keep, num_prefix, fuse, spatial_order, backend):
        out, index = op(backend, "drop_tokens")(x, scores, keep, num_prefix, fuse, spatial_order)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(x, scores, index)
        ctx.args = (num_prefix, fuse, backend)
        return out, index

    @staticmethod
    @registry.first_order_only("drop_tokens")
    def backward(ctx, grad_out, grad_index):
        x, scores, index = ctx.saved_tensors
        num_prefix, fuse, backend = ctx.args
        gx, gs = op(backend, "drop_tokens_backward")(grad_out.contiguous(), x, scores, index, num_prefix, fuse)
        need = ctx.needs_input_grad
        return gx if need[0] else None, gs if need[1] else None, None, None, None, None, None


# ---- public functions -----------------------------------------------------------------------------------

def cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, num_prefix: int = 1,
                         backend: str | None = None) -> torch.Tensor:
    """EViT's token scores, ``attn[:, :, 0, P:].mean(dim=1)``, from the CLS query alone (no [B, H, N, N]).

    q: [B, H, D] the CLS token's query (``q[:, :, 0]`` of a [B, H, N, D] q, after any q_norm; any strides);
    k: [B, H, N, D] (any strides); scale: default D ** -0.5; num_prefix P: the leading tokens that are not scored
    (CLS, registers, distillation token; the CLS token is token 0). Returns [B, N - P] in float32 (float64 for
    float64 input): per image, the mean over heads of softmax(scale * q . k_j) over all N keys, at keys j >= P.
    Differentiable in q and k.
    """
    scale, num_prefix = checks.check_cls_attention_scores(q, k, scale, num_prefix)
    chosen = backends.select("token_drop", backend, k)
    if chosen == "torch":
        return reference.cls_attention_scores(q.to(acc_dtype(q.dtype)), k.to(acc_dtype(q.dtype)), scale, num_prefix)
    if registry.needs_autograd(q, k):
        return ClsAttentionScoresFunction.apply(q, k, scale, num_prefix, chosen)
    return op(chosen, "cls_attention_scores")(q, k, scale, num_prefix)[0]


def drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int = 1, fuse: bool = True,
                spatial_order: bool = False, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's gather: keep the ``keep`` best-scored non-prefix tokens, optionally fusing the rest into one.

    x: [B, N, C] the residual stream (any strides); scores: [B, N - P] (any float dtype; e.g. from
    cls_attention_scores, or from a guide model); 1 <= keep <= N - P. Returns (out [B, P + keep + fuse, C] in x's
    dtype: the P prefix tokens, the kept tokens, and with fuse the sum of the dropped tokens weighted by their
    scores (not renormalised, as EViT); index [B, keep] int64: the kept tokens' positions among the non-prefix
    tokens, in descending score order (ties: lower position first; NaN scores last) or ascending with
    spatial_order, for scattering back). Differentiable in x and scores (detach scores to stop that gradient).
    """
    keep, num_prefix = checks.check_drop_tokens(x, scores, keep, num_prefix)
    chosen = backends.select("token_drop", backend, x)
    if chosen == "torch":
        return reference.drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)
    if registry.needs_autograd(x, scores):
        return DropTokensFunction.apply(x, scores, keep, num_prefix, fuse, spatial_order, chosen)
    return op(chosen, "drop_tokens")(x, scores, keep, num_prefix, fuse, spatial_order)


def _script_cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    return torch.ops.effvit.cls_attention_scores(q, k, scale, num_prefix)[0]


def _script_drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int, fuse: bool,
                        spatial_order: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.effvit.drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)


# the C++ kernels as TorchScript calls them, without argument checks, backend choice or backward, which TorchScript
# cannot run; the reference (same arguments) without effvit._C
script_cls_attention_scores = registry.script_kernel(_script_cls_attention_scores, _OPS,
                                                     fallback=reference.cls_attention_scores)
script_drop_tokens = registry.script_kernel(_script_drop_tokens, _OPS, fallback=reference.drop_tokens)
