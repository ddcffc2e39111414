"""timm's own model tests over the models effvit patches, with the patch applied right after timm.create_model.

The tests are timm's tests/test_models.py from the sdist of the installed timm release (``pip download
--no-binary :all: --no-deps timm==<version>``, fetched once and cached under ~/.cache/effvit/timm-tests/<version>;
$EFFVIT_CACHE_DIR moves the cache); without a reachable package index they skip and say so. They run in a pytest
subprocess with tests/_timm_patch_shim.py as a plugin, which patches each model timm.create_model makes (ViTs at
keep_rate=1.0): forward, backward, features, intermediates, torch.fx (timm's create_feature_extractor, forward and
backward), TorchScript (plain, and of the fx graph). A timm upgrade that breaks a patch fails here.

Every timm test that passes unpatched must pass patched: the tests that fail patched are rerun unpatched, and those
that pass there fail this test. ``make test`` runs efficientvit_b0; ``make test-heavy`` every model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import effvit

# timm's tests of one model: forward, backward, features, intermediates, fx, TorchScript
TIMM_TESTS = (
    "test_model_forward", "test_model_backward",
    "test_model_forward_features", "test_model_forward_intermediates_features", "test_model_forward_intermediates",
    "test_model_forward_fx", "test_model_backward_fx",
    "test_model_forward_torchscript", "test_model_forward_fx_torchscript",
)
# what must run (not skip) for every model: the fx and TorchScript paths this file exists for
MUST_RUN = ("test_model_forward_fx", "test_model_backward_fx", "test_model_forward_torchscript",
            "test_model_forward_fx_torchscript")
# what timm's test file itself leaves out for a model (its EXCLUDE_FX_JIT_FILTERS name the distilled DeiTs)
TIMM_EXCLUDES = {"deit_small_distilled_patch16_224": ("test_model_forward_fx_torchscript",)}
SIZE_LIMIT = "input size model > limit"   # timm's reason for skipping a model too large for a test
DEFAULT_MODEL = "efficientvit_b0"
MODELS = (DEFAULT_MODEL, "efficientvit_l1", "swin_tiny_patch4_window7_224", "swin_base_patch4_window12_384",
          "vit_small_patch16_224", "deit3_small_patch16_224", "deit_small_distilled_patch16_224")
TESTS_DIR = Path(__file__).resolve().parent


def _cache_dir() -> Path:
    if os.environ.get("EFFVIT_CACHE_DIR"):
        return Path(os.environ["EFFVIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effvit"


@pytest.fixture(scope="session")
def timm_test_models() -> Path:
    """tests/test_models.py of the installed timm's sdist, from the cache or fetched into it."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision", reason="timm's fx tests need torchvision's feature extraction")
    target = _cache_dir() / "timm-tests" / timm.__version__ / "test_models.py"
    if target.exists():
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
           f"timm=={timm.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(cmd + ["-d", tmp], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"timm's model tests come from its sdist, and `pip download` took more than 10 minutes")
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"timm's model tests come from its sdist, and `{' '.join(cmd[2:])}` failed (is the package "
                        f"index reachable?): {last}")
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if not sdists:
            pytest.skip(f"pip download gave no timm-*.tar.gz sdist: {os.listdir(tmp)}")
        with tarfile.open(sdists[0]) as sdist:
            member = next((m for m in sdist.getmembers() if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                pytest.skip(f"{sdists[0].name} has no tests/test_models.py")
            text = sdist.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    # an ini file next to it makes its folder pytest's rootdir: no project's settings apply to timm's tests
    (target.parent / "pytest.ini").write_text("[pytest]\n")
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(text)
    os.replace(partial, target)  # whole or absent, with parallel test workers
    return target


def run_timm_tests(test_file: Path, model_name: str, patched: bool, out_dir: Path,
                   tests: tuple[str, ...] = TIMM_TESTS) -> dict[str, str]:
    """Runs timm's ``tests`` on ``model_name`` in a pytest subprocess; returns {test id: "passed" | "failed" |
    "skipped: <reason>"} for the ids whose model is ``model_name``."""
    junit = out_dir / f"{model_name}-{'patched' if patched else 'unpatched'}.xml"
    cmd = [sys.executable, "-m", "pytest", *(f"{test_file}::{t}" for t in tests), "-k", model_name, "-q",
           "-p", "no:cacheprovider", "-W", "ignore", f"--junitxml={junit}"]
    if patched:
        cmd += ["-p", "_timm_patch_shim"]
    # the effvit under test, and the shim, first on the subprocess's path
    path = [str(Path(effvit.__file__).resolve().parent.parent), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=test_file.parent, timeout=3600)
    if not junit.exists():
        raise AssertionError(f"timm's tests did not run (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        if not name.endswith(f"-{model_name}]") and not name.endswith(f"[{model_name}]"):
            continue
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        skipped = case.find("skipped")
        if problem is not None:
            outcomes[name] = "failed: " + (problem.get("message") or "")[:500]
        elif skipped is not None:
            outcomes[name] = "skipped: " + (skipped.get("message") or "")
        else:
            outcomes[name] = "passed"
    return outcomes


def _counts(outcomes: dict[str, str]) -> str:
    kinds = [o.split(":")[0] for o in outcomes.values()]
    return ", ".join(f"{kinds.count(k)} {k}" for k in ("passed", "failed", "skipped") if k in kinds)


@pytest.mark.parametrize("model_name", [m if m == DEFAULT_MODEL else pytest.param(m, marks=pytest.mark.heavy)
                                        for m in MODELS])
def test_timm_model_tests_pass_patched(model_name, timm_test_models, tmp_path):
    patched = run_timm_tests(timm_test_models, model_name, patched=True, out_dir=tmp_path)
    print(f"{model_name}, patched: {_counts(patched)}")
    # timm skips what exceeds its input-size limits (all but the forward of swin_base_patch4_window12_384, whose
    # input is fixed at 384; tests/test_fx_torchscript.py covers it); anything else must run
    ran = {name.split("[")[0] for name, outcome in patched.items()
           if not outcome.startswith("skipped") or SIZE_LIMIT in outcome}
    must_run = set(MUST_RUN) - set(TIMM_EXCLUDES.get(model_name, ()))
    assert must_run <= ran, (f"timm's {sorted(must_run - ran)} did not run on {model_name}: "
                                  f"{patched}")
    failed = tuple(sorted({name.split("[")[0] for name, outcome in patched.items() if outcome.startswith("failed")}))
    if not failed:
        return
    unpatched = run_timm_tests(timm_test_models, model_name, patched=False, out_dir=tmp_path, tests=failed)
    regressions = {name: outcome for name, outcome in patched.items()
                   if outcome.startswith("failed") and unpatched.get(name) == "passed"}
    assert not regressions, f"timm tests that pass unpatched but fail with effvit's patch: {regressions}"
