"""Random and edge inputs for every public function and module, each backend against the reference (the "torch"
backend): the same clear error (ValueError or TypeError with the same words), or the same shapes, dtypes, NaN and
infinities and close values. Any other exception (RuntimeError, ZeroDivisionError, KeyError, an assertion from C++)
is a defect. Inputs: empty and odd dims, NaN/Inf, non-contiguous, sliced and stride-0 views, every float dtype and a
few that are not, wrong ranks, NumPy and float scalars where ints go.

Run by tests/test_bad_inputs.py in a child process, so that a crash fails that test instead of ending the run;
``python -m pytest tests/bad_inputs.py`` runs it directly. EFFVIT_BAD_INPUT_EXAMPLES sets the examples per function.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effvit
from effvit import backends

EXAMPLES = int(os.environ.get("EFFVIT_BAD_INPUT_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("EFFVIT_TEST_SEED") != "random",
                    suppress_health_check=list(HealthCheck))
CLEAR_ERRORS = (ValueError, TypeError)   # BackendNotSupported is a ValueError
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def kernel_backends(family: str) -> list[str]:
    """The kernels that run here on CPU tensors (Triton's interpreter is too slow for hundreds of calls)."""
    return [b for b in ("cpu",) if b in backends.families()[family].kernels
            and backends.families()[family].kernels[b].unavailable is None]


# ---- strategies -----------------------------------------------------------------------------------------

@st.composite
def tensors(draw, shape, dtypes=FLOATS, special=True, views=True):
    """A tensor of ``shape``: random values with NaN/±inf sprinkled in, as a contiguous tensor, a transposed or
    sliced view, or (along a dim of size 1 expanded) a stride-0 view."""
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(shape)
    kind = draw(st.sampled_from(("contiguous", "transposed", "sliced", "expanded"))) if views else "contiguous"
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))   # values replay with the example
    if dtype.is_floating_point:
        magnitude = draw(st.sampled_from((1.0, 1e-3, 30.0)))
        make = lambda s: torch.randn(s, dtype=torch.float64, generator=gen).mul(magnitude).to(dtype)
    else:
        make = lambda s: torch.randint(-3, 4, s, generator=gen).to(dtype)
    if kind == "transposed" and len(shape) >= 2:
        t = make(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif kind == "sliced" and len(shape) >= 1:
        t = make(shape[:-1] + (2 * shape[-1] + 1,))[..., 1::2]
    elif kind == "expanded" and len(shape) >= 1 and shape[0] != 1:
        t = make((1,) + shape[1:]).expand(shape)
    else:
        t = make(shape)
    if special and dtype.is_floating_point and t.numel() and draw(st.booleans()):
        flat = t.clone() if kind != "expanded" else t
        for value in draw(st.lists(st.sampled_from((float("nan"), float("inf"), float("-inf"))), max_size=2)):
            index = tuple(draw(st.integers(0, n - 1)) for n in shape)
            flat = flat.clone()
            flat[index] = value
        t = flat
    return t


def integral(value: int):
    """``value`` as an int or a NumPy integer."""
    return st.sampled_from((value, np.int64(value), np.int32(value)))


small = st.integers(0, 5)
positive = st.integers(1, 5)


# ---- the comparison -------------------------------------------------------------------------------------

def _outcome(fn, backend):
    try:
        return "ok", fn(backend)
    except CLEAR_ERRORS as e:
        return "error", e
    # anything else is a defect: let it propagate with the backend named
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"backend={backend!r} raised {type(e).__name__}, not a ValueError/TypeError: {e}") from e


def _flat(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _assert_same(out: torch.Tensor, ref: torch.Tensor, backend: str, compare_values: bool):
    assert out.shape == ref.shape and out.dtype == ref.dtype, \
        f"{backend}: {tuple(out.shape)} {out.dtype} vs reference {tuple(ref.shape)} {ref.dtype}"
    if not compare_values or not out.is_floating_point():
        return
    o, r = out.double(), ref.double()
    assert torch.equal(o.isnan(), r.isnan()), f"{backend}: NaN at other places than the reference's"
    assert torch.equal(o.isposinf(), r.isposinf()) and torch.equal(o.isneginf(), r.isneginf()), \
        f"{backend}: infinities at other places than the reference's"
    finite = r.isfinite()
    if finite.any():
        scale = max(r[finite].abs().max().item(), 1e-6)
        tol = 1e-4 if ref.dtype == torch.float32 else 1e-9
        err = (o[finite] - r[finite]).abs().max().item() / scale
        assert err <= tol, f"{backend}: relative error {err:.3g} against the reference"


def check_against_reference(fn, family: str, inputs: list[torch.Tensor]):
    """fn(backend) on every kernel backend against fn('torch'). Values are compared where the reference's own
    rounding is not the question: float32/float64 inputs without infinities that the two may sum in other
    orders (NaN and inf positions are compared wherever values are)."""
    ref_kind, ref = _outcome(fn, "torch")
    for backend in kernel_backends(family):
        kind, out = _outcome(fn, backend)
        if ref_kind == "error" or kind == "error":
            assert kind == ref_kind, f"{backend}: {kind} ({out!r}) where the reference gives {ref_kind} ({ref!r})"
            if not isinstance(out, backends.BackendNotSupported):
                assert type(out) is type(ref) and str(out) == str(ref), f"{backend}: {out!r} vs reference {ref!r}"
            continue
        full = all(t.dtype in (torch.float32, torch.float64) for t in inputs if isinstance(t, torch.Tensor))
        for o, r in zip(_flat(out), _flat(ref), strict=True):
            _assert_same(o, r, backend, full)


# ---- per function ---------------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_shift(data):
    layout = data.draw(st.sampled_from(("NCHW", "NHWC", "nchw")))
    shape = data.draw(st.lists(small, min_size=3, max_size=5))
    x = data.draw(tensors(shape, FLOATS + (torch.int64,)))
    n_div = data.draw(st.one_of(integral(data.draw(st.integers(1, 8))), st.just(4.0), st.just(True)))
    check_against_reference(lambda b: effvit.shift(x, n_div, layout, backend=b), "shift", [x])


@SETTINGS
@given(st.data())
def test_shift_group_norm(data):
    B, C, H, W = (data.draw(st.integers(0, 4)), data.draw(st.integers(3, 12)), data.draw(small), data.draw(small))
    x = data.draw(tensors((B, C, H, W)))
    weight = data.draw(st.one_of(st.none(), tensors((data.draw(st.sampled_from((C, C + 1))),), views=False)))
    bias = data.draw(st.one_of(st.none(), tensors((C,), views=False)))
    eps = data.draw(st.sampled_from((1e-5, 0.0, np.float32(1e-6), -1.0, float("nan"))))
    check_against_reference(lambda b: effvit.shift_group_norm(x, 4, weight, bias, eps, backend=b), "shift",
                            [x, weight, bias])


@SETTINGS
@given(st.data())
def test_window_attention(data):
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 5))
    B, H, W = data.draw(st.integers(0, 2)), data.draw(positive), data.draw(positive)
    channels = data.draw(st.sampled_from((3 * heads * head_dim, 3 * heads * head_dim + 1)))
    ndim = data.draw(st.sampled_from((4, 4, 4, 3)))
    qkv = data.draw(tensors((B, H, W, channels)[:ndim]))
    window = data.draw(st.one_of(integral(data.draw(st.integers(1, 4))),
                                 st.tuples(st.integers(1, 4), st.integers(1, 4)), st.just(2.5)))
    shift = data.draw(st.one_of(integral(data.draw(st.integers(0, 3))), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    wpair = (window, window) if isinstance(window, (int, np.integer)) else window
    table = None
    if data.draw(st.booleans()) and isinstance(wpair, tuple):
        rows = (2 * int(wpair[0]) - 1) * (2 * int(wpair[1]) - 1)
        table = data.draw(tensors((rows, heads), views=False))
    qkv_bias = data.draw(st.one_of(st.none(), tensors((channels,), views=False)))
    always_partition = data.draw(st.booleans())
    check_against_reference(
        lambda b: effvit.window_attention(qkv, heads, window, shift, table, qkv_bias, always_partition=always_partition,
                                          backend=b), "window", [qkv, table, qkv_bias])


@SETTINGS
@given(st.data())
def test_lofi_attention(data):
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 4))
    B, N, M = data.draw(st.integers(0, 2)), data.draw(small), data.draw(small)
    q = data.draw(tensors((B, N, heads * head_dim)))
    kv = data.draw(tensors((B, M, data.draw(st.sampled_from((2 * heads * head_dim, heads * head_dim))))))
    check_against_reference(lambda b: effvit.lofi_attention(q, kv, integral_value(heads), backend=b), "hilo", [q, kv])


def integral_value(value):
    return np.int64(value) if value % 2 else value


@SETTINGS
@given(st.data())
def test_linear_attention(data):
    B, H, N, D, Dv = (data.draw(st.integers(0, 2)), data.draw(positive), data.draw(small), data.draw(st.integers(0, 4)),
                      data.draw(st.integers(1, 4)))
    q = data.draw(tensors((B, H, N, D)))
    k = data.draw(tensors((B, H, N, D)))
    v = data.draw(tensors((B, H, N, Dv)))
    if data.draw(st.booleans()):
        k, v = k.to(q.dtype), v.to(q.dtype)
    feature_map = data.draw(st.sampled_from(("relu", "elu+1", "identity", "softmax")))
    temperature = data.draw(st.one_of(st.none(), tensors((H,), views=False, special=False)))
    eps = data.draw(st.sampled_from((0.0, 1e-5, np.float64(1e-3))))
    denom_min = data.draw(st.sampled_from((None, 100.0, 0.5, float("nan"))))
    check_against_reference(lambda b: effvit.linear_attention(q, k, v, feature_map, temperature, eps=eps,
                                                              denom_min=denom_min, backend=b), "linear", [q, k, v])


@SETTINGS
@given(st.data())
def test_cls_attention_scores(data):
    B, H, N, D = data.draw(st.integers(0, 3)), data.draw(positive), data.draw(positive), data.draw(st.integers(0, 4))
    q = data.draw(tensors((B, H, D)))
    k = data.draw(tensors((B, H, N, D)))
    if data.draw(st.booleans()):
        k = k.to(q.dtype)
    num_prefix = data.draw(integral(data.draw(st.integers(0, 2))))
    check_against_reference(lambda b: effvit.cls_attention_scores(q, k, num_prefix=num_prefix, backend=b),
                            "token_drop", [q, k])


@SETTINGS
@given(st.data())
def test_drop_tokens(data):
    B, N, C = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 9)), data.draw(small)
    num_prefix = data.draw(st.integers(0, 2))
    x = data.draw(tensors((B, N, C)))
    scores = data.draw(tensors((B, max(N - num_prefix, 0))))
    keep = data.draw(integral(data.draw(st.integers(0, 8))))
    fuse, spatial = data.draw(st.booleans()), data.draw(st.booleans())
    check_against_reference(lambda b: effvit.drop_tokens(x, scores, keep, num_prefix, fuse, spatial, backend=b),
                            "token_drop", [x, scores])


# ---- modules --------------------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_hilo_module(data):
    heads = data.draw(st.sampled_from((1, 2, 4)))
    dim = heads * data.draw(st.integers(1, 4))
    ws, alpha = data.draw(st.integers(1, 3)), data.draw(st.sampled_from((0.0, 0.5, 1.0)))
    B, H, W = data.draw(st.integers(0, 2)), data.draw(positive), data.draw(positive)
    x = data.draw(tensors((B, H * W, dim), dtypes=(torch.float32, torch.float64)))
    torch.manual_seed(0)   # the weights
    module = effvit.nn.HiLo(dim, heads, qkv_bias=True, window_size=ws, alpha=alpha).to(x.dtype)

    def run(backend):
        module.backend = backend
        with torch.no_grad():
            return module(x, H, W)

    check_against_reference(run, "hilo", [x])


@SETTINGS
@given(st.data())
def test_window_attention_module(data):
    heads = data.draw(st.sampled_from((1, 2)))
    dim, window = heads * data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    B, H, W = data.draw(st.integers(0, 2)), data.draw(positive), data.draw(positive)
    x = data.draw(tensors((B, H, W, dim), dtypes=(torch.float32, torch.float64)))
    shift = data.draw(st.integers(0, window - 1))
    torch.manual_seed(0)
    module = effvit.nn.WindowAttention(dim, window, heads).to(x.dtype)

    def run(backend):
        module.backend = backend
        with torch.no_grad():
            return module.forward_map(x, shift, always_partition=True)

    check_against_reference(run, "window", [x])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
