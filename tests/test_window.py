"""Window family: every kernel backend against the reference (timm's SwinTransformerBlock._attn)."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
import torch._dynamo.testing
from torch.autograd import gradcheck

import effvit
from effvit.ops import window as window_ops
from effvit.reference import window as ref

from conftest import (ALL_DTYPES, DEVICE, REL_TOL, assert_close_rel, kernel_backends, rel_error, requires_ext,
                      GRADCHECK_NONDET_TOL)

BACKENDS = kernel_backends(DEVICE, "window")
ACC = {torch.float64: torch.float64}


def random_case(rng: random.Random, max_window: int = 7):
    """An odd geometry: non-square windows, maps that are not multiples of them, some shifted, some with
    only one dimension shifted, with and without bias table and qkv bias."""
    wh, ww = rng.randint(2, max_window), rng.randint(2, max_window)
    H, W = rng.randint(wh, 2 * wh + 3), rng.randint(ww, 2 * ww + 3)
    kind = rng.choice(["none", "both", "h", "w"])
    sh = rng.randint(1, wh - 1) if kind in ("both", "h") else 0
    sw = rng.randint(1, ww - 1) if kind in ("both", "w") else 0
    return dict(B=rng.randint(1, 2), H=H, W=W, heads=rng.randint(1, 3), head_dim=rng.choice([16, 24, 32]),
                window=(wh, ww), shift=(sh, sw), table=rng.random() < 0.8, pad=rng.random() < 0.8)


def make_inputs(case, dtype, device=DEVICE, requires_grad=False):
    C = case["heads"] * case["head_dim"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.randn(case["B"], case["H"], case["W"], 3 * C, device=device, dtype=torch.float64).to(dtype)
    rows = (2 * case["window"][0] - 1) * (2 * case["window"][1] - 1)
    table = torch.randn(rows, case["heads"], device=device, dtype=acc) if case["table"] else None
    pad = torch.randn(3 * C, device=device, dtype=torch.float64).to(dtype) if case["pad"] else None
    if requires_grad:
        for t in (qkv, table, pad):
            if t is not None:
                t.requires_grad_()
    return qkv, table, pad


def reference_core(case, qkv, table, pad):
    """The float64 reference output and log-sum-exp of the same (rounded) inputs."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    args = (case["heads"], case["window"], case["shift"], case["head_dim"] ** -0.5)
    return (ref.window_attention_core(d(qkv), d(table), *args, d(pad)),
            ref.window_attention_lse(d(qkv), d(table), *args, d(pad)))


def reference_grads(case, qkv, table, pad, grad) -> list[torch.Tensor]:
    """Float64 reference gradients for the inputs that are not None (zeros where the reference does not use
    one: qkv_bias when no token is padding)."""
    inputs = [t for t in (qkv, table, pad) if t is not None]
    d = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(d)
    q64, t64, p64 = next(it), next(it) if table is not None else None, next(it) if pad is not None else None
    expected = ref.window_attention_core(q64, t64, case["heads"], case["window"], case["shift"],
                                         case["head_dim"] ** -0.5, p64)
    grads = torch.autograd.grad(expected, d, grad.double(), allow_unused=True)
    return [torch.zeros_like(t, dtype=torch.float64) if g is None else g for g, t in zip(grads, inputs)]


def call(case, qkv, table, pad, backend):
    return effvit.window_attention(qkv, case["heads"], case["window"], case["shift"], table, pad,
                                   always_partition=True, backend=backend)


def raw_op(backend, name):
    return window_ops.op(backend, name)


# ---- the kernels against the reference -----------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_forward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_case(random.Random(seed))
    qkv, table, pad = make_inputs(case, dtype)
    out, lse = raw_op(backend, "window_attention")(qkv, table, pad, case["heads"], list(case["window"]),
                                                   list(case["shift"]), case["head_dim"] ** -0.5)
    expected, expected_lse = reference_core(case, qkv, table, pad)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(out, expected, dtype, f"out {case}")
    assert_close_rel(lse, expected_lse, torch.float64 if dtype == torch.float64 else torch.float32, f"lse {case}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_backward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_case(random.Random(seed))
    qkv, table, pad = make_inputs(case, dtype, requires_grad=True)
    out = call(case, qkv, table, pad, backend)
    grad = torch.randn_like(out)
    inputs = [t for t in (qkv, table, pad) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad)
    expected_grads = reference_grads(case, qkv, table, pad, grad)
    for name, g, e, t in zip(("qkv", "table", "pad"), grads, expected_grads, inputs):
        assert g.dtype == t.dtype
        # half-precision gradients (the float32 table's too) carry the rounding of the output they start from
        tol = REL_TOL[dtype] * (4 if dtype in (torch.float16, torch.bfloat16) else 1)
        err = rel_error(g, e)
        assert not torch.isnan(g).any(), name
        assert err <= tol, f"grad {name}: relative error {err:.3g} for {case}"


EDGE_CASES = [
    # window == map, no padding; whole map one window
    dict(B=1, H=7, W=7, heads=2, head_dim=16, window=(7, 7), shift=(0, 0), table=True, pad=True),
    # Swin stage shape, shifted
    dict(B=1, H=14, W=14, heads=3, head_dim=32, window=(7, 7), shift=(3, 3), table=True, pad=True),
    # window larger than the map (always_partition): mostly padding
    dict(B=2, H=3, W=2, heads=1, head_dim=16, window=(4, 5), shift=(1, 2), table=True, pad=True),
    # one row of windows, only the width shifted
    dict(B=1, H=4, W=17, heads=2, head_dim=24, window=(4, 6), shift=(0, 3), table=False, pad=False),
    # the largest window and head the GPU kernels take
    dict(B=1, H=16, W=16, heads=1, head_dim=128, window=(16, 16), shift=(8, 8), table=True, pad=True),
    # window 2, head_dim not a multiple of 16
    dict(B=3, H=5, W=3, heads=4, head_dim=20, window=(2, 2), shift=(1, 1), table=True, pad=True),
    # 18 and 50 keys: the CPU forward's logit GEMM stops at 16 and 48 columns and takes the last two a column at
    # a time (ws 7's 49 keys, one left over, are in every Swin case)
    dict(B=2, H=7, W=13, heads=2, head_dim=16, window=(3, 6), shift=(1, 2), table=True, pad=True),
    dict(B=1, H=12, W=10, heads=2, head_dim=32, window=(5, 10), shift=(2, 0), table=True, pad=False),
    # 16 keys: the GEMM's columns are exactly the keys
    dict(B=1, H=9, W=8, heads=3, head_dim=16, window=(4, 4), shift=(2, 2), table=False, pad=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: f"{c['H']}x{c['W']}w{c['window']}s{c['shift']}d{c['head_dim']}")
def test_edge_geometries(backend, case, seed, poisoned):
    qkv, table, pad = make_inputs(case, torch.float32, requires_grad=True)
    out = call(case, qkv, table, pad, backend)
    expected, _ = reference_core(case, qkv, table, pad)
    assert_close_rel(out, expected, torch.float32, f"out {case}")
    inputs = [t for t in (qkv, table, pad) if t is not None]
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    for g, e in zip(grads, reference_grads(case, qkv, table, pad, grad)):
        assert rel_error(g, e) <= 1e-5


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_half_qkv_with_float32_table(backend, seed):
    """The table stays float32 under autocast while qkv is half: every backend, the reference too, takes it."""
    case = dict(B=1, H=6, W=7, heads=2, head_dim=16, window=(3, 3), shift=(1, 1), table=True, pad=True)
    qkv, table, pad = make_inputs(case, torch.bfloat16)
    assert table.dtype == torch.float32
    out = call(case, qkv, table, pad, backend)
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, reference_core(case, qkv, table, pad)[0], torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, seed):
    case = dict(B=1, H=5, W=6, heads=2, head_dim=16, window=(3, 4), shift=(1, 2), table=True, pad=True)
    qkv, table, pad = make_inputs(case, torch.float64, requires_grad=True)
    qkv.data.mul_(0.5)
    fn = lambda q, t, p: call(case, q, t, p, backend)  # noqa: E731
    assert gradcheck(fn, (qkv, table, pad), eps=1e-6, atol=1e-6, fast_mode=True, nondet_tol=GRADCHECK_NONDET_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_qkv(backend, seed):
    case = dict(B=2, H=6, W=5, heads=2, head_dim=16, window=(3, 3), shift=(1, 1), table=True, pad=True)
    qkv, table, pad = make_inputs(case, torch.float32)
    wide = torch.randn(2, 6, 5, qkv.shape[3] + 8, device=qkv.device)[..., 4:-4].copy_(qkv)   # rows apart
    assert not wide.is_contiguous()
    out = call(case, wide, table, pad, backend)
    assert_close_rel(out, reference_core(case, qkv, table, pad)[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_no_attention_matrix(backend):
    """Forward keeps qkv, the output and the log-sum-exp, never a [.., N, N] tensor."""
    case = dict(B=2, H=14, W=14, heads=3, head_dim=16, window=(7, 7), shift=(3, 3), table=True, pad=True)
    qkv, table, pad = make_inputs(case, torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = call(case, qkv, table, pad, backend)
    big = [tuple(t.shape) for t in saved if t.numel() > qkv.numel()]
    assert not big, f"saved tensors larger than qkv: {big}"
    total = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != qkv.data_ptr())
    lse_bytes = case["B"] * case["heads"] * case["H"] * case["W"] * 4
    table_bytes = table.numel() * 4 + pad.numel() * 4
    assert total <= out.numel() * out.element_size() + lse_bytes + table_bytes


# ---- argument errors ------------------------------------------------------------------------------

def test_errors_name_the_argument():
    qkv = torch.randn(1, 5, 6, 3 * 32)
    with pytest.raises(ValueError, match="larger than the 5x6 map"):
        effvit.window_attention(qkv, 2, 7)
    with pytest.raises(ValueError, match="divisible by 3 \\* num_heads"):
        effvit.window_attention(qkv, 5, 3)
    with pytest.raises(ValueError, match="4-D"):
        effvit.window_attention(qkv[0], 2, 3)
    with pytest.raises(ValueError, match="shift_size"):
        effvit.window_attention(qkv, 2, 3, 3)
    with pytest.raises(TypeError, match="window_size"):
        effvit.window_attention(qkv, 2, 2.5)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        effvit.window_attention(qkv, 2, 3, 1, torch.randn(24, 2))
    with pytest.raises(ValueError, match="qkv_bias"):
        effvit.window_attention(qkv, 2, 3, 1, None, torch.randn(95))
    with pytest.raises(TypeError, match="qkv must be float"):
        effvit.window_attention(qkv.int(), 2, 3)
    if torch.device("meta") != qkv.device:
        with pytest.raises(ValueError, match="same device"):
            effvit.window_attention(qkv, 2, 3, 0, torch.randn(25, 2, device="meta"))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        effvit.nn.WindowAttention(30, 7, 4)


@requires_ext
def test_raw_op_checks():
    qkv = torch.randn(1, 5, 6, 3 * 32)
    with pytest.raises(ValueError, match="shift must be in"):
        torch.ops.effvit.window_attention(qkv, None, None, 2, [3, 3], [3, 0], 0.25)
    with pytest.raises(ValueError, match="bias_table must have shape"):
        torch.ops.effvit.window_attention(qkv, torch.randn(3, 2), None, 2, [3, 3], [0, 0], 0.25)
    with pytest.raises(TypeError, match="accumulation dtype"):
        torch.ops.effvit.window_attention(qkv, torch.randn(25, 2, dtype=torch.float64), None, 2, [3, 3], [0, 0], 0.25)


# ---- registration: opcheck, fake kernels, torch.compile ------------------------------------------

def _op_names():
    names = []
    if "cpu" in window_ops._OP_TABLE:
        names += [f"effvit::{n}" for n in window_ops._OPS]
    if window_ops._triton is not None:
        names += [f"effvit::triton_{n}" for n in window_ops._OPS]
    return names


def _sample_args(name: str, table: bool):
    case = dict(B=2, H=5, W=7, heads=2, head_dim=16, window=(3, 4), shift=(1, 2), table=table, pad=table)
    qkv, tab, pad = make_inputs(case, torch.float32)
    geo = (2, [3, 4], [1, 2], 0.25)
    if not name.endswith("_backward"):
        return (qkv, tab, pad) + geo
    fwd = getattr(torch.ops.effvit, name.split("::")[1].removesuffix("_backward"))
    out, lse = fwd(qkv, tab, pad, *geo)
    return (torch.randn_like(out), qkv, tab, pad, out, lse) + geo


@pytest.mark.parametrize("name", _op_names())
@pytest.mark.parametrize("table", [True, False])
def test_opcheck(name, table):
    op = getattr(torch.ops.effvit, name.split("::")[1])
    torch.library.opcheck(op, _sample_args(name, table))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    attn = effvit.nn.WindowAttention(32, (3, 4), 2, backend=backend).to(DEVICE)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x: attn.forward_map(x, (1, 2)), fullgraph=True, backend=counter)
    x = torch.randn(2, 5, 7, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    expected = ref.swin_attention(x, attn, (3, 4), (1, 2))
    assert_close_rel(out, expected, torch.float32)
    (g,) = torch.autograd.grad(out.sum(), x)
    (e,) = torch.autograd.grad(expected.sum(), x)
    assert_close_rel(g, e, torch.float32)
    compiled(torch.randn(2, 5, 7, 32, device=DEVICE, requires_grad=True))
    assert counter.frame_count == 1


# ---- modules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_window_attention_module(backend, seed):
    attn = effvit.nn.WindowAttention(48, (3, 4), 3, backend=backend).to(DEVICE)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
    timm_keys = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}
    assert set(attn.state_dict()) == timm_keys
    windows = torch.randn(5, 12, 48, device=DEVICE)
    assert_close_rel(attn(windows), ref.WindowAttention.forward(attn, windows), torch.float32)
    mask = torch.zeros(5, 12, 12, device=DEVICE).masked_fill_(torch.rand(5, 12, 12, device=DEVICE) < 0.3, -100.0)
    assert_close_rel(attn(windows[:5], mask), ref.WindowAttention.forward(attn, windows[:5], mask), torch.float32)
    x = torch.randn(2, 7, 9, 48, device=DEVICE)
    assert_close_rel(attn.forward_map(x, (1, 2)), ref.swin_attention(x, attn, (3, 4), (1, 2)), torch.float32)


def test_effective_window_follows_timm():
    assert ref.effective_window((56, 56), (7, 7), (3, 3)) == ((7, 7), (3, 3))
    assert ref.effective_window((7, 10), (7, 7), (3, 3)) == ((7, 7), (0, 3))
    assert ref.effective_window((5, 10), (7, 7), (3, 3)) == ((5, 7), (0, 3))
    assert ref.effective_window((5, 10), (7, 7), (3, 3), always_partition=True) == ((7, 7), (3, 3))


def test_reference_core_takes_a_premade_shift_mask(seed):
    """The benchmark's eager peers take the shift mask made once, as timm's attn_mask buffer: the same numbers
    as making it per call, and the argument is really used."""
    qkv = torch.randn(2, 10, 13, 3 * 32, dtype=torch.float64)
    table = torch.randn(7 * 7, 2, dtype=torch.float64)
    args = (table, 2, (4, 4), (2, 2), 16 ** -0.5, None)
    mask = ref.shift_region_mask(12, 16, (4, 4), (2, 2), dtype=torch.float64)
    made_here = ref.window_attention_core(qkv, *args)
    assert torch.equal(ref.window_attention_core(qkv, *args, shift_mask=mask), made_here)
    assert not torch.allclose(ref.window_attention_core(qkv, *args, shift_mask=torch.zeros_like(mask)), made_here)


# ---- timm: patched models give the same numbers --------------------------------------------------

try:
    import timm
except ImportError:  # the GPU machines may lack it: the kernel tests above still run
    timm = None
requires_timm = pytest.mark.skipif(timm is None, reason="needs timm (pip install timm)")


def _random_model(name, **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases too, so padding tokens carry the qkv bias
            p.add_(torch.randn_like(p) * 0.02)
    return model


@requires_timm
def test_reference_matches_timm_block(seed):
    """The reference itself against timm's SwinTransformerBlock._attn, padded and shifted."""
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(32, (10, 13), num_heads=2, window_size=4, shift_size=2, dynamic_mask=True)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 10, 13, 32)
    expected = block._attn(x)
    assert torch.allclose(ref.swin_attention(x, block.attn, block.window_size, block.shift_size), expected,
                          atol=1e-6)


@requires_timm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"])
@pytest.mark.parametrize("size", [(224, 224), (200, 296)])
def test_timm_swin_patched_logits_and_gradients(name, size, seed):
    kwargs = {} if size == (224, 224) else dict(img_size=size, strict_img_size=False)
    model = _random_model(name, **kwargs).to(DEVICE).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, *size, device=DEVICE)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    effvit.patch.timm(model)
    assert type(model.layers[0].blocks[0]).__name__ == "FusedSwinTransformerBlock"
    assert list(model.state_dict()) == list(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    out = model(x)
    assert (out - expected).abs().max().item() < 1e-4
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for (pname, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert rel_error(g, e) < 1e-4, pname
    effvit.unpatch(model)
    assert type(model.layers[0].blocks[0]).__name__ == "SwinTransformerBlock"
    assert torch.equal(model(x), expected)


@requires_timm
def test_timm_patch_survives_copy_and_pickle():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                              embed_dim=32, num_heads=(1, 2, 2, 4), img_size=64).eval()
    effvit.patch.timm(model)
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.layers[0].blocks[0]).__name__ == "FusedSwinTransformerBlock"
        assert torch.equal(clone(x), out)


@requires_timm
def test_timm_patch_attention_dropout_in_training_runs_the_reference(seed):
    """timm's attention dropout is not fused: in training the patched block runs the reference, which draws
    the same dropout mask as timm from the same generator state."""
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(32, (9, 10), num_heads=2, window_size=4, shift_size=2, attn_drop=0.3).train()
    x = torch.randn(2, 9, 10, 32)
    torch.manual_seed(seed)
    expected = block._attn(x)
    effvit.patch.timm(block)
    torch.manual_seed(seed)
    assert torch.allclose(block._attn(x), expected, atol=1e-6)


@requires_timm
def test_timm_patch_under_autocast():
    """Under autocast the qkv Linear gives bfloat16 while the bias table stays float32, as in timm."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                              embed_dim=32, num_heads=(1, 2, 2, 4), img_size=(64, 80), strict_img_size=False).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        out = effvit.patch.timm(model)(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel_error(out, expected) < 3e-2


@requires_timm
def test_timm_patch_needs_a_swin():
    with pytest.raises(ValueError, match="found nothing to patch in Linear; it patches timm's swin_transformer"):
        effvit.patch.timm(torch.nn.Linear(2, 2))
