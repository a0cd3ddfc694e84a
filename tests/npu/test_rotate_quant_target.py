"""A rotated activation on the NPU graph: one npu_rotate_quant on the single-level schemes (the stand-in
records its arguments), bmm + the scheme's quantizer on the dual-level scheme and on torchair GE graphs
(targets lacking npu_rotate_quant); each bit-identical to the reference target compiled the same way."""

import sys
from collections import Counter

import pytest
import torch

import mxfx
from mxfx.dynamo_backend import Backend, InnerCompiler
from mxfx.prepared import PreparedWeights
from mxfx.targets import GE_LACKS, TARGETS
from passes.fuse_norm_quant import NormQuantReport
from passes.fuse_swiglu_quant import SwigluQuantReport
from passes.fusion import FusionSkipReason

from .. import npu_standin
from ..models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
E4M3 = 292


def _run(model, scheme, target, lacks=frozenset()):
    """(logits, graph op counts, backend) of the model compiled with the rotate recipe."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    be = Backend(scheme, target=target, recipe="rotate", cache=PreparedWeights(),
                 inner=InnerCompiler(keep, name="keep", lacks=lacks))
    with torch.no_grad():
        logits = torch.compile(model, backend=be, fullgraph=True)(IDS).logits
    ops = Counter(getattr(n.target, "__name__", str(n.target)) for gm in graphs for n in gm.graph.nodes
                  if n.op == "call_function")
    return logits, ops, be


@pytest.mark.parametrize("scheme", ["mxfp4_w4a8", "mxfp8"])
def test_single_level_rotation_is_one_npu_rotate_quant_per_activation(torch_npu, scheme):
    model = tiny_qwen3(layers=1)
    npu, ops, be = _run(model, scheme, "npu")
    reference, ref_ops, _ = _run(model, scheme, "reference")
    assert torch.equal(npu, reference) and ops == ref_ops
    assert ops["npu_rotate_quant.default"] == 4 and ops["bmm.default"] == 0
    assert ops["npu_dynamic_mx_quant.default"] == 0, "no separate activation quantizer"
    rotations = [args for name, args in npu_standin.calls if name == "npu_rotate_quant"]
    assert rotations == [
        {"x": (16, k), "rotation": (k // 32, 32, 32), "dst_dtype": E4M3, "round_mode": "rint", "scale_alg": 0}
        for k in (512, 512, 512, 1536)  # q/k/v, o, gate/up, down
    ]
    norm, = be.pipeline_reports[-1].get(NormQuantReport)
    swiglu, = be.pipeline_reports[-1].get(SwigluQuantReport)
    assert {s.reason for s in norm.skipped} == {s.reason for s in swiglu.skipped} == {FusionSkipReason.ROTATED}


def test_torchair_ge_graphs_compose_the_rotation(torch_npu):
    """A target lacking npu_rotate_quant (torchair's GE mode) rotates by bmm and quantizes by npu_dynamic_mx_quant;
    the reference with the same `lacks` runs the same graph, and for bf16 the fused op's bits."""
    model = tiny_qwen3(layers=1)
    ge, ops, _ = _run(model, "mxfp4_w4a8", "npu", lacks=GE_LACKS)
    reference, ref_ops, _ = _run(model, "mxfp4_w4a8", TARGETS["reference"].without(GE_LACKS))
    assert torch.equal(ge, reference) and ops == ref_ops
    assert ops["npu_rotate_quant.default"] == 0 and ops["bmm.default"] == 4 and ops["npu_dynamic_mx_quant.default"] == 4
    assert "npu_rotate_quant" not in {name for name, _ in npu_standin.calls}
    fused, _, _ = _run(model, "mxfp4_w4a8", "reference")
    assert (ge != fused).float().mean() < 1e-3, "the same arithmetic, up to the GEMMs' summation order"


def test_the_dual_level_scheme_keeps_bmm_and_its_quantizer():
    model = tiny_qwen3(layers=1)
    _, ops, _ = _run(model, "mxfp4_dual", "reference")
    assert ops["npu_rotate_quant.default"] == 0 and ops["bmm.default"] == 4
    assert ops["npu_dynamic_dual_level_mx_quant.default"] == 4


def test_torchair_inner_lacks_npu_rotate_quant_in_ge_mode_only(monkeypatch):
    import types

    class CompilerConfig:
        def __init__(self, mode="max-autotune"):
            self.mode = mode
            self.experimental_config = types.SimpleNamespace(frozen_parameter=False)

    monkeypatch.setitem(sys.modules, "torchair", types.SimpleNamespace(
        CompilerConfig=CompilerConfig, get_npu_backend=lambda compiler_config=None: None))
    from mxfx.dynamo_backend import torchair_inner

    assert torchair_inner(CompilerConfig()).lacks == GE_LACKS
    assert torchair_inner(CompilerConfig("reduce-overhead")).lacks == frozenset()  # aclgraph runs the eager kernels
    assert mxfx.backend("mxfp8", target="reference", inner=torchair_inner()).target.lacks == GE_LACKS
