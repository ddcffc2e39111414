"""Every op is a registered torch op: opcheck passes, torch.compile(fullgraph=True) traces through it."""

from __future__ import annotations

import pytest
import torch

import effvit
from effvit import _extension
from effvit.ops import shift as shift_ops

from conftest import DEVICE, assert_close_rel, kernel_backends, requires_ext

BACKENDS = kernel_backends(DEVICE)
OPS = shift_ops._OPS


def _op_names():
    names = []
    if _extension.available():
        names += [f"effvit::{n}" for n in OPS]
    if shift_ops._triton is not None:
        names += [f"effvit::triton_{n}" for n in OPS]
    return names


def _sample_args(name: str, nhwc: bool):
    shape = (2, 5, 7, 12) if nhwc else (2, 12, 5, 7)
    x = torch.randn(shape, device=DEVICE)
    w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    base = name.split("::")[1].removeprefix("triton_")
    if base == "shift":
        return [(x, 4, nhwc, False), (x, 4, nhwc, True)]
    if base == "shift_group_norm":
        return [(x, 4, w, b, 1e-5, nhwc)]
    fwd = getattr(torch.ops.effvit, name.split("::")[1].removesuffix("_backward"))
    s, y, mean, rstd = fwd(x, 4, w, b, 1e-5, nhwc)
    return [(torch.randn_like(s), torch.randn_like(y), s, w, mean, rstd, 4, nhwc),
            (None, torch.randn_like(y), s, w, mean, rstd, 4, nhwc)]


@pytest.mark.parametrize("name", _op_names())
@pytest.mark.parametrize("nhwc", [False, True])
def test_opcheck(name, nhwc):
    op = getattr(torch.ops.effvit, name.split("::")[1])
    for args in _sample_args(name, nhwc):
        torch.library.opcheck(op, args)


@requires_ext
def test_every_op_has_a_cpu_kernel():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effvit::{name}", "CPU"), name


@pytest.mark.parametrize("name", _op_names())
def test_fake_kernel_gives_output_metadata(name):
    """Under FakeTensorMode (what torch.compile traces with) every op gives outputs of the right shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.effvit, name.split("::")[1])
    args = _sample_args(name, nhwc=True)[0]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_block(backend, seed):
    """A ShiftBlock under torch.compile(fullgraph=True): no graph break, same numbers, one compilation."""
    torch._dynamo.reset()
    block = effvit.nn.ShiftBlock(16, n_div=4, mlp_ratio=2.0, backend=backend).to(DEVICE)
    reference = effvit.nn.ShiftBlock(16, n_div=4, mlp_ratio=2.0, backend="torch").to(DEVICE)
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    counter = torch._dynamo.testing.CompileCounter()
    compiled_counted = torch.compile(block, fullgraph=True, backend=counter)
    for _ in range(2):
        x = torch.randn(2, 16, 5, 7, device=DEVICE)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = compiled(x1), reference(x2)
        assert_close_rel(out, expected, torch.float32, "compiled block")
        out.sum().backward(), expected.sum().backward()
        assert_close_rel(x1.grad, x2.grad, torch.float32, "compiled block grad")
        compiled_counted(x)
    assert counter.frame_count == 1, "recompiled on a second call with the same shapes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_compile_fullgraph_functions(backend, layout, seed):
    torch._dynamo.reset()
    x = torch.randn((2, 12, 5, 7) if layout == "NCHW" else (2, 5, 7, 12), device=DEVICE)
    w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)

    def fn(x):
        s = effvit.shift(x, 4, layout, backend=backend)
        s2, y = effvit.shift_group_norm(s, 4, w, b, 1e-5, layout, backend=backend)
        return s2 + y

    expected = fn(x)
    out = torch.compile(fn, fullgraph=True)(x)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_auto_backend_follows_process_default(backend):
    torch._dynamo.reset()
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    with effvit.use_backend(backend):
        out = torch.compile(lambda t: effvit.shift(t, 4), fullgraph=True)(x)
    assert torch.equal(out, effvit.reference.shift_feat(x, 4))


def test_triton_launchers_skip_the_op_dispatch_in_eager_only():
    """The Triton backends call their launchers directly on plain tensors in eager mode (the custom op's dispatch
    costs more than a small kernel), and the registered op wherever torch records or transforms calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from effvit.ops import registry

    calls = []
    fast = registry._eager_fast_path(lambda *a: calls.append("launcher"), lambda *a: calls.append("op"))
    x = torch.randn(3)
    fast(None, x, 2)
    fast(x, torch.nn.Parameter(torch.randn(3)))  # a subclass anywhere: the op (its dispatch may matter)
    with FakeTensorMode() as mode:
        fast(None, mode.from_tensor(x), 2)
    assert calls == ["launcher", "op", "op"]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    table = shift_ops._OP_TABLE.get("triton")
    if table is not None:  # Triton runs here (a GPU, or the interpreter conftest turns on without one)
        y = torch.randn(2, 8, 3, 5, device=DEVICE)
        seen = []
        with Recorder():
            recorded = table["shift"](y, 4, False, False)
        assert "effvit.triton_shift.default" in seen, seen  # a dispatch mode sees the op, not its insides
        assert torch.equal(table["shift"](y, 4, False, False), recorded)
