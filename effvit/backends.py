"""Which implementation runs an op: the one place where a backend is chosen.

Backends:
  "torch"   the pure-PyTorch reference in effvit/reference (always works; the official maths)
  "cpu"     the C++ kernels of effvit._C on CPU tensors
  "cuda"    the CUDA kernels of effvit._C on CUDA tensors
  "triton"  the Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, for tests)
  "auto"    the fastest kernel that supports the input, else "torch"

The choice is made per call (``backend=`` on every function and module), else by the innermost
``use_backend()`` block of the calling thread (or asyncio task: it is a context variable, so one request's block in a
threaded server does not change another thread's kernels), else by the process-wide default that ``set_backend()``
sets (initially the ``EFFVIT_BACKEND`` environment variable, or "auto"). torch.compile guards on both, so a
compiled model follows them too. Forcing a backend that cannot serve an input raises
``BackendNotSupported`` listing every backend's reason, the way xformers reports "not supported because".

Each family declares its kernels with ``register_family``: the devices and dtypes each one serves, the
ops it needs, the order ``auto`` tries them in per device (fastest first, from bench/results; a family whose
fastest backend depends on the input's size gives a ``prefer`` rule), and an optional check of shapes.
Availability (extension built, CUDA compiled in, Triton importable) is read once, when the family registers,
so choosing stays cheap and traceable by torch.compile.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from effvit import _extension
from effvit.checks import FLOAT_DTYPES

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
KERNEL_BACKENDS = ("cpu", "cuda", "triton")


class BackendNotSupported(ValueError):
    """The requested backend cannot run this input; the message lists every backend's reasons."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")
    return name


class _State:
    default = _check_name(os.environ.get("EFFVIT_BACKEND", "auto").strip().lower() or "auto")


# use_backend's choice, per thread and asyncio task (a new thread starts with None: the process default)
_SCOPED: contextvars.ContextVar[str | None] = contextvars.ContextVar("effvit_backend", default=None)


def set_backend(name: str) -> None:
    """Sets the process-wide default backend (initially $EFFVIT_BACKEND or "auto"), for every thread."""
    _State.default = _check_name(name)


def get_backend() -> str:
    """The backend a call without ``backend=`` uses in this thread: use_backend's, else the process default."""
    return _SCOPED.get() or _State.default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, calls without an explicit ``backend=`` use ``name``, in this thread (or asyncio task)
    only; other threads keep theirs."""
    token = _SCOPED.set(_check_name(name))
    try:
        yield
    finally:
        _SCOPED.reset(token)


# ---- what each family's kernels support -----------------------------------------------------------

def _triton_status() -> tuple[str | None, bool]:
    """(reason Triton cannot run at all or None, whether the CPU interpreter is on)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)", False
    return None, os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class KernelSpec:
    """One backend's kernels for one family."""

    backend: str                                   # "cpu" | "cuda" | "triton"
    ops: tuple[str, ...]                           # registered op names it needs (effvit::<op>)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    # shape/argument limits beyond device and dtype: returns a reason or None
    check: Callable[..., str | None] | None = None
    devices: tuple[str, ...] = field(init=False, default=())
    unavailable: str | None = field(init=False, default=None)

    def resolve(self) -> None:
        """Reads once which devices this backend can serve here, or why it cannot run at all."""
        if self.backend in ("cpu", "cuda"):
            key = self.backend.upper()
            self.devices = (self.backend,)
            if not _extension.available():
                self.unavailable = _extension.missing_reason()
            elif not all(_extension.has_kernel(op, key) for op in self.ops):
                self.unavailable = (
                    "effvit._C was built without CUDA kernels (rebuild on a machine with nvcc, or with "
                    "EFFVIT_FORCE_CUDA=1)" if key == "CUDA" else "effvit._C has no CPU kernel for this op")
        elif self.backend == "triton":
            reason, interpret = _triton_status()
            self.unavailable = reason
            self.devices = ("cuda", "cpu") if interpret else ("cuda",)
        else:
            raise ValueError(f"unknown kernel backend {self.backend!r}")


@dataclass
class Family:
    name: str
    kernels: dict[str, KernelSpec]
    auto_order: dict[str, tuple[str, ...]]  # device type -> backends, fastest first
    # per input, an order that replaces auto_order's (None: keep it): where the fastest backend depends on size
    prefer: Callable[..., tuple[str, ...] | None] | None = None

    def order(self, device: str, x: torch.Tensor, *args) -> tuple[str, ...]:
        """The backends ``auto`` tries for this input, fastest first."""
        if self.prefer is not None:
            preferred = self.prefer(device, x, *args)
            if preferred is not None:
                return preferred
        return self.auto_order.get(device, ())

    def supports(self, backend: str, x: torch.Tensor, *args, device: str | None = None) -> bool:
        spec = self.kernels.get(backend)
        if spec is None or spec.unavailable is not None:
            return False
        if (device or _device_type(x)) not in spec.devices or x.dtype not in spec.dtypes:
            return False
        return spec.check is None or spec.check(x, *args) is None

    def reasons(self, backend: str, x: torch.Tensor, *args) -> list[str]:
        """Why ``backend`` cannot run this input (empty when it can)."""
        if backend == "torch":
            return []
        spec = self.kernels.get(backend)
        if spec is None:
            return [f"effvit has no {backend} kernel for {self.name}"]
        if spec.unavailable is not None:
            return [spec.unavailable]
        out = []
        if x.device.type not in spec.devices:
            hint = ""
            if backend == "triton" and x.device.type == "cpu":
                hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import, for testing)"
            out.append(f"input is on {x.device.type}, {backend} kernels run on {', '.join(spec.devices)}{hint}")
        if x.dtype not in spec.dtypes:
            out.append(f"dtype {x.dtype} is not supported (supported: "
                       f"{', '.join(str(d).replace('torch.', '') for d in spec.dtypes)})")
        if spec.check is not None:
            reason = spec.check(x, *args)
            if reason:
                out.append(reason)
        return out


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, kernels: list[KernelSpec], auto_order: dict[str, tuple[str, ...]],
                    prefer: Callable[..., tuple[str, ...] | None] | None = None) -> Family:
    """prefer(device, x, *args): an order for this input that replaces auto_order[device], or None."""
    for spec in kernels:
        spec.resolve()
    family = Family(name, {k.backend: k for k in kernels}, auto_order, prefer)
    _FAMILIES[name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def _device_type(x: torch.Tensor) -> str:
    # x.is_cpu / x.is_cuda cost a fifth of x.device.type: this runs on every call
    return "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type


def select(family: str, backend: str | None, x: torch.Tensor, *args) -> str:
    """The backend that runs ``family`` on input ``x`` (args: extra inputs the family's checks read)."""
    name = (_SCOPED.get() or _State.default) if backend is None else backend
    if name not in BACKENDS:
        _check_name(name)
    if name == "torch":
        return "torch"
    fam = _family(family)
    if name == "auto":
        device = _device_type(x)
        for candidate in fam.order(device, x, *args):
            if fam.supports(candidate, x, *args, device=device):
                return candidate
        return "torch"
    if fam.supports(name, x, *args):
        return name
    raise BackendNotSupported(_not_supported_message(fam, name, x, *args))


def _family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}; effvit's families are "
                         f"{', '.join(repr(f) for f in _FAMILIES)}") from None


def explain(family: str, x: torch.Tensor, *args) -> dict[str, list[str]]:
    """For each backend, why it cannot run ``family`` on this input (an empty list: it can)."""
    fam = _family(family)
    return {b: fam.reasons(b, x, *args) for b in ("torch",) + KERNEL_BACKENDS}


def _not_supported_message(fam: Family, name: str, x: torch.Tensor, *args) -> str:
    lines = [f"backend={name!r} cannot run {fam.name} on a {x.dtype} tensor of shape {tuple(x.shape)} "
             f"on {x.device}:"]
    for b, reasons in explain(fam.name, x, *args).items():
        lines.append(f"  {b}: " + ("supported" if not reasons else "; ".join(reasons)))
    lines.append("Use backend='auto' to fall back to a backend that can, or 'torch' for the reference.")
    return "\n".join(lines)
