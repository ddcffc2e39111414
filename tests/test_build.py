"""The package as a user installs it: import without the extension, build facts, ISA dispatch, CUDA
objects, and the CMake build for C++ users."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import effvit
from effvit import _extension

from conftest import requires_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def test_import_without_the_extension():
    """`import effvit` works when effvit._C is missing; the reference runs and says how to build."""
    out = _run("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "effvit._C":
                    raise ImportError("No module named 'effvit._C'")
        sys.meta_path.insert(0, Block())
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, effvit
        from effvit import _extension
        assert not effvit.extension_available()
        assert any("not built" in str(w.message) for w in caught), [str(w.message) for w in caught]
        x = torch.randn(1, 8, 3, 3)
        assert torch.equal(effvit.shift(x, 4), effvit.reference.shift_feat(x, 4))   # auto -> torch
        try:
            effvit.shift(x, 4, backend="cpu")
        except effvit.BackendNotSupported as e:
            print(e)
        print(_extension.missing_reason())
    """)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation" in out.stdout
    assert "cpu: effvit's compiled extension (effvit._C) is not built" in out.stdout


def test_torch_mismatch_warning_text():
    assert _extension.torch_mismatch("2.14.1", "2.14.1") is None
    assert _extension.torch_mismatch(None, "2.14.1") is None
    msg = _extension.torch_mismatch("2.13.0+cpu", "2.14.1+cu130")
    assert "2.13.0+cpu" in msg and "2.14.1+cu130" in msg and "rebuild" in msg


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "effvit.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "shift" in out.stdout and "auto" in out.stdout
    js = subprocess.run([sys.executable, "-m", "effvit.info", "--json"], capture_output=True, text=True, timeout=300)
    info = json.loads(js.stdout)
    assert info["torch"] == torch.__version__
    assert "shift" in info["ops"]


@requires_ext
def test_build_facts_recorded():
    info = _extension.build_info
    for key in ("torch", "torch_cuda", "cuda", "cuda_arch_list", "cpu_isa_variants", "built_at"):
        assert key in info, key
    assert info["torch"] == torch.__version__


@requires_ext
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_isa_variant_gives_the_same_numbers(isa):
    """EFFVIT_CPU_ISA lowers the ISA; each compiled variant runs and matches the reference."""
    out = _run("""
        import torch, effvit
        from effvit import _extension
        from effvit.reference import shift as R
        print(_extension.cpu_isa(), _extension._C.cpu_isa_supported())
        torch.manual_seed(0)
        for layout, shape in (("NCHW", (2, 24, 9, 11)), ("NHWC", (2, 9, 11, 24))):
            x = torch.randn(shape)
            assert torch.equal(effvit.shift(x, 6, layout, backend="cpu"), R.shift(x, 6, layout))
            w, b = torch.randn(24), torch.randn(24)
            s, y = effvit.shift_group_norm(x, 6, w, b, 1e-5, layout, backend="cpu")
            rs, ry = R.shift_group_norm(x.double(), 6, w.double(), b.double(), 1e-5, layout)
            assert (y.double() - ry).abs().max() < 1e-5, "normalized differs"
        # the attention kernels: their GEMM and softmax run in vectors of the variant's own width
        from effvit.reference import window as W, linear as L
        qkv, table = torch.randn(2, 9, 11, 3 * 64), torch.randn(13 * 13, 2)
        got = effvit.window_attention(qkv, 2, 7, 3, table, backend="cpu")
        want = W.window_attention_core(qkv.double(), table.double(), 2, (7, 7), (3, 3), 32 ** -0.5, None)
        assert (got.double() - want).abs().max() < 1e-4, "window attention differs"
        q, k, v = torch.randn(3, 2, 3, 150, 32).unbind(0)
        got = effvit.linear_attention(q, k, v, "relu", eps=1e-5, backend="cpu")
        want = L.linear_attention(q.double(), k.double(), v.double(), None, "relu", eps=1e-5)
        assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-5, "linear attention differs"
        # token drop: the CLS scores' dot products and the fused token's weighted sum
        from effvit.reference import token_drop as T
        q, k = torch.randn(2, 3, 40), torch.randn(2, 3, 37, 40)
        got = effvit.cls_attention_scores(q, k, 0.2, 1, backend="cpu")
        assert (got.double() - T.cls_attention_scores(q.double(), k.double(), 0.2, 1)).abs().max() < 1e-6, "scores"
        x, s = torch.randn(2, 37, 200), torch.rand(2, 36)
        got, index = effvit.drop_tokens(x, s, 20, 1, True, backend="cpu")
        want, want_index = T.drop_tokens(x.double(), s.double(), 20, 1, True, False)
        assert torch.equal(index, want_index) and (got.double() - want).abs().max() < 1e-5, "drop_tokens differs"
    """, env={"EFFVIT_CPU_ISA": isa})
    assert out.returncode == 0, out.stderr
    in_use, supported = out.stdout.split()
    order = ["default", "avx2", "avx512"]
    assert in_use == order[min(order.index(isa), order.index(supported))]


@requires_ext
def test_baseline_variant_has_no_avx512():
    """The code compiled for CPUs without AVX-512 holds no AVX-512 instruction (zmm registers)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    lib = _extension._C.__file__
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", lib], capture_output=True, text=True,
                         timeout=300).stdout
    checked = 0
    for block in out.split("\n\n"):
        header = block.split("\n", 1)[0]
        if "effvit::" in header and ("_default<" in header or "_avx2<" in header):
            checked += 1
            assert "zmm" not in block, f"AVX-512 in a baseline/AVX2 variant: {header}"
    assert checked > 0


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for entry in sys.path:
        for cand in glob.glob(os.path.join(entry, "nvidia", "*", "bin", "cuobjdump")):
            return cand
    return None


@requires_ext
def test_cuda_kernels_registered_and_compiled_for_each_arch():
    info = _extension.build_info
    if not info.get("cuda"):
        pytest.skip(f"built without CUDA: {info.get('cuda_reason')}")
    for name in ("shift", "shift_group_norm", "shift_group_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effvit::{name}", "CUDA"), name
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    lib = _extension._C.__file__
    elf = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True, timeout=300).stdout
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True, timeout=300).stdout
    for arch in info["cuda_arch_list"].replace(" ", ";").split(";"):
        if not arch:
            continue
        sm = arch.replace("+PTX", "").replace(".", "")
        assert f"sm_{sm}" in elf, f"no SASS for sm_{sm} in {lib}:\n{elf}"
        if arch.endswith("+PTX"):
            assert f"sm_{sm}" in ptx, f"no PTX for sm_{sm}:\n{ptx}"


@pytest.mark.slow
def test_cmake_build_for_cpp_users(tmp_path):
    """CMakeLists.txt builds csrc/ against LibTorch (with the CUDA kernels when nvcc is there, unless
    EFFVIT_NO_CUDA is set, as for the pip build); the library
    registers working ops. The build is limited to the shift family (EFFVIT_FAMILIES): the CMake logic and the
    flags are the same for every family, the pip build compiles every source, and a whole second build
    would double the CI's build time on a 2-core machine. The C++ is compiled at -O0: this checks the build logic
    and that the ops register and run, not their speed, and at -O3 csrc/cpu/shift.cpp alone took ~9 minutes of a
    core beside the other test worker on a slow day (-O0: under 2)."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "cmake")
    cmake = beside_python if os.path.exists(beside_python) else shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    if not os.path.exists(os.path.join(ROOT, "CMakeLists.txt")):
        pytest.skip("needs effvit's source tree (CMakeLists.txt and csrc/ beside tests/)")
    no_cuda = os.environ.get("EFFVIT_NO_CUDA", "").strip().lower() in ("1", "true", "yes", "on")
    with_cuda = bool(torch.version.cuda and shutil.which("nvcc")) and not no_cuda
    build = tmp_path / "build"
    options = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DEFFVIT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
               "-DCMAKE_CUDA_ARCHITECTURES=80", "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -DNDEBUG"]

    unknown = subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path / "unknown"), *options, "-DEFFVIT_FAMILIES=shift;swin"],
                             capture_output=True, text=True, timeout=600)
    assert unknown.returncode != 0
    assert "EFFVIT_FAMILIES names 'swin', which is not one of" in unknown.stdout + unknown.stderr

    configure = subprocess.run([cmake, "-S", ROOT, "-B", str(build), *options, "-DEFFVIT_FAMILIES=shift"],
                               capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    jobs = str(max(1, min(os.cpu_count() or 1, 2)))
    built = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    libs = glob.glob(str(build / "libeffvit*.so"))
    assert libs, os.listdir(build)
    out = _run(f"""
        import torch
        torch.ops.load_library({libs[0]!r})
        x = torch.randn(2, 12, 5, 7)
        y = torch.ops.effvit.shift(x, 4, False, False)
        assert torch.equal(y[:, 0, :, :-1], x[:, 0, :, 1:])
        # declared (every schema is in effvit_ops.cpp) but not built
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("effvit::lofi_attention", "CPU")
        print(torch._C._dispatch_has_kernel_for_dispatch_key("effvit::shift", "CUDA"))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(with_cuda)
