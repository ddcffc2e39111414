"""Builds effvit._C from csrc/: the CPU kernels always, the CUDA kernels when they can be built.

Environment (all optional):
  EFFVIT_FORCE_CUDA=1    build the CUDA kernels even without a visible GPU (needs nvcc)
  EFFVIT_NO_CUDA=1       skip the CUDA kernels
  TORCH_CUDA_ARCH_LIST   GPU targets, e.g. "8.0;9.0+PTX"; default: the local GPUs when there are any,
                         else DEFAULT_CUDA_ARCHS below
  CUDA_HOME              the CUDA toolkit; default: found from nvcc (which may be a wrapper script)
  MAX_JOBS               parallel compile jobs; default: CPUs, capped so each nvcc job has ~4 GiB
  EFFVIT_DEBUG=1         -O0 -g

Build with `pip install --no-build-isolation -e .` (or `make build`), so the extension is compiled
against the torch you run.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone

from setuptools import find_packages, setup

# Archs built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: Ampere (A100, RTX 30xx),
# Ada (RTX 40xx, L4), Hopper (H100), with PTX for Hopper so newer GPUs JIT-compile it.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def log(msg: str) -> None:
    print(f"effvit setup: {msg}", file=sys.stderr)


def find_cuda_home() -> str | None:
    """The toolkit root. torch guesses it as nvcc's grandparent folder, which is wrong when nvcc on
    PATH is a wrapper (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc); nvcc itself
    knows its root, so ask it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=60)
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if m:
                candidates.append(os.path.realpath(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and glob.glob(
                os.path.join(root, "**", "cuda_runtime.h"), recursive=True):
            return root
    return None


def wheel_cuda_include_dirs() -> list[str]:
    """Include folders of the nvidia-* wheels that torch depends on: ATen's CUDA headers include
    cusparse.h, cublas_v2.h, ..., which a bare toolkit (or nvcc from pip) may lack."""
    dirs = []
    for entry in sys.path:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in dirs:
                dirs.append(inc)
    return dirs


def default_max_jobs() -> int:
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return max(1, min(cpus, mem_kb // (4 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        return cpus


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- decide what to build, before torch.utils.cpp_extension reads the environment ----------------

try:
    import torch  # noqa: E402
except ImportError:
    raise SystemExit(
        "effvit setup: torch is not importable here. effvit compiles against the torch you run: install torch "
        "first, then build with `pip install --no-build-isolation .` (an isolated build has no torch).")

want_cuda = False
cuda_reason = ""
if env_flag("EFFVIT_NO_CUDA"):
    cuda_reason = "EFFVIT_NO_CUDA is set"
elif torch.version.cuda is None:
    cuda_reason = f"torch {torch.__version__} is a CPU-only build"
    if env_flag("EFFVIT_FORCE_CUDA"):
        raise SystemExit("effvit setup: EFFVIT_FORCE_CUDA=1 but " + cuda_reason + "; install a CUDA build of torch")
else:
    cuda_home = find_cuda_home()
    if cuda_home is None:
        cuda_reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
        if env_flag("EFFVIT_FORCE_CUDA"):
            raise SystemExit("effvit setup: EFFVIT_FORCE_CUDA=1 but " + cuda_reason)
    else:
        os.environ["CUDA_HOME"] = cuda_home
        want_cuda = True

if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

debug = env_flag("EFFVIT_DEBUG")
opt = ["-O0", "-g"] if debug else ["-O3"]
# Python's own CFLAGS (which setuptools passes first) carry -g: debug info for every torch header a file
# includes, ~45% of each C++ compile and ~80% of the library's 80 MB (16.6 MB without). A release build drops it (last flag wins).
cxx_flags = opt + ([] if debug else ["-g0"]) + ["-fopenmp-simd", "-fvisibility=hidden"]
link_flags = []
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    # at::parallel_for is an inline template that runs serially unless the extension itself is
    # compiled with OpenMP; libgomp.so.1 then resolves to the copy torch has already loaded
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
include_dirs = [os.path.join(ROOT, "csrc")]

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
if want_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags.append("-DEFFVIT_WITH_CUDA")
    nvcc_flags.append("-DEFFVIT_WITH_CUDA")
    toolkit_has_libs = os.path.exists(os.path.join(os.environ["CUDA_HOME"], "include", "cusparse.h"))
    if not toolkit_has_libs:
        # after the toolkit's own headers (-isystem comes after -I), so its cuda_runtime.h wins
        for inc in wheel_cuda_include_dirs():
            cxx_flags += ["-isystem", inc]
            nvcc_flags += ["-isystem", inc]
    Extension = cpp_extension.CUDAExtension
    log(f"building CPU and CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
else:
    Extension = cpp_extension.CppExtension
    log(f"building CPU kernels only: {cuda_reason}")

ext = Extension(
    name="effvit._C",
    sources=sources,
    include_dirs=include_dirs,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if want_cuda else {"cxx": cxx_flags},
    extra_link_args=link_flags,
    py_limited_api=False,
)


# The slowest compiles, in the order they should start. window.cpp (three ISA variants of a forward and a
# backward in every dtype) takes ~a third of a CPU-only build's compile time; started last, as the sorted
# source list had it, it ran alone on one core for ~15 of a 29-minute build on a 2-core CI machine.
SLOWEST_SOURCES_FIRST = ("csrc/cpu/window.cpp",)


def slowest_first(sources: list[str]) -> list[str]:
    def rank(path: str) -> int:
        rel = os.path.relpath(os.path.abspath(path), ROOT).replace(os.sep, "/")
        return SLOWEST_SOURCES_FIRST.index(rel) if rel in SLOWEST_SOURCES_FIRST else len(SLOWEST_SOURCES_FIRST)
    return sorted(sources, key=rank)  # stable: the rest keep their order


class BuildExt(cpp_extension.BuildExtension):
    """Writes effvit/_build_info.json beside the compiled module: what it was built with; starts the slowest
    compiles first."""

    def build_extension(self, ext):
        # setuptools sorts ext.sources by name before compiling, and ninja starts jobs in the order of its
        # file, so the order has to be set here, on the way into the compile step. The objects go back in
        # the sorted order, so the link line (and the .so) stays as it was.
        compile_sorted = self.compiler.compile

        def compile_slowest_first(sources, *args, **kwargs):
            order = slowest_first(list(sources))
            objects = compile_sorted(order, *args, **kwargs)
            by_source = dict(zip(order, objects))
            return [by_source[s] for s in sources]

        self.compiler.compile = compile_slowest_first
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sorted

    def run(self):
        super().run()
        info = {
            "effvit_commit": git_commit(),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "compiler_flags": cxx_flags,
            "cuda": want_cuda,
            "cuda_reason": cuda_reason or None,
            "cuda_home": os.environ.get("CUDA_HOME") if want_cuda else None,
            "nvcc_version": nvcc_version() if want_cuda else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if want_cuda else None,
            "cpu_isa_variants": ["avx512", "avx2", "default"] if platform.machine() in ("x86_64", "AMD64") else ["default"],
        }
        out_dir = os.path.dirname(self.get_ext_fullpath("effvit._C"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(info, f, indent=2)


def nvcc_version() -> str | None:
    try:
        out = subprocess.run([os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else None
    except (OSError, subprocess.SubprocessError):
        return None


setup(
    packages=find_packages(include=["effvit", "effvit.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    package_data={"effvit": ["_build_info.json"]},
)
