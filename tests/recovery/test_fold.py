"""The offline fold of o_proj's input rotation into v_proj's rows: exact in real arithmetic with GQA (fp64,
torch.block_diag as the independent rotation), the compiled graph equal to the same linears composed by
hand from the reference ops, one bmm fewer per layer on the NPU target, and every refusal with its reason."""

import copy

import pytest
import torch

import mxfx
from mxfx import recipes
from mxfx.calibrating import calibrate
from mxfx.dynamo_backend import Backend
from mxfx.prepared import PreparedWeights
from mxfx.recipes import Recipe
from mxfx.recovery.rotation import BlockRotation
from passes import RewriteError
from tests import reference_linear
from tests.models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
ATTENTION = "model.layers.{}.self_attn"


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _compiled(model, selector, **options):
    torch._dynamo.reset()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm

    be = Backend(selector, inner=inner, cache=PreparedWeights(), **options)  # every weight prepared: all calls
    with torch.no_grad():
        logits = torch.compile(model, backend=be, fullgraph=True)(IDS).logits
    torch._dynamo.reset()
    return logits, be, graphs[-1]


def _rotations(gm) -> int:
    """Online rotations: bmm (dual-level, or a target without it) or npu_rotate_quant (single-level)."""
    names = ("bmm.default", "npu_rotate_quant.default")  # aten's, and the mirror's or torch_npu's
    return sum(n.op == "call_function" and getattr(n.target, "__name__", "") in names for n in gm.graph.nodes)


@pytest.mark.parametrize("block", [32, 64])
def test_the_fold_is_exact_in_real_arithmetic_with_gqa(block):
    """fp64, unquantized: v_proj's rows A^T W_v and bias b A, o_proj's columns W_o A^-T with no rotation of
    its input: the logits of the original model (8 heads on 4 kv heads), and the recipe's own transforms."""
    model = tiny_qwen3(layers=2, attention_bias=True)
    for m in _linears(model).values():
        torch.nn.init.normal_(m.bias, std=0.5) if m.bias is not None else None
    selector = recipes.apply("mxfp4_dual", Recipe(rotation=BlockRotation(block)), None, model)
    assert [f.folded for f in selector.folds.rotations] == [True, True]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = model64(IDS).logits
        for layer in range(2):
            attention = model64.get_submodule(ATTENTION.format(layer))
            a = torch.block_diag(*BlockRotation(block).activation_blocks(512))  # o_proj's input, 8 heads of 64
            a_v = a[:256, :256]  # the blocks of 4 kv heads: the same per head position
            v, o = attention.v_proj, attention.o_proj
            v.weight.copy_(a_v.T @ v.weight)
            v.bias.copy_(v.bias @ a_v)
            o.weight.copy_(o.weight @ torch.linalg.inv(a).T)
        got = model64(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    with torch.no_grad():
        for layer in range(2):
            names = {p: f"{ATTENTION.format(layer)}.{p}" for p in ("v_proj", "o_proj")}
            for p, name in names.items():
                original, folded = model.get_submodule(name), model64.get_submodule(name)
                scheme = selector.scheme_for(original.weight)
                w = scheme.transformed_weight(original.weight)
                if p == "v_proj":  # the recipe also rotates v_proj's own input: undo it to compare the rows
                    w = w @ torch.block_diag(*BlockRotation(block).activation_blocks(512)).T.float()
                    torch.testing.assert_close(scheme.output_bias(original.bias.float()), folded.bias.float(),
                                               rtol=1e-6, atol=1e-6)
                    assert scheme.output_bias(original.bias).dtype == torch.bfloat16
                torch.testing.assert_close(w.double(), folded.weight, rtol=1e-5, atol=1e-5)


class _Hand(torch.nn.Module):
    """A linear composed by hand: x rotated by `a` in bf16 (fp32 accumulation, one rounding) unless a is
    None, then the reference ops on the given transformed weight and bias."""

    def __init__(self, scheme, a, w, b):
        super().__init__()
        self.scheme, self.a, self.n = scheme, a, w.shape[0]
        self.prepared = reference_linear.prepare(scheme, w, b)

    def forward(self, x):
        if self.a is not None:
            x = (x.float() @ self.a.float()).bfloat16()
        return reference_linear.apply(self.scheme, x, self.prepared, self.n)


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp4_w4a8"])
def test_the_folded_graph_is_the_reference_ops_composed_by_hand(scheme):
    model = tiny_qwen3(layers=2, attention_bias=True)
    selector = recipes.apply(scheme, "rotate", None, model)
    got, be, gm = _compiled(model, selector, target="reference")
    report = be.reports[-1]
    assert report.folds == [f"{ATTENTION.format(i)}.o_proj: input rotation folded into v_proj's rows" for i in (0, 1)]
    labels = {r.fqn: r.scheme for r in report.rewritten}
    assert labels[f"{ATTENTION.format(0)}.o_proj"] == f"{scheme}+rotate (input rotation folded offline)"
    assert labels[f"{ATTENTION.format(0)}.v_proj"] == f"{scheme}+rotate (output rows rotated per head)"
    assert "model.layers.0.self_attn.o_proj: input rotation folded" in str(report)

    hand = copy.deepcopy(model)
    for name, m in _linears(model).items():
        if name == "lm_head":
            continue
        a = torch.block_diag(*BlockRotation(32).activation_blocks(m.in_features))
        w = m.weight.float() @ torch.linalg.inv(a).T.float()
        b = m.bias
        if name.endswith("v_proj"):
            a_out = a[:256, :256].float()  # 4 kv heads of 64, the blocks of o_proj's head positions
            w, b = a_out.T @ w, (b.float() @ a_out).bfloat16()
        hand.set_submodule(name, _Hand(scheme, None if name.endswith("o_proj") else a, w.bfloat16(), b))
    with torch.no_grad():
        expected = hand(IDS).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp8"])
def test_the_fold_removes_one_bmm_per_layer_on_the_npu_target(torch_npu, scheme, record_property):
    """On the NPU stand-in: 3 rotations per layer instead of 4, the same torch_npu calls, and the reference
    target's logits. Against the online rotation (a selector without the model) only the place of one bf16
    rounding moves (v's output, not o_proj's rotated input), which the MX quantizers amplify to a
    difference of the size of the quantization error itself; both are as far from bf16."""
    from tests import npu_standin

    model = tiny_qwen3(layers=2, attention_bias=True)
    folded = recipes.apply(scheme, "rotate", None, model)
    online = recipes.select(scheme, "rotate", None, {name: m.weight for name, m in _linears(model).items()})
    npu_standin.calls.clear()
    npu, _, npu_graph = _compiled(model, folded, target="npu")
    calls = [name for name, _ in npu_standin.calls]
    reference, _, _ = _compiled(model, folded, target="reference")
    npu_standin.calls.clear()
    unfolded, be, online_graph = _compiled(model, online, target="npu")
    assert torch.equal(npu, reference)
    assert (_rotations(npu_graph), _rotations(online_graph)) == (6, 8)
    assert be.reports[-1].folds == [recipes.NO_MODEL]
    online_calls = [name for name, _ in npu_standin.calls]
    if scheme == "mxfp4_dual":  # the rotation is an aten bmm: the same torch_npu calls, in the same order
        assert calls == online_calls
    else:  # o_proj's activation: a plain quantizer in place of npu_rotate_quant, per layer
        assert (calls.count("npu_rotate_quant"), online_calls.count("npu_rotate_quant")) == (6, 8)
        assert calls.count("npu_dynamic_mx_quant") == online_calls.count("npu_dynamic_mx_quant") + 2
    with torch.no_grad():
        bf16 = model(IDS).logits.float()
    errors = [(logits.float() - bf16).pow(2).mean().sqrt().item() for logits in (npu, unfolded)]
    top1 = (npu.argmax(-1) == unfolded.argmax(-1)).float().mean().item()
    record_property("measured", f"{scheme} rotate, folded vs online: logits RMS error to bf16 {errors[0]:.4f} vs "
                                f"{errors[1]:.4f}, max |difference| {(npu - unfolded).abs().max().item():.3f}, "
                                f"top-1 agreement {top1:.1%}")
    assert not torch.equal(npu, unfolded) and errors[0] < 1.1 * errors[1]



def test_what_cannot_fold_stays_online_with_its_reason():
    model = tiny_qwen3(layers=1)
    weights = {name: m.weight for name, m in _linears(model).items()}
    found = recipes.attentions(model)
    assert found == [recipes.Attention(f"{ATTENTION.format(0)}.v_proj", f"{ATTENTION.format(0)}.o_proj", 64)]

    def reason(recipe, found=found, weights=weights, smooth=()):
        (fold,) = recipes.fold_rotations(mxfx.schemes.SCHEMES["mxfp8"], recipe, weights, found, dict(smooth))
        assert not fold.folded
        return fold.reason

    assert reason(Recipe(rotation=BlockRotation(32, "random"))) == "the random blocks differ between head positions"
    assert reason(Recipe(rotation=BlockRotation(128))) == "rotation block 128 does not divide head_dim 64"
    o_proj, scale = f"{ATTENTION.format(0)}.o_proj", recipes.Constant(torch.ones(512, dtype=torch.bfloat16))
    assert reason(Recipe(smooth_alpha=0.5, rotation=BlockRotation(32)), smooth=[(o_proj, scale)]) == \
        "o_proj's input is smoothed before its rotation"
    with pytest.raises(ValueError, match=f"linear {o_proj}: its smoothing must be decided before its rotation"):
        reason(Recipe(smooth_alpha=0.5, rotation=BlockRotation(32)))
    no_v = {k: v for k, v in weights.items() if not k.endswith("v_proj")}
    assert reason(Recipe(rotation=BlockRotation(32)), weights=no_v) == \
        f"{ATTENTION.format(0)}.v_proj is not quantized by the recipe"
    other = [recipes.Attention("a.v_proj", f"{ATTENTION.format(0)}.o_proj", None, "attention class X is not known")]
    assert reason(Recipe(rotation=BlockRotation(32)), found=other) == "attention class X is not known"
    assert recipes.fold_rotations(mxfx.schemes.SCHEMES["mxfp8"], Recipe(gptq=True), weights, found, {}) == []

    class Custom(torch.nn.Module):  # an attention mxfx does not know: v_proj's output may meet anything
        def __init__(self):
            super().__init__()
            self.v_proj, self.o_proj, self.head_dim = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), 32

    (custom,) = recipes.attentions(torch.nn.ModuleDict({"attn": Custom()}))
    assert custom.head_dim is None and "Custom is not known to pass v_proj's output straight" in custom.why


@pytest.mark.parametrize("o_proj_smoothed", [False, True])
def test_the_fold_is_decided_after_the_smoothing_search(monkeypatch, o_proj_smoothed):
    """smooth-search + rotate: o_proj's rotation folds where the search chose no smoothing for its input (a
    scale for every other input), and stays online, saying why, where it chose one; the o_proj that folds
    has no smooth scale and reads no online rotation in the graph (6 rotations for 2 layers, not 8)."""
    model = tiny_qwen3(layers=2)
    calibration = calibrate(model, [IDS], gram=False)
    chosen = {}

    def search(base, recipe, stats, weights):  # stands in for the search: its choice per input is the case's
        smooth = None if stats.members[0].endswith("o_proj") and not o_proj_smoothed else \
            recipes.Constant(torch.full((stats.k,), 0.5, dtype=torch.bfloat16))
        chosen[stats.members[0]] = smooth
        return smooth

    monkeypatch.setattr(recipes, "searched_smooth", search)
    recipe = Recipe(smooth_alpha="search", rotation=BlockRotation(32))
    selector = recipes.apply("mxfp4_dual", recipe, calibration, model)
    assert len(chosen) == 2 * 4 + 1, "one search per input (q/k/v, o, gate/up, down per layer; lm_head)"
    folds = selector.folds.rotations
    refused = (False, "o_proj's input is smoothed before its rotation")
    assert [(f.folded, f.reason) for f in folds] == [refused if o_proj_smoothed else (True, "")] * 2
    o_proj = selector.scheme_for(model.get_submodule(f"{ATTENTION.format(0)}.o_proj").weight)
    assert o_proj.fold_input == (not o_proj_smoothed) and (o_proj.smooth is None) == (not o_proj_smoothed)
    _, be, gm = _compiled(model, selector, target="reference")
    assert _rotations(gm) == (8 if o_proj_smoothed else 6)
    assert be.reports[-1].folds == [str(f) for f in selector.folds.all()]


def test_a_folded_pair_half_rewritten_is_refused_by_name():
    model = tiny_qwen3(layers=1)
    selector = recipes.apply("mxfp4_dual", "rotate", None, model)
    with pytest.raises(Exception, match=r"linear model.layers.0.self_attn.o_proj: its input rotation is folded into "
                                        r"model.layers.0.self_attn.v_proj's rows, but model.layers.0.self_attn."
                                        r"v_proj is skipped \(excluded"):
        _compiled(model, selector, target="reference", exclude="*v_proj")
    assert issubclass(RewriteError, RuntimeError)


def test_an_updated_v_proj_is_merged_again_with_its_rows_rotated():
    """The merged q/k/v constants keep one scheme per sibling: the weight watch re-prepares v_proj's rotated
    rows (and bias) when its weight changes after compiling."""
    model = tiny_qwen3(layers=1, attention_bias=True)
    selector = recipes.apply("mxfp8", "rotate", None, model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mxfx.backend(selector, target="reference"), fullgraph=True)
    v = model.get_submodule(f"{ATTENTION.format(0)}.v_proj")
    with torch.no_grad():
        before = compiled(IDS).logits
        v.weight.mul_(-1)
        v.bias.add_(0.5)
        after = compiled(IDS).logits
    expected, be, _ = _compiled(model, selector, target="reference")
    merged = [s.linears for s in be.pipeline_reports[-1].passes[1].fused]
    assert merged[0] == tuple(f"{ATTENTION.format(0)}.{p}_proj" for p in "qkv"), "v_proj merges with q/k"
    assert not torch.equal(before, after) and torch.equal(after, expected)
