"""`python -m effvit.info`: how effvit was built, what this machine has, and which backend serves which op.

    python -m effvit.info            # human-readable report
    python -m effvit.info --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

import effvit
from effvit import _extension, backends
from effvit.checks import FLOAT_DTYPES


def _backend_status(family: backends.Family) -> dict[str, str]:
    """Per kernel backend: "ok (devices)" or why it cannot run here."""
    out = {}
    for name in backends.KERNEL_BACKENDS:
        spec = family.kernels.get(name)
        if spec is None:
            out[name] = "no kernel"
        elif spec.unavailable:
            out[name] = spec.unavailable
        else:
            out[name] = f"ok on {', '.join(spec.devices)}"
    return out


def _auto_choice(family: backends.Family, device: str, dtype: torch.dtype) -> str:
    for name in family.auto_order.get(device, ()):
        spec = family.kernels.get(name)
        if spec and not spec.unavailable and device in spec.devices and dtype in spec.dtypes:
            # a family with a size rule (family.prefer) may pick another backend for large inputs
            return name + (" (small inputs)" if family.prefer is not None and device == "cuda" else "")
    return "torch"


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "effvit": effvit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "extension": {
            "loaded": _extension.available(),
            "problem": _extension.missing_reason() or None,
            "build": _extension.build_info or None,
            "cpu_isa_in_use": _extension.cpu_isa(),
            "cpu_isa_supported": _extension._C.cpu_isa_supported() if _extension.available() else None,
            "cuda_kernels": bool(_extension.available() and _extension._C.has_cuda()),
        },
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "default_backend": backends.get_backend(),
        "ops": {},
    }
    for fam_name, fam in backends.families().items():
        info["ops"][fam_name] = {
            "backends": _backend_status(fam),
            "auto": {f"{device}/{str(dtype).replace('torch.', '')}": _auto_choice(fam, device, dtype)
                     for device in devices for dtype in FLOAT_DTYPES},
        }
    return info


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def report(info: dict) -> str:
    ext = info["extension"]
    build = ext["build"] or {}
    lines = [
        f"effvit {info['effvit']}  (python {info['python']}, torch {info['torch']}, CUDA {info['torch_cuda']})",
        f"GPUs: {', '.join(info['gpu']) or 'none visible'}",
        "",
        "compiled extension (effvit._C):",
    ]
    if ext["loaded"]:
        lines += [
            f"  built against torch {build.get('torch')} on {build.get('built_at')} (commit {build.get('effvit_commit')})",
            f"  CUDA kernels: {'yes, archs ' + str(build.get('cuda_arch_list')) + ', nvcc ' + str(build.get('nvcc_version')) if ext['cuda_kernels'] else 'no (' + str(build.get('cuda_reason')) + ')'}",
            f"  CPU ISA: {ext['cpu_isa_in_use']} in use (this CPU supports {ext['cpu_isa_supported']}; compiled: "
            f"{', '.join(build.get('cpu_isa_variants', []))}; EFFVIT_CPU_ISA lowers it)",
        ]
    else:
        lines.append(f"  not available: {ext['problem']}")
    lines += [
        f"Triton: {info['triton'] or 'not installed'}" + ("  (TRITON_INTERPRET=1: runs on CPU tensors)"
                                                          if info["triton_interpret"] else ""),
        f"default backend: {info['default_backend']!r} (set_backend(), use_backend(), EFFVIT_BACKEND)",
        "",
        "ops: the kernel backends, and what backend='auto' runs per device/dtype (torch = the reference):",
    ]
    for fam, row in info["ops"].items():
        lines.append(f"  {fam}")
        for name, status in row["backends"].items():
            lines.append(f"    {name:<7} {status}")
        lines.append("    auto    " + ", ".join(f"{k} -> {v}" for k, v in row["auto"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effvit.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
