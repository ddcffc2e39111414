"""Public functional API: one module per family, each with its autograd.Function and op registration."""

from effvit.ops.shift import shift, shift_group_norm

__all__ = ["shift", "shift_group_norm"]
