"""quantize_linears on hand-built graphs of each IR form: rewrites, the exact ops emitted for both
targets, outputs bit-exact to the reference ops composed by hand, shared activation quantization,
every skip reason, idempotence."""

import operator

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import mxfx
import passes
from mxfx.ops.npu import register_dual_level_matmul_fake
from mxfx.selection import Selection, SkipReason
from mxfx.targets import Target
from passes import quantize_linears

from .. import npu_standin, reference_linear
from ..models import tiny_gpt2, tiny_qwen3_moe
from .graphs import Block, activation, aot_graph, dynamo_graph, export_graph, module_graph

mx = torch.ops.mxfx
aten = torch.ops.aten


def _hand_block(scheme, model, x):
    def lin(layer, h):
        return reference_linear.linear(scheme, h, layer.weight, layer.bias)

    return lin(model.o, lin(model.q, x) * lin(model.k, x) + lin(model.v, x))


SCHEMES = ["mxfp4_dual", "mxfp4_w4a8", "mxfp8", "mxfp4"]
QUANT = {"mxfp4_dual": "npu_dynamic_dual_level_mx_quant", "mxfp4_w4a8": "npu_dynamic_mx_quant",
         "mxfp8": "npu_dynamic_mx_quant", "mxfp4": "npu_dynamic_mx_quant"}
MATMUL = {"mxfp4_dual": "npu_dual_level_quant_matmul", "mxfp4_w4a8": "npu_quant_matmul",
          "mxfp8": "npu_quant_matmul", "mxfp4": "npu_quant_matmul"}


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _quantized_ops(gm):
    return [t.__name__.split(".")[0] for t in _ops(gm)
            if isinstance(t, torch._ops.OpOverload) and t.namespace in ("mxfx", "npu")]


def _forms():
    model, x = Block(), activation()
    gm, weights, inputs = dynamo_graph(model, x)
    yield "dynamo", model, x, gm, weights, [i for i in inputs]
    yield "module", model, x, module_graph(model, x), None, [x]
    gm, weights, ep = export_graph(model, x)
    yield "export", model, x, gm, weights, [*weights.values(), x]
    gm, weights, inputs = aot_graph(model, x)
    yield "aot", model, x, gm, weights, inputs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_form_is_rewritten_bit_exactly(scheme):
    for form, model, x, gm, weights, inputs in _forms():
        report = quantize_linears(gm, scheme, "reference", weights)
        assert len(report.rewritten) == 4 and not report.skipped, (form, str(report))
        assert report.activation_quants == 2, f"{form}: q/k/v share one activation quantization"
        assert _quantized_ops(gm) == [QUANT[scheme], *[MATMUL[scheme]] * 3, QUANT[scheme], MATMUL[scheme]], form
        assert not any(t in (torch._C._nn.linear, aten.linear.default, aten.addmm.default) for t in _ops(gm)), form
        gm.graph.lint()
        out = gm(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert torch.equal(out, _hand_block(scheme, model, x)), f"{form}: rewrite changed the numerics"


def test_exact_op_sequence_of_one_linear():
    model = torch.nn.Linear(512, 64, dtype=torch.bfloat16)
    gm, weights, inputs = dynamo_graph(model, activation((2, 3, 512)))
    quantize_linears(gm, "mxfp4_dual", "reference", weights)
    assert _ops(gm) == [aten.reshape.default, mx.npu_dynamic_dual_level_mx_quant.default,
                        operator.getitem, operator.getitem, operator.getitem,
                        mx.npu_dual_level_quant_matmul.default, aten.reshape.default]
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(a.removeprefix("_mxfx_l_fn_parameters_weight__") for a in attrs) == [
        "bias", "weight", "weight_level0_scale", "weight_scale"]
    level0 = gm.get_buffer(next(a for a in attrs if a.endswith("level0_scale")))
    assert level0.shape == (1, 64) and level0.is_contiguous(), "level-0 scale pre-transposed to [K/512, N]"
    nz = gm.get_buffer(next(a for a in attrs if a.endswith("_weight")))
    assert nz.dtype == torch.int8 and nz.shape == (8, 4, 16, 32), "FP4 weight as emulated FRACTAL_NZ"


def test_new_nodes_carry_meta_val():
    gm, weights, inputs = dynamo_graph(Block(), activation())
    original = {n.name for n in gm.graph.nodes}
    quantize_linears(gm, "mxfp8", "reference", weights)
    new = [n for n in gm.graph.nodes if n.name not in original]
    assert new and all("val" in n.meta for n in new)
    real = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    for node in gm.graph.nodes:  # every value matches what running the node gives
        if node.op == "get_attr":
            real[node] = gm.get_buffer(node.target)
        elif node.op == "call_function":
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), real.__getitem__)
            real[node] = node.target(*args, **kwargs)
            fake = node.meta.get("val", node.meta.get("example_value"))
            if isinstance(fake, torch.Tensor):
                assert (fake.shape, fake.dtype, fake.stride()) == (
                    real[node].shape, real[node].dtype, real[node].stride()), node
    out = gm.graph.output_node().args[0][0].meta["val"]
    assert out.shape == (2, 3, 512) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", SCHEMES)
def test_npu_target_emits_torch_npu_ops_with_the_same_numerics(scheme):
    npu_standin.register()
    register_dual_level_matmul_fake()
    model, x = Block(), activation()
    reference, weights, inputs = dynamo_graph(model, x)
    npu, npu_weights, _ = dynamo_graph(model, x)
    quantize_linears(reference, scheme, "reference", weights)
    quantize_linears(npu, scheme, "npu", npu_weights)
    namespaces = {t.namespace for t in _ops(npu) if isinstance(t, torch._ops.OpOverload) and t.namespace != "aten"}
    assert namespaces == {"npu"}
    assert _quantized_ops(npu) == _quantized_ops(reference)
    assert torch.equal(npu(*inputs)[0], reference(*inputs)[0])


def test_a_target_without_its_ops_is_an_error_naming_the_linear():
    gm, weights, _ = dynamo_graph(Block(), activation())
    target = Target("fake-npu", "no_such_namespace")
    with pytest.raises(passes.RewriteError, match=r"linear q \(node linear\): .*no_such_namespace.*not registered"):
        quantize_linears(gm, "mxfp8", target, weights)


def test_running_twice_changes_nothing():
    gm, weights, _ = dynamo_graph(Block(), activation())
    quantize_linears(gm, "mxfp4_dual", "reference", weights)
    code = gm.code
    second = quantize_linears(gm, "mxfp4_dual", "reference", weights)
    assert gm.code == code and not second.rewritten and second.activation_quants == 0


def test_report_table_and_bytes():
    gm, weights, _ = dynamo_graph(Block(), activation())
    report = quantize_linears(gm, "mxfp4_dual", "reference", weights)
    assert report.bytes_before == 4 * 512 * 512 * 2
    assert report.bytes_after * 16 == report.bytes_before * 4.3125 / 2 * 2  # 4.3125 bits per element
    text = str(report)
    assert "q " in text and "rewritten" in text and "4 rewritten, 0 skipped, 2 activation quantizations" in text


# -- skips: each reason triggered by a graph built for it ------------------------------------------------
class Head(torch.nn.Module):
    def __init__(self, k=512, n=64, tie=False, dtype=torch.bfloat16):
        super().__init__()
        self.embed = torch.nn.Embedding(32, k, dtype=dtype)
        self.body = torch.nn.Linear(k, k, dtype=dtype)
        self.lm_head = torch.nn.Linear(k, 32 if tie else n, bias=False, dtype=dtype)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


def _skips(report):
    return {r.fqn: (r.skip_reason, r.reason) for r in report.skipped}


def _head_skips(**selection):
    gm, weights, _ = dynamo_graph(Head(), torch.zeros(1, 4, dtype=torch.long))
    return _skips(quantize_linears(gm, "mxfp4_dual", "reference", weights, select=Selection.of(**selection)))


def test_lm_head_excluded_by_default_and_patterns():
    default = (SkipReason.EXCLUDED, "excluded by default pattern 'lm_head'")
    assert _head_skips() == {"lm_head": default}
    assert _head_skips(include=["lm_*"], default_exclude=False) == {
        "body": (SkipReason.NOT_INCLUDED, "not matched by include patterns")}


def test_a_pattern_string_is_one_pattern_and_exclude_keeps_the_defaults():
    """exclude="lm_head" was iterated by character (quantizing lm_head); include="*q_proj" likewise."""
    assert _head_skips(exclude="lm_head")["lm_head"][0] is SkipReason.EXCLUDED
    assert _head_skips(include="body") == _head_skips(include=["body"]) == {"lm_head": _head_skips()["lm_head"]}
    assert set(_head_skips(include="b")) == {"body", "lm_head"}, "'b' is one pattern, matching neither name"
    both = _head_skips(exclude="body")
    assert both["body"] == (SkipReason.EXCLUDED, "excluded by pattern 'body'") and "lm_head" in both, "defaults kept"
    assert _head_skips(exclude="body", default_exclude=False).keys() == {"body"}, "defaults replaced on request"
    with pytest.raises(TypeError, match="must be strings"):
        Selection.of(exclude=[1])


def test_tied_embedding_weight_is_skipped():
    gm, weights, _ = dynamo_graph(Head(tie=True), torch.zeros(1, 4, dtype=torch.long))
    report = quantize_linears(gm, "mxfp4_dual", "reference", weights, select=Selection.of(default_exclude=False))
    assert _skips(report) == {"lm_head": (SkipReason.TIED_EMBEDDING, "weight is tied to an embedding")}


@pytest.mark.parametrize(
    "scheme, k, reason",
    [("mxfp4_dual", 544, "K=544 is not a multiple of 512"), ("mxfp8", 100, "K=100 is not a multiple of 32"),
     ("mxfp4_w4a8", 48, "K=48 is not a multiple of 32")],
)
def test_k_rules(scheme, k, reason):
    gm, weights, _ = dynamo_graph(torch.nn.Linear(k, 64, dtype=torch.bfloat16), activation((2, k)))
    report = quantize_linears(gm, scheme, "reference", weights)
    assert [(r.skip_reason, r.reason) for r in report.skipped] == [(SkipReason.K_RULE, f"{reason} ({scheme})")]
    assert len(list(gm.graph.nodes)) == 5


class ComputedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 512, dtype=torch.bfloat16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w * 2)


def test_weight_that_is_not_a_constant():
    gm, weights, _ = dynamo_graph(ComputedWeight(), activation((2, 512)))
    report = quantize_linears(gm, "mxfp8", "reference", weights)
    assert _skips(report) == {"mul": (SkipReason.NOT_CONSTANT, "weight mul is not a constant of the graph")}


def test_fp32_activation_and_missing_metadata():
    model = torch.nn.Linear(512, 64)
    gm, weights, _ = dynamo_graph(model, torch.randn(2, 512))
    assert "activation dtype torch.float32" in quantize_linears(gm, "mxfp8", "reference", weights).skipped[0].reason
    untraced = fx.symbolic_trace(torch.nn.Linear(512, 64, dtype=torch.bfloat16))
    assert "no shape metadata" in quantize_linears(untraced, "mxfp8").skipped[0].reason


def _hand_graph(weight, bias=None, k_dynamic=False):
    """x -> F.linear(x, get_attr weight, get_attr bias), with a fake x in meta["val"]."""
    root = torch.nn.Module()
    root.register_buffer("w", weight)
    graph = fx.Graph()
    x = graph.placeholder("x")
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dims = [DimDynamic.STATIC, DimDynamic.DYNAMIC if k_dynamic else DimDynamic.STATIC]
    x.meta["val"] = mode.from_tensor(torch.empty(4, weight.shape[-1], dtype=torch.bfloat16),
                                     symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
    args = [x, graph.get_attr("w")]
    if bias is not None:
        root.register_buffer("b", bias)
        args.append(graph.get_attr("b"))
    graph.output(graph.call_function(torch._C._nn.linear, tuple(args)))
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize(
    "graph, kind, reason",
    [
        (lambda: _hand_graph(torch.zeros(64, 512, dtype=torch.int8)), SkipReason.WEIGHT_DTYPE,
         "weight is torch.int8 [64, 512]"),
        (lambda: _hand_graph(torch.zeros(64, 512, dtype=torch.bfloat16), bias=torch.zeros(1, 64)),
         SkipReason.BIAS_SHAPE, "bias shape [1, 64]"),
        (lambda: _hand_graph(torch.zeros(64, 512, dtype=torch.bfloat16), k_dynamic=True), SkipReason.DYNAMIC_K,
         "dynamic K"),
    ],
)
def test_hand_built_skips(graph, kind, reason):
    report = quantize_linears(graph(), "mxfp8", "reference", None)
    assert report.skipped[0].skip_reason is kind and report.skipped[0].reason.startswith(reason)


def test_unknown_scheme_and_target():
    gm = fx.symbolic_trace(torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_linears(gm, "int4")
    with pytest.raises(ValueError, match="unknown target"):
        quantize_linears(gm, "mxfp8", "tpu")


class TwoInOne(torch.nn.Module):
    """Two F.linear calls in one module: the same module path for both sites."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(activation((64, 512), seed=1) * 0.05)
        self.w2 = torch.nn.Parameter(activation((64, 512), seed=2) * 0.05)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w1), torch.nn.functional.linear(x, self.w2)


def test_linears_sharing_a_module_path_keep_their_own_weights():
    model, x = TwoInOne(), activation((3, 512))
    gm, weights, _ = export_graph(model, x)
    report = quantize_linears(gm, "mxfp8", "reference", weights)
    assert len(report.rewritten) == 2
    a, b = gm(*weights.values(), x)
    assert torch.equal(a, reference_linear.linear("mxfp8", x, model.w1, None))
    assert torch.equal(b, reference_linear.linear("mxfp8", x, model.w2, None))


def test_a_nested_lm_head_is_excluded_by_default():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Head()

        def forward(self, ids):
            return self.inner(ids)

    gm, weights, _ = dynamo_graph(Wrapper(), torch.zeros(1, 4, dtype=torch.long))
    report = quantize_linears(gm, "mxfp4_dual", "reference", weights)
    assert _skips(report) == {"inner.lm_head": (SkipReason.EXCLUDED, "excluded by default pattern '*.lm_head'")}


def _compiled_report(model, scheme="mxfp8"):
    gm, weights, _ = dynamo_graph(model, torch.zeros(1, 8, dtype=torch.long))
    return quantize_linears(gm, scheme, "reference", weights)


def test_moe_experts_are_listed_and_the_router_is_kept():
    """Before: the experts (3-D, 89% of the matmul bytes) were not listed, the router was quantized and the
    report claimed 0.52x."""
    report = _compiled_report(tiny_qwen3_moe())
    by_name = {r.fqn: r for r in report.linears}
    experts = [by_name[f"model.layers.0.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj")]
    assert all(e.skip_reason is SkipReason.UNSUPPORTED_MATMUL and "grouped MoE experts" in e.reason for e in experts)
    assert by_name["model.layers.0.mlp.gate"].skip_reason is SkipReason.EXCLUDED, "routers stay unquantized"
    assert [r.fqn for r in report.rewritten] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    expert_bytes = sum(e.bytes_before for e in experts)
    assert expert_bytes == 8 * 3 * 512 * 512 * 2 and report.total_bytes_before == report.bytes_before + sum(
        r.bytes_before for r in report.skipped)
    assert report.total_bytes_after / report.total_bytes_before > 0.85, "the summary counts every matmul weight"
    assert "all 8 matmul weights" in report.summary()


def test_gpt2_conv1d_layers_are_listed():
    report = _compiled_report(tiny_gpt2())
    conv = [r for r in report.skipped if r.skip_reason is SkipReason.UNSUPPORTED_MATMUL]
    assert [r.fqn for r in conv] == [f"transformer.h.0.{m}"
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert (conv[0].k, conv[0].n) == (512, 1536) and "GPT-2 Conv1D" in conv[0].reason and not report.rewritten


def test_an_activation_of_another_dtype_is_left_to_f_linear():
    """Before: a bf16 linear called with fp16 input ran and returned fp16 under mxfx, where eager raises."""
    linear, x = torch.nn.Linear(512, 64, dtype=torch.bfloat16), activation((2, 512), dtype=torch.float16)
    with pytest.raises(RuntimeError, match="same dtype"):
        linear(x)
    reports = []
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
        torch.compile(linear, backend=mxfx.backend("mxfp8", target="reference", report=reports.append))(x)
    torch._dynamo.reset()
    assert reports[0].skipped[0].skip_reason is SkipReason.DTYPE_MISMATCH and not reports[0].rewritten
