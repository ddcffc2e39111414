"""One module per family: op registration (fakes, Triton custom ops), the autograd.Functions and the
public functions, which the top-level package re-exports (effvit.shift is effvit.ops.shift.shift)."""
