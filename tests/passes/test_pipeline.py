"""The pass pipeline: ordered passes, each returning a typed report; node tags a later pass can find;
lift_constants as a pass; the backend's list is extensible."""

import logging
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import mxfx
import passes
from mxfx.targets import get_target
from passes import PassContext, PassReport, lift_constants, mxfx_tag, quantize_linears, run_passes

from ..models import tiny_qwen3
from .graphs import Block, activation, dynamo_graph


@dataclass
class QuantCount(PassReport):
    pass_name: ClassVar[str] = "count_quants"
    linears: list[list[str]]

    def summary(self) -> str:
        return f"{len(self.linears)} activation quantizations"


def count_quants(gm, context) -> QuantCount:
    """A later pass: finds the rewrite's activation quantizations by their tags alone."""
    nodes = [n for n in gm.graph.nodes if mxfx_tag(n).get("role") == "activation_quant" and "quant" in str(n.target)]
    return QuantCount([mxfx_tag(n)["linears"] for n in nodes])


def test_emitted_nodes_are_tagged_with_pass_role_and_linear():
    gm, weights, _ = dynamo_graph(Block(), activation())
    before = set(gm.graph.nodes)
    quantize_linears(gm, "mxfp8", "reference", weights)
    new = [n for n in gm.graph.nodes if n not in before]
    assert new and all(mxfx_tag(n)["pass"] == "quantize_linears" for n in new)
    roles = {mxfx_tag(n)["role"] for n in new}
    assert roles == {"constant", "activation_quant", "matmul", "shape"}
    assert {mxfx_tag(n)["linear"] for n in new if mxfx_tag(n)["role"] == "matmul"} == {"q", "k", "v", "o"}
    report = run_passes(gm, [count_quants], PassContext("mxfp8", get_target("reference")))
    assert report.passes[0].linears == [["q", "k", "v"], ["o"]], "siblings listed on their shared quantization"


def test_lift_constants_makes_the_tagged_constants_inputs():
    gm, weights, inputs = dynamo_graph(Block(), activation())
    quantize_linears(gm, "mxfp4_dual", "reference", weights)
    expected = gm(*inputs)[0]
    placeholders = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    report = lift_constants(gm)
    assert len(report.constants) == 4 * 4 and len(report.names) == 16, "4 linears: weight, 2 scales, bias each"
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and mxfx_tag(n).get("role") == "constant"]
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == placeholders + 16
    assert torch.equal(gm(*inputs, *report.constants)[0], expected)


def test_the_backend_runs_its_passes_in_order_then_lifts():
    be = mxfx.backend("mxfp8", target="reference", passes=(*passes.UNFUSED_PASSES, count_quants))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_qwen3(layers=1), backend=be, fullgraph=True)(torch.zeros(1, 8, dtype=torch.long))
    torch._dynamo.reset()
    report = be.pipeline_reports[-1]
    assert [r.pass_name for r in report.passes] == ["quantize_linears", "count_quants", "lift_constants"]
    assert report.passes[1].linears == [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                         "model.layers.0.self_attn.v_proj"], ["model.layers.0.self_attn.o_proj"],
                                        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                                        ["model.layers.0.mlp.down_proj"]]
    assert "count_quants: 4 activation quantizations" in str(report)


def test_a_pass_must_return_a_report():
    gm, _, _ = dynamo_graph(Block(), activation())
    with pytest.raises(TypeError, match="graph pass 'bad' returned NoneType, not a PassReport"):
        def bad(gm, context):
            return None
        run_passes(gm, [bad], PassContext("mxfp8", get_target("reference")))


def test_the_rewrite_logs_each_linear(caplog):
    gm, weights, _ = dynamo_graph(Block(), activation())
    with caplog.at_level(logging.DEBUG, logger="mxfx.passes"):
        quantize_linears(gm, "mxfp4_dual", "reference", weights)
    messages = [r.getMessage() for r in caplog.records if r.name == "mxfx.passes"]
    assert "quantize_linears: q rewritten with mxfp4_dual (K=512, N=512)" in messages
    assert messages[-1].startswith("quantize_linears: 4 rewritten, 0 skipped")


def test_fusions_are_on_by_default_and_fuse_false_turns_them_off():
    assert mxfx.backend().passes == passes.DEFAULT_PASSES == (*passes.UNFUSED_PASSES, *passes.FUSION_PASSES)
    assert mxfx.backend(fuse=False).passes == passes.UNFUSED_PASSES
    with pytest.raises(ValueError, match="either passes .* or fuse, not both"):
        mxfx.backend(fuse=True, passes=passes.UNFUSED_PASSES)


@pytest.mark.parametrize("recipe", [None, "smooth"])
def test_an_engine_runs_the_pipeline_as_a_custom_pass_on_its_aot_autograd_graph(recipe):
    """A serving engine owns its compile pipeline (aot_autograd, then its own passes): it hands mxfx the
    post-autograd forward graph with the weights as inputs. The rewrite and every fusion match there as on
    the Dynamo graph (a recipe's smoothing folds into the aten RMSNorm chain), and the logits are the mxfx
    backend's, bit for bit."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from mxfx import recipes
    from mxfx.calibrating import calibrate

    model, ids = tiny_qwen3(layers=1), torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    scheme = "mxfp8" if recipe is None else recipes.apply("mxfp8", recipe, calibrate(model, [ids], gram=False), model)
    reports = []

    def engine(gm, example_inputs):
        def forward_compiler(fw, fw_inputs):
            placeholders = [n.name for n in fw.graph.nodes if n.op == "placeholder"]
            weights = {name: t for name, t in zip(placeholders, example_inputs) if isinstance(t, torch.nn.Parameter)}
            context = PassContext(scheme, get_target("reference"), weights,
                                  fake_mode=torch._guards.detect_fake_mode(fw_inputs))
            reports.append(run_passes(fw, passes.DEFAULT_PASSES, context))
            return make_boxed_func(fw.forward)

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    with torch.no_grad():
        torch._dynamo.reset()
        got = torch.compile(model, backend=engine, fullgraph=True)(ids).logits
        torch._dynamo.reset()
        expected = torch.compile(model, backend=mxfx.backend(scheme, target="reference"), fullgraph=True)(ids).logits
    torch._dynamo.reset()
    rewrite, merge, smooth, norm, swiglu = reports[-1].passes
    assert len(smooth.fused) == (0 if recipe is None else 2), "q/k/v's and gate/up's smoothing: into their norms"
    assert len(rewrite.rewritten) == 7
    assert [len(site.linears) for site in merge.fused] == [3, 2]
    # down_proj's smoothing folds into up_proj's rows (recipes.fold_smoothings): no multiply between the SwiGLU
    # and its quantization, which fuse on the aten graph as without a recipe
    assert len(norm.fused) == 2 and len(swiglu.fused) == 1
    assert torch.equal(got, expected)
