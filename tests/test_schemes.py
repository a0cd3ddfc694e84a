"""Schemes are values: their parameters are their identity (caches key on it, never on a name), the
report label is apart from it, and the activation key decides which linears share a quantization."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from mxfx.prepared import PreparedWeights
from mxfx.schemes import MODELSLIM, MXFP4W4A8, MXFP8, SCHEMES, DualLevelMXFP4, get_scheme
from mxfx.targets import get_target

REFERENCE = get_target("reference")


def _weight(n=64, k=512, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).bfloat16()


@dataclass(frozen=True)
class Scaled(MXFP8):
    """A variant that keeps its parent's name but has a parameter: it must never get MXFP8's weights."""

    name: ClassVar[str] = "mxfp8"
    factor: float = 1.0

    def quantize_weight(self, target, weight):
        return super().quantize_weight(target, weight * self.factor)


def test_two_schemes_that_differ_only_in_a_parameter_never_share_prepared_weights():
    cache, weight = PreparedWeights(), _weight()
    plain = cache.prepare(MXFP8(), REFERENCE, weight, None, torch.bfloat16)
    halved = cache.prepare(Scaled(factor=0.5), REFERENCE, weight, None, torch.bfloat16)
    same_name = cache.prepare(Scaled(factor=1.0), REFERENCE, weight, None, torch.bfloat16)
    assert cache.hits == 0 and len(cache) == 3, "a name shared with mxfp8 must not reuse its entry"
    assert not torch.equal(plain["weight_scale"].view(torch.uint8), halved["weight_scale"].view(torch.uint8))
    assert torch.equal(plain["weight"].view(torch.uint8), same_name["weight"].view(torch.uint8))
    assert cache.prepare(Scaled(factor=0.5), REFERENCE, weight, None, torch.bfloat16) is halved and cache.hits == 1


@pytest.mark.parametrize("cls", [DualLevelMXFP4, MXFP4W4A8])
def test_the_weight_round_mode_is_a_parameter(cls):
    weight, cache = _weight(k=1024, seed=3), PreparedWeights()
    rint = cache.prepare(cls(), REFERENCE, weight, None, torch.bfloat16)
    away = cache.prepare(cls(weight_round_mode="round"), REFERENCE, weight, None, torch.bfloat16)
    differ = (rint["weight"].view(torch.uint8) != away["weight"].view(torch.uint8)).float().mean().item()
    assert 0 < differ < 0.05, "round (half away) and rint (half even) differ on ties only"
    assert cls(weight_round_mode="round").label == f"{cls.name} (weights round round)" and cls().label == cls.name
    assert cls(weight_round_mode="round") != cls() and hash(cls()) == hash(cls())


def test_fp8_weights_round_to_nearest_even_only():
    with pytest.raises(ValueError, match="weight_round_mode must be one of"):
        MXFP8(weight_round_mode="round")


def test_label_is_not_identity():
    assert MXFP8(stored=True).label == "modelslim/mxfp8" and MXFP8(stored=True) != MXFP8()
    assert get_scheme("mxfp8") is SCHEMES["mxfp8"] and get_scheme("modelslim") is MODELSLIM
    with pytest.raises(TypeError, match="scheme_for"):
        get_scheme(42)


def test_activation_keys_are_the_quantization_and_its_constants():
    """Schemes that quantize activations alike share; per-activation constants of other values do not."""

    @dataclass(frozen=True)
    class Smoothed(MXFP8):
        activation_constants: ClassVar[tuple[str, ...]] = ("smooth_scale",)

    assert MXFP8().activation_key({}) == MXFP4W4A8().activation_key({}) != DualLevelMXFP4().activation_key({})
    ones, twos = {"smooth_scale": torch.ones(8)}, {"smooth_scale": torch.full((8,), 2.0)}
    assert Smoothed().activation_key(ones) == Smoothed().activation_key({"smooth_scale": torch.ones(8)})
    assert Smoothed().activation_key(ones) != Smoothed().activation_key(twos) != MXFP8().activation_key(twos)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=list(SCHEMES))
def test_linear_returns_the_activations_dtype_and_shape(scheme, dtype):
    """Scheme.linear replaced copies that hard-coded a bf16 output (wrong for fp16 models)."""
    weight, x = _weight().to(dtype), torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    prepared = scheme.prepare(REFERENCE, weight, None, dtype)
    y = scheme.linear(REFERENCE, x, prepared)
    assert y.dtype == dtype and y.shape == (2, 3, 64)
    x2d = x.reshape(-1, 512)
    by_hand = scheme.matmul(REFERENCE, scheme.quantize_activation(REFERENCE, x2d, prepared), prepared, dtype)
    assert torch.equal(y.reshape(-1, 64), by_hand)
