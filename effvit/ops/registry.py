"""What every family's ops module does the same way: register the fake kernels of its C++ and Triton ops, look
up each kernel backend's registered ops once, decide when a call needs its autograd.Function, give TorchScript
the C++ ops, and mark backwards that have no derivative of their own."""

from __future__ import annotations

import functools
import typing
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from effvit import _extension


def _has_cpp_ops(ops: tuple[str, ...]) -> bool:
    return _extension.available() and all(hasattr(torch.ops.effvit, name) for name in ops)


def register_fakes(ops: tuple[str, ...], fakes: dict[str, Callable], triton: bool) -> None:
    """fakes[name] as the fake kernel of effvit::<name> (when the extension has it) and of effvit::triton_<name>
    (when the family's Triton custom ops are defined)."""
    if _has_cpp_ops(ops):
        for name in ops:
            torch.library.register_fake(f"effvit::{name}")(fakes[name])
    if triton:
        for name in ops:
            torch.library.register_fake(f"effvit::triton_{name}")(fakes[name])


def needs_autograd(*tensors) -> bool:
    """Whether a call must go through its family's autograd.Function: grad mode is on and an input requires grad.

    Never under torch.jit.trace: the trace records the C++ op itself, a graph that can be saved and runs the fused
    kernel (a traced autograd.Function is a Python call that cannot be exported, and the trace's own check
    re-traces under no_grad, so recording it would also fail that check). A traced module is for inference: its
    graph holds no backward of the op."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and not torch.jit.is_tracing())


def script_kernel(fn: Callable, ops: tuple[str, ...], fallback: Callable | None = None) -> Callable:
    """``fn``, a function that calls effvit::<op> for each of ``ops`` directly (what TorchScript can call), when the
    extension has the ops. Without them: ``fallback`` (a scriptable function taking the same arguments, e.g. the
    reference), else ``fn`` marked torch.jit.unused, so that TorchScript still compiles its callers and a call
    raises."""
    if _has_cpp_ops(ops):
        return fn
    if fallback is not None:
        return fallback
    # TorchScript types an unused function's stub from its annotations as objects, not the strings that
    # `from __future__ import annotations` leaves
    fn.__annotations__ = typing.get_type_hints(fn)
    return torch.jit.unused(fn)


def _eager_fast_path(launcher: Callable, op: Callable) -> Callable:
    """The Triton launcher itself on plain tensors in plain eager mode, the registered custom op wherever torch
    records or transforms calls (torch.compile, fake and functional tensors, dispatch modes such as
    FlopCounterMode or selective checkpointing, torch.jit.trace, vmap / grad, tensor subclasses). The op's Python
    dispatch costs 10-25 µs a call, as much as a small kernel's whole GPU time; the launcher computes the same
    thing (the op's body is that call)."""
    def call(*args):
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
                or torch._C._are_functorch_transforms_active()
                or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)):
            return op(*args)
        return launcher(*args)

    return call


def resolve_ops(ops: tuple[str, ...], triton_module=None) -> dict[str, dict]:
    """The kernels of each kernel backend, looked up once ("cpu" and "cuda" share the C++ op; calling .default
    skips the packet's overload resolution, a microsecond a call). triton_module: the family's launchers
    (effvit.triton_kernels.<family>, one function per op, named as the op), or None without Triton."""
    table: dict[str, dict] = {}
    if _has_cpp_ops(ops):
        table["cpu"] = table["cuda"] = {name: getattr(torch.ops.effvit, name).default for name in ops}
    if triton_module is not None:
        table["triton"] = {name: _eager_fast_path(getattr(triton_module, name),
                                                  getattr(torch.ops.effvit, f"triton_{name}").default)
                           for name in ops}
    return table


def first_order_only(op_name: str) -> Callable:
    """Decorates an autograd.Function's backward that is not itself differentiable. Under create_graph=True its
    gradients carry a node that raises, naming the op, when they are differentiated again: a second derivative
    raises rather than coming back None or zero. (torch's once_differentiable skips that node when the incoming
    gradients do not require grad, as after ``y.sum()``.)"""
    message = (f"effvit's {op_name} has no second derivative (its backward kernel is not differentiable); "
               "compute it with backend='torch' (the reference)").encode()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            tensors = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            # the node also takes the saved inputs (or outputs) that require grad, so that it lies on the path from
            # the gradients back to the inputs and a second derivative runs into it
            anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            if not tensors or not anchors:
                return grads[0] if single else grads
            raising = torch._C._functions.DelayedError(message, len(tensors) + len(anchors))(
                *[grads[i].detach().requires_grad_() for i in tensors], *anchors)
            out = list(grads)
            for i, g in zip(tensors, raising):
                out[i] = g
            return out[0] if single else tuple(out)

        return wrapper

    return decorate
