"""Element codecs against ml_dtypes over every bf16 bit pattern, and a brute-force nearest-grid oracle
for the FP4 round modes that ml_dtypes does not have."""

import ml_dtypes
import numpy as np
import pytest
import torch

from mxfx.formats import e2m1_decode, e2m1_encode, e4m3_encode

EVERY_BF16_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)
EVERY_BF16 = EVERY_BF16_BITS.view(ml_dtypes.bfloat16).astype(np.float32)
FINITE = np.isfinite(EVERY_BF16)


def _every_bf16_torch() -> torch.Tensor:
    return torch.from_numpy(EVERY_BF16_BITS.view(np.int16).copy()).view(torch.bfloat16)


def _ml_dtypes_e2m1_codes(values: np.ndarray) -> np.ndarray:
    # ml_dtypes stores one float4_e2m1fn per byte; it rounds half-to-even and saturates, like the NPU.
    with np.errstate(invalid="ignore"):  # NaN has no E2M1 code; those entries are checked apart
        return values.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_e2m1_rint_matches_ml_dtypes_on_every_bf16(dtype):
    got = e2m1_encode(_every_bf16_torch().to(dtype)).numpy()
    expected = _ml_dtypes_e2m1_codes(EVERY_BF16)
    not_nan = ~np.isnan(EVERY_BF16)
    mismatches = np.flatnonzero((got != expected) & not_nan)
    assert mismatches.size == 0, f"{mismatches.size} codes differ, first at {EVERY_BF16[mismatches[:5]]}"
    assert (got[~not_nan] == 0).all(), "NaN must encode as +0 (the NPU casts NaN to 0)"


SIGNED_GRID = np.array([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _grid_oracle(values: np.ndarray, mode: str) -> np.ndarray:
    """The grid value chosen for each finite value, by brute force over the 15 signed grid points."""
    v = np.clip(values.astype(np.float64), -6, 6)[:, None]
    if mode == "floor":  # largest grid point <= v (toward -inf)
        return np.where(SIGNED_GRID <= v, SIGNED_GRID, -np.inf).max(axis=1)
    distance = np.abs(SIGNED_GRID - v)
    nearest = distance == distance.min(axis=1, keepdims=True)
    # "round": of the nearest grid points, the one of larger magnitude (ties away from zero)
    return np.where(nearest, np.abs(SIGNED_GRID), -1).max(axis=1) * np.sign(v[:, 0])


@pytest.mark.parametrize("mode", ["round", "floor"])
def test_e2m1_round_modes_match_brute_force_grid(mode):
    got = e2m1_decode(e2m1_encode(_every_bf16_torch(), mode)).double().numpy()[FINITE]
    expected = _grid_oracle(EVERY_BF16[FINITE], mode)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("rint", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, 1e30], [0, 1, 1, 2, 2, 4, 4, 6, 6, 6]),
        ("round", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5], [0.5, 1, 1.5, 2, 3, 4, 6, -3]),
        ("floor", [0.4, 1.9, 5.9, -0.3, -5.0, -2.5, 100.0], [0, 1.5, 4, -0.5, -6, -3, 6]),
    ],
)
def test_e2m1_hand_vectors(mode, values, expected):
    got = e2m1_decode(e2m1_encode(torch.tensor(values), mode))
    assert got.tolist() == expected


def test_e2m1_zero_and_special_signs():
    codes = e2m1_encode(torch.tensor([0.0, -0.0, -0.1, float("inf"), float("-inf"), float("nan")])).tolist()
    assert codes == [0x0, 0x8, 0x8, 0x7, 0xF, 0x0]


def test_e2m1_decode_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    expected = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = e2m1_decode(torch.from_numpy(codes)).numpy()
    assert np.array_equal(got, expected) and np.array_equal(np.signbit(got), np.signbit(expected))


def test_e2m1_rejects_unknown_round_mode():
    with pytest.raises(ValueError, match="round_mode"):
        e2m1_encode(torch.zeros(2), "nearest")


def test_e4m3_matches_ml_dtypes_on_every_bf16():
    got = e4m3_encode(_every_bf16_torch()).view(torch.uint8).numpy()
    # saturating RNE == RNE of the value clamped to the largest finite E4M3 (448)
    with np.errstate(invalid="ignore"):
        expected = np.clip(EVERY_BF16, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    not_nan = ~np.isnan(EVERY_BF16)
    assert np.array_equal(got[not_nan], expected[not_nan])
    assert torch.isnan(e4m3_encode(torch.tensor([float("nan")])).float()).all()


def test_e4m3_saturates_instead_of_nan():
    got = e4m3_encode(torch.tensor([448.0, 464.0, 1e6, float("inf"), -float("inf")])).float().tolist()
    assert got == [448.0, 448.0, 448.0, 448.0, -448.0]
