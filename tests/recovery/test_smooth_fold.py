"""The offline fold of down_proj's input smoothing into up_proj's rows: exact in real arithmetic (fp64, with
the MLP's biases), down_proj's multiply gone from the graph so the SwiGLU fuses with its quantization
(fusion report, NPU stand-in calls), and every case that does not fold, with its reason."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mxfx
from mxfx import recipes
from mxfx.calibrating import calibrate
from mxfx.recipes import Recipe
from mxfx.recovery.rotation import BlockRotation
from passes import FusionReport
from tests.models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
MLP = "model.layers.{}.mlp"


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _tiny_llama_with_mlp_bias():
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                         mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return model


def test_the_fold_is_exact_in_real_arithmetic_with_biases():
    """fp64, unquantized: up_proj's rows and bias times down_proj's smooth scale s, down_proj's columns W / s,
    no multiply: the original model's logits; and the recipe's own transforms are those."""
    model = _tiny_llama_with_mlp_bias()
    selector = recipes.apply("mxfp8", "smooth", calibrate(model, [IDS], gram=False), model)
    assert [(f.down_proj, f.folded) for f in selector.folds.smoothings] == [(MLP.format(0) + ".down_proj", True)]
    model64 = copy.deepcopy(model).double()
    up, down = (model64.get_submodule(f"{MLP.format(0)}.{p}") for p in ("up_proj", "down_proj"))
    s = selector.scheme_for(model.get_submodule(f"{MLP.format(0)}.down_proj").weight).smooth.tensor.double()
    with torch.no_grad():
        expected = model64(IDS).logits
        up.weight.mul_(s.unsqueeze(1))
        up.bias.mul_(s)
        down.weight.div_(s)
        got = model64(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    originals = {p: model.get_submodule(f"{MLP.format(0)}.{p}") for p in ("up_proj", "down_proj")}
    up_scheme, down_scheme = (selector.scheme_for(m.weight) for m in originals.values())
    assert up_scheme.row_scale.tensor.double().equal(s) and down_scheme.smooth_folded
    # up_proj's own input is smoothed too (gate/up's scale, on its columns): undo it to compare the rows
    w_up = up_scheme.transformed_weight(originals["up_proj"].weight) * up_scheme.smooth.tensor.float()
    torch.testing.assert_close(w_up.double(), up.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(down_scheme.transformed_weight(originals["down_proj"].weight).double(), down.weight,
                               rtol=1e-6, atol=1e-6)
    bias = up_scheme.output_bias(originals["up_proj"].bias)
    assert bias.dtype == torch.bfloat16
    torch.testing.assert_close(bias.double(), up.bias, rtol=2 ** -8, atol=0)
    assert down_scheme.activation_constants == () and "smooth_scale" not in down_scheme.prepare(
        mxfx.targets.get_target("reference"), originals["down_proj"].weight, None, torch.bfloat16)


def _mlp_sites(be) -> dict[str, list]:
    """pass -> [(outcome, op or reason)] of its down_proj sites."""
    return {r.pass_name: [(s.outcome, s.op or s.reason.value) for s in r.sites if s.linears[0].endswith("down_proj")]
            for r in be.pipeline_reports[-1].get(FusionReport)}


def _compiled(model, selector, target="reference", **options):
    """(logits, backend, the last graph) of model(IDS) compiled with mxfx on `target`."""
    torch._dynamo.reset()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm

    be = mxfx.backend(selector, target=target, inner=inner, **options)
    with torch.no_grad():
        logits = torch.compile(model, backend=be, fullgraph=True)(IDS).logits
    torch._dynamo.reset()
    return logits, be, graphs[-1]


def _smooth_muls(gm) -> int:
    return sum(n.op == "call_function" and n.meta.get("mxfx", {}).get("role") == "activation_quant"
               and getattr(n.target, "__name__", "") == "mul.Tensor" for n in gm.graph.nodes)


@pytest.mark.parametrize("scheme", ["mxfp4_w4a8", "mxfp8"])
def test_the_fold_removes_down_projs_multiply_and_the_swiglu_fuses(torch_npu, scheme, record_property):
    """On the NPU stand-in: npu_swiglu_mx_quant quantizes down_proj's input (no mul before it), the logits
    the reference target's; against the online multiply (a selector without the model) only the place of
    one rounding moves, and both are as far from bf16."""
    from tests import npu_standin

    model = tiny_qwen3(layers=2)
    calibration = calibrate(model, [IDS], gram=False)
    folded = recipes.apply(scheme, "smooth", calibration, model)
    online = recipes.select(scheme, "smooth", calibration, {name: m.weight for name, m in _linears(model).items()})
    npu_standin.calls.clear()
    npu, be, folded_graph = _compiled(model, folded, target="npu")
    calls = [name for name, _ in npu_standin.calls]
    reference, _, _ = _compiled(model, folded)
    unfolded, online_be, online_graph = _compiled(model, online)
    assert torch.equal(npu, reference)
    assert be.reports[-1].folds == [f"{MLP.format(i)}.down_proj: input smoothing folded into up_proj's rows"
                                    for i in (0, 1)]
    assert online_be.reports[-1].folds == [recipes.NO_MODEL]
    labels = {r.fqn: r.scheme for r in be.reports[-1].rewritten}
    assert labels[f"{MLP.format(0)}.down_proj"] == f"{scheme}+smooth (input smoothing folded offline)"
    assert labels[f"{MLP.format(0)}.up_proj"] == f"{scheme}+smooth (output rows smoothed for down_proj)"
    assert _mlp_sites(be)["fuse_swiglu_quant"] == [("fused", "npu_swiglu_mx_quant")] * 2
    assert _mlp_sites(online_be)["fuse_swiglu_quant"] == [("skipped", "no pattern")] * 2
    assert calls.count("npu_swiglu_mx_quant") == 2
    assert (_smooth_muls(folded_graph), _smooth_muls(online_graph)) == (2, 4), "o_proj's mul stays; down_proj's goes"
    with torch.no_grad():
        bf16 = model(IDS).logits.float()
    errors = [(logits.float() - bf16).pow(2).mean().sqrt().item() for logits in (reference, unfolded)]
    record_property("measured", f"{scheme} smooth, down_proj folded vs online: logits RMS error to bf16 "
                                f"{errors[0]:.4f} vs {errors[1]:.4f}")
    assert errors[0] < 1.1 * errors[1]


def test_a_down_proj_input_rotation_still_follows_the_folded_smoothing():
    """smooth+rotate on mxfp4_dual: the rotation after the smoothing makes it a mul, which folds; down_proj's
    activation is then rotated only (bmm, then the quantizer), the weight still (W / s) A^-T."""
    model = tiny_qwen3(layers=1)
    recipe = Recipe(smooth_alpha=0.5, rotation=BlockRotation(32))
    selector = recipes.apply("mxfp4_dual", recipe, calibrate(model, [IDS], gram=False), model)
    assert [f.folded for f in selector.folds.smoothings] == [True]
    down = selector.scheme_for(model.get_submodule(f"{MLP.format(0)}.down_proj").weight)
    assert down.activation_constants == ("rotation",)
    assert not [f for f in recipes.apply("mxfp4_dual", "smooth", calibrate(model, [IDS], gram=False),
                                         model).folds.smoothings], "free in the dual-level quantizer: no fold"


def test_what_cannot_fold_stays_online_with_its_reason():
    model = tiny_qwen3(layers=1)
    weights = {name: m.weight for name, m in _linears(model).items()}
    found = recipes.mlps(model)
    down, up = f"{MLP.format(0)}.down_proj", f"{MLP.format(0)}.up_proj"
    assert found == [recipes.MLP(up, down)]
    scale = recipes.Constant(torch.ones(1536, dtype=torch.bfloat16))
    base, smooth = mxfx.schemes.SCHEMES["mxfp8"], Recipe(smooth_alpha=0.5)

    def reason(found=found, weights=weights):
        (fold,) = recipes.fold_smoothings(base, smooth, weights, found, {down: scale})
        assert not fold.folded
        return fold.reason

    no_up = {k: v for k, v in weights.items() if k != up}
    assert reason(weights=no_up) == f"{up} is not quantized by the recipe"
    assert reason(weights={**weights, up: torch.zeros(1024, 512)}) == f"{up}'s N=1024 is not down_proj's K=1536"

    class Custom(torch.nn.Module):  # an MLP mxfx does not know: up_proj's output may be anything to down_proj
        def __init__(self):
            super().__init__()
            self.up_proj, self.down_proj = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    (custom,) = recipes.mlps(torch.nn.ModuleDict({"mlp": Custom()}))
    assert custom.why == "MLP class Custom is not known to multiply up_proj's output into down_proj's input " \
                         "channel by channel"
    assert reason(found=[recipes.MLP(up, down, custom.why)]) == custom.why
    assert recipes.fold_smoothings(base, smooth, weights, found, {down: None}) == [], "the search chose none"
    assert recipes.fold_smoothings(base, Recipe(gptq=True), weights, found, {}) == []
    with pytest.raises(ValueError, match=f"linear {down}: its smoothing must be decided before its smoothing"):
        recipes.fold_smoothings(base, smooth, weights, found, {})


def test_a_folded_mlp_half_rewritten_is_refused_by_name():
    model = tiny_qwen3(layers=1)
    selector = recipes.apply("mxfp8", "smooth", calibrate(model, [IDS], gram=False), model)
    with pytest.raises(Exception, match=r"linear model.layers.0.mlp.down_proj: its input smoothing is folded into "
                                        r"model.layers.0.mlp.up_proj's rows, but model.layers.0.mlp.up_proj is "
                                        r"skipped \(excluded"):
        _compiled(model, selector, exclude="*up_proj")


def test_the_layer_sqnr_of_a_folded_linear_compares_its_transformed_rows():
    """evaluation.layer_sqnr on the four linears of the folds: up_proj's (v_proj's) bf16 output scaled
    (rotated) like its rows, down_proj's (o_proj's) input smoothed (rotated) as the fold delivers it, so the
    figure is the quantization's, as without the fold (not the -20 dB of comparing a transformed output with
    the plain one)."""
    from mxfx import evaluation

    model = tiny_qwen3(layers=1)
    calibration = calibrate(model, [IDS], gram=False)
    weights = {name: m.weight for name, m in _linears(model).items()}
    inputs = evaluation.layer_inputs(model, IDS)
    for recipe, name in (("smooth", f"{MLP.format(0)}.up_proj"), ("rotate", "model.layers.0.self_attn.v_proj"),
                         ("smooth", f"{MLP.format(0)}.down_proj"), ("rotate", "model.layers.0.self_attn.o_proj")):
        folded = recipes.apply("mxfp8", recipe, calibration, model)
        scheme, n, k = folded.scheme_for(weights[name]), *weights[name].shape
        y, x = torch.randn(3, n), torch.randn(3, k)
        assert not (torch.equal(scheme.output_rows(y), y) and torch.equal(scheme.folded_input(x), x)), "a fold"
        online = recipes.select("mxfp8", recipe, calibration, weights)
        got, unfolded = (evaluation.layer_sqnr(model, inputs, s, [name])[name] for s in (folded, online))
        assert abs(got - unfolded) < 1.0 and got > 25, (recipe, got, unfolded)
