"""ONNX engines as model-level peers: the inference engines CPU deployments use, running a timm model exported to
ONNX by effvit.onnx.export at the case's batch (static shapes).

  "onnxruntime", "openvino"                 the unpatched model in the engine
  "effvit:onnxruntime", "effvit:openvino"   the effvit-patched model exported into the engine (its fused ops become
                                            standard ONNX; what effvit removes, such as dropped tokens, stays removed)

Timed on CPU, in float32, forward only, with as many threads as torch uses. OpenVINO is held to float32
(INFERENCE_PRECISION_HINT f32): its CPU plugin otherwise computes in bfloat16 where the CPU has bfloat16
instructions. Absent packages make the peers skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable

import torch

ENGINES = ("onnxruntime", "openvino")
# the packages each engine needs beyond torch: the exporter's, and the engine's own
_PACKAGES = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}
_INSTALL = {"onnxruntime": "pip install 'effvit[onnx]'", "openvino": "pip install 'effvit[onnx,openvino]'"}


def unavailable(engine: str, device: str, dtype: torch.dtype, direction: str) -> str | None:
    """Why ``engine`` is not a peer of a case (None: it is)."""
    if direction != "fwd":
        return f"{engine} runs inference only (no backward)"
    if device != "cpu":
        return f"{engine} is a CPU peer"
    if dtype != torch.float32:
        return f"{engine} is timed in float32 only"
    missing = [p for p in _PACKAGES[engine] if importlib.util.find_spec(p) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({_INSTALL[engine]})"
    return None


def compile_for(engine: str, model: torch.nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """``model`` exported to ONNX at ``example``'s shape and loaded into ``engine``: a function of a CPU float32
    batch of that shape that runs the engine on it and returns its outputs."""
    from effvit import onnx as effvit_onnx

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        effvit_onnx.export(model, (example,), path, dynamic_batch=False, verbose=False)
        if engine == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x.numpy()})
        if engine == "openvino":
            import openvino

            compiled = openvino.Core().compile_model(
                path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
            request = compiled.create_infer_request()
            return lambda x: request.infer([x.numpy()])
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def add_engine_peers(impls: dict, skipped: dict, models: dict[str, Callable[[], torch.nn.Module]],
                     builder: Callable[[Callable], Callable], example: Callable[[], torch.Tensor], device: str,
                     dtype: torch.dtype, direction: str) -> None:
    """Adds each engine's peers to a model case. models: {name prefix: the model to export} ("" for the unpatched
    model, "effvit:" for the patched one); builder(fn) makes the timed step of fn(images); example() gives an
    input batch (its shape is the one exported)."""
    for engine in ENGINES:
        why = unavailable(engine, device, dtype, direction)
        for prefix, model in models.items():
            name = prefix + engine
            if why:
                skipped[name] = why
            else:
                impls[name] = builder(lambda engine=engine, model=model: compile_for(engine, model(), example()))
