"""Patched timm models under torch.fx (symbolic tracing, torchvision's create_feature_extractor), TorchScript
(torch.jit.script, of the model and of its fx graph) and torch.jit.trace: they run, give the eager model's numbers,
and run effvit's kernels (leaf calls in the fx graph, effvit:: ops in the TorchScript graphs)."""


import copy
import io
import re

import pytest
import torch

import effvit
from effvit.nn import linear as nn_linear, token_drop as nn_token_drop, window as nn_window
from effvit.ops import registry
from effvit.reference import token_drop as ref_token_drop

from conftest import DEVICE, requires_ext

timm = pytest.importorskip("timm")

# model name -> (keep_rate, the leaf call its fx graph must hold, the ops its TorchScript graph must hold)
CASES = {
    "swin_tiny_patch4_window7_224": (1.0, nn_window.window_attention_core, {"effvit::window_attention"}),
    "efficientvit_b0": (1.0, nn_linear.lite_mla_attention, {"effvit::linear_attention"}),
    "vit_small_patch16_224": (0.7, nn_token_drop.drop_by_cls_attention,
                              {"effvit::cls_attention_scores", "effvit::drop_tokens"}),
    "swin_base_patch4_window12_384": (1.0, nn_window.window_attention_core, {"effvit::window_attention"}),
}
# make test: the same architectures, narrower (the real sizes run under make test-heavy); Swin on 112 x 112, where
# the last stage's 3 x 3 map clamps the window
NARROW = {"swin_tiny_patch4_window7_224": dict(embed_dim=32, num_heads=(1, 2, 4, 8), img_size=112),
          "vit_small_patch16_224": dict(embed_dim=64, num_heads=2)}
HEAVY = ("swin_base_patch4_window12_384",)
MODELS = [pytest.param(name, NARROW.get(name, {}), id=name) for name in CASES if name not in HEAVY] + [
    pytest.param(name, {}, id=f"{name}-full" if name in NARROW else name, marks=pytest.mark.heavy)
    for name in (*NARROW, *HEAVY)]


def make_models(name: str, keep_rate: float = 1.0, **kwargs):
    """(timm's model, the same weights patched), eval mode on DEVICE."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(DEVICE).eval()
    return model, effvit.patch.timm(copy.deepcopy(model), keep_rate=keep_rate)


def images(model, batch: int = 1) -> torch.Tensor:
    """A batch of the size ``model`` takes."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def leaf_calls(graph_module: torch.fx.GraphModule) -> set:
    return {n.target for n in graph_module.graph.nodes if n.op == "call_function"}


def effvit_ops(script_module) -> set[str]:
    """The effvit:: ops in a TorchScript module's graph, nested blocks and called functions included."""
    return set(re.findall(r"effvit::\w+", str(script_module.inlined_graph)))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_fx_graph_calls_the_fused_path_and_matches(name, kwargs):
    keep_rate, leaf, _ = CASES[name]
    timm_model, patched = make_models(name, keep_rate, **kwargs)
    x = images(patched)
    graph_module = torch.fx.symbolic_trace(patched)
    assert leaf in leaf_calls(graph_module)
    with torch.no_grad():
        eager = patched(x)
        assert torch.equal(graph_module(x), eager)   # the same kernels, called the same way
        if keep_rate == 1:
            assert max_diff(eager, timm_model(x)) < 1e-4
        else:
            expected = ref_token_drop.evit_forward(timm_model, x, keep_rate, patched.token_drop.drop_loc)
            assert max_diff(eager, expected) < 1e-4
    # the graph runs effvit's autograd too: gradients as the eager patched model's
    graph_module(x).sum().backward()
    grads = [p.grad.clone() for p in graph_module.parameters()]
    graph_module.zero_grad()
    patched(x).sum().backward()
    for g, p in zip(grads, patched.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_fx_token_drop_count_comes_from_the_input():
    """The traced drop holds no token count: one graph keeps ceil(keep_rate (N - 1)) of whatever N it is given, all
    of them when that is N - 1; and a model whose drops keep every token traces to timm's numbers."""
    class Drop(torch.nn.Module):
        def forward(self, x, q_cls, k):
            return nn_token_drop.drop_by_cls_attention(x, q_cls, k, 0.125, 0.9, 1, True, False, False)

    graph_module = torch.fx.symbolic_trace(Drop())
    assert nn_token_drop.drop_by_cls_attention in leaf_calls(graph_module)
    for n, kept in ((21, 1 + 18 + 1), (6, 6)):       # CLS + ceil(0.9 * 20) = 18 + fused; ceil(0.9 * 5) = 5: all
        x, q, k = torch.randn(2, n, 8), torch.randn(2, 2, 4), torch.randn(2, 2, n, 4)
        assert graph_module(x, q, k).shape == (2, kept, 8)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=48).to(DEVICE).eval()
    patched = effvit.patch.timm(copy.deepcopy(model), keep_rate=0.99)   # 9 patches: ceil(0.99 * 9) = 9
    small = torch.randn(1, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        assert max_diff(torch.fx.symbolic_trace(patched)(small), model(small)) < 1e-5


def test_fx_token_drop_refuses_what_it_cannot_trace():
    _, patched = make_models("vit_small_patch16_224", 0.7, **NARROW["vit_small_patch16_224"])
    patched.token_drop.record_index = True
    with pytest.raises(ValueError, match="record_index"):
        torch.fx.symbolic_trace(patched)


FEATURE_NODES = {"swin_tiny_patch4_window7_224": ["layers.1", "layers.2", "layers.3", "norm"],
                 "vit_small_patch16_224": ["blocks.2", "blocks.5", "blocks.11", "norm"]}


@pytest.mark.parametrize("name,kwargs", [p for p in MODELS if p.values[0] in FEATURE_NODES])
def test_create_feature_extractor_features_equal_unpatched(name, kwargs):
    """torchvision's feature extraction, as a detector pulls a backbone's features: the patched model's equal the
    unpatched model's (ViT at keep_rate 1 exactly), from a graph that runs effvit's kernels."""
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    nodes = FEATURE_NODES[name]
    timm_model, patched = make_models(name, 1.0, **kwargs)
    x = images(patched)
    expected = feature_extraction.create_feature_extractor(timm_model, return_nodes=nodes)
    extractor = feature_extraction.create_feature_extractor(patched, return_nodes=nodes)
    if name.startswith("swin"):
        assert nn_window.window_attention_core in leaf_calls(extractor)
    with torch.no_grad():
        want, got = expected(x), extractor(x)
    assert list(got) == nodes
    for node in nodes:
        if name.startswith("vit"):
            assert torch.equal(got[node], want[node]), node
        else:
            assert max_diff(got[node], want[node]) < 1e-4 * want[node].abs().max().item(), node


@requires_ext
@pytest.mark.parametrize("name,kwargs", MODELS)
def test_script_runs_the_kernels_and_matches_eager(name, kwargs):
    keep_rate, _, ops = CASES[name]
    timm_model, patched = make_models(name, keep_rate, **kwargs)
    x = images(patched)
    scripted = torch.jit.script(patched)
    assert ops <= effvit_ops(scripted)
    with torch.no_grad():
        eager = patched(x)
        assert max_diff(scripted(x), eager) < 1e-5
    # with gradients, what TorchScript can differentiate (timm's code, effvit's reference): same numbers, gradients
    out = scripted(x)
    assert out.requires_grad and max_diff(out.detach(), eager) < 1e-4
    out.sum().backward()
    assert all(p.grad is not None for p in patched.parameters())
    # the scripted model saves and loads (no Python calls left in it)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert max_diff(torch.jit.load(buffer)(x), eager) < 1e-5


@requires_ext
def test_script_vit_keep_rate_one_is_timm_exactly():
    timm_model, patched = make_models("deit3_small_patch16_224", 1.0, **NARROW["vit_small_patch16_224"])
    scripted = torch.jit.script(patched)
    x = images(patched)
    with torch.no_grad():
        assert torch.equal(scripted(x), torch.jit.script(timm_model)(x))


@requires_ext
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "vit_small_patch16_224"])
def test_script_of_the_fx_graph_runs_the_kernels(name):
    keep_rate, _, ops = CASES[name]
    _, patched = make_models(name, keep_rate, **NARROW[name])
    scripted = torch.jit.script(torch.fx.symbolic_trace(patched))
    assert ops <= effvit_ops(scripted)
    x = images(patched)
    with torch.inference_mode():
        assert max_diff(scripted(x), patched(x)) < 1e-5
    if name.startswith("swin"):    # no backward of the C++ op under TorchScript: an error that says what to do
        with pytest.raises(Exception, match="no_grad"):
            scripted(x)


def test_script_settings_are_read_when_scripting():
    _, patched = make_models("swin_tiny_patch4_window7_224", 1.0, **NARROW["swin_tiny_patch4_window7_224"])
    effvit.patch.timm(patched, backend="torch")     # the reference: the scripted model runs timm's own code
    scripted = torch.jit.freeze(torch.jit.script(patched))   # freezing drops the branches that cannot run
    assert not effvit_ops(scripted)
    effvit.unpatch(patched)
    assert not any(hasattr(m, "_effvit_script_kernels") for m in patched.modules())
    _, vit = make_models("vit_small_patch16_224", 0.7, **NARROW["vit_small_patch16_224"])
    vit.token_drop.record_index = True
    with pytest.raises(ValueError, match="record_index"):
        torch.jit.script(vit)


@requires_ext
@pytest.mark.parametrize("name", [name for name in CASES if name not in HEAVY])
def test_trace_records_the_kernels(name):
    """torch.jit.trace with gradients on (its default check re-traces under no_grad): the graph holds effvit's ops,
    matches eager, and saves."""
    keep_rate, _, ops = CASES[name]
    _, patched = make_models(name, keep_rate, **NARROW.get(name, {}))
    x = images(patched)
    traced = torch.jit.trace(patched, x)
    assert ops <= effvit_ops(traced)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert max_diff(torch.jit.load(buffer)(x), patched(x)) < 1e-5


def _kernel(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.effvit.no_such_op(x)


def _fallback(x: torch.Tensor) -> torch.Tensor:
    return x + 1


_stub = registry.script_kernel(_kernel, ("no_such_op",))


def _calls_stub(x: torch.Tensor) -> torch.Tensor:
    return _stub(x)


def test_script_kernel_without_the_ops():
    """Without effvit._C the TorchScript callers still compile: the fallback runs, or a stub raises."""
    assert registry.script_kernel(_kernel, ("no_such_op",), fallback=_fallback) is _fallback
    scripted = torch.jit.script(_calls_stub)
    with pytest.raises(Exception, match="unused|ignored"):
        scripted(torch.zeros(1))
