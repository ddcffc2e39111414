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
