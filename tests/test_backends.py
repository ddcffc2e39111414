"""Backend choice: per call, per module, process default, context manager, environment; clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import effvit
from effvit import backends

from conftest import DEVICE, kernel_backends, requires_ext


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        effvit.shift(torch.zeros(1, 8, 2, 2), 4, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        effvit.set_backend("gpu")


def test_process_default_and_context_manager():
    assert effvit.get_backend() == "auto"
    effvit.set_backend("torch")
    try:
        assert effvit.get_backend() == "torch"
        with effvit.use_backend("auto"):
            assert effvit.get_backend() == "auto"
            with pytest.raises(RuntimeError):
                with effvit.use_backend("torch"):
                    raise RuntimeError("boom")
            assert effvit.get_backend() == "auto"  # restored after the exception
        assert effvit.get_backend() == "torch"
    finally:
        effvit.set_backend("auto")


@requires_ext
def test_auto_takes_the_cpu_kernel_on_cpu():
    x = torch.randn(1, 8, 3, 3)
    assert backends.select("shift", None, x) == "cpu"
    assert backends.select("shift", "auto", x) == "cpu"
    with effvit.use_backend("torch"):
        assert backends.select("shift", None, x) == "torch"
        assert backends.select("shift", "cpu", x) == "cpu"  # per call beats the process default


def test_auto_falls_back_to_the_reference_when_no_kernel_fits():
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    family = backends.families()["shift"]
    saved = family.auto_order
    family.auto_order = {"cpu": ()}
    try:
        assert backends.select("shift", "auto", x) == "torch"
        assert torch.equal(effvit.shift(x, 4), effvit.reference.shift_feat(x, 4))
    finally:
        family.auto_order = saved


def test_forcing_an_unfit_backend_lists_every_reason():
    x = torch.randn(1, 8, 3, 3)  # a CPU tensor; the cuda kernels never run on it
    with pytest.raises(effvit.BackendNotSupported) as info:
        effvit.shift(x, 4, backend="cuda")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for name in ("torch: supported", "cpu:", "cuda:", "triton:"):
        assert name in message, message
    assert "input is on cpu" in message or "without CUDA" in message


def test_explain():
    reasons = effvit.explain("shift", torch.randn(1, 8, 3, 3))
    assert set(reasons) == {"torch", "cpu", "cuda", "triton"}
    assert reasons["torch"] == []
    assert reasons["cuda"], "a CPU tensor cannot run on the cuda backend"


def test_explain_window_takes_the_window_and_shift_as_window_attention_does():
    qkv = torch.randn(1, 17, 17, 3 * 2 * 136, device=DEVICE)   # 2 heads of 136 channels
    as_ints = effvit.explain("window", qkv, 2, 17, 3)
    assert as_ints == effvit.explain("window", qkv, 2, (17, 17), (3, 3))
    if "triton" in kernel_backends(DEVICE, "window"):
        assert any("289 tokens" in r for r in as_ints["triton"]), as_ints["triton"]
        assert any("head_dim 136" in r for r in effvit.explain("window", qkv, 2, 7, 0)["triton"])


@pytest.mark.parametrize("backend", kernel_backends(DEVICE))
def test_module_backend_attribute(backend):
    block = effvit.nn.Shift(4, backend=backend)
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    assert torch.equal(block(x), effvit.reference.shift_feat(x, 4))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_environment_variable_sets_the_default():
    out = _run("import effvit; print(effvit.get_backend())", EFFVIT_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    bad = _run("import effvit", EFFVIT_BACKEND="nope")
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_triton_on_cpu_needs_the_interpreter():
    out = _run("import torch, effvit\n"
               "print(effvit.explain('shift', torch.zeros(1, 8, 2, 2))['triton'])", TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout or "not installed" in out.stdout


def test_linear_prefers_triton_for_large_gpu_inputs():
    # the size rule of effvit/ops/linear.py (Triton's GPU time is a third of CUDA's at large N, its host time
    # larger); meta tensors stand for CUDA ones here: only shapes and dtypes are read
    from effvit.ops import linear
    family = backends.families()["linear"]

    def order(shape, dtype=torch.float32, device="cuda"):
        return family.order(device, torch.empty(shape, dtype=dtype, device="meta"), shape[3], shape[3])

    rows = linear.TRITON_FROM_ROWS
    assert order((1, 8, rows // 8 - 1, 32)) == ("cuda", "triton")
    assert order((1, 8, rows // 8, 32)) == ("triton", "cuda")
    assert order((64, 8, 784, 32), torch.bfloat16) == ("triton", "cuda")
    assert order((1, 8, 50176, 32), torch.float64) == ("cuda", "triton")  # Triton's float64 dots are FMA loops
    assert order((1, 8, 50176, 128)) == ("cuda", "triton")                # untimed there
    assert order((1, 8, 50176, 32), device="cpu") == ("cpu",)
