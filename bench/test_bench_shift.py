"""The shift family's cases under pytest-benchmark: one benchmark per case and implementation."""

from __future__ import annotations

import pytest
import torch

from effvit.bench import runner
from effvit.bench.cases import SuiteOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = runner.collect_cases(["shift"], SuiteOptions(device=DEVICE, directions=("fwd", "fwd+bwd")))
PARAMS = [pytest.param(case, name, id=f"{case.op}-{case.shape.replace(' ', '_')}-{case.direction}-{name}")
          for case in CASES for name in case.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_shift(benchmark, case, impl):
    step = case.impls[impl]()
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape} {case.direction}"
    benchmark.extra_info.update({"bytes": case.bytes, "impl": impl, "device": DEVICE})
    if DEVICE == "cuda":
        def run():
            step(*inputs)
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(step, *inputs)
