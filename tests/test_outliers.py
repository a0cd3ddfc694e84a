"""Outlier-channel test models: bf16 logits bit-identical to the original's, the outliers really in every kind
of linear input (and only in the planted channels), the input never modified, bad arguments refused; plain
rounding falls apart on them and the searched smoothing recovers it."""

import pytest
import torch

import mxfx
from mxfx import evaluation, recipes
from mxfx.calibrating import calibrate
from mxfx.metrics import sqnr_db
from mxfx.outliers import with_outliers
from tests.models import tiny_qwen3


def _channel_amax(inputs):
    return {name: x.float().abs().reshape(-1, x.shape[-1]).amax(0) for name, x in inputs.items()}


def test_logits_are_bit_identical_and_every_linear_input_has_its_outliers():
    model = tiny_qwen3(layers=2)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    outlier = with_outliers(model, channels=2, factor=256, seed=3)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, outlier(ids).logits)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())  # the input is untouched
    original = _channel_amax(evaluation.layer_inputs(model, ids))
    planted = _channel_amax(evaluation.layer_inputs(outlier, ids))
    for name, amax in original.items():
        ratio = planted[name] / amax
        # o_proj: 2 (KV head, channel) pairs, one channel per query head of the group (8 heads on 4 KV heads)
        count = 0 if name == "lm_head" else 4 if name.endswith("o_proj") else 2
        assert (ratio == 256).sum() == count and ((ratio == 1) | (ratio == 256)).all(), name
        if count:
            assert planted[name].max() > 50 * planted[name].median(), name  # hundreds of times the typical channel
    again = with_outliers(model, channels=2, factor=256, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), outlier.state_dict().values()))


def test_bad_arguments_are_refused():
    model = tiny_qwen3(layers=1)
    with pytest.raises(ValueError, match="power of two > 1.*got 100"):
        with_outliers(model, factor=100)
    with pytest.raises(ValueError, match="power of two > 1.*got 1"):
        with_outliers(model, factor=1)
    with pytest.raises(ValueError, match=r"channels per activation must be in \[1, head_dim=64\], got 0"):
        with_outliers(model, channels=0)
    with pytest.raises(ValueError, match="builds Qwen3 models"):
        with_outliers(torch.nn.Linear(4, 4))



def test_rounding_falls_apart_on_the_outlier_model_and_the_searched_smoothing_recovers_it(record_property):
    """Logits' SQNR against bf16 (a random 1-layer model: a few dB is what mxfp4_dual keeps of it)."""
    model = tiny_qwen3(layers=1)
    outlier = with_outliers(model, channels=2, factor=256)
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        bf16 = model(batches[0]).logits
    sqnr = {}
    for label, m, recipe in (("rtn", model, None), ("rtn outlier", outlier, None),
                             ("smooth-search outlier", outlier, "smooth-search")):
        scheme = recipes.apply("mxfp4_dual", recipe, calibrate(m, batches, gram=False), m) if recipe else "mxfp4_dual"
        torch._dynamo.reset()
        compiled = torch.compile(m, backend=mxfx.backend(scheme=scheme, target="reference"), fullgraph=True)
        with torch.no_grad():
            sqnr[label] = sqnr_db(bf16, compiled(batches[0]).logits)
    torch._dynamo.reset()
    record_property("measured", ", ".join(f"{k} {v:.1f} dB" for k, v in sqnr.items()))
    assert sqnr["rtn outlier"] < sqnr["rtn"] - 4  # measured 1.4 dB against 7.9 dB
    assert sqnr["smooth-search outlier"] > max(sqnr["rtn outlier"] + 4, sqnr["rtn"] - 1.5)  # measured 7.8 dB
