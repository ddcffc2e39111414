"""Shift family: every kernel backend against the reference (microsoft/SPACH shift_feat + GroupNorm)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
from torch.autograd import gradcheck

import effvit
from effvit import reference
from effvit.reference import shift as ref_shift

from conftest import ALL_DTYPES, DEVICE, assert_close_rel, in_triton_interpreter, kernel_backends, requires_ext

BACKENDS = kernel_backends(DEVICE)
LAYOUTS = ("NCHW", "NHWC")
MEMORY = ("contiguous", "transposed", "strided", "rows_apart")


def random_geometry(rng: random.Random) -> tuple[tuple[int, int, int, int], int]:
    """An odd (B, C, H, W) and a valid n_div (shifted groups non-empty)."""
    C = rng.randint(4, 23)
    shape = (rng.randint(1, 3), C, rng.randint(1, 9), rng.randint(1, 9))
    return shape, rng.randint(4, C)


def make_input(bchw, layout, memory, dtype, device=DEVICE, scale=1.0, offset=0.0):
    """A logical (B, C, H, W) or (B, H, W, C) tensor with the memory arrangement asked for."""
    B, C, H, W = bchw
    logical = (B, C, H, W) if layout == "NCHW" else (B, H, W, C)

    def base(shape):
        return (torch.randn(shape, device=device, dtype=torch.float64) * scale + offset).to(dtype)

    if memory == "contiguous":
        return base(logical)
    if memory == "transposed":  # channels-last memory for NCHW, NCHW memory for NHWC
        if layout == "NCHW":
            return base((B, H, W, C)).permute(0, 3, 1, 2)
        return base((B, C, H, W)).permute(0, 2, 3, 1)
    if memory == "rows_apart":  # rows (or pixels) contiguous inside, with gaps between them
        return base(logical[:3] + (logical[3] + 3,))[..., :logical[3]]
    # every other element along two dims: neither rows nor channels are contiguous
    return base((logical[0], logical[1] * 2, logical[2], logical[3] * 2))[:, ::2, :, ::2]


def every_kernel_layout_memory_dtype(test):
    """Runs `test` for every kernel backend, layout, memory arrangement and dtype."""
    for name, values in (("dtype", ALL_DTYPES), ("memory", MEMORY), ("layout", LAYOUTS), ("backend", BACKENDS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@every_kernel_layout_memory_dtype
def test_shift_matches_reference(backend, layout, memory, dtype, seed, poisoned):
    shape, n_div = random_geometry(random.Random(seed))
    x = make_input(shape, layout, memory, dtype)
    out = effvit.shift(x, n_div, layout, backend=backend)
    expected = ref_shift.shift(x, n_div, layout)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, expected), f"shift differs for {shape}, n_div={n_div}"  # pure data movement: exact


@every_kernel_layout_memory_dtype
def test_shift_backward_is_reverse_shift(backend, layout, memory, dtype, seed, poisoned):
    shape, n_div = random_geometry(random.Random(seed))
    x = make_input(shape, layout, memory, dtype).requires_grad_()
    grad = make_input(shape, layout, "strided", dtype)
    (g_kernel,) = torch.autograd.grad(effvit.shift(x, n_div, layout, backend=backend), x, grad)
    (g_ref,) = torch.autograd.grad(ref_shift.shift(x, n_div, layout), x, grad)
    assert torch.equal(g_kernel, g_ref)


@every_kernel_layout_memory_dtype
def test_shift_group_norm_matches_reference(backend, layout, memory, dtype, seed, poisoned):
    rng = random.Random(seed)
    shape, n_div = random_geometry(rng)
    C = shape[1]
    # an offset mean checks the statistics are not computed as E[x^2] - E[x]^2 in low precision
    x = make_input(shape, layout, memory, dtype, scale=rng.uniform(0.5, 3.0), offset=rng.uniform(-4, 4))
    weight = torch.randn(C, device=DEVICE, dtype=dtype)
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    shifted, normalized = effvit.shift_group_norm(x, n_div, weight, bias, 1e-5, layout, backend=backend)
    ref_s, ref_y = ref_shift.shift_group_norm(x.double(), n_div, weight.double(), bias.double(), 1e-5, layout)
    assert torch.equal(shifted, ref_s.to(dtype))
    assert normalized.dtype == dtype and normalized.stride() == shifted.stride()
    assert_close_rel(normalized, ref_y, dtype, f"normalized {shape} n_div={n_div}")


@every_kernel_layout_memory_dtype
@pytest.mark.parametrize("uses", ["both", "normalized", "shifted"])
def test_shift_group_norm_backward_matches_reference(backend, layout, memory, dtype, uses, seed, poisoned):
    rng = random.Random(seed)
    shape, n_div = random_geometry(rng)
    C = shape[1]
    x = make_input(shape, layout, memory, dtype, offset=rng.uniform(-2, 2))
    weight = torch.randn(C, device=DEVICE, dtype=dtype)
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    g_s = make_input(shape, layout, "contiguous", dtype)
    g_y = make_input(shape, layout, "strided", dtype)

    def grads(fn, x, w, b):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        s, y = fn(x, w, b)
        loss = 0
        if uses in ("both", "shifted"):
            loss = loss + (s * g_s.to(s.dtype)).sum()
        if uses in ("both", "normalized"):
            loss = loss + (y * g_y.to(y.dtype)).sum()
        return torch.autograd.grad(loss, (x, w, b), allow_unused=True)

    ours = grads(lambda x, w, b: effvit.shift_group_norm(x, n_div, w, b, 1e-5, layout, backend=backend),
                 x, weight, bias)
    ref = grads(lambda x, w, b: ref_shift.shift_group_norm(x, n_div, w, b, 1e-5, layout),
                x.double(), weight.double(), bias.double())
    # dx = rstd * (w*gy - mean(w*gy) - xhat * mean(w*gy*xhat)) + g_s: it can cancel to far below its terms
    # (a sample that is mostly shifted-in zeros), and then its rounding error is relative to the terms
    s64 = ref_shift.shift(x.double(), n_div, layout)
    rstd = (s64.flatten(1).var(1, unbiased=False) + 1e-5).rsqrt().max().item()
    channel_dim = 3 if layout == "NHWC" else 1
    w_shape = [1, 1, 1, 1]
    w_shape[channel_dim] = C
    terms = 0.0
    if uses in ("both", "normalized"):
        terms = rstd * (weight.double().view(w_shape) * g_y.double()).abs().max().item()
    for name, g, r in zip(("grad_x", "grad_weight", "grad_bias"), ours, ref):
        if r is None:
            assert g is None or not g.abs().any(), f"{name} should be zero"
            continue
        assert g.dtype == dtype
        assert_close_rel(g, r, dtype, f"{name} {shape} n_div={n_div}", scale=terms if name == "grad_x" else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, layout, seed):
    fast = in_triton_interpreter(backend)
    shape, n_div = ((1, 5, 3, 4) if fast else (2, 9, 4, 5)), 4
    C = shape[1]
    x = make_input(shape, layout, "strided", torch.float64).requires_grad_()
    w = torch.randn(C, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, device=DEVICE, dtype=torch.float64, requires_grad=True)

    def sgn(x, w, b):
        return effvit.shift_group_norm(x, n_div, w, b, 1e-5, layout, backend=backend)

    assert gradcheck(lambda x: effvit.shift(x, n_div, layout, backend=backend), (x,), fast_mode=fast)
    assert gradcheck(sgn, (x, w, b), fast_mode=fast)
    assert gradcheck(lambda x, w, b: sgn(x, w, b)[1], (x, w, b), fast_mode=fast)
    assert gradcheck(lambda x, w, b: sgn(x, w, b)[0], (x, w, b), fast_mode=fast)


EDGE_GEOMETRIES = [  # (B, C, H, W), n_div
    ((1, 4, 1, 1), 4),    # one pixel, every group one channel
    ((2, 5, 1, 7), 5),    # one row: up/down shifts are all zero
    ((2, 9, 6, 1), 4),    # one column; C not divisible by n_div
    ((1, 8, 3, 3), 8),    # n_div == C: nothing copied unshifted
    ((3, 7, 2, 2), 4),    # a single shifted channel per group, three copied
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("geometry", EDGE_GEOMETRIES, ids=lambda g: f"{g[0]}/{g[1]}" if isinstance(g, tuple) else g)
def test_edge_geometries(backend, layout, memory, geometry, seed, poisoned):
    shape, n_div = geometry
    x = make_input(shape, layout, memory, torch.float64).requires_grad_()
    w = torch.randn(shape[1], device=DEVICE, dtype=torch.float64)
    b = torch.randn(shape[1], device=DEVICE, dtype=torch.float64)
    assert torch.equal(effvit.shift(x, n_div, layout, backend=backend), ref_shift.shift(x, n_div, layout))
    s, y = effvit.shift_group_norm(x, n_div, w, b, 1e-5, layout, backend=backend)
    rs, ry = ref_shift.shift_group_norm(x, n_div, w, b, 1e-5, layout)
    assert torch.equal(s, rs)
    assert_close_rel(y, ry, torch.float64, "normalized")
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (rgx,) = torch.autograd.grad(ry, x, g)
    assert_close_rel(gx, rgx, torch.float64, "grad_x")


@requires_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_large_sample_splits_across_threads(layout, seed, poisoned):
    """Batch 1 at ShiftViT's first stage: the CPU kernels split the sample into several tasks."""
    shape = (1, 96, 56, 56)
    x = make_input(shape, layout, "contiguous", torch.float32).requires_grad_()
    w, b = torch.randn(96), torch.randn(96)
    assert torch.equal(effvit.shift(x, 12, layout, backend="cpu"), ref_shift.shift(x, 12, layout))
    s, y = effvit.shift_group_norm(x, 12, w, b, 1e-5, layout, backend="cpu")
    x64 = x.detach().double().requires_grad_()
    rs, ry = ref_shift.shift_group_norm(x64, 12, w.double(), b.double(), 1e-5, layout)
    assert_close_rel(y, ry, torch.float32, "normalized")
    g_s, g_y = torch.randn_like(s), torch.randn_like(y)
    (gx,) = torch.autograd.grad((s, y), x, (g_s, g_y))
    (rgx,) = torch.autograd.grad((rs, ry), x64, (g_s.double(), g_y.double()))
    assert_close_rel(gx, rgx, torch.float32, "grad_x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives(backend, seed):
    """The shift is linear: any order of derivative works. The fused GroupNorm has first derivatives
    only, and says so instead of giving wrong second ones."""
    x = torch.randn(1, 8, 3, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: effvit.shift(t, 4, backend=backend), (x,),
                                        fast_mode=in_triton_interpreter(backend))
    s, y = effvit.shift_group_norm(x, 4, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="shift_group_norm has no second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(backend, layout):
    x = torch.randn((0, 12, 5, 6) if layout == "NCHW" else (0, 5, 6, 12), device=DEVICE, requires_grad=True)
    out = effvit.shift(x, 4, layout, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    w = torch.ones(12, device=DEVICE, requires_grad=True)
    s, y = effvit.shift_group_norm(x, 4, w, None, 1e-5, layout, backend=backend)
    assert s.shape == y.shape == x.shape
    (s.sum() + y.sum()).backward()
    assert w.grad is not None and w.grad.shape == (12,)


@requires_ext
@pytest.mark.parametrize("dim,hw,n_div", [(96, 56, 12), (192, 28, 12), (384, 14, 16), (768, 7, 16)])
def test_shiftvit_shapes_cpu(dim, hw, n_div, seed, poisoned):
    """The ShiftViT stage shapes, on the C++ kernels (too large for the Triton interpreter)."""
    x = torch.randn(2, dim, hw, hw)
    assert torch.equal(effvit.shift(x, n_div, backend="cpu"), ref_shift.shift_feat(x, n_div))
    w, b = torch.randn(dim), torch.randn(dim)
    s, y = effvit.shift_group_norm(x, n_div, w, b, backend="cpu")
    ref_s, ref_y = ref_shift.shift_group_norm(x.double(), n_div, w.double(), b.double())
    assert torch.equal(s, ref_s.float())
    assert_close_rel(y, ref_y, torch.float32, "normalized")


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("norm", ["group_norm", "batch_norm"])
def test_shift_block_equals_official_block(backend, norm, seed):
    dim, n_div = 24, 6
    norm_layer = None if norm == "group_norm" else nn.BatchNorm2d
    ours = effvit.nn.ShiftBlock(dim, n_div=n_div, mlp_ratio=2.0, norm_layer=norm_layer, backend=backend).to(DEVICE)
    official = reference.ShiftViTBlock(dim, n_div=n_div, mlp_ratio=2.0).to(DEVICE)
    if norm == "batch_norm":
        official.norm2 = nn.BatchNorm2d(dim).to(DEVICE)
    with torch.no_grad():  # non-trivial norm parameters
        for p in ours.parameters():
            p.normal_(0, 0.5)
    assert set(ours.state_dict()) == set(official.state_dict())
    official.load_state_dict(ours.state_dict())
    ours.eval(), official.eval()
    x = torch.randn(2, dim, 7, 9, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x1), official(x2)
    assert_close_rel(out, expected, torch.float32, "block output")
    g = torch.randn_like(out)
    out.backward(g), expected.backward(g)
    assert_close_rel(x1.grad, x2.grad, torch.float32, "block grad_x")
    for (name, p1), p2 in zip(ours.named_parameters(), official.parameters()):
        assert_close_rel(p1.grad, p2.grad, torch.float32, f"grad of {name}")


def test_shift_block_fuses_the_official_group_norm_subclass(seed):
    """SPACH's ShiftViT builds norm2 as its own GroupNorm(num_channels, num_groups=1) subclass and passes
    input_resolution: both are accepted, and the norm still runs fused."""

    class SpachGroupNorm(nn.GroupNorm):  # as microsoft/SPACH models/shiftvit.py defines it
        def __init__(self, num_channels, num_groups=1):
            super().__init__(num_groups, num_channels)

    block = effvit.nn.ShiftBlock(16, n_div=4, norm_layer=SpachGroupNorm, input_resolution=(5, 5)).to(DEVICE)
    assert block._fusable_norm()
    official = reference.ShiftViTBlock(16, n_div=4).to(DEVICE)
    official.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    assert_close_rel(block(x), official(x), torch.float32, "block")

    class CustomNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    assert not effvit.nn.ShiftBlock(16, n_div=4, norm_layer=lambda c: CustomNorm(1, c))._fusable_norm()


def test_shift_module_layouts(seed):
    x = torch.randn(2, 5, 6, 16, device=DEVICE)
    assert torch.equal(effvit.nn.Shift(4, layout="NHWC")(x), ref_shift.shift_feat_nhwc(x, 4))
    assert "n_div=4" in repr(effvit.nn.Shift(4))


# ---- bad input ----------------------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"] + BACKENDS)
@pytest.mark.parametrize("call,error,words", [
    (lambda be: effvit.shift(_x(2, 8, 4), 4, backend=be), ValueError, "4-D"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4, 1), 4, backend=be), ValueError, "4-D"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), 0, backend=be), ValueError, "n_div"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), -3, backend=be), ValueError, "n_div"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), 3, backend=be), ValueError, "n_div"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), 9, backend=be), ValueError, "n_div"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), 4.0, backend=be), TypeError, "n_div"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4, dtype=torch.int32), 4, backend=be), TypeError, "float"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4, dtype=torch.bool), 4, backend=be), TypeError, "float"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4).numpy(), 4, backend=be), TypeError, "torch.Tensor"),
    (lambda be: effvit.shift(_x(2, 8, 4, 4), 4, layout="NWHC", backend=be), ValueError, "layout"),
    (lambda be: effvit.shift(_x(2, 4, 4, 3), 4, layout="NHWC", backend=be), ValueError, "n_div"),
    (lambda be: effvit.shift_group_norm(_x(2, 8, 4, 4), 4, torch.ones(7), backend=be), ValueError, "weight"),
    (lambda be: effvit.shift_group_norm(_x(2, 8, 4, 4), 4, None, torch.ones(8, dtype=torch.int64), backend=be),
     TypeError, "bias"),
    (lambda be: effvit.shift_group_norm(_x(2, 8, 4, 4), 4, torch.ones(8, device="meta"), backend=be),
     ValueError, "device"),
    (lambda be: effvit.shift_group_norm(_x(2, 8, 4, 4), 4, eps=-1.0, backend=be), ValueError, "eps"),
    (lambda be: effvit.shift_group_norm(_x(2, 8, 0, 4), 4, backend=be), ValueError, "H and W > 0"),
])
def test_bad_input_raises_clear_error(backend, call, error, words):
    with pytest.raises(error, match=words):
        call(backend)


@requires_ext
@pytest.mark.parametrize("call,error,words", [
    (lambda: torch.ops.effvit.shift(_x(2, 8, 4), 4, False, False), ValueError, "4-D"),
    (lambda: torch.ops.effvit.shift(_x(2, 8, 4, 4), 2, False, False), ValueError, "n_div"),
    (lambda: torch.ops.effvit.shift(_x(2, 8, 4, 4, dtype=torch.int64), 4, False, False), TypeError, "floating"),
    (lambda: torch.ops.effvit.shift_group_norm(_x(2, 8, 4, 4), 4, torch.ones(3), torch.ones(8), 1e-5, False),
     ValueError, "weight"),
    (lambda: torch.ops.effvit.shift_group_norm_backward(None, _x(2, 8, 4, 4), _x(2, 8, 4, 5), torch.ones(8),
                                                         torch.ones(2), torch.ones(2), 4, False),
     ValueError, "shape"),
])
def test_raw_ops_reject_bad_input(call, error, words):
    """Direct callers of torch.ops.effvit.* get Python exceptions, never a crash."""
    with pytest.raises(error, match=words):
        call()


def test_poisoning_is_active(poisoned):
    """The `poisoned` fixture really fills new tensors with NaN (else the tests above could not fail)."""
    assert torch.isnan(torch.empty(16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(4, 4), memory_format=torch.preserve_format)).all()
