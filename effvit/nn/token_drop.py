"""EViT token dropping inside timm Vision Transformers, and guided dropping from a tiny model (TinyDrop's idea).

    effvit.patch.timm(vit, keep_rate=0.7, drop_loc=(3, 6, 9))   # blocks 3, 6, 9 drop 30% of the tokens
    vit.keep_rate = 0.5                                           # shared by every dropping block
    scores = effvit.nn.cls_attention_map(tiny_vit, images)      # what a small ViT attends to
    with effvit.nn.guided(vit, scores, grid=tiny_vit.patch_embed.grid_size):
        logits = vit(images)                                      # the tiny model picks the tokens

A dropping block is timm's Block with its forward swapped (class swap, ToMe-style: weights, buffers and
state_dict keys untouched): attention as timm computes it (SDPA; q_norm/k_norm, output norm and gate honoured),
its residual, then the EViT scores from the CLS query alone (effvit.cls_attention_scores: no [B, H, N, N]), the
fused top-k gather (effvit.drop_tokens), and the MLP on the kept tokens. When nothing would be dropped
(ceil(keep_rate * (N - P)) = N - P, e.g. keep_rate = 1) the block runs timm's own forward unchanged. Under torch.fx
and TorchScript the scores and the gather are one call, drop_by_cls_attention, which reads the token count when it
runs (docs/fx-torchscript.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from effvit.ops import token_drop as td_ops
from effvit.ops.token_drop import cls_attention_scores, drop_tokens
from effvit.reference import token_drop as reference


@dataclasses.dataclass
class TokenDropSettings:
    """The settings every dropping block of one model shares (``model.token_drop``).

    keep_rate: share of the non-prefix tokens each dropping block keeps, in (0, 1] (EViT: 0.7).
    drop_loc: indices of the dropping blocks. fuse_token: fuse the dropped tokens into one (weighted by their
    scores). spatial_order: keep the kept tokens in image order instead of score order. detach_scores: stop the
    gradient through the scores (EViT lets it flow). record_index: keep each dropping block's kept index
    [B, keep] in ``kept`` after a forward (positions among that block's non-prefix input tokens).
    """
    keep_rate: float = 0.7
    drop_loc: tuple[int, ...] = (3, 6, 9)
    fuse_token: bool = True
    spatial_order: bool = False
    detach_scores: bool = False
    record_index: bool = False
    num_prefix: int = 1
    backend: str | None = None
    guide: torch.Tensor | None = None          # [B, M] scores on the model's patch grid, set by guided()
    kept: list = dataclasses.field(default_factory=list)
    _guide_now: torch.Tensor | None = None     # the guide scores of the tokens still present


def check_keep_rate(keep_rate) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be a number in (0, 1] (the share of tokens each dropping block keeps), "
                         f"got {keep_rate!r}")
    return float(keep_rate)


def attention_with_cls_query(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm 1.0 Attention.forward (SDPA path) of a patched Block's ``attn`` (``self``: the Block) that also returns
    the CLS query [B, H, D] and the keys [B, H, N, D] after q_norm / k_norm, which the EViT scores need."""
    attn = self.attn
    B, N, _ = x.shape
    gate: Optional[torch.Tensor] = None
    if hasattr(attn, "gate"):  # a gated attention (newer timm)
        if attn.gate is not None:
            gate = attn.gate(x).sigmoid()
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal)
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q[:, :, 0], k


@torch.fx.wrap
def drop_by_cls_attention(x: torch.Tensor, q_cls: torch.Tensor, k: torch.Tensor, scale: float, keep_rate: float,
                          num_prefix: int, fuse: bool, spatial_order: bool, detach_scores: bool,
                          attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                          backend: Optional[str] = None) -> torch.Tensor:
    """EViT's drop step as one call in torch.fx graphs and in TorchScript: scores from the CLS query (q_cls [B, H, D],
    k [B, H, N, D]), then the top ceil(keep_rate * (N - P)) of x's N - P non-prefix tokens [B, N, C] kept (x itself
    when that keeps them all). The count is read from x's shape when the call runs, so a traced graph holds no
    branch on a traced value and no count of its own. attn_mask / is_causal (inputs of an fx graph) are checked when
    it runs too: a drop cannot honour them (ValueError).

    torch.fx records it as a leaf (torch.fx.wrap). Run from Python it is effvit.cls_attention_scores and
    effvit.drop_tokens; compiled by TorchScript it calls their C++ kernels, or the reference where a gradient is
    needed (TorchScript cannot run the kernels' backward).
    """
    scored = x.shape[1] - num_prefix
    keep = reference.keep_count(keep_rate, scored)
    if keep >= scored:
        return x
    _check_no_mask(attn_mask, is_causal)
    if not torch.jit.is_scripting():
        return _drop_by_cls_attention(x, q_cls, k, scale, keep, num_prefix, fuse, spatial_order, detach_scores,
                                      backend)
    if torch.is_grad_enabled() and (x.requires_grad or q_cls.requires_grad or k.requires_grad):
        scores = reference.cls_attention_scores(q_cls, k, scale, num_prefix)
        if detach_scores:
            scores = scores.detach()
        return reference.drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)[0]
    scores = td_ops.script_cls_attention_scores(q_cls, k, scale, num_prefix)
    return td_ops.script_drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order)[0]


@torch.jit.unused
def _drop_by_cls_attention(x: torch.Tensor, q_cls: torch.Tensor, k: torch.Tensor, scale: float, keep: int,
                           num_prefix: int, fuse: bool, spatial_order: bool, detach_scores: bool,
                           backend: Optional[str]) -> torch.Tensor:
    scores = cls_attention_scores(q_cls, k, scale, num_prefix, backend=backend)
    if detach_scores:
        scores = scores.detach()
    return drop_tokens(x, scores, keep, num_prefix, fuse, spatial_order, backend=backend)[0]


# ---- timm's ViT Block, patched at the dropping blocks (effvit.patch.timm swaps its class for a subclass with these
# methods and gives it _effvit_token_drop, the model's TokenDropSettings, and _effvit_block_index)

def dropping_block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                           is_causal: bool = False) -> torch.Tensor:
    """Forward of a dropping timm Block (see the module docstring). Under torch.fx and TorchScript the drop is one
    call, drop_by_cls_attention; where nothing is dropped (keep_rate = 1 under fx, ceil(keep_rate * (N - P)) = N - P
    eagerly and under TorchScript) the block is timm's own forward."""
    if torch.jit.is_scripting():
        keep_rate, num_prefix, fuse, spatial_order, detach_scores = self._effvit_script_settings
        scored = x.shape[1] - num_prefix
        if reference.keep_count(keep_rate, scored) >= scored:
            return self._timm_forward(x, attn_mask, is_causal)
        return self._effvit_graph_forward(x, attn_mask, is_causal, keep_rate, num_prefix, fuse, spatial_order,
                                          detach_scores, None)
    return self._effvit_forward(x, attn_mask, is_causal)


@torch.jit.unused
def _eager_dropping_block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                                  is_causal: bool = False) -> torch.Tensor:
    settings: TokenDropSettings = self._effvit_token_drop
    if settings.keep_rate >= 1:  # nothing to drop, whatever the token count: timm's own block
        return self._timm_forward(x, attn_mask=attn_mask, is_causal=is_causal)
    if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: no branch on the token count
        if settings.guide is not None or settings.record_index:
            raise ValueError("guided() dropping and record_index run eagerly only: torch.fx cannot trace them; trace "
                             "outside guided() with model.token_drop.record_index = False")
        return self._effvit_graph_forward(x, attn_mask, is_causal, settings.keep_rate, settings.num_prefix,
                                          settings.fuse_token, settings.spatial_order, settings.detach_scores,
                                          settings.backend)
    P = settings.num_prefix
    scored = x.shape[1] - P
    keep = reference.keep_count(settings.keep_rate, scored)
    first = self._effvit_block_index == min(settings.drop_loc)
    if first:
        settings.kept = []
        settings._guide_now = settings.guide
    if keep >= scored:  # EViT: nothing to drop, timm's own block
        return self._timm_forward(x, attn_mask=attn_mask, is_causal=is_causal)
    _check_no_mask(attn_mask, is_causal)
    attn_out, q_cls, k = self._effvit_attention(self.norm1(x))
    x = x + self.drop_path1(self.ls1(attn_out))
    guide = settings._guide_now
    if guide is not None:
        if guide.shape != (x.shape[0], scored):
            raise ValueError(f"guided(): the guide scores are {tuple(guide.shape)} but block "
                             f"{self._effvit_block_index} scores {x.shape[0]} images x {scored} tokens")
        scores = guide.to(x.device)
    else:
        scores = cls_attention_scores(q_cls, k, self.attn.scale, P, backend=settings.backend)
    if settings.detach_scores:
        scores = scores.detach()
    x, index = drop_tokens(x, scores, keep, P, settings.fuse_token, settings.spatial_order, backend=settings.backend)
    if guide is not None:  # the guide follows the tokens; a fused token carries the score mass it absorbed
        kept_scores = scores.gather(1, index)
        parts = [kept_scores] + ([scores.sum(1, keepdim=True) - kept_scores.sum(1, keepdim=True)]
                                 if settings.fuse_token else [])
        settings._guide_now = torch.cat(parts, dim=1)
    if settings.record_index:
        settings.kept.append(index)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _graph_dropping_block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                                  keep_rate: float, num_prefix: int, fuse: bool, spatial_order: bool,
                                  detach_scores: bool, backend: Optional[str]) -> torch.Tensor:
    """The dropping block as torch.fx traces it and TorchScript compiles it: timm's attention with the CLS query,
    the residual, drop_by_cls_attention (one call), the MLP."""
    attn_out, q_cls, k = self._effvit_attention(self.norm1(x), attn_mask, is_causal)
    x = x + self.drop_path1(self.ls1(attn_out))
    x = drop_by_cls_attention(x, q_cls, k, self.attn.scale, keep_rate, num_prefix, fuse, spatial_order,
                              detach_scores, attn_mask, is_causal, backend)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _check_no_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("token dropping changes the number of tokens, so it cannot run with an attention mask or "
                         "is_causal; call the model without them or set keep_rate=1")


def _prepare_scriptable(self):
    """torch.jit.script calls this before compiling the block: the settings it reads, as a tuple TorchScript can
    type (keep_rate, num_prefix, fuse_token, spatial_order, detach_scores), taken now."""
    settings: TokenDropSettings = self._effvit_token_drop
    if settings.record_index:
        raise ValueError("record_index appends to model.token_drop.kept, which a TorchScript module cannot: set "
                         "model.token_drop.record_index = False before torch.jit.script")
    self._effvit_script_settings = (float(settings.keep_rate), int(settings.num_prefix), bool(settings.fuse_token),
                                    bool(settings.spatial_order), bool(settings.detach_scores))
    return self


# the methods of the patched Block (effvit.patch adds _timm_forward, timm's own forward)
TIMM_BLOCK_METHODS = {"forward": dropping_block_forward, "_effvit_forward": _eager_dropping_block_forward,
                      "_effvit_graph_forward": _graph_dropping_block_forward,
                      "_effvit_attention": attention_with_cls_query, "__prepare_scriptable__": _prepare_scriptable}


def cls_attention_map(model, images: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The CLS attention of a timm ViT's last block, averaged over heads: [B, N - P] token importances on its
    patch grid (``model.patch_embed.grid_size``). Runs the model's forward_features once (no gradient)."""
    captured = {}
    attn = model.blocks[-1].attn

    def keep_input(module, args):
        captured["x"] = args[0]

    handle = attn.register_forward_pre_hook(keep_input)
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]
    with torch.no_grad():
        B, N, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return cls_attention_scores(q[:, :, 0], k, attn.scale, model.num_prefix_tokens, backend=backend)


@contextlib.contextmanager
def guided(model, scores: torch.Tensor, grid: tuple[int, int] | None = None) -> Iterator[None]:
    """Within the block, the dropping blocks of ``model`` (patched by effvit.patch.timm) rank tokens by
    ``scores`` [B, h * w] instead of their own CLS attention: e.g. cls_attention_map of a tiny ViT. With ``grid``
    = (h, w) the scores are resized (bilinear, total kept) to the model's patch grid."""
    settings = getattr(model, "token_drop", None)
    if not isinstance(settings, TokenDropSettings):
        raise ValueError("guided() needs a ViT patched for token dropping: effvit.patch.timm(model, keep_rate=...)")
    target = tuple(model.patch_embed.grid_size)
    if grid is not None and tuple(grid) != target:
        scores = reference.resize_scores(scores, tuple(grid), target)
    previous = settings.guide
    settings.guide = scores.detach()
    try:
        yield
    finally:
        settings.guide = previous
