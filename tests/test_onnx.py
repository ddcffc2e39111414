"""effvit.onnx: every effvit forward op written out in standard ONNX, run by ONNX Runtime (and OpenVINO when
installed) without effvit, against effvit's kernels in eager; patched timm models exported whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effvit
from effvit.ops import hilo as hilo_ops
from effvit.ops import linear as linear_ops
from effvit.ops import shift as shift_ops
from effvit.ops import token_drop as token_drop_ops
from effvit.ops import window as window_ops

from conftest import kernel_backends, requires_ext
from deploy_models import FULL, SMALL, VIT_DROP_SMALL, build, images

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
import effvit.onnx  # noqa: E402

pytestmark = requires_ext

# ONNX Runtime's float32 kernels (MatMul blocking, Softmax) round differently from effvit's: max |diff| over
# max(1, max |eager|)
TOLERANCE = 1e-4


def onnx_error(out: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    assert out.shape == expected.shape and out.dtype == expected.dtype, (out.shape, out.dtype, expected.shape)
    if out.dtype == np.int64:
        return float((out != expected).sum())
    return float(np.abs(out.astype(np.float64) - expected).max() / max(1.0, np.abs(expected).max()))


def session(program):
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run_session(sess, inputs):
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})


def assert_standard_onnx(program) -> None:
    """Only standard ONNX operators: nothing of effvit (or of torch) is left for the engine to resolve."""
    proto = program.model_proto
    assert not proto.functions
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}


# ---- each op, with every output it returns -------------------------------------------------------------------

class OpModule(torch.nn.Module):
    """Calls one effvit op on its tensor inputs (the batch-first arguments) plus fixed parameters."""

    def __init__(self, call, params=()):
        super().__init__()
        self.call = call
        self.params = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])

    def forward(self, a, b=None, c=None):
        return self.call(*(t for t in (a, b, c) if t is not None), *self.params)


def cpu_op(ops_module, name):
    return ops_module.op("cpu", name)


def window_case():
    """Swin's shifted window over a map that is not a multiple of the window: padding tokens (their qkv is the
    qkv bias) share shift regions with real tokens in both dimensions."""
    C, heads = 32, 4
    table, pad = torch.randn(13 * 13, heads) * 0.5, torch.randn(3 * C)
    call = lambda qkv, t, p: cpu_op(window_ops, "window_attention")(qkv, t, p, heads, [7, 7], [3, 3], 0.25)
    return call, lambda b: (torch.randn(b, 9, 12, 3 * C),), (table, pad)


def window_noshift_case():
    """Unshifted, non-square windows without a bias table, zero padding tokens."""
    call = lambda qkv: cpu_op(window_ops, "window_attention")(qkv, None, None, 2, [2, 3], [0, 0], 0.5)
    return call, lambda b: (torch.randn(b, 5, 7, 3 * 16),), ()


def lofi_case():
    call = lambda q, kv: cpu_op(hilo_ops, "lofi_attention")(q, kv, 4, 0.3)
    return call, lambda b: (torch.randn(b, 50, 64), torch.randn(b, 13, 128)), ()


def linear_case(feature_map, temperature, denom_min, q_scale=1.0, eps=1e-5):
    params = (torch.rand(4) + 0.5,) if temperature else ()
    call = lambda q, k, v, *t: cpu_op(linear_ops, "linear_attention")(
        q, k, v, t[0] if t else None, feature_map, q_scale, 0.7, eps, denom_min)
    return call, lambda b: (torch.randn(b, 4, 40, 16), torch.randn(b, 4, 40, 16), torch.randn(b, 4, 40, 24)), params


def cls_scores_case():
    call = lambda q, k: cpu_op(token_drop_ops, "cls_attention_scores")(q, k, 0.4, 2)
    return call, lambda b: (torch.randn(b, 6, 16), torch.randn(b, 6, 50, 16)), ()


def drop_case(fuse, spatial_order):
    call = lambda x, s: cpu_op(token_drop_ops, "drop_tokens")(x, s, 30, 1, fuse, spatial_order)
    return call, lambda b: (torch.randn(b, 50, 24), torch.rand(b, 49)), ()


def shift_case(nhwc, reverse):
    call = lambda x: cpu_op(shift_ops, "shift")(x, 8, nhwc, reverse)
    return call, lambda b: (torch.randn(b, 7, 9, 28) if nhwc else torch.randn(b, 28, 7, 9),), ()


def shift_group_norm_case(nhwc):
    call = lambda x, w, b: cpu_op(shift_ops, "shift_group_norm")(x, 8, w, b, 1e-5, nhwc)
    return call, lambda b: (torch.randn(b, 7, 9, 28) if nhwc else torch.randn(b, 28, 7, 9),), (torch.randn(28),
                                                                                                 torch.randn(28))


OP_CASES = {
    "window_shift_pad": window_case,
    "window_noshift": window_noshift_case,
    "lofi": lofi_case,
    "linear_efficientvit": lambda: linear_case("relu", False, float("-inf")),
    "linear_l2vit": lambda: linear_case("relu", True, 1.0, eps=0.0),
    "linear_elu": lambda: linear_case("elu+1", False, float("-inf"), q_scale=0.5),
    "linear_identity_no_clamp_sentinel": lambda: linear_case("identity", True, linear_ops.NO_CLAMP, eps=0.0),
    "cls_scores": cls_scores_case,
    "drop": lambda: drop_case(False, False),
    "drop_fuse": lambda: drop_case(True, False),
    "drop_spatial": lambda: drop_case(False, True),
    "drop_fuse_spatial": lambda: drop_case(True, True),
    "shift": lambda: shift_case(False, False),
    "shift_reverse_nhwc": lambda: shift_case(True, True),
    "shift_group_norm": lambda: shift_group_norm_case(False),
    "shift_group_norm_nhwc": lambda: shift_group_norm_case(True),
}


@pytest.mark.parametrize("name", OP_CASES)
def test_op_translation(name, seed):
    """Each op's translation gives every output of the C++ op (auxiliary ones too: log-sum-exp, state, kept
    index, statistics) at two batch sizes, with only standard ONNX operators in the file."""
    call, make_inputs, params = OP_CASES[name]()
    if name == "linear_identity_no_clamp_sentinel":   # identity features: keep the denominators away from 0
        make_inputs = (lambda inner: lambda b: tuple(t.abs() for t in inner(b)))(make_inputs)
    module = OpModule(call, params).eval()
    program = effvit.onnx.export(module, make_inputs(2))
    assert_standard_onnx(program)
    sess = session(program)
    for batch in (1, 3):
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        outs = run_session(sess, inputs)
        assert len(outs) == len(expected)
        for i, (out, ref) in enumerate(zip(outs, expected)):
            assert onnx_error(out, ref) <= TOLERANCE, f"{name}: output {i}, batch {batch}"


TRITON_CASES = {
    "window_attention": (lambda qkv: effvit.window_attention(qkv, 2, (2, 3), 1, backend="triton"),
                         lambda b: (torch.randn(b, 5, 7, 3 * 16),)),
    "linear_attention": (lambda q, k, v: effvit.linear_attention(q, k, v, "relu", eps=1e-5, backend="triton"),
                         lambda b: tuple(torch.randn(b, 2, 20, 8) for _ in range(3))),
    "drop_tokens": (lambda x, s: effvit.drop_tokens(x, s, 12, 1, True, backend="triton"),
                    lambda b: (torch.randn(b, 20, 16), torch.rand(b, 19))),
}


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_op_translation(name, seed):
    """A model whose ops run on the Triton backend exports effvit::triton_<op>, which shares the C++ op's
    translation."""
    family = {"window_attention": "window", "linear_attention": "linear", "drop_tokens": "token_drop"}[name]
    if "triton" not in kernel_backends("cpu", family):
        pytest.skip("the Triton backend cannot run on CPU tensors here (Triton missing or TRITON_INTERPRET unset)")
    call, make_inputs = TRITON_CASES[name]
    module = OpModule(call).eval()
    inputs = make_inputs(2)
    assert effvit.onnx.effvit_ops(torch.export.export(module, inputs)) == [f"effvit::triton_{name}"]
    sess = session(effvit.onnx.export(module, inputs))
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (out, ref) in enumerate(zip(run_session(sess, inputs), expected)):
        assert onnx_error(out, ref) <= TOLERANCE, f"{name}: output {i}"


def test_translation_table_covers_every_forward_op():
    """Every registered effvit op except the backward ops has a translation: a new op fails here until it gets
    one, instead of failing a user's export."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("effvit::")}
    forward = {name.removeprefix("triton_") for name in registered if not name.endswith("_backward")}
    assert forward, "no effvit op is registered"
    assert forward <= set(effvit.onnx.TRANSLATIONS), forward - set(effvit.onnx.TRANSLATIONS)
    table = {str(target) for target in effvit.onnx.translation_table()}
    assert {f"effvit.{name}.default" for name in registered if not name.endswith("_backward")} <= table


def test_untranslatable_op_is_named():
    """A program that calls an effvit op without a translation (here a backward op) fails before any ONNX is
    written, and the error names the op."""
    def backward_call(grad, q, kv):
        out, lse = cpu_op(hilo_ops, "lofi_attention")(q, kv, 2, 0.5)
        return cpu_op(hilo_ops, "lofi_attention_backward")(grad, q, kv, out, lse, 2, 0.5)

    module = OpModule(backward_call).eval()
    inputs = (torch.randn(2, 10, 16), torch.randn(2, 10, 16), torch.randn(2, 4, 32))
    with pytest.raises(effvit.onnx.UntranslatableOpError, match="effvit::lofi_attention_backward"):
        effvit.onnx.export(module, inputs)


def test_export_arguments():
    module = OpModule(lambda x: x * 2)
    with pytest.raises(TypeError, match="args must be a tuple"):
        effvit.onnx.export(module, torch.randn(2, 3))
    with pytest.raises(ValueError, match="opset_version must be >= 18"):
        effvit.onnx.export(module, (torch.randn(2, 3),), opset_version=17)


# ---- patched timm models -------------------------------------------------------------------------------------

MODEL_CASES = [VIT_DROP_SMALL.param()] + [c.param(heavy=True) for c in SMALL + FULL if c is not VIT_DROP_SMALL]


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    """case name -> (patched model, path of its .onnx file), each model exported once for the engines."""
    cache = {}

    def get(case):
        if case.name not in cache:
            model = build(case)
            path = tmp_path_factory.mktemp("onnx") / f"{case.name}.onnx"
            program = effvit.onnx.export(model, (images(case, 2),), path)
            assert_standard_onnx(program)
            cache[case.name] = model, str(path)
        return cache[case.name]

    return get


def assert_engine_matches_eager(run, model, case, engine: str) -> None:
    for batch in (1, 3):
        x = images(case, batch)
        with torch.no_grad():
            expected = model(x)
        assert onnx_error(run(x.numpy()), expected) <= TOLERANCE, f"{case.name} in {engine}, batch {batch}"


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_onnxruntime(case, exported_models, seed):
    model, path = exported_models(case)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert_engine_matches_eager(lambda x: sess.run(None, {name: x})[0], model, case, "ONNX Runtime")


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_openvino(case, exported_models, seed):
    """OpenVINO at float32 (its CPU plugin computes in bfloat16 by default where the CPU has it)."""
    ov = pytest.importorskip("openvino")
    model, path = exported_models(case)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert_engine_matches_eager(lambda x: compiled(x)[0], model, case, "OpenVINO")
