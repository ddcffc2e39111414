"""Shared test machinery: backends to test, seeds, poisoned outputs, tolerances."""

from __future__ import annotations

import os
import random
import zlib

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; it must be on
# before triton is imported.
try:
    import torch as _torch

    _HAS_GPU = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_GPU = False
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_rounds_bf16_like_gpu() -> None:
    """Triton's interpreter narrows fp32 to bf16 by truncation where the GPU (cvt.rn) rounds to nearest
    even: twice the GPU's error, which the bf16 tolerances below are not made for. Route that one
    conversion through torch's round-to-nearest-even so interpreter results carry the GPU's rounding."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no triton: nothing to patch
        return
    truncating = getattr(interpreter, "_convert_float", None)
    if truncating is None:  # pragma: no cover - a Triton whose interpreter converts another way
        return

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode is None:
            flat = _torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return flat.to(_torch.bfloat16).view(_torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return truncating(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_like_gpu()

import pytest
import torch

import effvit
from effvit import _extension, backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = DTYPES + (torch.float64,)

# float32 means float32 on a GPU too: cuDNN convolutions default to TF32 (a 10-bit mantissa), which turns a last-bit
# difference before a convolution (timm's LiteMLA projects its attention output with one) into 1e-3 after it
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# max |out - ref| / max |ref| against a float64 reference, per dtype
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """max |out - ref| over max |ref|, or over ``scale`` when that is larger: the size of the terms a result
    is a difference of, where it cancels (then its rounding error scales with the terms, not with it)."""
    out, ref = out.double(), ref.double()
    scale = max(scale, ref.abs().max().item() if ref.numel() else 0.0)
    return ((out - ref).abs().max().item() / max(scale, 1e-30)) if ref.numel() else 0.0


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                     scale: float = 0.0) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output (an element left unwritten?)"
    err = rel_error(out, ref, scale)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.0g} for {dtype}"


def kernel_backends(device: str = "cpu", family: str = "shift") -> list[str]:
    """Kernel backends of `family` that can run on `device` here."""
    fam = backends.families()[family]
    out = []
    for name, spec in fam.kernels.items():
        if spec.unavailable is None and device in spec.devices:
            out.append(name)
    return out


DEVICE = "cuda" if _HAS_GPU else "cpu"
# The GPU backwards add partial gradients (keys, values, the bias table) with atomics, so float64 results differ
# run to run in the last bits: gradcheck's reentrancy check gets this much slack (seen on an H100: exact 0 failed).
GRADCHECK_NONDET_TOL = 1e-12


def in_triton_interpreter(backend: str) -> bool:
    """Triton on CPU tensors runs in Triton's interpreter (~0.1-0.5 s a call here): gradcheck then takes random
    projections of the Jacobian (fast mode) instead of one call per input element (the token-drop scores' full
    check took 460 s of CI's 90 minutes). The GPU check runs the full one on a GPU."""
    return backend == "triton" and DEVICE == "cpu"


def _seed_for(nodeid: str) -> int:
    """EFFVIT_TEST_SEED=<n>: every test uses n (replay); =random: fresh seeds each run (fuzzing); unset: a
    seed fixed per test id, so a plain run (CI) draws the same random cases every time."""
    chosen = os.environ.get("EFFVIT_TEST_SEED", "")
    if chosen == "random":
        return random.SystemRandom().randrange(2**31)
    if chosen:
        return int(chosen)
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request):
    """A seed per test (see _seed_for), printed with the failure so it can be replayed."""
    value = _seed_for(request.node.nodeid)
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    yield value


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("seed", f"replay with EFFVIT_TEST_SEED={seeds[0]}"))


@pytest.fixture
def poisoned():
    """While active, every new tensor (torch.empty*, at::empty* in the kernels) is filled with NaN, so an
    output element that a kernel forgets to write fails the comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


requires_ext = pytest.mark.skipif(not _extension.available(), reason=_extension.missing_reason() or "n/a")
requires_gpu = pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """Without a GPU, Triton kernels run in Triton's interpreter, one program instance after another in
    Python: on a slow 2-core VM the suite then ran past CI's 90 minutes. There the half-precision Triton
    cases are skipped (float32 and float64 run the same kernel code; the GPU check runs every dtype on the
    GPU); EFFVIT_TEST_TRITON_INTERPRETER=all runs them too."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("EFFVIT_TEST_TRITON_INTERPRETER") == "all":
        return
    skip = pytest.mark.skip(reason="half-precision Triton case in the interpreter (EFFVIT_TEST_TRITON_INTERPRETER=all "
                                   "runs it; the GPU check runs it on a GPU)")
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        on_triton = any(isinstance(v, str) and v == "triton" for v in params.values())
        if on_triton and params.get("dtype") in (torch.float16, torch.bfloat16):
            item.add_marker(skip)
