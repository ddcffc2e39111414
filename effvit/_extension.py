"""Loads the compiled kernels (effvit._C) if they were built, and says what is missing if not.

effvit imports without them: the reference (torch) backend and the Triton kernels still run.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the effvit source tree "
    "(or `make build`), against the torch you run"
)

_C: Any = None
load_error: str | None = None
build_info: dict[str, Any] = {}

try:
    from effvit import _C  # noqa: F401  (registers the effvit::* ops)
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    _C = None
    load_error = str(e)

_info_path = os.path.join(os.path.dirname(__file__), "_build_info.json")
if os.path.exists(_info_path):
    try:
        with open(_info_path) as f:
            build_info = json.load(f)
    except (OSError, ValueError):
        build_info = {}


def torch_mismatch(built_with: str | None, running: str) -> str | None:
    """A warning when the extension was built against another torch than the one running."""
    if not built_with or built_with == running:
        return None
    return (f"effvit._C was built against torch {built_with} but torch {running} is running; its kernels "
            f"may crash or fail to load: rebuild effvit ({BUILD_HINT}).")


def available() -> bool:
    """Whether the compiled CPU/CUDA kernels are loaded."""
    return _C is not None


def missing_reason() -> str:
    """Why the compiled kernels are not available, in words a user can act on."""
    if _C is not None:
        return ""
    if load_error and "No module named" in load_error:
        return f"effvit's compiled extension (effvit._C) is not built; {BUILD_HINT}"
    return f"effvit._C failed to load ({load_error}); {BUILD_HINT}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether effvit::<op> has a kernel for a dispatch key ("CPU", "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"effvit::{op}", dispatch_key)


def cpu_isa() -> str | None:
    return _C.cpu_isa() if _C is not None else None


class ExtensionWarning(UserWarning):
    """effvit's compiled kernels are missing or were built for another torch."""


_mismatch = torch_mismatch(build_info.get("torch"), torch.__version__) if _C is not None else None
if _mismatch:
    warnings.warn(_mismatch, ExtensionWarning, stacklevel=2)
elif _C is None and os.environ.get("EFFVIT_QUIET") != "1":
    warnings.warn(missing_reason() + ". Until then the reference (torch) and Triton backends run; "
                  "EFFVIT_QUIET=1 silences this.", ExtensionWarning, stacklevel=2)


