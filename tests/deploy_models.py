"""The patched timm models that the deployment tests (test_export.py, test_onnx.py) take through torch.export,
AOTInductor and ONNX: small variants for `make test`, the models of the issue at full size for `make test-heavy`.

Every model is built on CPU: deployment targets (AOTInductor on CPU, ONNX Runtime, OpenVINO) run there, and the
exported programs then call the C++ ops.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import effvit

TOKEN_DROP = {"keep_rate": 0.7, "drop_loc": (3, 6, 9)}


@dataclasses.dataclass(frozen=True)
class DeployCase:
    name: str                       # the test id
    timm_name: str
    image: int                      # square images of this side
    create: dict = dataclasses.field(default_factory=dict)   # timm.create_model keyword arguments
    patch: dict = dataclasses.field(default_factory=dict)    # effvit.patch.timm keyword arguments
    ops: tuple[str, ...] = ()       # the effvit ops the exported program must call

    def param(self, heavy: bool = False):
        return pytest.param(self, id=self.name, marks=[pytest.mark.heavy] if heavy else [])


SWIN_SMALL = DeployCase("swin_tiny_112", "swin_tiny_patch4_window7_224", 112, {"img_size": 112},
                        ops=("effvit::window_attention",))
EFFICIENTVIT_SMALL = DeployCase("efficientvit_b0_128", "efficientvit_b0", 128, ops=("effvit::linear_attention",))
VIT_DROP_SMALL = DeployCase("vit_small_drop_112", "vit_small_patch16_224", 112, {"img_size": 112}, TOKEN_DROP,
                            ops=("effvit::cls_attention_scores", "effvit::drop_tokens"))
SMALL = (SWIN_SMALL, EFFICIENTVIT_SMALL, VIT_DROP_SMALL)

FULL = (
    DeployCase("swin_tiny", "swin_tiny_patch4_window7_224", 224, ops=SWIN_SMALL.ops),
    DeployCase("efficientvit_b1", "efficientvit_b1", 224, ops=EFFICIENTVIT_SMALL.ops),
    DeployCase("vit_small_drop", "vit_small_patch16_224", 224, patch=TOKEN_DROP, ops=VIT_DROP_SMALL.ops),
)


def sharpen_token_scores(model: torch.nn.Module, factor: float = 4.0) -> None:
    """Random weights attend almost uniformly, so many EViT scores are nearly tied and a last-bit difference
    between two engines can swap which token is kept (a different, equally valid output). Scaling the q and k
    weights spreads the scores apart as trained weights do."""
    for block in getattr(model, "blocks", ()):
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "qkv"):
            with torch.no_grad():
                attn.qkv.weight[: 2 * attn.qkv.out_features // 3] *= factor


def build(case: DeployCase) -> torch.nn.Module:
    """The case's timm model (random weights, eval mode, on CPU), patched by effvit."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(case.timm_name, pretrained=False, **case.create).eval()
    if case.patch:
        sharpen_token_scores(model)
    return effvit.patch.timm(model, **case.patch)


def images(case: DeployCase, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, case.image, case.image)


def called_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The effvit ops an exported program calls, without the Triton prefix ("effvit::window_attention", ...)."""
    from effvit.onnx import effvit_ops

    return {name.replace("effvit::triton_", "effvit::") for name in effvit_ops(program)}
