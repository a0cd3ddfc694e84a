"""E8M0 decode against ml_dtypes, and the shared-exponent rules against exact float64 arithmetic."""

import ml_dtypes
import numpy as np
import pytest
import torch

from mxfx.formats import e8m0_decode, shared_scale_bytes
from mxfx.formats.e8m0 import pow2_reciprocal


def test_decode_every_byte_matches_ml_dtypes():
    every = np.arange(256, dtype=np.uint8)
    expected = every.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = e8m0_decode(torch.from_numpy(every)).numpy()
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.isnan(got[255]) and got[0] == 2.0**-127 and got[127] == 1.0 and got[254] == 2.0**127


def test_decode_accepts_the_e8m0_dtype_and_refuses_others():
    assert e8m0_decode(torch.tensor([128], dtype=torch.uint8).view(torch.float8_e8m0fnu)).item() == 2.0
    with pytest.raises(ValueError, match="E8M0"):
        e8m0_decode(torch.tensor([1.0]))


def test_pow2_reciprocal_is_exact_for_every_byte():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = pow2_reciprocal(every, torch.float32).double().numpy()
    expected = np.where(np.arange(256) == 255, np.nan, 2.0 ** (127 - np.arange(256.0)))
    assert np.array_equal(got, expected, equal_nan=True)


@pytest.mark.parametrize(
    "amax, emax, expected",
    [
        (6.0, 2, 127),  # floor(log2 6) = 2 -> shared exp 0
        (8.0, 2, 128),
        (7.999, 2, 127),
        (1.0, 2, 125),
        (448.0, 8, 127),
        (512.0, 8, 128),
        (0.0, 2, 0),  # zero block: the smallest scale
        (2.0**-130, 2, 0),  # subnormal amax clamps to byte 0
        (2.0**-124, 2, 1),
        (2.0**-125, 2, 0),
        (3.0e38, 8, 246),
        (float("inf"), 2, 255),
        (float("nan"), 8, 255),
    ],
)
def test_floor_rule_hand_vectors(amax, emax, expected):
    max_normal = {2: 6.0, 8: 448.0}[emax]
    for alg in ("floor", "ocp"):
        assert shared_scale_bytes(torch.tensor([amax]), emax, max_normal, alg).item() == expected


def _rceil_oracle(amax: np.ndarray) -> np.ndarray:
    """ceil(log2(amax / 448)) + 127 in exact float64, clamped to the E8M0 range (0 for amax == 0)."""
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(amax.astype(np.float64) / 448.0))
    return np.clip(exponent + 127, 0, 254).astype(np.uint8)


@pytest.mark.parametrize("dtype, np_dtype", [(torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)])
def test_rceil_rule_on_every_positive_value(dtype, np_dtype):
    bits = np.arange(0x7C00 if dtype == torch.float16 else 0x7F80, dtype=np.uint16)  # +0 .. largest finite
    amax = torch.from_numpy(bits.view(np.int16).copy()).view(dtype)
    got = shared_scale_bytes(amax, 8, 448.0, "rceil").numpy()
    assert np.array_equal(got, _rceil_oracle(bits.view(np_dtype).astype(np.float64)))


def test_rceil_hand_vectors():
    got = shared_scale_bytes(torch.tensor([448.0, 449.0, 1.0, 0.0, float("inf")]), 8, 448.0, "rceil")
    assert got.tolist() == [127, 128, 119, 0, 255]  # 1/448 -> 2**-8 rounded up is 2**-8: byte 119


def test_unknown_scale_alg():
    with pytest.raises(ValueError, match="scale_alg"):
        shared_scale_bytes(torch.tensor([1.0]), 8, 448.0, "even")
