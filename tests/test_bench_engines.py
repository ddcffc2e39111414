"""effvit-bench's ONNX engine peers (effvit.bench.engines): listed for CPU float32 forward model cases, skipped with
a reason otherwise or when a package is missing, and running the exported model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effvit
from effvit.bench import cases, engines

from conftest import requires_ext


def model_case(**options):
    opts = cases.SuiteOptions(shapes=("vit_small_patch16_224",), batches=(8,), **options)
    (case,) = list(cases.suites()["token_drop"](opts))   # suites() loads every family, as effvit-bench does
    return case


def test_model_case_lists_each_engine_for_both_models():
    pytest.importorskip("timm")
    case = model_case()
    for engine in engines.ENGINES:
        why = engines.unavailable(engine, "cpu", torch.float32, "fwd")
        for name in (engine, f"effvit:{engine}"):
            if why is None:
                assert name in case.impls, sorted(case.impls)
            else:
                assert case.skipped[name] == why


def test_engines_skip_what_they_do_not_time():
    pytest.importorskip("timm")
    case = model_case(directions=("fwd+bwd",))
    for engine in engines.ENGINES:
        assert "inference only" in case.skipped[f"effvit:{engine}"]
    assert "CPU peer" in engines.unavailable("onnxruntime", "cuda", torch.float32, "fwd")
    assert "float32 only" in engines.unavailable("openvino", "cpu", torch.bfloat16, "fwd")


def test_missing_package_is_the_reason(monkeypatch):
    real_find_spec = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    assert engines.unavailable("openvino", "cpu", torch.float32, "fwd") == \
        "openvino not installed (pip install 'effvit[onnx,openvino]')"


@requires_ext
@pytest.mark.parametrize("engine", engines.ENGINES)
def test_compile_for_runs_the_exported_model(engine, seed):
    """A module calling an effvit op, exported and run by the engine: the outputs of the eager module."""
    why = engines.unavailable(engine, "cpu", torch.float32, "fwd")
    if why:
        pytest.skip(why)
    module = effvit.nn.LinearAttention(32, num_heads=4).eval()
    x = torch.randn(2, 10, 32)
    run = engines.compile_for(engine, module, x)
    with torch.no_grad():
        expected = module(x).numpy()
    out = np.asarray(run(x)[0])
    assert np.abs(out - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
