"""Token-drop family: every kernel backend against the reference (EViT's scoring and gathering), and timm ViTs
patched with token dropping against EViT's algorithm on the same weights."""

from __future__ import annotations

import copy
import math
import pickle
import random

import pytest
import torch
import torch._dynamo.testing
from torch.autograd import gradcheck

import effvit
from effvit.ops import token_drop as td_ops
from effvit.reference import token_drop as ref

from conftest import ALL_DTYPES, DEVICE, REL_TOL, assert_close_rel, in_triton_interpreter, kernel_backends, rel_error

BACKENDS = kernel_backends(DEVICE, "token_drop")
ACC = {torch.float64: torch.float64}


def acc_of(dtype):
    return ACC.get(dtype, torch.float32)


# ---- inputs ---------------------------------------------------------------------------------------------

def random_score_case(rng: random.Random):
    return dict(B=rng.randint(1, 3), H=rng.randint(1, 4), N=rng.randint(2, 70), D=rng.choice([8, 16, 24, 40, 64]),
                P=rng.randint(0, 2), strided=rng.random() < 0.6)


def make_qk(case, dtype, requires_grad=False):
    """The CLS query and the keys as timm makes them: views of one qkv tensor [B, N, 3, H, D] (strided) or
    contiguous copies."""
    B, H, N, D = case["B"], case["H"], max(case["N"], case["P"] + 1), case["D"]
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=torch.float64).to(dtype).permute(2, 0, 3, 1, 4)
    q, k = qkv[0, :, :, 0], qkv[1]
    if not case["strided"]:
        q, k = q.contiguous(), k.contiguous()
    if requires_grad:
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    return q, k


def random_drop_case(rng: random.Random):
    N = rng.randint(2, 60)
    P = rng.randint(0, min(2, N - 1))
    return dict(B=rng.randint(1, 3), N=N, C=rng.randint(3, 70), P=P, keep=rng.randint(1, N - P),
                fuse=rng.random() < 0.7, spatial=rng.random() < 0.4, strided=rng.random() < 0.5)


def make_x_scores(case, dtype, requires_grad=False):
    B, N, C, P = case["B"], case["N"], case["C"], case["P"]
    if case["strided"]:  # a slice of a wider tensor, tokens not adjacent
        x = torch.randn(B, 2 * N, C + 5, device=DEVICE, dtype=torch.float64).to(dtype)[:, ::2, 2:C + 2]
    else:
        x = torch.randn(B, N, C, device=DEVICE, dtype=torch.float64).to(dtype)
    scores = torch.rand(B, N - P, device=DEVICE, dtype=acc_of(dtype))
    if requires_grad:
        x, scores = x.detach().requires_grad_(), scores.detach().requires_grad_()
    return x, scores


def d(t):
    return t.detach().double()


# ---- scores -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_scores_match_reference(backend, dtype, trial, seed, poisoned):
    case = random_score_case(random.Random(seed))
    q, k = make_qk(case, dtype)
    scale = case["D"] ** -0.5
    scores, lse = td_ops.op(backend, "cls_attention_scores")(q, k, scale, case["P"])
    assert scores.dtype == lse.dtype == acc_of(dtype)
    # scores are probabilities (<= 1); their error is measured against 1 / N, the size of a typical one
    expected = ref.cls_attention_scores(d(q), d(k), scale, case["P"])
    typical = 1.0 / k.shape[2]
    assert_close_rel(scores, expected, dtype, f"scores {case}", scale=typical)
    assert_close_rel(lse, ref.cls_attention_lse(d(q), d(k), scale), dtype, f"lse {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", [True, False])
def test_scores_at_vit_shapes(backend, strided, seed, poisoned):
    """ViT-S's heads (D = 64, N = 197: sixteen-key groups and a remainder), float32: the CPU kernel's path that reads
    k rows in place sixteen at a time."""
    case = dict(B=2, H=6, N=197, D=64, P=1, strided=strided)
    q, k = make_qk(case, torch.float32)
    scores, lse = td_ops.op(backend, "cls_attention_scores")(q, k, 0.125, 1)
    expected = ref.cls_attention_scores(d(q), d(k), 0.125, 1)
    assert_close_rel(scores, expected, torch.float32, "scores", scale=1.0 / 197)
    assert_close_rel(lse, ref.cls_attention_lse(d(q), d(k), 0.125), torch.float32, "lse")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(2))
def test_scores_backward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_score_case(random.Random(seed))
    q, k = make_qk(case, dtype, requires_grad=True)
    scale = case["D"] ** -0.5
    scores = effvit.cls_attention_scores(q, k, scale, case["P"], backend=backend)
    grad = torch.randn_like(scores)
    gq, gk = torch.autograd.grad(scores, (q, k), grad)
    q64, k64 = d(q).requires_grad_(), d(k).requires_grad_()
    eq, ek = torch.autograd.grad(ref.cls_attention_scores(q64, k64, scale, case["P"]), (q64, k64), d(grad))
    assert gq.dtype == gk.dtype == dtype and gk.shape == k.shape
    # a softmax gradient is a difference of terms of the size p * |g| * |k| * scale
    terms = scale * d(grad).abs().max().item() * k64.abs().max().item() / k.shape[2]
    assert_close_rel(gq, eq, dtype, f"grad q {case}", scale=terms * k.shape[2] ** 0.5)
    assert_close_rel(gk, ek, dtype, f"grad k {case}", scale=terms * q64.abs().max().item() / k64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_gradcheck_float64(backend, seed):
    case = dict(B=2, H=3, N=9, D=8, P=1, strided=True)
    q, k = make_qk(case, torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k: effvit.cls_attention_scores(q, k, 0.4, 1, backend=backend), (q, k), eps=1e-6,
                     atol=1e-7, fast_mode=in_triton_interpreter(backend))


# ---- drop --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_drop_matches_reference(backend, dtype, trial, seed, poisoned):
    check_drop(backend, dtype, random_drop_case(random.Random(seed)))


@pytest.mark.skipif(DEVICE != "cpu", reason="how the CPU kernel shares work among threads")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_drop_images_shared_among_threads(dtype, threads, seed, poisoned):
    """Fewer images than threads: the CPU kernel shares each image's rows and fused channels out among threads
    (channel shares in whole 64-channel runs, the last one ragged)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, C, strided, fuse in ((1, 128, False, True), (1, 200, True, True), (1, 333, False, True),
                                    (1, 200, True, False), (threads - 1, 130, True, True)):
            case = dict(B=B, N=37, C=C, P=1, keep=23, fuse=fuse, spatial=B > 1, strided=strided)
            check_drop("cpu", dtype, case)
    finally:
        torch.set_num_threads(saved)


def check_drop(backend, dtype, case):
    x, scores = make_x_scores(case, dtype)
    out, index = td_ops.op(backend, "drop_tokens")(x, scores, case["keep"], case["P"], case["fuse"], case["spatial"])
    expected, expected_index = ref.drop_tokens(d(x), d(scores), case["keep"], case["P"], case["fuse"],
                                               case["spatial"])
    assert index.dtype == torch.int64 and torch.equal(index, expected_index), case
    assert out.dtype == dtype and out.is_contiguous()
    # kept rows are copies: exact
    rows = case["P"] + case["keep"]
    assert torch.equal(out[:, :rows].double(), expected[:, :rows]), case
    if case["fuse"]:  # the fused row: a sum of up to N terms of size |score * x|
        assert_close_rel(out[:, rows:], expected[:, rows:], dtype, f"fused {case}",
                         scale=(d(x).abs().max() * d(scores).abs().max()).item())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(2))
def test_drop_backward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_drop_case(random.Random(seed))
    x, scores = make_x_scores(case, dtype, requires_grad=True)
    out, index = effvit.drop_tokens(x, scores, case["keep"], case["P"], case["fuse"], case["spatial"],
                                    backend=backend)
    grad = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, scores), grad, allow_unused=True)
    x64, s64 = d(x).requires_grad_(), d(scores).requires_grad_()
    expected, _ = ref.drop_tokens(x64, s64, case["keep"], case["P"], case["fuse"], case["spatial"])
    ex, es = torch.autograd.grad(expected, (x64, s64), d(grad), allow_unused=True)
    es = torch.zeros_like(s64) if es is None else es
    assert gx.dtype == dtype and gs.dtype == scores.dtype
    assert_close_rel(gx, ex, dtype, f"grad x {case}", scale=d(grad).abs().max().item())
    assert_close_rel(gs, es, dtype, f"grad scores {case}",
                     scale=(d(grad).abs().max() * d(x).abs().max()).item() * case["C"] ** 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", [True, False])
def test_drop_gradcheck_float64(backend, fuse, seed):
    case = dict(B=2, N=9, C=5, P=1, keep=5, fuse=fuse, spatial=False, strided=True)
    x, scores = make_x_scores(case, torch.float64, requires_grad=True)
    fn = lambda x, s: effvit.drop_tokens(x, s, 5, 1, fuse, backend=backend)[0]  # noqa: E731
    assert gradcheck(fn, (x, scores), eps=1e-6, atol=1e-7, fast_mode=in_triton_interpreter(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_ties_and_nan_order(backend):
    x = torch.randn(2, 7, 4, device=DEVICE)
    scores = torch.full((2, 6), 0.5, device=DEVICE)
    scores[1, 2] = float("nan")
    scores[1, 4] = 0.9
    out, index = td_ops.op(backend, "drop_tokens")(x, scores, 4, 1, True, False)
    assert index.tolist() == [[0, 1, 2, 3], [4, 0, 1, 3]]   # ties to the lower position; NaN last
    out, index = td_ops.op(backend, "drop_tokens")(x, scores, 4, 1, False, True)
    assert index.tolist() == [[0, 1, 2, 3], [0, 1, 3, 4]]


@pytest.mark.parametrize("scores_dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_ranks_scores_of_any_dtype_in_their_own_precision(backend, scores_dtype):
    """Every backend ranks scores of any dtype in float32 (float64 for float64 scores), whatever x's dtype: half
    and bf16 scores, with their many ties, keep the documented order (score descending, ties to the lower
    position); the fused row weights the dropped rows by the scores in x's accumulation dtype."""
    torch.manual_seed(3)
    x = torch.randn(3, 41, 70, device=DEVICE)
    scores = torch.rand(3, 39, device=DEVICE).to(scores_dtype)
    out, index = td_ops.op(backend, "drop_tokens")(x, scores, 23, 2, True, False)
    out, index, x, scores = out.cpu(), index.cpu(), x.cpu(), scores.cpu()
    s = d(scores)
    for b in range(3):
        order = sorted(range(39), key=lambda j: (-s[b, j].item(), j))
        assert index[b].tolist() == order[:23], (scores_dtype, b)
        dropped = torch.tensor(order[23:])
        fused = (s[b, dropped, None] * d(x)[b, 2 + dropped]).sum(0)
        assert torch.equal(out[b, 2:25], x[b, 2 + index[b]])
        assert (out[b, -1].double() - fused).abs().max() < 1e-5, scores_dtype


def test_errors_name_the_argument():
    x = torch.randn(2, 10, 8)
    scores = torch.rand(2, 9)
    with pytest.raises(ValueError, match="keep must be in"):
        effvit.drop_tokens(x, scores, 10)
    with pytest.raises(ValueError, match="keep must be in"):
        effvit.drop_tokens(x, scores, 0)
    with pytest.raises(ValueError, match="scores must be"):
        effvit.drop_tokens(x, scores, 3, num_prefix=2)
    with pytest.raises(ValueError, match="x must be 3-D"):
        effvit.drop_tokens(x[0], scores, 3)
    with pytest.raises(TypeError, match="keep must be an int"):
        effvit.drop_tokens(x, scores, 3.0)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 10, 8)
    with pytest.raises(ValueError, match="q must be 3-D"):
        effvit.cls_attention_scores(k, k)
    with pytest.raises(ValueError, match="k must be"):
        effvit.cls_attention_scores(q, k[:, :2])
    with pytest.raises(TypeError, match="k has dtype"):
        effvit.cls_attention_scores(q, k.double())
    with pytest.raises(ValueError, match="num_prefix"):
        effvit.cls_attention_scores(q, k, num_prefix=10)


@pytest.mark.skipif("cpu" not in td_ops._OP_TABLE, reason="needs the compiled extension")
def test_raw_op_checks():
    x, scores = torch.randn(2, 10, 8), torch.rand(2, 9)
    with pytest.raises(ValueError, match="keep"):
        torch.ops.effvit.drop_tokens(x, scores, 11, 1, True, False)
    with pytest.raises(ValueError, match="num_prefix"):
        torch.ops.effvit.cls_attention_scores(torch.randn(2, 3, 8), torch.randn(2, 3, 4, 8), 1.0, 4)
    out, index = torch.ops.effvit.drop_tokens(x, scores, 3, 1, True, False)
    with pytest.raises(IndexError, match="index holds"):
        torch.ops.effvit.drop_tokens_backward(torch.randn_like(out), x, scores, index + 100, 1, True)


def _op_names():
    names = []
    if "cpu" in td_ops._OP_TABLE:
        names += [f"effvit::{n}" for n in td_ops._OPS]
    if td_ops._triton is not None:
        names += [f"effvit::triton_{n}" for n in td_ops._OPS]
    return names


@pytest.mark.parametrize("name", _op_names())
def test_opcheck(name):
    op_name = name.split("::")[1]
    if "cls_attention_scores" in op_name:
        q, k = make_qk(dict(B=2, H=2, N=7, D=8, P=1, strided=True), torch.float32)
        args = (q, k, 0.3, 1)
        if op_name.endswith("_backward"):
            scores, lse = getattr(torch.ops.effvit, op_name.removesuffix("_backward"))(*args)
            args = (torch.randn_like(scores), q, k, lse, 0.3, 1)
    else:
        x, scores = make_x_scores(dict(B=2, N=9, C=6, P=1, strided=True), torch.float32)
        args = (x, scores, 4, 1, True, False)
        if op_name.endswith("_backward"):
            out, index = getattr(torch.ops.effvit, op_name.removesuffix("_backward"))(*args)
            args = (torch.randn_like(out), x, scores, index, 1, True)
    torch.library.opcheck(getattr(torch.ops.effvit, op_name), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    def fn(q, k, x):
        scores = effvit.cls_attention_scores(q, k, 0.25, 1, backend=backend)
        return effvit.drop_tokens(x, scores, 5, 1, True, backend=backend)[0]

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    q, k = make_qk(dict(B=2, H=2, N=11, D=16, P=1, strided=True), torch.float32, requires_grad=True)
    x = torch.randn(2, 11, 6, device=DEVICE, requires_grad=True)
    out = compiled(q, k, x)
    out.sum().backward()
    assert torch.equal(out, fn(q, k, x))
    assert counter.frame_count == 1


# ---- timm ViT -----------------------------------------------------------------------------------------

try:
    import timm  # noqa: F401
    from timm.models.vision_transformer import VisionTransformer

    HAS_TIMM = True
except ImportError:  # pragma: no cover
    HAS_TIMM = False
requires_timm = pytest.mark.skipif(not HAS_TIMM, reason="needs timm")


def small_vit(**kw):
    """A small timm ViT with every part token dropping must honour switched on by the test's kwargs."""
    args = dict(img_size=48, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).to(DEVICE).eval()


@requires_timm
@pytest.mark.parametrize("variant", ["plain", "registers_qknorm_layerscale", "avgpool"])
@pytest.mark.parametrize("fuse,spatial", [(True, False), (False, True)])
def test_patched_vit_matches_evit_reference(variant, fuse, spatial, seed):
    kw = dict(plain={}, registers_qknorm_layerscale=dict(reg_tokens=3, qk_norm=True, init_values=0.5),
              avgpool=dict(global_pool="avg"))[variant]
    model = small_vit(**kw)
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    drop_loc = (1, 3, 4)
    with torch.no_grad():
        expected = ref.evit_forward(model, images, 0.7, drop_loc, fuse, spatial)
    keys = set(model.state_dict())
    effvit.patch.timm(model, keep_rate=0.7, drop_loc=drop_loc, fuse_token=fuse, spatial_order=spatial,
                      record_index=True)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        out = model(images)
    assert (out - expected).abs().max().item() < 1e-5
    # 36 patches: 36 -> 26 (+1 fused) -> ...
    P = model.num_prefix_tokens
    counts, n = [], 36
    for _ in drop_loc:
        counts.append(math.ceil(0.7 * n))
        n = counts[-1] + int(fuse)
    assert [tuple(i.shape) for i in model.token_drop.kept] == [(2, c) for c in counts]
    assert P == (4 if variant.startswith("registers") else 1)


@requires_timm
def test_patched_vit_gradients_match_reference(seed):
    model = small_vit(init_values=0.5)
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    reference_model = copy.deepcopy(model)
    expected = ref.evit_forward(reference_model, images, 0.6, (2, 4), True, False)
    expected.sum().backward()
    effvit.patch.timm(model, keep_rate=0.6, drop_loc=(2, 4))
    model(images).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference_model.parameters()):
        assert rel_error(p.grad, p_ref.grad) < 1e-4, name


@requires_timm
def test_keep_rate_one_is_timm_exactly_and_settings(seed):
    model = small_vit()
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        expected = model(images)
        effvit.patch.timm(model, keep_rate=1.0, drop_loc=(1, 2))
        assert torch.equal(model(images), expected)
        assert type(model).__name__ == "TokenDropVisionTransformer"
        assert type(model.blocks[1]).__name__ == "TokenDropBlock" and type(model.blocks[0]).__name__ == "Block"
        model.keep_rate = 0.5
        assert model.blocks[1]._effvit_token_drop.keep_rate == 0.5
        assert not torch.equal(model(images), expected)
        with pytest.raises(ValueError, match="keep_rate"):
            model.keep_rate = 0
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            model.forward_intermediates(images)
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(images), model(images))
        twin = copy.deepcopy(model)
        twin.keep_rate = 1.0
        assert model.keep_rate == 0.5 and torch.equal(twin(images), expected)
        effvit.unpatch(model)
        assert type(model) is VisionTransformer and not hasattr(model, "token_drop")
        assert torch.equal(model(images), expected)


@requires_timm
def test_patch_errors():
    model = small_vit()
    with pytest.raises(ValueError, match="keep_rate"):
        effvit.patch.timm(model, keep_rate=1.5)
    with pytest.raises(ValueError, match="drop_loc"):
        effvit.patch.timm(model, drop_loc=(2, 6))
    with pytest.raises(ValueError, match="no prefix token"):
        effvit.patch.timm(small_vit(class_token=False, global_pool="avg"), drop_loc=(1,))
    with pytest.raises(ValueError, match="nothing to patch"):
        effvit.patch.timm(torch.nn.Linear(3, 3))


@requires_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_vit_compiles_fullgraph(backend, seed):
    torch._dynamo.reset()
    model = small_vit()
    effvit.patch.timm(model, backend=backend, keep_rate=0.7, drop_loc=(1, 3))
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        assert (compiled(images) - model(images)).abs().max().item() < 1e-5
    assert counter.frame_count == 1


@requires_timm
def test_guided_dropping_follows_the_guide(seed):
    tiny = small_vit(img_size=32, embed_dim=24)          # a 4 x 4 patch grid
    model = small_vit()                                  # a 6 x 6 patch grid
    effvit.patch.timm(model, keep_rate=0.5, drop_loc=(1, 3), record_index=True)
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    guide = effvit.nn.cls_attention_map(tiny, torch.nn.functional.interpolate(images, size=32))
    assert guide.shape == (2, 16)
    with torch.no_grad(), effvit.nn.guided(model, guide, grid=(4, 4)):
        model(images)
    resized = ref.resize_scores(guide, (4, 4), (6, 6))
    assert torch.allclose(resized.sum(1), guide.sum(1))
    assert torch.equal(model.token_drop.kept[0], torch.topk(resized, 18, dim=1).indices)
    assert model.token_drop.guide is None
    with torch.no_grad():
        model(images)   # without the guide: the model's own scores again
    assert not torch.equal(model.token_drop.kept[0], torch.topk(resized, 18, dim=1).indices)


@requires_timm
def test_timm_vit_small_evit_schedule(seed):
    """EViT's DeiT-S setting on timm's vit_small_patch16_224 (random weights): 197 -> 140 -> 100 -> 72 tokens, the
    logits of EViT's algorithm, and timm's own logits at keep_rate 1."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False).to(DEVICE).eval()
    images = torch.randn(2, 3, 224, 224, device=DEVICE)
    with torch.no_grad():
        unpatched = model(images)
        expected = ref.evit_forward(model, images, 0.7, (3, 6, 9))
        effvit.patch.timm(model, keep_rate=0.7, drop_loc=(3, 6, 9), record_index=True)
        out = model(images)
        assert [i.shape[1] + 2 for i in model.token_drop.kept] == [140, 100, 72]
        assert (out - expected).abs().max().item() < 1e-5
        model.keep_rate = 1.0
        assert torch.equal(model(images), unpatched)
