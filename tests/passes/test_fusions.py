"""The fusion passes (passes.FUSION_PASSES) on Dynamo graphs: merge_siblings is bit-identical to the unmerged
graph; the norm and SwiGLU fusions compute the NPU's arithmetic, checked against the numpy oracle's norm /
SwiGLU fed to the hand-composed reference linears (tests/reference_linear.py); every site is reported,
fused or skipped with its typed reason."""

import operator
from collections import Counter

import numpy as np
import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

import mxfx
import passes
from mxfx.dynamo_backend import Backend
from mxfx.prepared import PreparedWeights
from mxfx.schemes import MXFP4W4A8, MXFP8
from mxfx.targets import get_target
from passes import FusionSkipReason, PassContext, fuse_norm_quant, fuse_swiglu_quant, merge_siblings, run_passes

from .. import npu_standin
from ..models import tiny_qwen3
from ..ops.fused_golden import rms_norm_golden, swiglu_golden
from ..reference_linear import linear
from .graphs import Block, activation, dynamo_graph

mx = torch.ops.mxfx
SCHEMES = ("mxfp8", "mxfp4_w4a8", "mxfp4_dual")
SINGLE = ("mxfp8", "mxfp4_w4a8")  # the schemes with single-level MX activations (the fusible ones)


def _rewritten(model, *inputs, scheme="mxfp8", extra=()):
    gm, weights, example = dynamo_graph(model, *inputs)
    context = PassContext(scheme, get_target("reference"), weights)
    report = run_passes(gm, (*passes.UNFUSED_PASSES, *extra), context)
    return gm, example, report, context


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def _bf16(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).bfloat16()


def _weights(module, seed):
    for i, p in enumerate(module.parameters()):
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)).to(p.dtype) * 0.05 + (
            1.0 if p.dim() == 1 else 0.0)
    return module


# -- merge_siblings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ids_shape", [(2, 8), (1, 1)])
def test_merge_siblings_is_bit_identical_on_qwen3(scheme, ids_shape):
    ids = torch.randint(0, 256, ids_shape, generator=torch.Generator().manual_seed(1))
    gm, inputs, _, context = _rewritten(tiny_qwen3(), ids, scheme=scheme)
    expected = gm(*inputs)
    report = merge_siblings(gm, context)
    merged = [s.linears for s in report.fused]
    assert len(merged) == 4 and merged[0] == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert merged[1] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert Counter(s.reason for s in report.skipped) == {FusionSkipReason.SINGLE: 4}, "o_proj and down_proj"
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(gm(*inputs), expected))
    lifted = passes.lift_constants(gm)
    per_linear = 3 if scheme == "mxfp4_dual" else 2  # weight and scale(s), no bias
    assert len([n for n in lifted.names if "merged" in n]) == 4 * per_linear, "4 merged sets (qkv, gate_up x 2)"
    assert len(lifted.names) == 8 * per_linear, "and o_proj, down_proj x 2 as they were"
    assert torch.equal(gm(*inputs, *lifted.constants)[-1], expected[-1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_siblings_concatenates_biases(scheme):
    gm, inputs, _, context = _rewritten(Block(bias=True), activation(), scheme=scheme)
    expected = gm(*inputs)
    before = {name for name, _ in gm.named_buffers()}
    report = merge_siblings(gm, context)
    assert [s.linears for s in report.fused] == [("q", "k", "v")]
    assert torch.equal(gm(*inputs)[0], expected[0])
    after = {name for name, _ in gm.named_buffers()}
    assert not any("_q_" in n or "_k_" in n or "_v_" in n for n in after), "the siblings' constants are gone"
    assert len(after) == len(before) - 2 * len(after - before)


class _MixedBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(512, 256, bias=True, dtype=torch.bfloat16)
        self.b = torch.nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _PerWeight:
    """A selector giving the first weight it sees one scheme and every other weight another."""

    label = "per-weight"

    def __init__(self):
        self.first = None

    def scheme_for(self, weight):
        self.first = weight if self.first is None else self.first
        return MXFP8() if weight is self.first else MXFP4W4A8()


def test_merge_siblings_skips_mixed_bias_and_mixed_schemes():
    gm, _, _, context = _rewritten(_MixedBias(), activation())
    report = merge_siblings(gm, context)
    assert [(s.linears, s.reason) for s in report.sites] == [(("a", "b"), FusionSkipReason.BIAS)]
    gm, weights, _ = dynamo_graph(Block(bias=False), activation())
    selector = _PerWeight()
    context = PassContext(selector, get_target("reference"), weights)
    run_passes(gm, passes.UNFUSED_PASSES, context)
    report = merge_siblings(gm, context)
    assert all(s.reason in (FusionSkipReason.SCHEME, FusionSkipReason.SINGLE) for s in report.sites)


# -- fuse_norm_quant -------------------------------------------------------------------------------------
class NormLinear(torch.nn.Module):
    """(optionally residual add ->) RMSNorm -> two linears; returns the linears and the residual stream."""

    def __init__(self, eps, functional=False, share=False):
        super().__init__()
        self.eps, self.functional, self.share = eps, functional, share
        self.norm = Qwen3RMSNorm(512, eps=eps).to(torch.bfloat16)
        self.q = torch.nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)
        self.k = torch.nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)
        _weights(self, seed=10)

    def forward(self, x, residual=None):
        h = x if residual is None else x + residual
        if self.functional:
            n = torch.nn.functional.rms_norm(h, (512,), self.norm.weight, self.eps)
        else:
            n = self.norm(h)
        out = (self.q(n), self.k(n), *([n] if self.share else []))
        return out if residual is None else (*out, h)  # Dynamo returns no graph output for a bare input


def _expected_norm_linears(module, scheme, x, residual):
    """The oracle's fused norm (fp32 residual sum, fp32 gamma, one cast) into the hand-composed linears."""
    x32 = x.float().numpy() + (0 if residual is None else residual.float().numpy())
    y, _ = rms_norm_golden(x32, module.norm.weight.float().detach().numpy(), None, module.eps)
    n = _bf16(y)
    return [linear(scheme, n, m.weight.detach(), None) for m in (module.q, module.k)]


@pytest.mark.parametrize("scheme", SINGLE)
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("functional, eps", [(False, 1e-6), (False, 1e-5), (True, 1e-6)],
                         ids=["qwen3-1e-6", "qwen3-1e-5", "F.rms_norm"])
def test_norm_quant_fusion_computes_the_npu_arithmetic(scheme, add, functional, eps):
    module = NormLinear(eps, functional)
    x, residual = activation(seed=1) * 4, activation(seed=2) if add else None
    inputs = (x,) if residual is None else (x, residual)
    gm, example, _, context = _rewritten(module, *inputs, scheme=scheme)
    report = fuse_norm_quant(gm, context)
    op = "npu_add_rms_norm_dynamic_mx_quant" if add else "npu_rms_norm_dynamic_mx_quant"
    assert [(s.linears, s.op) for s in report.sites] == [(("q", "k"), op)]
    fused = [n for n in gm.graph.nodes if n.target == getattr(mx, op).default]
    assert len(fused) == 1 and fused[0].kwargs["epsilon"] == eps and fused[0].kwargs["dst_type"] == 292
    assert not [n for n in gm.graph.nodes if n.target == mx.npu_dynamic_mx_quant.default]
    q, k, *h = gm(*example)
    expected_q, expected_k = _expected_norm_linears(module, scheme, x, residual)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    if add:
        assert torch.equal(_bits(h[0]), _bits(x + residual)), "x_out is the bf16 residual add"


def test_norm_quant_fusion_carries_scale_alg_and_fp4_destinations():
    """The quantization's dst_type / scale_alg / round_mode reach the fused op (graphs edited by hand:
    FP8 with scale_alg=1, and FP4 activations into an FP4 x FP4 matmul)."""
    module, x = NormLinear(1e-6), activation(seed=3)
    for quant_kwargs, matmul_kwargs in (({"scale_alg": 1}, {}), ({"dst_type": 296, "round_mode": "round"},
                                                                 {"x1_dtype": 296})):
        gm, example, _, context = _rewritten(module, x, scheme="mxfp4_w4a8")
        for node in gm.graph.nodes:
            if node.target == mx.npu_dynamic_mx_quant.default:
                node.kwargs = {**node.kwargs, **quant_kwargs}
            if node.target == mx.npu_quant_matmul.default:
                node.kwargs = {**node.kwargs, **matmul_kwargs}
        gm.recompile()
        unfused = gm(*example)
        report = fuse_norm_quant(gm, context)
        assert len(report.fused) == 1
        fused = next(n for n in gm.graph.nodes if n.target == mx.npu_rms_norm_dynamic_mx_quant.default)
        assert {k: fused.kwargs[k] for k in quant_kwargs} == quant_kwargs
        assert all(torch.isfinite(t).all() for t in gm(*example))
        assert not torch.equal(gm(*example)[0], unfused[0]), "fp32 gamma multiply: other numerics than the graph's"


def test_norm_quant_fusion_skips_with_reasons():
    x = activation(seed=4)
    gm, example, _, context = _rewritten(NormLinear(1e-6, share=True), x)
    report = fuse_norm_quant(gm, context)
    assert [s.reason for s in report.sites] == [FusionSkipReason.SHARED_OUTPUT]
    gm, example, _, context = _rewritten(NormLinear(1e-6), x, scheme="mxfp4_dual")
    report = fuse_norm_quant(gm, context)
    assert [s.reason for s in report.sites] == [FusionSkipReason.DUAL_LEVEL]
    gm, example, _, context = _rewritten(NormLinear(1e-6), x)
    for node in gm.graph.nodes:
        if node.target == mx.npu_dynamic_mx_quant.default:
            node.kwargs = {**node.kwargs, "block_size": 64}
    report = fuse_norm_quant(gm, context)
    assert [s.reason for s in report.sites] == [FusionSkipReason.QUANT_ARGS]
    gm, example, _, context = _rewritten(Block(), x)
    report = fuse_norm_quant(gm, context)
    assert [s.reason for s in report.sites] == [FusionSkipReason.NO_PATTERN] * 2


# -- fuse_swiglu_quant -----------------------------------------------------------------------------------
class _Config:
    hidden_size, intermediate_size, hidden_act, mlp_bias = 512, 1536, "silu", False


class UpFirstMLP(Qwen3MLP):
    """Qwen3MLP with up_proj traced before gate_proj: the merged halves come [up | gate]."""

    def forward(self, x):
        up = self.up_proj(x)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * up)


@pytest.mark.parametrize("scheme", SINGLE)
@pytest.mark.parametrize("mlp_class, activate_left", [(Qwen3MLP, True), (UpFirstMLP, False)],
                         ids=["gate-up", "up-gate"])
def test_swiglu_quant_fusion_on_the_merged_gate_up(scheme, mlp_class, activate_left):
    mlp = _weights(mlp_class(_Config()).to(torch.bfloat16), seed=20)
    x = activation(seed=5)
    gm, example, report, _ = _rewritten(mlp, x, scheme=scheme, extra=(merge_siblings, fuse_swiglu_quant))
    swiglu = report.passes[-1]
    assert [(s.linears, s.op) for s in swiglu.fused] == [(("down_proj",), "npu_swiglu_mx_quant")]
    node = next(n for n in gm.graph.nodes if n.target == mx.npu_swiglu_mx_quant.default)
    assert node.kwargs["activate_left"] is activate_left and node.kwargs["dst_type"] == 292
    gate, up = (linear(scheme, x, m.weight.detach(), None) for m in (mlp.gate_proj, mlp.up_proj))
    halves = (gate, up) if activate_left else (up, gate)
    out = _bf16(swiglu_golden(torch.cat(halves, -1).float().numpy(), activate_left))
    assert torch.equal(gm(*example)[0], linear(scheme, out, mlp.down_proj.weight.detach(), None))


def test_swiglu_quant_fusion_needs_the_merge():
    mlp = _weights(Qwen3MLP(_Config()).to(torch.bfloat16), seed=21)
    _, _, report, _ = _rewritten(mlp, activation(), extra=(fuse_swiglu_quant,))
    assert [s.reason for s in report.passes[-1].sites] == [FusionSkipReason.NO_PATTERN, FusionSkipReason.NOT_MERGED]


# -- all of them on Qwen3 -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fusion_passes_on_qwen3(scheme):
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    model = tiny_qwen3()
    for layer in model.model.layers:  # trained norms are not all ones
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _weights(norm, seed=30)
    gm, example, _, context = _rewritten(model, ids, scheme=scheme)
    expected = gm(*example)
    report = run_passes(gm, passes.FUSION_PASSES, context)
    merge, smooth, norm, swiglu = report.passes
    assert not smooth.sites, "no recipe: nothing smoothed"
    assert len(merge.fused) == 4
    if scheme == "mxfp4_dual":
        assert not norm.fused and not swiglu.fused
        assert Counter(s.reason for s in norm.skipped)[FusionSkipReason.DUAL_LEVEL] == 4
        assert all(torch.equal(a, b) for a, b in zip(gm(*example), expected)), "only the bit-exact merge ran"
        return
    assert [s.op for s in norm.fused] == ["npu_rms_norm_dynamic_mx_quant"] + ["npu_add_rms_norm_dynamic_mx_quant"] * 3
    assert len(swiglu.fused) == 2
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function" and n.target != operator.getitem)
    assert targets[mx.npu_dynamic_mx_quant.default] == 2, "only o_proj's inputs are quantized on their own"
    assert targets[mx.npu_quant_matmul.default] == 8, "per layer: qkv, o, gate_up, down"
    fused, unfused = gm(*example)[-1].float(), expected[-1].float()
    assert not torch.equal(fused, unfused), "the fused ops' arithmetic differs from the unfused graph's"
    with torch.no_grad():
        bf16 = model(ids).logits.float()
    error = {name: ((t - bf16).norm() / bf16.norm()).item() for name, t in (("fused", fused), ("unfused", unfused))}
    assert error["fused"] < 1.1 * error["unfused"], error


# -- the NPU target -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SINGLE)
def test_fusions_on_target_npu_call_the_fused_torch_npu_ops(torch_npu, scheme):
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    model, fusions = tiny_qwen3(), passes.DEFAULT_PASSES
    with torch.no_grad():
        npu = torch.compile(model, backend=Backend(scheme, target="npu", cache=PreparedWeights(), passes=fusions),
                            fullgraph=True)(ids)
        calls = [(name, args) for name, args in npu_standin.calls if name not in ("npu_format_cast",)]
        torch._dynamo.reset()
        reference = torch.compile(model, backend=mxfx.backend(scheme, target="reference", passes=fusions),
                                  fullgraph=True)(ids)
    assert torch.equal(npu.logits, reference.logits)
    run = Counter(name for name, _ in calls[14:])  # after preparing 14 weights (and 4 merged sets)
    assert run["npu_rms_norm_dynamic_mx_quant"] == 1 and run["npu_add_rms_norm_dynamic_mx_quant"] == 3
    assert run["npu_swiglu_mx_quant"] == 2 and run["npu_quant_matmul"] == 8
    assert all(args["activate_left"] is True for name, args in calls if name == "npu_swiglu_mx_quant")


def test_fusions_under_dynamic_shapes():
    """dynamic=True: eps arrives as item() of a graph input and the rewrite reads sizes with sym_size; the
    fusions still apply and compute what the static compile computes."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    model, fusions = tiny_qwen3(), passes.DEFAULT_PASSES
    logits = []
    for dynamic in (True, False):
        torch._dynamo.reset()
        backend = mxfx.backend("mxfp8", target="reference", passes=fusions)
        with torch.no_grad():
            logits.append(torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True)(ids).logits)
        _, merge, _, norm, swiglu, _ = backend.pipeline_reports[-1].passes  # (no smoothing to fold)
        assert (len(merge.fused), len(norm.fused), len(swiglu.fused)) == (4, 4, 2), dynamic
    assert torch.equal(*logits)


def test_an_update_of_a_merged_weight_is_merged_again():
    """Merged constants come from several weights: an update of one of them (here v_proj's, in place) makes
    the watch merge all of them again, so the compiled model computes what a fresh compile computes (v_proj:
    k_proj's output is normalized, so scaling it would change nothing)."""
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    model = tiny_qwen3(layers=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))
    with torch.no_grad():
        before = compiled(ids).logits
        model.model.layers[0].self_attn.v_proj.weight.mul_(2)
        updated = compiled(ids).logits
        torch._dynamo.reset()
        fresh = torch.compile(model, backend=mxfx.backend("mxfp8", target="reference"))(ids).logits
    torch._dynamo.reset()
    assert not torch.equal(before, updated)
    assert torch.equal(updated, fresh)


@pytest.mark.parametrize("scheme, recipe", [("mxfp4_w4a8", "gptq"), ("mxfp4_dual", "rotate+gptq")])
def test_recipe_siblings_merge_bit_exactly(scheme, recipe):
    """A recipe's siblings differ only in their codes (GPTQ is per linear) and share their activation's
    rotation: they merge, and the merged graph computes what the unmerged one does, bit for bit."""
    from mxfx.calibrating import calibrate

    model, ids = tiny_qwen3(layers=1), torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    calibration = calibrate(model, [ids])
    logits, reports = [], []
    for pipeline in ((passes.rewrite_linears, passes.merge_siblings), passes.UNFUSED_PASSES):
        torch._dynamo.reset()
        be = mxfx.backend(scheme, target="reference", recipe=recipe, calibration=calibration, passes=pipeline)
        with torch.no_grad():
            logits.append(torch.compile(model, backend=be, fullgraph=True)(ids).logits)
        reports.append(be.pipeline_reports[-1])
    torch._dynamo.reset()
    merge = reports[0].passes[1]
    assert [len(site.linears) for site in merge.fused] == [3, 2]
    assert torch.equal(*logits)
