"""EViT's token dropping (youweiliang/evit, evit.py), in timm 1.0 terms: the truth effvit's token-drop kernels and
its patched timm ViTs are tested against.

EViT's Attention.forward, after the softmax: with K = ceil(keep_rate * (N - 1)) < N - 1 tokens to keep,
``cls_attn = attn[:, :, 0, 1:].mean(dim=1)`` and ``topk(cls_attn, K, sorted=True)``. Its Block.forward, after the
attention residual: gather the kept non-CLS tokens; with ``fuse_token``, one more token, the sum of the dropped
tokens weighted by their (not renormalised) scores, found with ``complement_idx``; then the MLP on the kept set.
Here the CLS token is generalised to timm's P prefix tokens (CLS, registers, distillation token: the CLS row is
row 0, every prefix token is kept and none is scored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int = 1) -> torch.Tensor:
    """EViT's ``attn[:, :, 0, P:].mean(dim=1)`` from the CLS query alone.

    q: [B, H, D] the CLS query row; k: [B, H, N, D]. Returns [B, N - P]: the CLS row of softmax((q @ k^T) * scale)
    over all N keys (EViT's order: scale after the product), at the non-prefix keys, averaged over the heads.
    """
    attn = ((q.unsqueeze(2) @ k.transpose(-2, -1)) * scale).softmax(dim=-1)   # [B, H, 1, N]
    return attn[:, :, 0, num_prefix:].mean(dim=1)


def cls_attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """log-sum-exp of each head's CLS logits: [B, H]."""
    return torch.logsumexp((q.unsqueeze(2) @ k.transpose(-2, -1)).squeeze(2) * scale, dim=-1)


def complement_idx(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """The positions in [0, dim) that are not in idx [B, K], ascending: [B, dim - K] (EViT's complement_idx)."""
    marks = torch.arange(1, dim + 1, device=idx.device).expand(idx.shape[0], dim)
    marks = marks.scatter(-1, idx, 0)             # kept positions become 0 and sort first
    return marks.sort(dim=-1).values[:, idx.shape[1]:] - 1


def keep_count(keep_rate: float, scored: int) -> int:
    """EViT's number of kept tokens: ceil(keep_rate * scored)."""
    return math.ceil(keep_rate * scored)


def rank_scores(scores: torch.Tensor) -> torch.Tensor:
    """The positions of scores [B, M] from the highest score down: [B, M]. EViT's ``topk(sorted=True)`` with its
    ties made definite: equal scores rank by position (lower first), NaN ranks below every number, -inf included.
    (A stable ascending sort of -scores: torch sorts NaN last.)"""
    return torch.sort(-scores, dim=1, stable=True).indices


def drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int = 1, fuse: bool = True,
                spatial_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's Block.forward gathering step.

    x: [B, N, C] the residual stream after the attention; scores: [B, N - P]. Returns (out [B, P + keep + fuse, C],
    index [B, keep]): the prefix tokens, the kept tokens (top-k in score order, or ascending position with
    spatial_order) and with fuse the sum of the dropped tokens weighted by their scores. Ranking: rank_scores.
    """
    B, N, C = x.shape
    idx = rank_scores(scores)[:, :keep]
    if spatial_order:
        idx = idx.sort(dim=1).values
    prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
    kept = torch.gather(rest, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    parts = [prefix, kept]
    if fuse:
        dropped = complement_idx(idx, N - num_prefix)
        dropped_x = torch.gather(rest, 1, dropped.unsqueeze(-1).expand(-1, -1, C))
        dropped_w = torch.gather(scores, 1, dropped)
        parts.append(torch.sum(dropped_x * dropped_w.unsqueeze(-1).to(x.dtype), dim=1, keepdim=True))
    return torch.cat(parts, dim=1), idx


def attention_with_probs(attn_module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm 1.0 Attention.forward on its explicit (non-SDPA) path, also returning the probabilities [B, H, N, N]
    (EViT computes its scores from them). Honours q_norm/k_norm, the output norm and the gate."""
    B, N, C = x.shape
    m = attn_module
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    attn = ((q * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (m.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, m.num_heads * m.head_dim)
    out = getattr(m, "norm", torch.nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return m.proj_drop(m.proj(out)), attn


def evit_block(block, x: torch.Tensor, keep_rate: float, num_prefix: int = 1, fuse: bool = True,
               spatial_order: bool = False) -> torch.Tensor:
    """EViT's Block.forward on a timm 1.0 Block (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2)."""
    attn_out, attn = attention_with_probs(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(attn_out))
    scored = x.shape[1] - num_prefix
    keep = keep_count(keep_rate, scored)
    if keep < scored:
        scores = attn[:, :, 0, num_prefix:].mean(dim=1)
        x, _ = drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def evit_forward(model, images: torch.Tensor, keep_rate: float, drop_loc=(3, 6, 9), fuse: bool = True,
                 spatial_order: bool = False) -> torch.Tensor:
    """A timm VisionTransformer's forward with EViT's blocks at drop_loc (the others on timm's own path)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for i, block in enumerate(model.blocks):
        if i in drop_loc:
            x = evit_block(block, x, keep_rate, model.num_prefix_tokens, fuse, spatial_order)
        else:
            x = block(x)
    x = model.norm(x)
    return model.forward_head(x)


def resize_scores(scores: torch.Tensor, grid: tuple[int, int], to_grid: tuple[int, int]) -> torch.Tensor:
    """Token scores [B, h * w] on a (h, w) patch grid resized (bilinear) to (H, W) and renormalised to the
    original total: [B, H * W]. How a tiny model's map guides a larger one (TinyDrop)."""
    B = scores.shape[0]
    total = scores.sum(dim=1, keepdim=True)
    resized = F.interpolate(scores.reshape(B, 1, *grid), size=to_grid, mode="bilinear", align_corners=False)
    resized = resized.reshape(B, -1).clamp_min(0)
    return resized * (total / resized.sum(dim=1, keepdim=True).clamp_min(torch.finfo(resized.dtype).tiny))
