"""The machine and software a benchmark ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
import re
import subprocess

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_bytes(level: int = 3) -> int | None:
    path = f"/sys/devices/system/cpu/cpu0/cache/index{level}/size"
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    m = re.match(r"(\d+)([KMG]?)", text)
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_name(device: str) -> str:
    """A folder-friendly name: the GPU's, or the CPU model's."""
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    name = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*$", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def describe(device: str) -> dict:
    from effvit import __version__, _extension

    info = {
        "device": device,
        "machine_name": machine_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "l3_bytes": cache_bytes(3),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "effvit": __version__,
        "effvit_commit": git_commit(),
        "effvit_cpu_isa": _extension.cpu_isa(),
        "extension_build": _extension.build_info or None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_sm": f"{props.major}.{props.minor}",
                     "gpu_memory_bytes": props.total_memory, "gpu_multiprocessors": props.multi_processor_count,
                     "gpu_l2_bytes": getattr(props, "L2_cache_size", None)})
    return info
