"""Deferred preparation: the pipeline's rewrite registers fake constants (Scheme.fake_prepare) and run_passes
prepares those still in the graph after the last pass (passes.prepare_constants), so that merged siblings
are quantized once, for their merged constants. The graph and its constants are the undeferred pipeline's,
bit for bit; a fake that disagrees with the prepared tensor is refused, naming the linear."""

import dataclasses
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import mxfx
import passes
from mxfx import schemes
from mxfx.dynamo_backend import Backend
from mxfx.prepared import PreparedWeights
from mxfx.recipes import Recovered
from mxfx.targets import get_target
from passes import PassContext, RewriteError, mxfx_tag, quantize_linears, run_passes

from ..models import tiny_qwen3
from .graphs import dynamo_graph

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride()


@pytest.mark.parametrize("target", ["reference", "npu"])
@pytest.mark.parametrize("name", list(schemes.SCHEMES))
def test_fake_prepare_has_the_metadata_of_prepare(request, target, name):
    """The weight's tensors are fakes with the prepared tensors' shapes, dtypes and strides (from the fake
    kernels, nothing quantized); the bias is real and equal."""
    if target == "npu":
        request.getfixturevalue("torch_npu")
    scheme, weight = schemes.SCHEMES[name], torch.randn(96, 1024, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    real = scheme.prepare(get_target(target), weight, bias, torch.bfloat16)
    fake = scheme.fake_prepare(get_target(target), weight, bias, torch.bfloat16, FakeTensorMode())
    assert fake.keys() == real.keys()
    assert all(_meta(fake[k]) == _meta(real[k]) for k in real)
    assert all(isinstance(fake[k], FakeTensor) for k in real if k != "bias")
    assert torch.equal(fake["bias"], real["bias"])


def _undeferred(gm, context):
    return quantize_linears(gm, context.scheme, context.target, context.weights, prepare=context.prepare)


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp8"])
def test_the_deferred_pipeline_builds_the_undeferred_graph(scheme):
    """Default pipeline, rewrite deferred vs prepared at once (merge_siblings then merges prepared siblings, as
    a pipeline split over two run_passes calls does): the same code, constants (names, bits, strides) and
    fake values."""
    graphs = []
    for rewrite in (passes.rewrite_linears, _undeferred):
        gm, weights, _ = dynamo_graph(tiny_qwen3(), IDS)
        run_passes(gm, (rewrite, *passes.FUSION_PASSES), PassContext(scheme, get_target("reference"), weights))
        graphs.append(gm)
    deferred, undeferred = graphs
    assert deferred.code == undeferred.code
    buffers = [dict(g.named_buffers()) for g in graphs]
    assert buffers[0].keys() == buffers[1].keys() and any("merged" in name for name in buffers[0])
    for name, tensor in buffers[0].items():
        assert not isinstance(tensor, FakeTensor)
        assert _meta(tensor) == _meta(buffers[1][name])
        assert torch.equal(tensor.view(torch.uint8), buffers[1][name].view(torch.uint8)), name
    constants = [[n for n in g.graph.nodes if mxfx_tag(n).get("role") == "constant"] for g in graphs]
    assert [_meta(n.meta["val"]) for n in constants[0]] == [_meta(n.meta["val"]) for n in constants[1]]


def _count_quantizations(monkeypatch, cls) -> Counter:
    """Real (not fake) calls of cls.quantize_weight, by the weight's data pointer."""
    counts, quantize = Counter(), cls.quantize_weight

    def counted(self, target, weight):
        if not isinstance(weight, FakeTensor):
            counts[weight.data_ptr()] += 1
        return quantize(self, target, weight)

    monkeypatch.setattr(cls, "quantize_weight", counted)
    return counts


@pytest.mark.parametrize("fuse", [True, False])
def test_every_weight_is_quantized_once_per_compile(monkeypatch, fuse):
    """q/k/v and gate/up, merged: each weight once, for the merged constants (they were quantized twice when the
    rewrite prepared them first); unfused, each once too."""
    model = tiny_qwen3()
    counts = _count_quantizations(monkeypatch, schemes.DualLevelMXFP4)
    be = Backend("mxfp4_dual", target="reference", cache=PreparedWeights(), fuse=fuse)
    with torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(IDS).logits
    torch._dynamo.reset()
    linears = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert counts == Counter({w.data_ptr(): 1 for w in linears}), "7 linears x 2 layers, each quantized once"
    merged = be.pipeline_reports[-1].passes[1].fused if fuse else []
    assert len(merged) == (4 if fuse else 0)
    with torch.no_grad():
        expected = torch.compile(model, backend=mxfx.backend("mxfp4_dual", target="reference", fuse=False))(IDS)
    torch._dynamo.reset()
    assert torch.equal(got, expected.logits)


def test_a_gptq_recipe_runs_gptq_once_per_weight(monkeypatch):
    from mxfx.calibrating import calibrate

    model = tiny_qwen3(layers=1)
    calibration = calibrate(model, [IDS])
    counts = _count_quantizations(monkeypatch, Recovered)
    be = Backend("mxfp4_w4a8", target="reference", recipe="gptq", calibration=calibration, cache=PreparedWeights())
    with torch.no_grad():
        torch.compile(model, backend=be, fullgraph=True)(IDS)
    torch._dynamo.reset()
    assert [len(site.linears) for site in be.pipeline_reports[-1].passes[1].fused] == [3, 2]
    assert sorted(counts.values()) == [1] * 7, "q/k/v, o, gate/up, down: one GPTQ each"


@dataclasses.dataclass(frozen=True)
class _LyingFakes(schemes.MXFP8):
    """Fake codes with the real ones' shape and dtype but column-major codes: the layout's strides differ."""

    def fake_codes(self, target, weight, dtype, fake_mode):
        codes = super().fake_codes(target, weight, dtype, fake_mode)
        return {**codes, "q": codes["q"].t().contiguous().t()}


def test_a_fake_that_disagrees_with_the_prepared_tensor_is_refused():
    gm, weights, _ = dynamo_graph(tiny_qwen3(layers=1), IDS)
    with pytest.raises(RewriteError, match=r"linear model\.layers\.0\.self_attn\.o_proj: its prepared weight is"):
        run_passes(gm, passes.DEFAULT_PASSES, PassContext(_LyingFakes(), get_target("reference"), weights))
