"""Outlier-channel test models: bf16 logits bit-identical to the original's, the outliers really in every kind
of linear input (and only in the planted channels), the input never modified, bad arguments refused."""

import pytest
import torch

from mxfx import evaluation
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
