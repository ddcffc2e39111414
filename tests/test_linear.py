"""Linear family: the linear attention kernels on every backend against the reference, and the modules."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo.testing
from torch.autograd import gradcheck

import effvit
from effvit.ops import linear as linear_ops
from effvit.reference import linear as ref

from conftest import ALL_DTYPES, DEVICE, REL_TOL, assert_close_rel, kernel_backends, rel_error, requires_ext

BACKENDS = kernel_backends(DEVICE, "linear")
HALF = (torch.float16, torch.bfloat16)
LAYOUTS = ("bhnd", "bnhd", "bhdn")


def make_qkv(B, H, N, D, Dv, layout, dtype, requires_grad=False, positive=False):
    """q, k: [B, H, N, D] and v: [B, H, N, Dv] as views of (B, H, N, D), (B, N, H, D) or (B, H, D, N) memory."""
    def one(last):
        shape = {"bhnd": (B, H, N, last), "bnhd": (B, N, H, last), "bhdn": (B, H, last, N)}[layout]
        t = torch.randn(shape, device=DEVICE, dtype=torch.float64)
        t = t.abs() if positive else t
        t = t.to(dtype)
        return {"bhnd": t, "bnhd": t.transpose(1, 2), "bhdn": t.transpose(2, 3)}[layout]
    q, k, v = one(D), one(D), one(Dv)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def random_case(rng: random.Random):
    feature = rng.choice(["relu", "elu+1", "identity"])
    return dict(B=rng.randint(1, 2), H=rng.randint(1, 3), N=rng.choice([1, rng.randint(2, 70), rng.randint(100, 700)]),
                D=rng.choice([8, 16, 20, 32]), Dv=rng.choice([8, 12, 32]), layout=rng.choice(LAYOUTS),
                feature=feature, temperature=rng.random() < 0.5, q_scale=rng.choice([1.0, 0.7]),
                k_scale=rng.choice([1.0, 1.3]), eps=rng.choice([0.0, 1e-5]),
                # L2ViT's clamp, set where it holds for some rows and not others (den ~ N * D / 4 with relu)
                denom_min=rng.choice([None, None, 0.25 * rng.randint(1, 70) * 4]))


def random_case_defined(rng: random.Random):
    """random_case, minus the one undefined combination: relu without eps or clamp gives 0 / 0 for a query whose
    features are all <= 0 (NaN in the official code too)."""
    case = random_case(rng)
    if case["feature"] == "relu" and case["eps"] == 0.0 and case["denom_min"] is None:
        case["eps"] = 1e-5
    return case


def make_case_inputs(case, dtype, requires_grad=False):
    # identity features keep q, k positive so denominators stay away from 0
    q, k, v = make_qkv(case["B"], case["H"], case["N"], case["D"], case["Dv"], case["layout"], dtype, requires_grad,
                       positive=case["feature"] == "identity")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = (torch.rand(case["H"], device=DEVICE, dtype=acc) + 0.1) if case["temperature"] else None
    if t is not None and requires_grad:
        t.requires_grad_()
    return q, k, v, t


def reference_and_grads(case, q, k, v, t, grad=None):
    d = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, t)]
    out = ref.linear_attention(*d, case["feature"], case["q_scale"], case["k_scale"], case["eps"], case["denom_min"])
    if grad is None:
        return out.detach(), None
    inputs = [x for x in d if x is not None]
    return out.detach(), torch.autograd.grad(out, inputs, grad.double())


def term_scales(case, q, k, v, t, grad) -> dict[str, float]:
    """The size of the terms the q, k and temperature gradients are differences of (with few tokens the output
    barely depends on q and k: their gradients cancel to ~0, and rounding then scales with the terms, not with the
    result)."""
    d = lambda x: x.detach().double()  # noqa: E731
    a = ref.feature_map(d(q) * case["q_scale"], case["feature"])
    b = ref.feature_map(d(k) * case["k_scale"], case["feature"])
    S = b.transpose(-2, -1) @ d(v)
    den = a @ b.sum(-2).unsqueeze(-1) + case["eps"]
    if case["denom_min"] is not None:
        den = den.clamp(min=case["denom_min"])
    dnum = d(grad) / den * (d(t).view(-1, 1, 1) if t is not None else 1.0)
    dS = a.transpose(-2, -1) @ dnum
    # the temperature's gradient is one sum over tokens and channels of g * num / c: its rounding scales with the
    # sum of the terms' sizes
    t_terms = (d(grad) * (a @ S) / den).abs().sum(dim=(0, 2, 3)).max().item()
    return {"q": case["q_scale"] * (dnum @ S.transpose(-2, -1)).abs().max().item(),
            "k": case["k_scale"] * (d(v) @ dS.transpose(-2, -1)).abs().max().item(), "t": t_terms}


def call(case, q, k, v, t, backend):
    return effvit.linear_attention(q, k, v, case["feature"], t, case["q_scale"], case["k_scale"], case["eps"],
                                   case["denom_min"], backend=backend)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_forward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_case_defined(random.Random(seed))
    q, k, v, t = make_case_inputs(case, dtype)
    out, state = linear_ops.op(backend, "linear_attention")(
        q, k, v, t, case["feature"], case["q_scale"], case["k_scale"], case["eps"],
        float("-inf") if case["denom_min"] is None else case["denom_min"])
    expected, _ = reference_and_grads(case, q, k, v, t)
    assert out.dtype == dtype and out.shape == expected.shape
    # the output is laid out in memory like q (the caller's layout)
    assert sorted(range(4), key=lambda i: -out.stride(i)) == sorted(range(4), key=lambda i: -q.stride(i))
    assert_close_rel(out, expected, dtype, f"out {case}")
    d = lambda x: x.detach().double()  # noqa: E731
    expected_state = ref.linear_attention_state(d(k), d(v), case["feature"], case["k_scale"])
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(state, expected_state, torch.float64 if dtype == torch.float64 else torch.float32, "state")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(3))
def test_backward_matches_reference(backend, dtype, trial, seed, poisoned):
    case = random_case_defined(random.Random(seed))
    q, k, v, t = make_case_inputs(case, dtype, requires_grad=True)
    out = call(case, q, k, v, t, backend)
    grad = torch.randn_like(out)
    inputs = [x for x in (q, k, v, t) if x is not None]
    grads = torch.autograd.grad(out, inputs, grad)
    _, expected = reference_and_grads(case, q, k, v, t, grad)
    tol = REL_TOL[dtype] * (4 if dtype in HALF else 1)
    scales = term_scales(case, q, k, v, t, grad)
    for name, g, e, x in zip("qkvt", grads, expected, inputs):
        assert g.shape == x.shape and not torch.isnan(g).any(), name
        err = rel_error(g, e, scale=scales.get(name, 0.0))
        assert err <= tol, f"grad {name}: relative error {err:.3g} for {case}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["relu", "elu+1", "identity"])
def test_gradcheck_float64(backend, feature, seed):
    case = dict(B=1, H=2, N=9, D=4, Dv=3, layout="bnhd", feature=feature, temperature=True, q_scale=0.8,
                k_scale=1.2, eps=1e-3, denom_min=1.5 if feature == "relu" else None)
    q, k, v, t = make_case_inputs(case, torch.float64, requires_grad=True)
    fn = lambda *x: call(case, *x, backend)  # noqa: E731
    assert gradcheck(fn, (q, k, v, t), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel's work split")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("B, H, N", [(1, 3, 1500), (2, 3, 1100), (1, 5, 130), (3, 1, 64), (1, 7, 1)])
def test_cpu_forward_split_over_tokens_and_heads(B, H, N, threads, poisoned):
    """The CPU forward splits (image, token range, head group) over the threads: several token ranges, head groups
    of uneven size and blocks cut short all give the reference's result, and the same bits on every run (the split
    depends on the thread count, never on thread timing)."""
    case = dict(B=B, H=H, N=N, D=20, Dv=12, layout="bnhd", feature="relu", temperature=True, q_scale=0.7,
                k_scale=1.3, eps=1e-5, denom_min=None)
    q, k, v, t = make_case_inputs(case, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, state = linear_ops.op("cpu", "linear_attention")(q, k, v, t, "relu", 0.7, 1.3, 1e-5, float("-inf"))
        out_one, state_one = linear_ops.op("cpu", "linear_attention")(q, k, v, t, "relu", 0.7, 1.3, 1e-5,
                                                                    float("-inf"))
    finally:
        torch.set_num_threads(before)
    expected, _ = reference_and_grads(case, q, k, v, t)
    assert_close_rel(out, expected, torch.float32, f"out {case}")
    assert torch.equal(out, out_one) and torch.equal(state, state_one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_does_not_overflow_at_large_n(backend):
    """The state is summed in float32: at N = 65536 the eager float16 code overflows to inf, the kernels do not."""
    B, H, N, D = 1, 1, 65536, 8
    q = torch.full((B, H, N, D), 4.0, device=DEVICE, dtype=torch.float16)
    v = torch.full((B, H, N, D), 8.0, device=DEVICE, dtype=torch.float16)
    eager = ref.linear_attention(q, q, v, None, "relu", eps=1e-5)
    assert not torch.isfinite(eager).all()  # 65536 * 4 * 8 = 2**21 > float16's 65504
    out = effvit.linear_attention(q, q, v, "relu", eps=1e-5, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full_like(out, 8.0, dtype=torch.float32), rtol=2e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_only_inputs_and_state(backend):
    q, k, v = make_qkv(2, 2, 300, 16, 16, "bnhd", torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        effvit.linear_attention(q, k, v, backend=backend)
    extra = [tuple(x.shape) for x in saved if x.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())]
    assert extra == [(2, 2, 16, 17)], extra  # the state only: O(N) memory, nothing N x N


def test_errors_name_the_argument():
    q, k, v = make_qkv(1, 2, 10, 8, 8, "bhnd", torch.float32)
    with pytest.raises(ValueError, match="k must have q's shape"):
        effvit.linear_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="v must have q's batch, heads and N"):
        effvit.linear_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="feature_map"):
        effvit.linear_attention(q, k, v, "softmax")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        effvit.linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        effvit.linear_attention(q, k, v, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="v must have q's dtype"):
        effvit.linear_attention(q, k, v.double())
    with pytest.raises(ValueError, match="4-D"):
        effvit.linear_attention(q[0], k, v)


@requires_ext
def test_raw_op_checks():
    q, k, v = make_qkv(1, 2, 10, 8, 8, "bhnd", torch.float32)
    with pytest.raises(ValueError, match="feature_map"):
        torch.ops.effvit.linear_attention(q, k, v, None, "tanh", 1.0, 1.0, 0.0, float("-inf"))
    with pytest.raises(TypeError, match="accumulation dtype"):
        torch.ops.effvit.linear_attention(q, k, v, torch.ones(2, dtype=torch.float64), "relu", 1.0, 1.0, 0.0, 0.0)


def _op_names():
    names = []
    if "cpu" in linear_ops._OP_TABLE:
        names += [f"effvit::{n}" for n in linear_ops._OPS]
    if linear_ops._triton is not None:
        names += [f"effvit::triton_{n}" for n in linear_ops._OPS]
    return names


@pytest.mark.parametrize("name", _op_names())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(name, layout):
    q, k, v = make_qkv(2, 2, 7, 4, 5, layout, torch.float32)
    t = torch.rand(2, device=DEVICE)
    args = (q, k, v, t, "relu", 1.0, 1.0, 1e-5, 0.5)
    if name.endswith("_backward"):
        out, state = torch.ops.effvit.__getattr__(name.split("::")[1].removesuffix("_backward"))(*args)
        args = (torch.randn_like(out), q, k, v, t, state) + args[4:]
    torch.library.opcheck(getattr(torch.ops.effvit, name.split("::")[1]), args)


# ---- modules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_l2vit_linear_attention_matches_official(backend, seed):
    official = ref.LinearAttention(64, num_heads=4, qkv_bias=True).to(DEVICE).double()
    with torch.no_grad():
        official.temperature.uniform_(0.05, 0.3)
    ours = effvit.nn.LinearAttention(64, num_heads=4, qkv_bias=True, backend=backend).to(DEVICE)
    ours.load_state_dict({k: v.float() for k, v in official.state_dict().items()})
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "temperature"}
    x = torch.randn(2, 50, 64, device=DEVICE, requires_grad=True)
    out = ours(x)
    x64 = x.detach().double().requires_grad_()
    expected = official(x64)
    assert_close_rel(out, expected.detach(), torch.float32)
    grad = torch.randn_like(expected)
    out.backward(grad.float())
    expected.backward(grad)
    assert rel_error(x.grad, x64.grad) <= 1e-5
    for p, p64 in zip(ours.parameters(), official.parameters()):
        assert rel_error(p.grad, p64.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda q, k, v: effvit.linear_attention(q, k, v, eps=1e-5, backend=backend), fullgraph=True,
                       backend=counter)
    q, k, v = make_qkv(2, 2, 33, 8, 8, "bhdn", torch.float32, requires_grad=True)
    out = fn(q, k, v)
    out.sum().backward()
    fn(*make_qkv(2, 2, 33, 8, 8, "bhdn", torch.float32, requires_grad=True))
    assert counter.frame_count == 1


# ---- timm EfficientViT (MIT) ----------------------------------------------------------------------

try:
    import timm
except ImportError:
    timm = None
requires_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")


def _random_efficientvit(name="efficientvit_b1"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(DEVICE).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong path cannot hide behind zeros
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@requires_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_lite_mla_patched_equals_timm(backend, seed):
    from timm.models.efficientvit_mit import LiteMLA

    mla = LiteMLA(64, 64, dim=8).to(DEVICE).eval()
    x = torch.randn(2, 64, 9, 11, device=DEVICE, requires_grad=True)
    expected = mla(x)
    effvit.patch.timm(mla, backend=backend)
    assert type(mla).__name__ == "FusedLiteMLA"
    out = mla(x)
    assert_close_rel(out, expected.detach(), torch.float32)
    (g,) = torch.autograd.grad(out.sum(), x)
    effvit.unpatch(mla)
    (e,) = torch.autograd.grad(mla(x).sum(), x)
    assert_close_rel(g, e, torch.float32)


@requires_timm
@pytest.mark.slow
def test_timm_efficientvit_b1_patched_logits_and_gradients(seed):
    model = _random_efficientvit()
    x = torch.randn(2, 3, 224, 224, device=DEVICE, requires_grad=True)
    expected = model(x)
    (e,) = torch.autograd.grad(expected.sum(), x)
    effvit.patch.timm(model)
    assert sum(type(m).__name__ == "FusedLiteMLA" for m in model.modules()) > 0
    out = model(x)
    assert (out - expected).abs().max().item() < 1e-4
    (g,) = torch.autograd.grad(out.sum(), x)
    assert rel_error(g, e) <= 1e-4
    effvit.unpatch(model)
    assert not any(type(m).__name__ == "FusedLiteMLA" for m in model.modules())
