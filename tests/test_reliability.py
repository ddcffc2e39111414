"""Edge inputs every backend must answer as the reference does: NaN and Inf, ties, empty batches, mixed dtypes,
integral types other than int, second derivatives, threads. Each case names the input it is about."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import effvit
from effvit.reference import hilo as ref_hilo
from effvit.reference import linear as ref_linear
from effvit.reference import shift as ref_shift
from effvit.reference import token_drop as ref_token_drop
from effvit.reference import window as ref_window
from conftest import DEVICE, kernel_backends, requires_ext


def backends_of(family: str) -> list[str]:
    return ["torch"] + kernel_backends(DEVICE, family)


def assert_same_values(out: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6):
    """NaN where the reference has NaN, the same infinities, the finite values close."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, what
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN at {out.isnan().nonzero().tolist()[:8]}, " \
                                                  f"reference at {ref.isnan().nonzero().tolist()[:8]}"
    assert torch.equal(out.isposinf(), ref.isposinf()) and torch.equal(out.isneginf(), ref.isneginf()), \
        f"{what}: infinities differ"
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=rtol, atol=atol, msg=what)


# ---- NaN and Inf ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_of("linear"))
@pytest.mark.parametrize("feature_map", ["relu", "elu+1", "identity"])
def test_linear_attention_nan_in_q_or_k_stays_nan(backend, feature_map):
    q, k, v = (torch.randn(1, 2, 5, 3, device=DEVICE) for _ in range(3))
    q[0, 0, 1, 0] = float("nan")
    k[0, 1, 3, 2] = float("nan")
    out = effvit.linear_attention(q, k, v, feature_map, eps=1e-5, backend=backend)
    ref = ref_linear.linear_attention(q.double(), k.double(), v.double(), None, feature_map, eps=1e-5)
    assert_same_values(out, ref, f"{backend} {feature_map}")


@pytest.mark.parametrize("backend", backends_of("linear"))
def test_linear_attention_nan_denom_min_is_refused(backend):
    q = torch.randn(1, 1, 4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="denom_min"):
        effvit.linear_attention(q, q, q, denom_min=float("nan"), backend=backend)


@pytest.mark.parametrize("backend", backends_of("shift"))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_shift_group_norm_nonfinite_sample_is_nan(backend, value):
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    x[0, 7, 2, 2] = value           # a copied channel: it reaches the statistics
    shifted, normalized = effvit.shift_group_norm(x, 4, backend=backend)
    ref_shifted, ref_normalized = ref_shift.shift_group_norm(x.double(), 4, None, None)
    assert_same_values(shifted, ref_shifted, backend)
    assert_same_values(normalized, ref_normalized, backend)
    assert normalized[0].isnan().all() and normalized[1].isfinite().all()


@pytest.mark.parametrize("backend", backends_of("window"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_attention_inf_value_under_the_shift_mask(backend, dtype):
    """The masked weight exp(-100) is subnormal in float32 but not zero: times an inf value it is inf, as torch's
    softmax gives it, not 0 * inf = NaN."""
    qkv = torch.randn(1, 7, 7, 3 * 2 * 4, device=DEVICE, dtype=dtype)
    qkv[0, 6, 6, 2 * 8 + 1] = float("inf")   # v of the last token, head 0
    out = effvit.window_attention(qkv, 2, 4, 2, always_partition=True, backend=backend)
    ref = ref_window.window_attention_core(qkv, None, 2, (4, 4), (2, 2), 4 ** -0.5)
    assert_same_values(out, ref, backend, rtol=1e-4, atol=1e-5)
    assert out.isinf().any()


@pytest.mark.parametrize("backend", backends_of("token_drop"))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_cls_attention_scores_nonfinite_key(backend, value):
    q, k = torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 3, 9, 4, device=DEVICE)
    q[0, 1].abs_()
    k[0, 1, 4, :] = value
    out = effvit.cls_attention_scores(q, k, num_prefix=1, backend=backend)
    ref = ref_token_drop.cls_attention_scores(q.double(), k.double(), 4 ** -0.5, 1)
    assert_same_values(out, ref, backend)


@pytest.mark.parametrize("backend", backends_of("window"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_of_minus_inf_logits(backend, dtype):
    """A query whose every logit is -inf (q = +inf against keys of one sign): torch's softmax gives NaN for its row,
    and so must every kernel, whose padded key columns must not become its probabilities."""
    d = dict(device=DEVICE, dtype=dtype)
    qkv = torch.randn(1, 3, 5, 3 * 2, **d)               # one head of dim 2, 15 tokens: a padded row of keys
    qkv[..., 2] = -1 - torch.rand(1, 3, 5, **d)          # k[:, 0] < 0 everywhere
    qkv[0, 1, 2, 0:2] = torch.tensor([float("inf"), 1.0], **d)
    out = effvit.window_attention(qkv, 1, (3, 5), backend=backend)
    assert_same_values(out, ref_window.window_attention_core(qkv.double(), None, 1, (3, 5), (0, 0), 2 ** -0.5), backend)
    assert out[0, 1, 2].isnan().all()
    q, kv = qkv[..., :2].reshape(1, 15, 2), qkv[..., 2:].reshape(1, 15, 4)
    out = effvit.lofi_attention(q, kv, 1, backend=backend)
    assert_same_values(out, ref_hilo.lofi_attention(q.double(), kv.double(), 1, 2 ** -0.5), backend)
    k = kv[..., :2].reshape(1, 1, 15, 2)
    scores = effvit.cls_attention_scores(q[:, 7:8].transpose(0, 1), k, num_prefix=1, backend=backend)
    assert_same_values(scores, ref_token_drop.cls_attention_scores(q[:, 7:8].transpose(0, 1).double(), k.double(),
                                                                   2 ** -0.5, 1), backend)
    assert scores.isnan().all()


# ---- the drop ranking: ties to the lower position, NaN below every number ---------------------------------------

RANKED = [
    (torch.full((9,), 0.25), list(range(9))),
    (torch.tensor([1.0, float("nan"), 1.0, float("-inf"), float("nan"), 0.5, 1.0, 2.0, float("-inf")]),
     [7, 0, 2, 6, 5, 3, 8, 1, 4]),
    (torch.tensor([0.0, -0.0, 0.0, float("inf"), 3.0, float("inf"), -1.0, 3.0, 0.0]), [3, 5, 4, 7, 0, 1, 2, 8, 6]),
]


@pytest.mark.parametrize("backend", backends_of("token_drop"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", range(len(RANKED)))
def test_drop_tokens_ranking_rule(backend, dtype, case):
    scores, order = RANKED[case]
    scores = scores.to(DEVICE, dtype).expand(2, -1).contiguous()
    x = torch.randn(2, 10, 4, device=DEVICE)
    assert ref_token_drop.rank_scores(scores)[0].tolist() == order
    for keep in (1, 5, 9):
        out, index = effvit.drop_tokens(x, scores, keep, num_prefix=1, fuse=False, backend=backend)
        assert index[0].tolist() == order[:keep] and index[1].tolist() == order[:keep], (backend, keep)
        torch.testing.assert_close(out[:, 1:], x[:, 1:][:, order[:keep]])


# ---- second derivatives ---------------------------------------------------------------------------------

def _second_derivative_cases(backend):
    d = dict(dtype=torch.float64, device=DEVICE)
    yield "window_attention", torch.randn(1, 6, 6, 24, **d), lambda t: effvit.window_attention(t, 2, 3, backend=backend)
    kv = torch.randn(1, 3, 16, **d)
    yield "lofi_attention", torch.randn(1, 5, 8, **d), lambda t: effvit.lofi_attention(t, kv, 2, backend=backend)
    yield "linear_attention", torch.randn(1, 2, 5, 3, **d), lambda t: effvit.linear_attention(t, t, t, "elu+1", backend=backend)
    yield "shift_group_norm", torch.randn(1, 8, 3, 3, **d), lambda t: effvit.shift_group_norm(t, 4, backend=backend)[1]
    yield "cls_attention_scores", torch.randn(1, 2, 9, 4, **d), \
        lambda t: effvit.cls_attention_scores(t[:, :, 0], t, backend=backend)
    yield "drop_tokens", torch.randn(1, 9, 4, **d), \
        lambda t: effvit.drop_tokens(t, t[:, 1:, 0], 4, backend=backend)[0]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda", "triton") if b in kernel_backends(DEVICE, "window")])
def test_second_derivative_raises_naming_the_op(backend):
    for name, x, fn in _second_derivative_cases(backend):
        x.requires_grad_()
        g, = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=f"{name} has no second derivative"):
            torch.autograd.grad(g.pow(2).sum(), x, allow_unused=True)
        # a first derivative under create_graph=True still works, and without it nothing is attached
        g2, = torch.autograd.grad(fn(x).pow(2).sum(), x)
        torch.testing.assert_close(g.detach(), g2)


def test_second_derivative_of_the_shift_works():
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: effvit.shift(t, 4, backend="cpu" if effvit.extension_available()
                                                              else "torch"), (x,))


# ---- inputs every backend takes alike ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_of("hilo"))
def test_empty_batch(backend):
    hilo = effvit.nn.HiLo(32, 4, qkv_bias=True, backend=backend).to(DEVICE)
    assert hilo(torch.randn(0, 35, 32, device=DEVICE), 5, 7).shape == (0, 35, 32)
    assert effvit.window_attention(torch.randn(0, 5, 6, 24, device=DEVICE), 2, 3, 1, always_partition=True,
                                   backend=backend).shape == (0, 5, 6, 8)
    assert effvit.lofi_attention(torch.randn(0, 5, 8, device=DEVICE), torch.randn(0, 3, 16, device=DEVICE), 2,
                                 backend=backend).shape == (0, 5, 8)


@pytest.mark.parametrize("backend", backends_of("linear"))
def test_float64_temperature_with_float32_q(backend):
    q, k, v = (torch.rand(1, 2, 6, 3, device=DEVICE) for _ in range(3))
    t = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5
    out = effvit.linear_attention(q, k, v, temperature=t, backend=backend)
    ref = ref_linear.linear_attention(q.double(), k.double(), v.double(), t, "relu")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends_of("shift"))
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_group_norm_parameters_of_another_dtype(backend, param_dtype, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("half-precision Triton case in the interpreter")
    x = torch.randn(2, 8, 3, 3, device=DEVICE, dtype=dtype)
    w, b = (torch.randn(8, device=DEVICE).to(param_dtype) for _ in range(2))
    _, normalized = effvit.shift_group_norm(x, 4, w, b, backend=backend)
    _, ref = ref_shift.shift_group_norm(x.double(), 4, w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(normalized.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", backends_of("window"))
def test_numpy_integers_are_ints(backend):
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    torch.testing.assert_close(effvit.shift(x, np.int64(4), backend=backend), effvit.shift(x, 4, backend=backend))
    qkv = torch.randn(1, 5, 6, 24, device=DEVICE)
    torch.testing.assert_close(effvit.window_attention(qkv, np.int32(2), np.int64(3), (np.int16(1), 2), backend=backend),
                               effvit.window_attention(qkv, 2, 3, (1, 2), backend=backend))
    tokens, scores = torch.randn(1, 10, 4, device=DEVICE), torch.rand(1, 9, device=DEVICE)
    assert effvit.drop_tokens(tokens, scores, np.int32(3), np.int64(1), backend=backend)[0].shape == (1, 5, 4)
    assert effvit.linear_attention(x[..., :2], x[..., :2], x[..., :2], eps=np.float32(1e-5),
                                   backend=backend).shape == (1, 8, 3, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: effvit.window_attention(torch.randn(2, 5, 6, 0), 1, 3), "head_dim must be >= 1"),
    (lambda: effvit.cls_attention_scores(torch.randn(2, 3, 0), torch.randn(2, 3, 9, 0)), "head_dim must be >= 1"),
    (lambda: effvit.explain("nonexistent", torch.randn(2)), "unknown family 'nonexistent'"),
    (lambda: effvit.shift(torch.randn(1, 8, 3, 3), 4.0), "n_div must be an int"),
    (lambda: effvit.shift(torch.randn(1, 8, 3, 3), True), "n_div must be an int"),
])
def test_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_meta_tensors_run_the_reference_under_auto():
    """Meta tensors (shape propagation) have no kernel: 'auto' runs the reference, a named kernel backend says
    why it cannot."""
    x = torch.randn(2, 8, 5, 5, device="meta")
    assert effvit.shift(x, 4).shape == x.shape
    assert effvit.window_attention(torch.empty(1, 5, 6, 24, device="meta"), 2, 3).shape == (1, 5, 6, 8)
    if effvit.extension_available():
        with pytest.raises(effvit.BackendNotSupported, match="input is on meta"):
            effvit.shift(x, 4, backend="cpu")


# ---- use_backend is per thread ---------------------------------------------------------------------------

def test_use_backend_is_per_thread():
    inside, other = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with effvit.use_backend("torch"):
            seen["holder"] = effvit.get_backend()
            inside.set()
            other.wait(10)

    def bystander():
        inside.wait(10)
        seen["bystander"] = effvit.get_backend()
        other.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=bystander)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"holder": "torch", "bystander": effvit.get_backend()}
    assert effvit.get_backend() != "torch" or effvit.backends._State.default == "torch"


def test_use_backend_nests_and_set_backend_is_process_wide():
    before = effvit.get_backend()
    with effvit.use_backend("torch"):
        with effvit.use_backend("auto"):
            assert effvit.get_backend() == "auto"
        assert effvit.get_backend() == "torch"
    assert effvit.get_backend() == before
    try:
        effvit.set_backend("torch")
        seen = []
        t = threading.Thread(target=lambda: seen.append(effvit.get_backend()))
        t.start()
        t.join()
        assert seen == ["torch"]
    finally:
        effvit.set_backend(before)


def test_use_backend_under_torch_compile(monkeypatch):
    """A compiled caller follows use_backend: torch.compile guards on the thread's choice."""
    from effvit.ops import shift as shift_ops

    monkeypatch.setattr(shift_ops.reference, "shift", lambda x, n_div, layout="NCHW": torch.full_like(x, 7.0))
    x = torch.randn(1, 8, 3, 3)
    compiled = torch.compile(lambda t: effvit.shift(t, 4), fullgraph=True)
    with effvit.use_backend("torch"):
        assert (compiled(x) == 7).all()
    if effvit.extension_available():
        with effvit.use_backend("cpu"):
            torch.testing.assert_close(compiled(x), ref_shift.shift_feat(x, 4))


# ---- timm models with a distillation token --------------------------------------------------------------

@requires_ext
def test_patch_distilled_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        effvit.patch.timm(model, keep_rate=1.0, drop_loc=(1, 3))
        assert type(model).__name__ == "TokenDropVisionTransformerDistilled" and model.token_drop.num_prefix == 2
        torch.testing.assert_close(model(images), expected)
        model.keep_rate = 0.5
        dropped = model(images)
        ref = ref_token_drop.evit_forward(effvit.unpatch(model), images, 0.5, drop_loc=(1, 3))
    torch.testing.assert_close(dropped, ref, rtol=1e-4, atol=1e-4)


@requires_ext
def test_patch_drop_loc_errors_name_it():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4)
    with pytest.raises(TypeError, match="drop_loc"):
        effvit.patch.timm(model, drop_loc=("a",))
    with pytest.raises(ValueError, match="drop_loc"):
        effvit.patch.timm(model, drop_loc=(7,))
    effvit.patch.timm(model, drop_loc=(np.int64(1),))
    assert model.token_drop.drop_loc == (1,)


def test_declared_index_limit_refuses_2_31_values():
    """Past 2**31 - 1 values the kernels that index with 32 bits say so (checks.INDEX_LIMIT, one definition)."""
    from effvit import checks

    big = torch.zeros(1).expand(checks.INDEX_LIMIT).view(1, 1, checks.INDEX_LIMIT, 1)   # no memory: stride 0
    cases = {"linear": (big, 1, 1), "window": (big.view(1, 1, 4, 2**29), 1, 1, 0),
             "token_drop": (big,), "hilo": (big.view(1, checks.INDEX_LIMIT, 1), 1, 1)}
    for family, args in cases.items():
        reasons = effvit.explain(family, *args)["cpu"]
        assert any("index" in r and "2**31 - 1" in r for r in reasons), (family, reasons)
        below = effvit.explain(family, torch.zeros(1).expand(16).view(*([1] * (args[0].dim() - 1)), 16), *args[1:])
        assert not any("2**31" in r for r in below["cpu"]), (family, below)
