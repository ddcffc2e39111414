"""GPU-only checks (skipped without a CUDA GPU): ShiftViT's real shapes on the CUDA and Triton kernels,
agreement with the CPU kernels, and large batches."""

from __future__ import annotations

import pytest
import torch

import effvit
from effvit.reference import shift as ref_shift

from conftest import ALL_DTYPES, assert_close_rel, kernel_backends, requires_gpu

pytestmark = requires_gpu
GPU_BACKENDS = kernel_backends("cuda") if torch.cuda.is_available() else []


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("dim,hw,n_div", [(96, 56, 12), (192, 28, 12), (384, 14, 16), (768, 7, 16)])
def test_shiftvit_shapes_on_gpu(backend, dtype, dim, hw, n_div, seed, poisoned):
    x = torch.randn(8, dim, hw, hw, device="cuda", dtype=dtype)
    assert torch.equal(effvit.shift(x, n_div, backend=backend), ref_shift.shift_feat(x, n_div))
    w = torch.randn(dim, device="cuda", dtype=dtype)
    b = torch.randn(dim, device="cuda", dtype=dtype)
    s, y = effvit.shift_group_norm(x, n_div, w, b, backend=backend)
    rs, ry = ref_shift.shift_group_norm(x.double(), n_div, w.double(), b.double())
    assert torch.equal(s, rs.to(dtype))
    assert_close_rel(y, ry, dtype, f"normalized {backend}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gpu_kernels_agree_with_cpu_kernels(backend, layout, seed):
    if not effvit.extension_available():
        pytest.skip("needs the CPU kernels too")
    shape = (4, 48, 17, 23) if layout == "NCHW" else (4, 17, 23, 48)
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(48, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    g_s, g_y = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    def run(device, be):
        xd = x.to(device).requires_grad_()
        wd, bd = w.to(device).requires_grad_(), b.to(device).requires_grad_()
        s, y = effvit.shift_group_norm(xd, 12, wd, bd, 1e-5, layout, backend=be)
        torch.autograd.backward((s, y), (g_s.to(device), g_y.to(device)))
        return [t.detach().cpu() for t in (s, y, xd.grad, wd.grad, bd.grad)]

    for got, want in zip(run("cuda", backend), run("cpu", "cpu")):
        assert_close_rel(got, want, torch.float64, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_batch(backend, seed):
    x = torch.randn(256, 96, 56, 56, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(effvit.shift(x, 12, backend=backend), ref_shift.shift_feat(x, 12))


def test_raw_backward_rejects_statistics_on_another_device():
    if not effvit.extension_available():
        pytest.skip("needs the compiled ops")
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="mean and rstd must be on"):
        torch.ops.effvit.shift_group_norm_backward(None, x, x, torch.ones(8, device="cuda"), torch.ones(2),
                                                   torch.ones(2), 4, False)


# ---- window family ----------------------------------------------------------------------------------

WINDOW_GPU_BACKENDS = kernel_backends("cuda", "window") if torch.cuda.is_available() else []


@pytest.mark.parametrize("backend", WINDOW_GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hw,C,heads,shift", [(56, 96, 3, 3), (28, 192, 6, 0), (14, 384, 12, 3), (7, 768, 24, 0)])
def test_swin_t_shapes_on_gpu(backend, dtype, hw, C, heads, shift, seed, poisoned):
    """Swin-T's stages, batch 8, forward and backward, against the float64 reference."""
    from effvit.reference import window as ref_window

    qkv = torch.randn(8, hw, hw, 3 * C, device="cuda", dtype=dtype).requires_grad_()
    # the table in the accumulation dtype (float32 for half qkv, as under autocast; float64 for float64)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    table = (torch.randn(169, heads, device="cuda", dtype=table_dtype) * 0.5).requires_grad_()
    pad = torch.randn(3 * C, device="cuda", dtype=dtype)
    out = effvit.window_attention(qkv, heads, 7, shift, table, pad, backend=backend)
    grad = torch.randn_like(out)
    g_qkv, g_table = torch.autograd.grad(out, (qkv, table), grad)
    q64, t64 = qkv.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    expected = ref_window.window_attention_core(q64, t64, heads, (7, 7), (shift, shift), (C // heads) ** -0.5,
                                                pad.double())
    e_qkv, e_table = torch.autograd.grad(expected, (q64, t64), grad.double())
    assert_close_rel(out, expected, dtype, "out")
    slack = 4 if dtype in (torch.float16, torch.bfloat16) else 1
    for name, g, e in (("qkv", g_qkv, e_qkv), ("table", g_table, e_table)):
        from conftest import REL_TOL, rel_error
        assert rel_error(g, e) <= slack * REL_TOL[dtype], name


def test_flex_peer_computes_the_same_core(seed):
    """The benchmark's FlexAttention peer is only a peer if it computes the same thing."""
    from effvit.bench import window_suite
    from effvit.reference import window as ref_window

    stage = {"C": 96, "H": 28, "W": 28, "heads": 3}
    qkv = torch.randn(2, 28, 28, 288, device="cuda")
    table, pad = torch.randn(169, 3, device="cuda"), torch.randn(288, device="cuda")
    core = window_suite._flex_core_factory(2, stage, (7, 7), (3, 3), 32 ** -0.5, "cuda")
    expected = ref_window.window_attention_core(qkv, table, 3, (7, 7), (3, 3), 32 ** -0.5, pad)
    assert (core(qkv, table, pad) - expected).abs().max().item() < 1e-3


def test_bench_times_cuda_graph_replays():
    """--cuda-graphs: the steps are captured and replayed (a capturable op), with samples like the eager path's."""
    from effvit.bench import timing

    x = torch.randn(4, 96, 56, 56, device="cuda")
    policy = timing.TimingPolicy(budget_s=0.05, min_repeats=3, warmup=1, cuda_graphs=True)
    calls = timing.graph_replays(lambda x: effvit.shift(x, 12), [(x,)])
    assert calls is not None
    samples = timing.time_step(lambda x: effvit.shift(x, 12), [(x,)], "cuda", policy)
    assert len(samples) >= 3 and all(s > 0 for s in samples)


def _graph_cases():
    """name -> (make inputs, fn(backend, *inputs) -> output): one call of each op, as a model would make it."""
    def window_inputs():
        return (torch.randn(2, 9, 11, 3 * 64, device="cuda"), torch.randn(81, 2, device="cuda"))

    def hilo_inputs():
        return (torch.randn(2, 30, 64, device="cuda"), torch.randn(2, 8, 128, device="cuda"))

    def linear_inputs():
        return tuple(torch.randn(2, 4, 50, 16, device="cuda") for _ in range(3))

    def shift_inputs():
        return (torch.randn(2, 48, 9, 7, device="cuda"),)

    def drop_inputs():
        return (torch.randn(2, 3, 1, 16, device="cuda"), torch.randn(2, 3, 21, 16, device="cuda"),
                torch.randn(2, 21, 48, device="cuda"))

    def drop(backend, q, k, x):
        scores = effvit.cls_attention_scores(q[:, :, 0], k, backend=backend)
        return effvit.drop_tokens(x, scores, keep=12, backend=backend)[0]

    return {
        "window": (window_inputs, lambda b, qkv, table: effvit.window_attention(
            qkv, 2, (5, 5), (2, 2), relative_position_bias_table=table, backend=b)),
        "lofi": (hilo_inputs, lambda b, q, kv: effvit.lofi_attention(q, kv, 4, backend=b)),
        "linear": (linear_inputs, lambda b, q, k, v: effvit.linear_attention(q, k, v, eps=1e-5, backend=b)),
        "shift_group_norm": (shift_inputs, lambda b, x: effvit.shift_group_norm(x, 12, backend=b)[1]),
        "token_drop": (drop_inputs, drop),
    }


GRAPH_CASES = _graph_cases() if torch.cuda.is_available() else {}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(GRAPH_CASES))
def test_ops_replay_in_cuda_graphs(name, backend, seed):
    """Every op, forward and backward, captured in a CUDA graph (no host sync, no allocation the graph cannot
    own) and replayed on new inputs copied into the captured ones: the same results as eager calls."""
    make, fn = GRAPH_CASES[name]
    static = [t.requires_grad_() for t in make()]
    grad = None

    def step():
        out = fn(backend, *static)
        out.backward(grad)
        return out

    grad = torch.randn_like(fn(backend, *static))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t in static:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    fresh = make()
    with torch.no_grad():
        for t, f in zip(static, fresh):
            t.copy_(f)
            t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    eager_inputs = [f.clone().requires_grad_() for f in fresh]
    expected = fn(backend, *eager_inputs)
    expected.backward(grad)
    assert torch.equal(out, expected), f"{name}: replayed output differs"
    for t, e in zip(static, eager_inputs):  # (the window backward adds the bias table's gradient with atomics)
        assert torch.allclose(t.grad, e.grad, rtol=1e-5, atol=1e-5), f"{name}: replayed gradient differs"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_patched_vit_replays_in_a_cuda_graph(backend, seed):
    """Token dropping has static shapes and no host sync, so a patched ViT captures whole in a CUDA graph."""
    pytest.importorskip("timm")
    from test_token_drop import small_vit

    model = small_vit().eval()
    effvit.patch.timm(model, backend=backend, keep_rate=0.7, drop_loc=(1, 3))
    static = torch.randn(2, 3, 48, 48, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        images = torch.randn(2, 3, 48, 48, device="cuda")
        static.copy_(images)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, model(images))
