"""Patched timm models through torch.export (a dynamic batch, save and load) and AOTInductor (compiled for CPU,
loaded and run from Python): the programs call effvit's ops and give the patched model's eager outputs."""

from __future__ import annotations

import zipfile

import pytest
import torch

from conftest import assert_close_rel, requires_ext
from deploy_models import FULL, SMALL, VIT_DROP_SMALL, build, called_ops, images

pytest.importorskip("timm")
pytestmark = requires_ext

BATCHES = (1, 3)   # neither is the batch the program was exported with


def export_dynamic_batch(model: torch.nn.Module, case) -> torch.export.ExportedProgram:
    return torch.export.export(model, (images(case, 2),), dynamic_shapes=({0: torch.export.Dim("batch")},))


def assert_matches_eager(run, model, case, what: str, batches=BATCHES) -> None:
    for batch in batches:
        x = images(case, batch)
        with torch.no_grad():
            expected = model(x)
            out = run(x)
        assert_close_rel(out, expected, torch.float32, f"{what}, batch {batch}")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c.param() for c in SMALL] + [c.param(heavy=True) for c in FULL])
def test_torch_export(case, seed, tmp_path):
    """torch.export with a dynamic batch: the program keeps effvit's fused ops, runs at other batch sizes, and
    survives torch.export.save / load."""
    model = build(case)
    program = export_dynamic_batch(model, case)
    assert called_ops(program) == set(case.ops)
    assert_matches_eager(program.module(), model, case, "exported program")
    path = tmp_path / f"{case.name}.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert called_ops(loaded) == set(case.ops)
    assert_matches_eager(loaded.module(), model, case, "saved and loaded program", batches=(3,))


def package_ops(path) -> set[str]:
    """The custom ops an AOTInductor package calls through its proxy executor (listed in the package's JSON)."""
    with zipfile.ZipFile(path) as package:
        text = "".join(package.read(name).decode() for name in package.namelist() if name.endswith(".json"))
    return {f"effvit::{name}" for name in ("window_attention", "linear_attention", "cls_attention_scores",
                                           "drop_tokens") if f'"effvit::{name}"' in text}


@pytest.mark.slow
@pytest.mark.parametrize("case", [VIT_DROP_SMALL.param()] + [c.param(heavy=True) for c in SMALL + FULL
                                                              if c is not VIT_DROP_SMALL])
def test_aot_inductor(case, seed, tmp_path):
    """aoti_compile_and_package on CPU: the package calls effvit's C++ ops (AOTInductor's proxy executor runs the
    registered kernels, so effvit must be imported where the package is loaded) and matches eager at batch sizes
    it was not compiled with."""
    model = build(case)
    program = export_dynamic_batch(model, case)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / f"{case.name}.pt2"))
    assert package_ops(path) == set(case.ops)
    compiled = torch._inductor.aoti_load_package(path)
    assert_matches_eager(compiled, model, case, "AOTInductor package")
