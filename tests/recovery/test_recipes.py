"""Recipe schemes in the graph: the rewrite of a recipe linear against the same linear composed by hand
from the reference ops, siblings sharing one activation quantization, scheme values as cache keys, and
the errors."""

import pytest
import torch

import mxfx
from mxfx import recipes
from mxfx.calibrating import calibrate
from mxfx.recipes import Recipe
from mxfx.recovery.rotation import BlockRotation
from tests import reference_linear
from tests.models import tiny_qwen3


class One(torch.nn.Module):
    def __init__(self, k=512, n=64):
        super().__init__()
        self.proj = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.proj(x)


def _inputs(k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 8, k, generator=g) * torch.linspace(0.05, 20, k)).bfloat16()


def _compiled(model, selector):
    torch._dynamo.reset()
    be = mxfx.backend(scheme=selector, target="reference")
    return torch.compile(model, backend=be, fullgraph=True), be


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp4_w4a8", "mxfp8"])
@pytest.mark.parametrize("rotation", [None, BlockRotation(64, "random", seed=5)])
def test_the_rewrite_is_smoothing_and_rotation_composed_by_hand(scheme, rotation):
    torch.manual_seed(0)
    model, x = One(), _inputs()
    calibration = calibrate(model, [_inputs(seed=1)], gram=False)
    selector = recipes.apply(scheme, Recipe(smooth_alpha=0.5, rotation=rotation), calibration, model)
    compiled, be = _compiled(model, selector)
    with torch.no_grad():
        got = compiled(x)
    assert be.reports[-1].linears[0].outcome == "rewritten"

    w = model.proj.weight.detach()
    amax_x = _inputs(seed=1).float().abs().reshape(-1, 512).amax(0)
    s = (w.float().abs().amax(0).sqrt() / amax_x.sqrt()).bfloat16()  # alpha 0.5: x divided by SmoothQuant's scale
    x_t, w_t = x * s, w.float() / s.float()
    if rotation is not None:
        a = torch.block_diag(*rotation.activation_blocks(512))
        x_t = (x_t.float() @ a.float()).bfloat16()  # bf16 in, fp32 accumulation, one rounding
        w_t = w_t @ torch.linalg.inv(a).T.float()
    expected = reference_linear.linear(scheme, x_t, w_t.bfloat16(), None)
    assert torch.equal(got, expected)


def test_siblings_share_one_activation_quantization_and_schemes_are_cache_keys():
    model = tiny_qwen3(layers=1)
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibration = calibrate(model, batches)
    selector = recipes.apply("mxfp4_dual", "smooth+gptq", calibration, model)
    compiled, be = _compiled(model, selector)
    with torch.no_grad():
        compiled(batches[0])
    report = be.reports[-1]
    assert len(report.rewritten) == 7 and report.activation_quants == 4  # q/k/v share one, gate/up one
    attention = model.model.layers[0].self_attn
    q, k, o = (selector.scheme_for(m.weight) for m in (attention.q_proj, attention.k_proj, attention.o_proj))
    assert q.smooth == k.smooth and q.smooth != o.smooth
    assert q == k and q != o  # q/k/v read one input: one Gram matrix, equal schemes (so merge_siblings merges them)
    again = recipes.apply("mxfp4_dual", "smooth+gptq", calibration, model).scheme_for(attention.q_proj.weight)
    assert again == q and hash(again) == hash(q)  # a second apply reuses the prepared weights
    other = recipes.apply("mxfp4_dual", Recipe(smooth_alpha=0.4, gptq=True), calibration, model)
    assert other.scheme_for(attention.q_proj.weight) != q
    assert selector.scheme_for(torch.zeros(4, 4)) is None  # a weight of another model is left alone


def test_bad_requests_are_refused_by_name():
    model = One()
    with pytest.raises(ValueError, match="recipe smooth needs a calibration"):
        recipes.apply("mxfp4_dual", "smooth", None, model)
    with pytest.raises(ValueError, match="unknown recipe 'best'"):
        recipes.apply("mxfp4_dual", "best", None, model)
    with pytest.raises(ValueError, match="no recipe is recommended for mxfp4 yet"):
        recipes.get_recipe("recommended", mxfx.schemes.SCHEMES["mxfp4"])
    with pytest.raises(ValueError, match="recipes apply to the online schemes"):
        recipes.apply("modelslim", "rotate", None, model)
    with pytest.raises(ValueError, match="linear proj: rotation block 64 does not divide K=96"):
        recipes.apply("mxfp4_w4a8", Recipe(rotation=BlockRotation(64)), None, One(k=96))
    with pytest.raises(ValueError, match="another model"):
        recipes.apply("mxfp4_dual", "gptq", calibrate(One(k=1024), [_inputs(1024)]), model)
    with pytest.raises(ValueError, match="linear proj: GPTQ needs the Gram matrix"):
        recipes.apply("mxfp4_dual", "gptq", calibrate(model, [_inputs()], gram=False), model)


def test_the_backend_runs_a_recipe_on_each_graphs_linears():
    """backend(recipe=, calibration=) builds the recipe's schemes from the graph's own linears: the same
    logits as the selector recipes.apply builds from the model where the model allows no offline fold (the
    dual-level quantizer smooths for free: nothing to fold), and the excluded lm_head stays bf16."""
    model = tiny_qwen3(layers=1)
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibration = calibrate(model, batches)
    selector = recipes.apply("mxfp4_dual", "smooth+gptq", calibration, model)
    assert selector.folds.all() == []
    compiled, by_model = _compiled(model, selector)
    with torch.no_grad():
        expected = compiled(batches[0]).logits
    torch._dynamo.reset()
    be = mxfx.backend("mxfp4_dual", target="reference", recipe="smooth+gptq", calibration=calibration)
    with torch.no_grad():
        got = torch.compile(model, backend=be, fullgraph=True)(batches[0]).logits
    torch._dynamo.reset()
    assert torch.equal(got, expected)
    assert "recipe='smooth+gptq'" in repr(be)
    assert {r.scheme for r in be.reports[-1].rewritten} == {"mxfp4_dual+smooth+gptq"}
    assert "lm_head" in {r.fqn for r in be.reports[-1].skipped}


def test_the_backend_refuses_a_recipe_it_cannot_run_when_made():
    with pytest.raises(ValueError, match="recipe gptq needs a calibration"):
        mxfx.backend("mxfp4_dual", recipe="gptq")
    with pytest.raises(ValueError, match="a calibration serves a recipe"):
        mxfx.backend("mxfp4_dual", calibration=calibrate(One(), [_inputs()]))
    with pytest.raises(ValueError, match="recipes apply to the online schemes"):
        mxfx.backend("modelslim", recipe="rotate")
    model = tiny_qwen3(layers=1)
    be = mxfx.backend("mxfp4_dual", target="reference", recipe="gptq", calibration=calibrate(One(), [_inputs()]))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="has no calibration statistics"):
        torch.compile(model, backend=be, fullgraph=True)(torch.zeros(1, 4, dtype=torch.long))
    torch._dynamo.reset()


def test_the_report_counts_the_weight_not_the_activations_constants():
    """A rotation (or smooth scale) belongs to the activation, shared by its linears: the rewrite report's
    bytes are the weight's codes and scales, as for the plain scheme."""
    model, x, counted = One(), _inputs(), []
    for recipe in (None, "rotate"):
        torch._dynamo.reset()
        be = mxfx.backend("mxfp4_dual", target="reference", recipe=recipe)
        with torch.no_grad():
            torch.compile(model, backend=be, fullgraph=True)(x)
        counted.append(be.reports[-1].bytes_after)
    torch._dynamo.reset()
    assert counted[0] == counted[1] == 64 * 512 * 4.3125 / 8


def _searched_errors(scheme, x, w, amax_x):
    """The oracle: each candidate's quantized output error, from the formula and the hand-composed linears
    (one linear: its error relative to the output's energy orders the candidates as the plain error does)."""
    exact = x.float() @ w.float().T
    errors = {None: (reference_linear.linear(scheme, x, w, None).float() - exact).square().sum().item()}
    for alpha in recipes.SEARCHED_ALPHAS:
        s = (w.double().abs().amax(0) ** (1 - alpha) / amax_x.double() ** alpha).bfloat16()
        y = reference_linear.linear(scheme, x * s, (w.float() / s.float()).bfloat16(), None)
        errors[alpha] = ((y.float() - exact).square().sum().item(), s)
    return errors


def _grid_values(shape, seed):
    """Values exact on the FP4 grid at any MX scale: +-2^-j, j in 0..2."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (signs * 2.0 ** -torch.randint(0, 3, shape, generator=g)).bfloat16()


@pytest.mark.parametrize("scheme", ["mxfp4_dual", "mxfp4_w4a8", "mxfp8"])
def test_the_alpha_search_picks_the_least_quantized_output_error(scheme):
    torch.manual_seed(0)
    model = One()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 512, generator=g)
    x[..., 37] *= 300  # planted outlier channels
    x[..., 300] *= 200
    calibration = calibrate(model, [x.bfloat16()], gram=False, sample_rows=128)
    stats = calibration.stats("proj")
    chosen = recipes.apply(scheme, "smooth-search", calibration, model).scheme_for(model.proj.weight).smooth
    errors = _searched_errors(scheme, stats.sample, model.proj.weight.detach(), stats.amax)
    best = min(errors, key=lambda a: errors[a] if a is None else errors[a][0])
    if best is None:
        assert chosen is None
    else:
        torch.testing.assert_close(chosen.tensor.float(), errors[best][1].float(), rtol=1e-2, atol=0)
    if scheme == "mxfp4_dual":  # an outlier crushes its MX blocks: smoothing wins by far
        assert best is not None and errors[best][0] < 0.5 * errors[None]


def test_the_alpha_search_keeps_an_activation_without_outliers_unsmoothed():
    """Activation and weight exact on the FP4 grid: no smoothing is the optimum (the oracle says so), and the
    rewrite then emits no smoothing at all."""
    model = One()
    with torch.no_grad():
        model.proj.weight.copy_(_grid_values((64, 512), 2))
    calibration = calibrate(model, [_grid_values((4, 32, 512), 3)], gram=False, sample_rows=128)
    stats = calibration.stats("proj")
    errors = _searched_errors("mxfp4_dual", stats.sample, model.proj.weight.detach(), stats.amax)
    assert all(errors[None] <= errors[alpha][0] for alpha in recipes.SEARCHED_ALPHAS)
    selector = recipes.apply("mxfp4_dual", "smooth-search", calibration, model)
    scheme = selector.scheme_for(model.proj.weight)
    assert scheme.smooth is None and scheme.activation_constants == ()
    compiled, be = _compiled(model, selector)
    x = _grid_values((2, 8, 512), 4)
    with torch.no_grad():
        assert torch.equal(compiled(x), reference_linear.linear("mxfp4_dual", x, model.proj.weight.detach(), None))


def test_the_alpha_search_refuses_a_calibration_without_a_sample():
    model = One()
    with pytest.raises(ValueError, match="linear proj: the smoothing's alpha search needs a sample"):
        recipes.apply("mxfp4_dual", "smooth-search", calibrate(model, [_inputs()], gram=False, sample_rows=0), model)
    recipes.apply("mxfp4_dual", "smooth", calibrate(model, [_inputs()], gram=False, sample_rows=0), model)  # no need
    with pytest.raises(ValueError, match="smooth_alpha must be a number in \\[0, 1\\], 'search' or None"):
        Recipe(smooth_alpha="best")


class Two(torch.nn.Module):
    """Two linears on one input, b's outputs ~64x a's: an outlier channel that b's column has absorbed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = (torch.nn.Linear(512, 64, bias=False, dtype=torch.bfloat16) for _ in range(2))
        with torch.no_grad():
            self.b.weight *= 64
            self.b.weight[:, 37] /= 256
            self.a.weight[:, 100] *= 8

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_the_alpha_search_weighs_each_linear_by_its_outputs_energy():
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(4, 64, 512, generator=torch.Generator().manual_seed(1))
    x[..., 37] *= 300
    calibration = calibrate(model, [x.bfloat16()], gram=False, sample_rows=128)
    stats, weights = calibration.stats("a"), [model.a.weight.detach(), model.b.weight.detach()]
    amax_w = torch.maximum(*(w.double().abs().amax(0) for w in weights))
    plain, relative = {}, {}
    for alpha in (None, *recipes.SEARCHED_ALPHAS):
        s = None if alpha is None else (amax_w ** (1 - alpha) / stats.amax.double() ** alpha).bfloat16()
        errors = []
        for w in weights:
            exact = stats.sample.float() @ w.float().T
            y = (reference_linear.linear("mxfp4_dual", stats.sample, w, None) if s is None else
                 reference_linear.linear("mxfp4_dual", stats.sample * s, (w.float() / s.float()).bfloat16(), None))
            errors.append(((y.float() - exact).square().sum().item(), exact.square().sum().item()))
        plain[alpha], relative[alpha] = sum(e for e, _ in errors), sum(e / energy for e, energy in errors)
    best = min(relative, key=relative.get)
    assert best != min(plain, key=plain.get)  # b's error alone would decide the plain sum
    chosen = recipes.apply("mxfp4_dual", "smooth-search", calibration, model).scheme_for(model.a.weight).smooth
    expected = (amax_w ** (1 - best) / stats.amax.double() ** best).bfloat16()
    torch.testing.assert_close(chosen.tensor.float(), expected.float(), rtol=1e-2, atol=0)
