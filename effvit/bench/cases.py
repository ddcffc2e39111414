"""What the benchmark times: cases (an op at a shape, dtype, device and direction) and, for each, the
implementations to compare: effvit's kernel backends and the peers (the eager reference, that is the
official code, and torch.compile of it).

A family adds itself with ``register_suite(family, builder)``; the builder yields ``Case``s for the
shapes and settings asked for.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from effvit import backends
from effvit.bench import engines

# An implementation: a builder that returns the step to time, step(*inputs), which runs the forward
# (or the forward and backward) and returns nothing. Building may compile (torch.compile peers).
ImplFactory = Callable[[], Callable[..., None]]


@dataclass
class Case:
    family: str
    op: str
    params: dict                  # shape and settings, e.g. {"B": 1, "C": 96, "H": 56, "W": 56, "n_div": 12}
    dtype: torch.dtype
    device: str
    direction: str                # "fwd" | "fwd+bwd"
    make_inputs: Callable[[], tuple]
    impls: dict[str, ImplFactory]         # name -> builder; names: "effvit:<backend>", "eager", "compile"
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not timed
    bytes: float = 0.0            # minimum memory traffic of one step
    flops: float = 0.0
    input_bytes: int = 0
    title: str | None = None      # what a reader calls the case where params do not say it (a model's full name)
    other_designs: tuple[str, ...] = ()  # impls computing something else (another attention), shown for context

    @property
    def shape(self) -> str:
        return " ".join(f"{k}{v}" for k, v in self.params.items())

    @property
    def key(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.family}/{self.op} {self.shape} {dt} {self.device} {self.direction}"


@dataclass
class SuiteOptions:
    device: str = "cpu"
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    batches: tuple[int, ...] | None = None          # None: the suite's own
    shapes: tuple[str, ...] | None = None           # None: the suite's own; else names from the suite
    directions: tuple[str, ...] = ("fwd",)
    backends: tuple[str, ...] | None = None         # None: every kernel backend that can run
    peers: bool = True
    quick: bool = False


SuiteBuilder = Callable[[SuiteOptions], Iterator[Case]]
_SUITES: dict[str, SuiteBuilder] = {}
_SHAPES: dict[str, dict[str, dict]] = {}


def register_suite(family: str, builder: SuiteBuilder, shapes: dict[str, dict]) -> None:
    _SUITES[family] = builder
    _SHAPES[family] = shapes


def suites() -> dict[str, SuiteBuilder]:
    _load_families()
    return dict(_SUITES)


def shapes(family: str) -> dict[str, dict]:
    _load_families()
    return dict(_SHAPES[family])


def _load_families() -> None:
    # every family's module, whatever was imported before (a suite module imported alone registers only itself)
    from effvit.bench import hilo_suite, linear_suite, shift_suite, token_drop_suite, window_suite  # noqa: F401


def kernel_impls(family: str, x: torch.Tensor, wanted: tuple[str, ...] | None, factory,
                 args: tuple = ()) -> tuple[dict, dict]:
    """effvit's backends for a case: the ones that can run it, and why the others are skipped
    (``args``: what the family's capability checks read after ``x``)."""
    fam = backends.families()[family]
    impls, skipped = {}, {}
    for name in backends.KERNEL_BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        reasons = fam.reasons(name, x, *args)
        if name == "triton" and x.device.type == "cpu" and not reasons:
            reasons = ["the Triton interpreter on CPU is for tests, not timing"]
        if reasons:
            skipped[f"effvit:{name}"] = "; ".join(reasons)
        else:
            impls[f"effvit:{name}"] = factory(name)
    return impls, skipped


def compile_unavailable() -> str | None:
    """Why torch.compile cannot be a peer on this install, or None. Only looked up: importing inductor takes
    seconds, so the compiling waits for the timing (``effvit-bench --list`` stays quick)."""
    if importlib.util.find_spec("torch._inductor") is None:  # pragma: no cover - depends on the install
        return "torch.compile unavailable: this torch has no torch._inductor"
    return None


def timm_unavailable() -> str | None:
    """Why the timm model and block cases cannot run on this install, or None (looked up, not imported)."""
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (pip install timm)"
    return None


def compiled(fn: Callable) -> Callable:
    """torch.compile of a peer, at static shapes, through a function with a code object of its own.

    Dynamo keeps what it compiled on the code object of the frame it traces, and past
    ``torch._dynamo.config.recompile_limit`` (8) entries it runs that code eagerly, with one log warning. A suite
    compiles the same peer function once per case (its own shapes, its grad mode), so from the ninth case on its
    "compile" timings were eager ones. ``fn`` (a function, bound method or module) is called from, and inlined
    into, a fresh frame per case: each case's compile holds only its own entries, and a call checks only its
    own guards. fullgraph=True keeps it so: a graph break would compile ``fn``'s own, shared code after all, so
    a peer that cannot trace whole is reported as an error rather than timed part eagerly (every suite's peers
    trace whole)."""
    def peer(*args, **kwargs):
        return fn(*args, **kwargs)
    own = types.FunctionType(peer.__code__.replace(), peer.__globals__, "compiled_peer", None, peer.__closure__)
    return torch.compile(own, dynamic=False, fullgraph=True)


def add_compile_peer(impls: dict, skipped: dict, fn: Callable, builder: Callable) -> None:
    """torch.compile of ``fn`` as the case's "compile" peer (timed through ``builder``), or why it is skipped."""
    why = compile_unavailable()
    if why:
        skipped["compile"] = why
    else:
        impls["compile"] = lambda: builder(compiled(fn))()


def with_backward(forward: Callable[..., tuple], grads: tuple) -> Callable[..., None]:
    """A step that runs forward, then backward with fixed output gradients to the inputs that require
    them (autograd.grad: nothing accumulates in .grad across repeats)."""
    def step(*inputs):
        outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads[:len(outs)], allow_unused=True)
    return step


def timed_step(fn: Callable, backward: bool, shape, device, dtype, n_outputs: int = 1) -> Callable[..., None]:
    """The function to time: fn under no_grad, or fn and its backward with fixed gradients (of ``shape``)
    for its ``n_outputs`` outputs."""
    if not backward:
        def forward_only(*inputs):
            with torch.no_grad():
                fn(*inputs)
        return forward_only
    grads = tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(n_outputs))
    return with_backward(fn, grads)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def timm_model_case(family: str, B: int, model_name: str, img: int, gflops: float, dtype, opts: SuiteOptions,
                    direction: str, probe_shape: tuple, probe_args: tuple = (), patch_kwargs: dict | None = None,
                    extra_peers: dict[str, Callable] | None = None, extra_skipped: dict | None = None,
                    params: dict | None = None, title: str | None = None) -> Case:
    """Images/s of timm's ``model_name`` (random weights) patched by effvit.patch.timm(**patch_kwargs) with each
    backend, against the unpatched model ("eager") and, on CPU, both models exported into ONNX engines
    (effvit.bench.engines). ``probe_shape`` / ``probe_args``: what the family's capability checks read;
    ``extra_peers``: more peers, {name: fn(model, images)}; gflops: the unpatched forward's. The model is made when
    the first implementation is built, not when the case is listed. ``title``: the case's name in reports (default
    ``model_name``)."""
    device, backward = opts.device, direction == "fwd+bwd"
    impls, skipped = {}, {}

    def make_inputs():
        return (torch.randn((B, 3, img, img), device=device, dtype=dtype).requires_grad_(backward),)

    @functools.cache
    def model():
        import timm

        return timm.create_model(model_name, pretrained=False).to(device=device, dtype=dtype).eval()

    def step(fn_of_model):
        return lambda: timed_step(fn_of_model(model()), backward, (B, 1000), device, dtype)

    def patch(m, backend=None):
        import effvit

        return effvit.patch.timm(copy.deepcopy(m), backend=backend, **(patch_kwargs or {}))

    why = timm_unavailable()
    if why:
        skipped["all"] = why
    else:
        def patched(backend):
            return step(functools.partial(patch, backend=backend))

        impls, skipped = kernel_impls(family, torch.empty(probe_shape, device=device, dtype=dtype), opts.backends,
                                      patched, args=probe_args)
        if opts.peers:
            impls["eager"] = step(lambda m: m)
            for name, fn in (extra_peers or {}).items():
                impls[name] = step(lambda m, fn=fn: functools.partial(fn, m))
            skipped["compile"] = "torch.compile of the whole model is left out (minutes of compilation)"
            skipped.update(extra_skipped or {})
            engines.add_engine_peers(
                impls, skipped, {"": model, "effvit:": lambda: patch(model())},
                lambda run: lambda: timed_step(run(), backward, (B, 1000), device, dtype),
                lambda: make_inputs()[0], device, dtype, direction)
    return Case(family=family, op="model", params=params or {"B": B, "model": model_name, "img": img}, dtype=dtype,
                device=device, direction=direction, make_inputs=make_inputs, impls=impls, skipped=skipped, bytes=0.0,
                flops=gflops * 1e9 * B * (3 if backward else 1), input_bytes=B * 3 * img * img * element_size(dtype),
                title=title or model_name)


__all__ = ["Case", "SuiteOptions", "register_suite", "suites", "shapes", "kernel_impls", "compile_unavailable",
           "compiled", "add_compile_peer", "with_backward", "timed_step", "element_size", "timm_model_case"]
