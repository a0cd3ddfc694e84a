"""fold_smooth_norm: a smoothing multiply after an RMSNorm becomes the norm's weight gamma * s (a new constant,
the user's parameter untouched) and the norm still fuses with the quantization; elsewhere the multiply
stays, reported. Bit for bit the plain scheme on a model holding gamma * s and W / s; the roundings within
the stated bound of the exact product."""

import copy

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import mxfx
from mxfx import recipes
from mxfx.calibrating import calibrate
from mxfx.recipes import Recipe
from mxfx.recovery.rotation import BlockRotation
from passes import FusionSkipReason

from ..models import tiny_qwen3

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


class NormThenLinears(torch.nn.Module):
    """RMSNorm (a trained-looking weight) feeding two sibling linears."""

    def __init__(self, k=512):
        super().__init__()
        self.norm = Qwen3RMSNorm(k, eps=1e-6).to(torch.bfloat16)
        self.q = torch.nn.Linear(k, 256, bias=False, dtype=torch.bfloat16)
        self.k = torch.nn.Linear(k, 128, bias=False, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=g))
            for m in (self.q, self.k):
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h)


def _x(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 6, 512, generator=g) * torch.linspace(0.1, 8, 512)).bfloat16()


def _compiled(model, scheme, *inputs, **options):
    torch._dynamo.reset()

    def inner(gm, example_inputs):
        be.graph = gm
        return gm

    be = mxfx.backend(scheme, target="reference", inner=inner, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return out, be


def _report(be, name):
    return next(r for r in be.pipeline_reports[-1].passes if r.pass_name == name)


@pytest.mark.parametrize("scheme", ["mxfp8", "mxfp4_w4a8"])
def test_the_fold_is_the_plain_scheme_on_gamma_s_and_w_over_s(scheme):
    model, x = NormThenLinears(), _x()
    gamma = model.norm.weight.detach().clone()
    selector = recipes.apply(scheme, "smooth", calibrate(model, [_x(2)], gram=False), model)
    got, be = _compiled(model, selector, x)
    fold, norm = _report(be, "fold_smooth_norm"), _report(be, "fuse_norm_quant")
    assert [(s.linears, s.outcome) for s in fold.sites] == [(("q", "k"), "fused")]
    assert [s.op for s in norm.fused] == ["npu_rms_norm_dynamic_mx_quant"], "the norm still fuses"
    assert torch.equal(model.norm.weight, gamma), "the user's parameter is never changed"

    s = selector.scheme_for(model.q.weight).smooth.tensor  # bf16 [K], shared by q and k
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle.norm.weight.copy_((gamma.float() * s.float()).bfloat16())  # fp32, one cast
        for m in (oracle.q, oracle.k):
            m.weight.copy_((m.weight.float() / s.float()).bfloat16())
    expected, plain = _compiled(oracle, scheme, x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    muls = [n for n in be.graph.graph.nodes if n.target == torch.ops.aten.mul.Tensor
            and n.meta.get("mxfx", {}).get("role") == "activation_quant"]
    assert not muls, "the smoothing multiply is gone"


def test_the_roundings_are_within_the_stated_bound():
    """Unfolded: bf16(bf16(gamma * n) * s), three roundings of n32 (n, then two products): <= 3 * 2^-8 of
    the exact product (bf16's unit roundoff is 2^-8). Folded and fused: bf16(n32 * bf16(gamma * s)), two:
    <= 2 * 2^-8. Per element, relative, where nothing underflows."""
    g = torch.Generator().manual_seed(0)
    n32 = torch.randn(4096, 512, generator=g)
    gamma = (1 + 0.3 * torch.randn(512, generator=g)).bfloat16()
    s = torch.exp(torch.randn(512, generator=g)).bfloat16()
    exact = n32.double() * gamma.double() * s.double()
    unfolded = ((gamma * n32.bfloat16()) * s).double()
    folded = (n32 * (gamma.float() * s.float()).bfloat16().float()).bfloat16().double()
    u = 2.0 ** -8
    rel = lambda t: ((t - exact).abs() / exact.abs()).max().item()  # noqa: E731
    assert rel(unfolded) <= 3 * u * 1.01 and rel(folded) <= 2 * u * 1.01
    assert ((folded - unfolded).abs() / exact.abs()).max().item() <= 5 * u * 1.01


def test_on_qwen3_the_norms_fold_and_the_other_multiplies_stay_as_a_cost():
    model = tiny_qwen3(layers=2)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibration = calibrate(model, batches, gram=False)
    got, be = _compiled(model, recipes.apply("mxfp4_w4a8", "smooth", calibration, model), IDS)
    fold, norm = _report(be, "fold_smooth_norm"), _report(be, "fuse_norm_quant")
    assert [s.linears[-1].rsplit(".", 1)[-1] for s in fold.fused] == ["v_proj", "up_proj"] * 2
    # down_proj's smoothing is not a multiply here: recipes.fold_smoothings moved it into up_proj's rows
    assert {s.linears[0].rsplit(".", 1)[-1]: s.reason for s in fold.skipped} == {"o_proj": FusionSkipReason.NO_PATTERN}
    assert "x * s stays (a cost)" in fold.skipped[0].detail
    assert len(norm.fused) == 4, "every norm + quantization fuses as without smoothing"
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if "norm" in n)
    passes_without = [p for p in be.passes if p.__name__ != "fold_smooth_norm"]
    unfolded, _ = _compiled(model, recipes.apply("mxfp4_w4a8", "smooth", calibration, model), IDS,
                            passes=passes_without)
    with torch.no_grad():
        bf16 = model(IDS).logits.float()
    errors = [(t.logits.float() - bf16).norm().item() / bf16.norm().item() for t in (got, unfolded)]
    assert errors[0] < 1.1 * errors[1], errors


def test_dual_level_folds_only_where_a_rotation_follows():
    model = tiny_qwen3(layers=1)
    calibration = calibrate(model, [IDS], gram=False)
    _, plain = _compiled(model, recipes.apply("mxfp4_dual", "smooth", calibration, model), IDS)
    assert not _report(plain, "fold_smooth_norm").sites, "the quantizer's smooth_scale input: no multiply"
    recipe = Recipe(smooth_alpha=0.5, rotation=BlockRotation(32))
    _, rotated = _compiled(model, recipes.apply("mxfp4_dual", recipe, calibration, model), IDS)
    fold = _report(rotated, "fold_smooth_norm")
    assert len(fold.fused) == 2 and len(fold.skipped) == 1, "o_proj's (down_proj's folds into up_proj)"


def test_an_updated_norm_weight_is_folded_again():
    """The folded weight is a prepared constant with a source: the weight watch folds the new gamma."""
    model, x = NormThenLinears(), _x()
    selector = recipes.apply("mxfp8", "smooth", calibrate(model, [_x(2)], gram=False), model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mxfx.backend(selector, target="reference"), fullgraph=True)
    with torch.no_grad():
        before = compiled(x)
        model.norm.weight.mul_(1.5)
        after = compiled(x)
    expected, _ = _compiled(model, selector, x)
    assert not torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(after, expected))


class SharedNorm(NormThenLinears):
    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), h  # the norm's output is also a result


def test_a_norm_output_used_elsewhere_keeps_its_multiply():
    model, x = SharedNorm(), _x()
    selector = recipes.apply("mxfp8", "smooth", calibrate(model, [_x(2)], gram=False), model)
    got, be = _compiled(model, selector, x)
    (site,) = _report(be, "fold_smooth_norm").sites
    assert site.reason is FusionSkipReason.SHARED_OUTPUT and "x * s stays (a cost)" in site.detail
    with torch.no_grad():
        assert torch.equal(got[2], model.norm(x)), "the norm itself computes what it did"
    unfolded, _ = _compiled(model, selector, x, passes=[p for p in be.passes if p.__name__ != "fold_smooth_norm"])
    assert all(torch.equal(a, b) for a, b in zip(got, unfolded)), "nothing changed"
