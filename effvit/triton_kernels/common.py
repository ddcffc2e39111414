"""Triton helpers the families' kernels and launchers share (window.py, hilo.py, shift.py).

Kernels: ``to_acc`` (loaded values to the accumulation type), ``matmul`` (a @ b as the attention kernels
multiply: tl.dot, or a broadcast-multiply-sum for float64 when FP64_TL_DOT is False, bf16 emulated under the
interpreter), ``acc_scale`` (the softmax scale back from its fp32 hi + lo split), NEG_FILL (the finite
logit of masked keys) and ``real_max`` / ``softmax_out`` (what a row of -inf logits gives). Launchers: ``acc_dtypes``, ``on_device``, ``sm_count``, ``dot_config`` (the DOT /
PREC / EMULATE / FMA constexprs that ``matmul`` takes), ``split_scale``, and ``cdiv`` / ``next_power_of_2``
(plain-Python launch arithmetic).

FP64_TL_DOT is the one switch for every family's float64 matmuls: set ``common.FP64_TL_DOT = False`` (read
by ``dot_config`` at each launch) should a GPU's tl.dot reject float64.
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

# (tl.constexpr: compiled kernels may only read globals that are)
NEG_FILL = tl.constexpr(-1.0e30)   # logit of masked key lanes: exp() underflows to 0, and it is finite, so a
                                   # max or difference of such values is never NaN (-inf - -inf is)
FP64_TL_DOT = True    # float64 matmuls by tl.dot; False: broadcast-multiply-sum fallback

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def real_max(running, s, valid):
    """The running max of a row's logits over its real keys (``valid``), -inf while there are none."""
    return tl.maximum(running, tl.max(tl.where(valid, s, float("-inf")), axis=1))


@triton.jit
def softmax_out(acc, l, mx, rmax):
    """(softmax @ V rows, log-sum-exp) from the online softmax's sums. A row whose every real logit is -inf has a
    NaN softmax and a -inf log-sum-exp, as torch's: the NEG_FILL lanes must not become its probabilities."""
    none = rmax == float("-inf")
    o = tl.where(none[:, None], float("nan"), acc / l[:, None])
    return o, tl.where(none, float("-inf"), mx + tl.log(l))


@triton.jit
def to_acc(v, ACC: tl.constexpr):
    """Converts loaded values to the accumulation type (bf16 via fp32: the interpreter has no bf16 maths)."""
    if v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(ACC)


@triton.jit
def matmul(a, b, PREC: tl.constexpr, EMULATE: tl.constexpr, FMA: tl.constexpr):
    """a @ b with a and b in the dot dtype; the result in float32 (float64 for float64 operands)."""
    if EMULATE:  # bf16 under the interpreter: bf16-rounded operands, fp32 products and sums
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FMA:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def acc_scale(scale_hi, scale_lo, ACC: tl.constexpr):
    # Python floats reach a kernel as fp32; float64 gets the scale back from a hi + lo split.
    if ACC == tl.float64:
        return tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
    else:
        return scale_hi


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions: a call
    from Python unwraps its arguments and costs ~5 µs, and the launchers made ten of them a call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1, without its cost."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtypes(dtype: torch.dtype):
    """(triton, torch) accumulation dtypes: float64 for float64, else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


CPU_SMS = 2   # SM count the chunking assumes for CPU tensors (TRITON_INTERPRET=1), so small tests get chunks
_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (CPU_SMS for CPU tensors), read once per device: the properties query
    costs microseconds of host time on every launch otherwise."""
    if device.type != "cuda":
        return CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_config(dtype: torch.dtype, is_cuda: bool) -> dict:
    """The constexprs of ``matmul`` (and DOT, the dtype its operands are cast to) for inputs of dtype."""
    return dict(DOT=_TL_DTYPES[dtype],
                PREC="ieee" if dtype in (torch.float32, torch.float64) else "tf32",  # tf32 is ignored for 16-bit
                EMULATE=dtype == torch.bfloat16 and not is_cuda,
                FMA=dtype == torch.float64 and not FP64_TL_DOT)


def split_scale(scale: float) -> tuple[float, float]:
    """(hi, lo): hi the fp32 rounding of scale, lo the rest (see acc_scale); beyond fp32's range (or inf) hi is
    the infinity and lo 0 (inf - inf would make it nan)."""
    try:
        hi = struct.unpack("f", struct.pack("f", scale))[0]
    except OverflowError:  # beyond fp32's range
        return math.copysign(math.inf, scale), 0.0
    return (hi, 0.0) if math.isinf(hi) else (hi, scale - hi)
