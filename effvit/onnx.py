"""Export effvit-patched models to standard ONNX, which ONNX Runtime, OpenVINO or any ONNX engine runs without effvit.

    effvit.patch.timm(model)
    effvit.onnx.export(model.eval(), (images,), "model.onnx")      # dynamic batch by default
    session = onnxruntime.InferenceSession("model.onnx")           # no effvit needed from here on

Every forward op of effvit (effvit::<name> of the C++ extension and its Triton twin effvit::triton_<name>) has a
translation into ONNX's standard operators (opset 18) that follows effvit.reference's maths: the fused kernel
becomes the unfused computation it replaces, which the engine runs at its own speed, and the work effvit removes
stays removed (token dropping's dropped tokens stay dropped). ``translation_table()`` is the same table for
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``. The backward ops have no translation
(ONNX graphs are inference graphs); an effvit op without one raises UntranslatableOpError naming it.

Only the batch dimension may be dynamic: the translations read the other sizes (tokens, spatial size, channels)
from the exported program, as the constants that shape their windows, masks and slices. Requires the ``onnx``
extra (onnx, onnxscript; onnxruntime to run the file).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from effvit.reference import window as window_reference

OPSET = 18
_INT64_MAX = 2**63 - 1

try:
    from onnxscript import ir
    from onnxscript import opset18 as op
except ImportError as _error:  # the module imports without the extra; export() says what to install
    ir = op = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None


class UntranslatableOpError(ValueError):
    """The exported program calls an effvit op that has no ONNX translation."""


# ---- helpers on traced values --------------------------------------------------------------------------------

def _acc(value) -> Any:
    """The accumulation dtype of an input, as effvit's kernels use it: float64 for float64, else float32."""
    return ir.DataType.DOUBLE if value.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _cast(value, dtype):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _const(array, dtype):
    """A constant tensor of ``dtype`` (numpy array or nested lists)."""
    return op.Constant(value=ir.tensor(np.asarray(array, dtype=dtype.numpy())))


def _ints(values: Sequence[int]):
    return _const(list(values), ir.DataType.INT64)


def _static_sizes(value, axes: Sequence[int], op_name: str, what: str) -> list[int]:
    """The sizes of ``value`` at ``axes``, which the translation needs as numbers."""
    sizes = []
    for axis in axes:
        size = value.shape[axis] if value.shape is not None else None
        if not isinstance(size, int):
            raise ValueError(f"effvit.onnx: {op_name} needs a static {what} (only the batch dimension may be "
                             f"dynamic), got shape {value.shape}")
        sizes.append(size)
    return sizes


def _slice(value, start: int, end: int, axis: int):
    return op.Slice(value, _ints([start]), _ints([end]), _ints([axis]))


def _pad(value, axis: int, before: int, after: int, rank: int = 4, constant=None):
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = before, after
    return op.Pad(value, _ints(pads)) if constant is None else op.Pad(value, _ints(pads), constant)


def _roll(value, shifts: Sequence[int], axes: Sequence[int], sizes: Sequence[int]):
    """torch.roll on axes of known sizes: out[i] = value[(i - shift) mod size]."""
    for shift, axis, size in zip(shifts, axes, sizes):
        k = shift % size
        if k:
            value = op.Concat(_slice(value, size - k, size, axis), _slice(value, 0, size - k, axis), axis=axis)
    return value


def _pick(value, index: int):
    """value[index] along axis 0 (the axis is removed)."""
    return op.Gather(value, _const(index, ir.DataType.INT64), axis=0)


# ---- window attention (Swin; the Hi-Fi half of HiLo) -------------------------------------------------------

def _reverse_and_crop(windows, window, shift, H: int, W: int, Hp: int, Wp: int, channels: int):
    """[B * nW, wh * ww, channels] windows -> [B, H, W, channels]: window_reverse, crop, roll back."""
    wh, ww = window
    x = op.Reshape(windows, _ints([-1, Hp // wh, Wp // ww, wh, ww, channels]))
    x = op.Reshape(op.Transpose(x, perm=[0, 1, 3, 2, 4, 5]), _ints([-1, Hp, Wp, channels]))
    if Hp > H or Wp > W:
        x = op.Slice(x, _ints([0, 0]), _ints([H, W]), _ints([1, 2]))
    return _roll(x, shift, (1, 2), (H, W))


def window_attention(qkv, bias_table, pad_qkv, num_heads: int, window: Sequence[int], shift: Sequence[int],
                     scale: float):
    """effvit::window_attention: roll by -shift, pad to whole windows (padding tokens' qkv = pad_qkv), partition,
    softmax(q * scale @ k^T + bias + shift mask) @ v, reverse, crop, roll back (effvit.reference.window)."""
    H, W, C3 = _static_sizes(qkv, (1, 2, 3), "window_attention", "qkv height, width and channels")
    acc = _acc(qkv)
    window, shift = tuple(window), tuple(shift)
    wh, ww = window
    n, C = wh * ww, C3 // 3
    Hp, Wp = window_reference.padded_size(H, W, window)
    x = _roll(_cast(qkv, acc), (-shift[0], -shift[1]), (1, 2), (H, W))
    if Hp > H or Wp > W:
        x = op.Pad(x, _ints([0, 0, 0, 0, 0, Hp - H, Wp - W, 0]))
        if pad_qkv is not None:
            filled = np.zeros((1, Hp, Wp, 1), dtype=bool)
            filled[:, H:] = filled[:, :, W:] = True
            x = op.Where(_const(filled, ir.DataType.BOOL), _cast(pad_qkv, acc), x)
    x = op.Reshape(x, _ints([-1, Hp // wh, wh, Wp // ww, ww, C3]))
    x = op.Reshape(op.Transpose(x, perm=[0, 1, 3, 2, 4, 5]), _ints([-1, n, 3, num_heads, C // num_heads]))
    qkv_heads = op.Transpose(x, perm=[2, 0, 3, 1, 4])                       # [3, B * nW, heads, n, D]
    q, k, v = _pick(qkv_heads, 0), _pick(qkv_heads, 1), _pick(qkv_heads, 2)
    logits = op.MatMul(op.Mul(q, _const(scale, acc)), op.Transpose(k, perm=[0, 1, 3, 2]))
    if bias_table is not None:
        index = window_reference.relative_position_index(wh, ww).reshape(-1).numpy()
        bias = op.Reshape(op.Gather(_cast(bias_table, acc), _const(index, ir.DataType.INT64), axis=0),
                          _ints([n, n, num_heads]))
        logits = op.Add(logits, op.Transpose(bias, perm=[2, 0, 1]))
    if any(shift):
        mask = window_reference.shift_region_mask(Hp, Wp, window, shift, dtype=torch.float64).numpy()
        windows = mask.shape[0]
        logits = op.Add(op.Reshape(logits, _ints([-1, windows, num_heads, n, n])),
                        _const(mask.reshape(1, windows, 1, n, n), acc))
        logits = op.Reshape(logits, _ints([-1, num_heads, n, n]))
    out = op.MatMul(op.Softmax(logits, axis=-1), v)                          # [B * nW, heads, n, D]
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), _ints([-1, n, C]))
    out = _reverse_and_crop(out, window, shift, H, W, Hp, Wp, C)
    lse = op.Transpose(op.ReduceLogSumExp(logits, _ints([-1]), keepdims=0), perm=[0, 2, 1])
    lse = _reverse_and_crop(lse, window, shift, H, W, Hp, Wp, num_heads)
    return _cast(out, qkv.dtype), op.Transpose(lse, perm=[0, 3, 1, 2])


# ---- Lo-Fi attention (HiLo) ------------------------------------------------------------------------------------

def lofi_attention(q, kv, num_heads: int, scale: float):
    """effvit::lofi_attention: softmax((q @ k^T) * scale) @ v per head, every query to every pooled key
    (effvit.reference.hilo.lofi_attention)."""
    (C,) = _static_sizes(q, (2,), "lofi_attention", "channel count")
    acc = _acc(q)
    D = C // num_heads
    q4 = op.Transpose(op.Reshape(_cast(q, acc), _ints([0, 0, num_heads, D])), perm=[0, 2, 1, 3])
    kv5 = op.Transpose(op.Reshape(_cast(kv, acc), _ints([0, 0, 2, num_heads, D])), perm=[2, 0, 3, 1, 4])
    k, v = _pick(kv5, 0), _pick(kv5, 1)
    logits = op.Mul(op.MatMul(q4, op.Transpose(k, perm=[0, 1, 3, 2])), _const(scale, acc))
    out = op.MatMul(op.Softmax(logits, axis=-1), v)
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), _ints([0, 0, C]))
    return _cast(out, q.dtype), op.ReduceLogSumExp(logits, _ints([-1]), keepdims=0)


# ---- linear attention (EfficientViT's LiteMLA, L2ViT) ------------------------------------------------------

def _feature_map(x, name: str, acc):
    if name == "relu":
        return op.Relu(x)
    if name == "elu+1":
        return op.Add(op.Elu(x), _const(1.0, acc))
    if name == "identity":
        return x
    raise ValueError(f"effvit.onnx: linear_attention's feature_map must be 'relu', 'elu+1' or 'identity', got "
                     f"{name!r}")


def linear_attention(q, k, v, temperature, feature_map: str, q_scale: float, k_scale: float, eps: float,
                     denom_min: float):
    """effvit::linear_attention: out = t * (a S) / max(a . z + eps, denom_min) with a = phi(q * q_scale),
    b = phi(k * k_scale), state = b^T [v, 1] = [S, z] (effvit.reference.linear, EfficientViT's ones column)."""
    acc = _acc(q)
    a = _feature_map(op.Mul(_cast(q, acc), _const(q_scale, acc)), feature_map, acc)
    b = _feature_map(op.Mul(_cast(k, acc), _const(k_scale, acc)), feature_map, acc)
    (value_dim,) = _static_sizes(v, (3,), "linear_attention", "value head dimension")
    v_ones = _pad(_cast(v, acc), 3, 0, 1, constant=_const(1.0, acc))
    state = op.MatMul(op.Transpose(b, perm=[0, 1, 3, 2]), v_ones)         # [B, H, D, Dv + 1]
    num_den = op.MatMul(a, state)                                          # [B, H, N, Dv + 1]
    den = op.Add(_slice(num_den, value_dim, value_dim + 1, 3), _const(eps, acc))
    if not (math.isinf(denom_min) or denom_min <= -torch.finfo(torch.float32).max):  # effvit's "no clamp"
        den = op.Max(den, _const(denom_min, acc))
    out = op.Div(_slice(num_den, 0, value_dim, 3), den)
    if temperature is not None:
        out = op.Mul(out, op.Reshape(_cast(temperature, acc), _ints([1, -1, 1, 1])))
    return _cast(out, q.dtype), state


# ---- token dropping (EViT) -------------------------------------------------------------------------------------

def cls_attention_scores(q, k, scale: float, num_prefix: int):
    """effvit::cls_attention_scores: the CLS row of softmax((q @ k^T) * scale), averaged over heads, at the
    non-prefix keys (effvit.reference.token_drop.cls_attention_scores); and each head's log-sum-exp."""
    acc = _acc(q)
    logits = op.Mul(op.MatMul(op.Unsqueeze(_cast(q, acc), _ints([2])),
                              op.Transpose(_cast(k, acc), perm=[0, 1, 3, 2])), _const(scale, acc))   # [B, H, 1, N]
    scores = op.ReduceMean(op.Softmax(logits, axis=-1), _ints([1, 2]), keepdims=0)                # [B, N]
    return _slice(scores, num_prefix, _INT64_MAX, 1), op.ReduceLogSumExp(logits, _ints([2, 3]), keepdims=0)


def drop_tokens(x, scores, keep: int, num_prefix: int, fuse: bool, spatial_order: bool):
    """effvit::drop_tokens: the prefix tokens, the ``keep`` best-scored tokens (score order, ties to the lower
    position; or image order) and with ``fuse`` the dropped tokens summed with their scores as weights
    (effvit.reference.token_drop.drop_tokens)."""
    acc = _acc(x)
    rest = _slice(x, num_prefix, _INT64_MAX, 1)
    _, index = op.TopK(scores, _ints([keep]), axis=1, largest=1, sorted=1)
    if spatial_order:
        index, _ = op.TopK(index, _ints([keep]), axis=1, largest=0, sorted=1)
    parts = [_slice(x, 0, num_prefix, 1), op.GatherND(rest, op.Unsqueeze(index, _ints([2])), batch_dims=1)]
    if fuse:
        # the kept tokens' weights zeroed: a weighted sum over exactly the dropped tokens
        weights = _cast(scores, acc)
        zeros = op.ConstantOfShape(op.Shape(index), value=ir.tensor(np.zeros(1, dtype=acc.numpy())))
        weights = op.ScatterElements(weights, index, zeros, axis=1)
        fused = op.MatMul(op.Unsqueeze(weights, _ints([1])), _cast(rest, acc))
        parts.append(_cast(fused, x.dtype))
    return op.Concat(*parts, axis=1), index


# ---- shift (ShiftViT) --------------------------------------------------------------------------------------------

def _axes(nhwc: bool) -> tuple[int, int, int]:
    """(channel, height, width) axes."""
    return (3, 1, 2) if nhwc else (1, 2, 3)


def shift(x, n_div: int, nhwc: bool = False, reverse: bool = False):
    """effvit::shift: ShiftViT's shift_feat; groups of C // n_div channels move one pixel left, right, up, down
    (each the other way with reverse) with zero fill, the rest is copied (effvit.reference.shift)."""
    channel, height, width = _axes(nhwc)
    (C,) = _static_sizes(x, (channel,), "shift", "channel count")
    g = C // n_div
    sign = -1 if reverse else 1
    parts = []
    for i, (axis, direction) in enumerate(((width, -1), (width, 1), (height, -1), (height, 1))):
        group = _slice(x, i * g, (i + 1) * g, channel)
        if direction * sign < 0:   # towards index 0: out[j] = x[j + 1], zero at the end
            parts.append(_pad(_slice(group, 1, _INT64_MAX, axis), axis, 0, 1))
        else:                      # out[j] = x[j - 1], zero at the start
            parts.append(_pad(_slice(group, 0, -1, axis), axis, 1, 0))
    if 4 * g < C:
        parts.append(_slice(x, 4 * g, C, channel))
    return op.Concat(*parts, axis=channel)


def shift_group_norm(x, n_div: int, weight, bias, eps: float, nhwc: bool = False):
    """effvit::shift_group_norm: (shifted, GroupNorm(1, C)(shifted), mean [B], rstd [B])."""
    channel = _axes(nhwc)[0]
    acc = _acc(x)
    shifted = shift(x, n_div, nhwc)
    s = _cast(shifted, acc)
    all_axes = _ints([1, 2, 3])
    mean = op.ReduceMean(s, all_axes, keepdims=1)
    centred = op.Sub(s, mean)
    var = op.ReduceMean(op.Mul(centred, centred), all_axes, keepdims=1)
    rstd = op.Reciprocal(op.Sqrt(op.Add(var, _const(eps, acc))))
    per_channel = _ints([1, -1, 1, 1] if channel == 1 else [1, 1, 1, -1])
    normalized = op.Add(op.Mul(op.Mul(centred, rstd), op.Reshape(_cast(weight, acc), per_channel)),
                        op.Reshape(_cast(bias, acc), per_channel))
    return (shifted, _cast(normalized, x.dtype), op.Reshape(mean, _ints([-1])), op.Reshape(rstd, _ints([-1])))


# ---- the table and the export call -------------------------------------------------------------------------------

TRANSLATIONS: dict[str, Callable] = {
    "window_attention": window_attention,
    "lofi_attention": lofi_attention,
    "linear_attention": linear_attention,
    "cls_attention_scores": cls_attention_scores,
    "drop_tokens": drop_tokens,
    "shift": shift,
    "shift_group_norm": shift_group_norm,
}


def _require_onnx() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("effvit.onnx needs onnx and onnxscript: pip install 'effvit[onnx]' (or pip install onnx "
                          "onnxscript onnxruntime)") from _IMPORT_ERROR


def translation_table() -> dict:
    """{effvit op overload: its ONNX translation} for every registered effvit forward op (C++ and Triton), to pass
    as torch.onnx.export(..., dynamo=True, custom_translation_table=effvit.onnx.translation_table())."""
    _require_onnx()
    table = {}
    for name, translation in TRANSLATIONS.items():
        for registered in (name, f"triton_{name}"):
            if hasattr(torch.ops.effvit, registered):
                table[getattr(torch.ops.effvit, registered).default] = translation
    return table


def effvit_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The names of the effvit ops an exported program calls ("effvit::window_attention", ...), sorted."""
    return sorted({node.target.name() for node in program.graph.nodes
                   if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                   and node.target.namespace == "effvit"})


def check_translatable(program: torch.export.ExportedProgram) -> None:
    """Raises UntranslatableOpError naming every effvit op in ``program`` that has no ONNX translation."""
    known = {f"effvit::{prefix}{name}" for name in TRANSLATIONS for prefix in ("", "triton_")}
    missing = [name for name in effvit_ops(program) if name not in known]
    if missing:
        raise UntranslatableOpError(
            f"effvit.onnx has no ONNX translation for {', '.join(missing)} (translated: "
            f"{', '.join(sorted(TRANSLATIONS))}). Backward ops appear when the program records a training step: "
            "export the model in eval mode for inference; for another op, unpatch the modules that call it "
            "(effvit.unpatch) or set backend='torch' on them, so they export as plain PyTorch.")


def export(model: torch.nn.Module | torch.export.ExportedProgram, args: tuple, path=None, dynamic_batch: bool = True,
           opset_version: int = OPSET, **onnx_kwargs):
    """Exports ``model`` (effvit-patched or not) to ONNX through torch.export and torch.onnx's dynamo exporter,
    each effvit op written out in standard ONNX operators.

    Args:
        model: an nn.Module (put it in eval mode first) or an ExportedProgram (then ``dynamic_batch`` is ignored:
            the program's own dynamic shapes hold).
        args: the example inputs, a tuple (e.g. ``(images,)``).
        path: where to write the .onnx file (None: not written; the returned program has ``.save(path)``).
        dynamic_batch: the first dimension of every tensor in ``args`` is one dynamic batch size ("batch").
        opset_version: the ONNX opset (>= 18, the opset of the translations).
        onnx_kwargs: passed on to torch.onnx.export (input_names, output_names, optimize, ...).

    Returns:
        The torch.onnx.ONNXProgram (``.model_proto``, ``.save(path)``, callable with numpy-like inputs).

    Raises:
        UntranslatableOpError: the model calls an effvit op that has no translation (the message names it).
    """
    _require_onnx()
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of the model's example inputs, e.g. (images,), got "
                        f"{type(args).__name__}")
    if opset_version < OPSET:
        raise ValueError(f"opset_version must be >= {OPSET} (the opset effvit's translations use), got "
                         f"{opset_version}")
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    check_translatable(program)
    onnx_program = torch.onnx.export(program, args, dynamo=True, custom_translation_table=translation_table(),
                                     opset_version=opset_version, **onnx_kwargs)
    if path is not None:
        onnx_program.save(path)
    return onnx_program
