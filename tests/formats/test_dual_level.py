"""mxfx.formats.quantize_dual_level / dequantize_dual_level against the numpy oracle in golden.py."""

import math
import zlib

import numpy as np
import pytest
import torch

from mxfx.formats import dequantize_dual_level, quantize_dual_level

from .golden import decode_fp4_packed, dual_level_dequantize_golden, dual_level_golden
from .test_mx import (
    FP4_TIES,
    FP4_TIES_EXPECTED,
    _half_step,
    assert_bits_equal,
    assert_bytes_equal,
    kernels,  # noqa: F401  (autouse: every test runs on the torch code and the native kernels)
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ROUND_MODES = ["rint", "round", "floor"]
SHAPES = [(512,), (2, 1024), (2, 2, 1536), (3, 544), (4, 100), (1, 2048), (2, 32)]
SCALES = [-30, -3, 0, 3, 30, "mixed"]


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def _random_input(shape, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if scale == "mixed":
        x = x * torch.exp2(torch.randint(-30, 30, shape, generator=g).double())
    else:
        x = x * 10.0**scale
    return x.to(dtype)


def check_against_golden(x: torch.Tensor, round_mode="rint"):
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}[x.dtype]
    q, level0, level1 = quantize_dual_level(x, round_mode=round_mode)
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    assert q.dtype == torch.uint8 and tuple(q.shape) == (*lead, k // 2)
    assert level0.dtype == torch.float32 and tuple(level0.shape) == (*lead, math.ceil(k / 512))
    assert level1.dtype == torch.float8_e8m0fnu and tuple(level1.shape) == (*lead, math.ceil(k / 32))
    exp_vals, exp_l0, exp_l1 = dual_level_golden(_bits(x), dtype, round_mode)
    x_np = x.float().numpy()
    assert_bits_equal(level0.numpy(), exp_l0, what="level0")
    assert_bytes_equal(level1.view(torch.uint8).numpy(), exp_l1)
    assert_bits_equal(decode_fp4_packed(q.numpy()), exp_vals, x_np)
    return q, level0, level1, exp_vals, exp_l0, exp_l1


# ------------------------------------------------------------------------------------ random data


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"1e{s}" if s != "mixed" else s)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("round_mode", ROUND_MODES)
def test_random_matches_golden(round_mode, dtype, scale, shape):
    seed = zlib.crc32(repr((round_mode, dtype, scale, shape)).encode())
    check_against_golden(_random_input(shape, scale, DTYPES[dtype], seed), round_mode)


@pytest.mark.parametrize("round_mode", ROUND_MODES)
def test_non_contiguous_input(round_mode):
    x = _random_input((544, 3), 0, torch.bfloat16, seed=5).t()
    assert not x.is_contiguous()
    check_against_golden(x, round_mode)


# ------------------------------------------------------------------------------------- known answer


def test_known_answer_full_8():
    """The Ascend operator test: x = full([1, 512], 8.0, bf16)."""
    q, level0, level1 = quantize_dual_level(torch.full((1, 512), 8.0, dtype=torch.bfloat16))
    assert q.shape == (1, 256) and (q == 119).all()  # 0x77: two codes 7 (+6.0)
    assert level0.shape == (1, 1)
    assert level0.item() == np.float32(1.3333334)
    assert level0.view(torch.int32).item() == 0x3FAAAAAB  # float32(8 * float32(1/6))
    assert level1.shape == (1, 16) and (level1.view(torch.uint8) == 127).all()


# ---------------------------------------------------------------------------------- hand-built edges


def _row(*segments, k=512):
    """A float64 row of length k, built from (start, values) pairs."""
    r = np.zeros(k)
    for start, values in segments:
        r[start : start + len(values)] = values
    return r


def _edge_rows():
    rng = np.random.default_rng(1)
    normal = rng.standard_normal(512)
    rows = {
        "all_zero_signed": _row((0, [0.0, -0.0] * 256)),
        "only_inf_nan_zeros": _row((0, [np.inf, -0.0]), (40, [-np.inf]), (100, [np.nan, np.inf]), (300, [-0.0])),
        "tiny_level0_zero": _row((0, [2.0**-125, -(2.0**-126)]), (64, [-0.0, 2.0**-130]), (200, [-(2.0**-127)])),
        "level0_boundary_at": _row((0, [1.5 * 2.0**-124, -(2.0**-126)]), (33, [2.0**-130])),
        "level0_boundary_below": _row((0, [1.4921875 * 2.0**-124, -(2.0**-126)]), (33, [2.0**-130])),
        "inf_in_one_32_block": np.where(np.arange(512) == 77, np.inf, normal),
        "nan_in_one_32_block": np.where(np.arange(512) == 500, np.nan, normal * 100),
        "neg_inf_and_nan_same_32": np.where(np.arange(512) == 3, -np.inf,
                                            np.where(np.arange(512) == 9, np.nan, normal)),
        "e_is_2_block": _row((0, [6.0, 1.0]), (32, [2.0**-125, -1.5 * 2.0**-126, 2.0**-126, -(2.0**-130)])),
        "subnormal_temp_block": _row((0, [6.0]), (32, [2.0**-130, -(2.0**-131), -0.0])),
        "ties": _row((0, FP4_TIES), (64, [-t for t in FP4_TIES])),
        "wide_range": normal * np.exp2(np.arange(512) % 64 - 32.0),
        "fp16_subnormals": _row((0, [2.0**-24, -3 * 2.0**-24, 2.0**-15, -(2.0**-20)]), (32, [2.0**-24] * 5)),
        "fp16_all_subnormal": (normal * 2.0**-18),
        "fp16_max": _row((0, [65504.0, -65504.0, 1.0, 60000.0])),
        "bf16_huge": _row((0, [3.0e38, -1.0e38, 1.0]), (32, [1e30])),
        "saturating_32_block": _row((0, [6.0]), (32, [3.9, -3.5, 3.75, 1.0])),
    }
    return rows


@pytest.mark.parametrize("round_mode", ROUND_MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_edge_rows_match_golden(dtype, round_mode):
    rows = _edge_rows()
    for name, row in rows.items():
        with np.errstate(over="ignore"):
            x = torch.from_numpy(row[None, :]).to(DTYPES[dtype])
        try:
            check_against_golden(x, round_mode)
        except AssertionError as e:
            raise AssertionError(f"edge row {name!r} ({dtype}, {round_mode}): {e}") from None


@pytest.mark.parametrize("k", [512, 1024, 1536, 544, 100])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_edge_rows_concatenated(dtype, k):
    """All edge rows laid end to end and cut into rows of k (blocks mix edge content, tails padded)."""
    flat = np.concatenate(list(_edge_rows().values()))
    n = len(flat) // k
    with np.errstate(over="ignore"):
        x = torch.from_numpy(flat[: n * k].reshape(n, k)).to(DTYPES[dtype])
    for round_mode in ROUND_MODES:
        check_against_golden(x, round_mode)


# literal expectations (by hand from the spec, not from the oracle)


def _q(row, dtype=torch.bfloat16, round_mode="rint"):
    q, l0, l1 = quantize_dual_level(torch.from_numpy(row[None, :]).to(dtype), round_mode=round_mode)
    return decode_fp4_packed(q.numpy())[0], l0[0].numpy(), l1.view(torch.uint8)[0].numpy()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_only_inf_nan_and_zeros_literal(dtype):
    vals, l0, l1 = _q(_edge_rows()["only_inf_nan_zeros"], DTYPES[dtype])
    assert l0.tolist() == [0.0]
    # 32-blocks 0 (inf), 1 (-inf at 40), 3 (NaN, inf at 100-101) -> 0xFF; the rest all zero -> 0
    assert l1[[0, 1, 3]].tolist() == [255, 255, 255]
    assert (np.delete(l1, [0, 1, 3]) == 0).all()
    assert (vals == 0).all()
    assert not np.signbit(vals[:128]).any(), "0xFF blocks must hold +0 codes"
    assert np.signbit(vals[300])  # -0 in an all-zero block keeps its sign


def test_tiny_512_block_level0_zero_literal():
    vals, l0, l1 = _q(_edge_rows()["tiny_level0_zero"])  # amax 2**-125 < 6 * 2**-126
    assert l0.tolist() == [0.0]
    assert l1[0] == 255 and l1[2] == 255 and l1[6] == 255  # blocks holding non-zero values -> inf -> 0xFF
    assert l1[1] == 0 and l1[3] == 0
    assert (vals[:96] == 0).all() and not np.signbit(vals[:96]).any()
    assert (vals == 0).all()


def test_inf_in_one_32_block_literal():
    row = _edge_rows()["inf_in_one_32_block"]
    vals, l0, l1 = _q(row)
    finite_amax = np.abs(torch.from_numpy(row).to(torch.bfloat16).float().numpy()[np.isfinite(row)]).max()
    assert l0[0] == np.float32(finite_amax) * np.float32(1 / 6) and l0[0] > 0  # inf ignored by level 0
    assert l1[2] == 255 and (vals[64:96] == 0).all() and not np.signbit(vals[64:96]).any()
    assert (np.delete(l1, 2) != 255).all() and (vals[:64] != 0).any()


@pytest.mark.parametrize("round_mode", ROUND_MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ties_literal(dtype, round_mode):
    """amax 6 -> level0 = 6 * fp32(1/6), which rounds to exactly 1.0 in fp32, so temp = x."""
    vals, l0, l1 = _q(_edge_rows()["ties"], DTYPES[dtype], round_mode)
    assert l0[0] == np.float32(6.0) * np.float32(1 / 6) == 1.0
    assert l1[0] == 127
    n = len(FP4_TIES)  # -0.3 is -0.30078125 in bf16, -0.2998 in fp16: the same expected values
    assert_bits_equal(vals[:n], np.array(FP4_TIES_EXPECTED[round_mode], dtype=np.float32))


@pytest.mark.parametrize(
    "dtype,amax,x,round_mode,expected",
    [
        # x / level0 in fp32 is 2.50446 (rint -> 3), rounded to bf16 it is the tie 2.5 (rint -> 2)
        ("bf16", 7.0, 2.921875, "rint", 2.0),
        # fp32 quotient 2.49944 (round -> 2), rounded to fp16 it is the tie 2.5 (round-half-away -> 3)
        ("fp16", 7.0, 2.916015625, "round", 3.0),
    ],
)
def test_quotient_rounded_to_input_dtype_literal(dtype, amax, x, round_mode, expected):
    vals, l0, l1 = _q(_row((0, [amax, x])), DTYPES[dtype], round_mode)
    assert l0[0] == np.float32(amax) * np.float32(1 / 6) and l1[0] == 127
    assert vals[0] == 6.0 and vals[1] == expected


@pytest.mark.parametrize("dtype,amax,x", [("bf16", 5.0, 3.328125), ("fp16", 11.0, 7.33203125)])
def test_level1_exponent_taken_after_dtype_rounding_literal(dtype, amax, x):
    """x / level0 is just below 4 in fp32 (3.99375 / 3.99929) but exactly 4 in the input dtype: the
    32-block's exponent is that of 4 (byte 127, value 4), not of 3.99 (byte 126, which would saturate)."""
    vals, l0, l1 = _q(_row((0, [amax]), (32, [x])), DTYPES[dtype])
    assert l1[1] == 127
    assert vals[32] == 4.0


def test_byte0_block_not_flushed_literal():
    """e = 2 (temp max 2**-125): byte 0 but multiplier 2**127, unlike single-level 'floor'."""
    vals, l0, l1 = _q(_edge_rows()["e_is_2_block"])
    assert l1[0] == 127 and l1[1] == 0
    # 2**-125 * 2**127 = 4; -1.5 * 2**-126 * 2**127 = -3; 2**-126 -> 2; -2**-130 -> -0.125 -> -0
    assert_bits_equal(vals[32:36], np.array([4.0, -3.0, 2.0, -0.0], dtype=np.float32))


def test_subnormal_temp_block_literal():
    """A 32-block of bf16 subnormals only (e = 0): byte 0, multiplier 0, zeros keep their sign."""
    vals, l0, l1 = _q(_edge_rows()["subnormal_temp_block"])
    assert l1[1] == 0
    assert_bits_equal(vals[32:35], np.array([0.0, -0.0, -0.0], dtype=np.float32))


def test_fp16_subnormals_literal():
    vals, l0, l1 = _q(_edge_rows()["fp16_subnormals"], torch.float16)
    assert l0[0] == np.float32(2.0**-15) * np.float32(1 / 6)
    assert l1[0] == 127 and vals[2] == 6.0  # the 512-block max maps to 6


# ---------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("round_mode", ROUND_MODES)
def test_dequantize_matches_golden(round_mode, dtype):
    rows = np.stack(list(_edge_rows().values()))
    with np.errstate(over="ignore"):
        xe = torch.from_numpy(rows).to(DTYPES[dtype])
    xr = _random_input((4, 512), "mixed", DTYPES[dtype], seed=9)
    x = torch.cat([xe, xr])[:, :-12]  # K = 500: short tails at both levels
    q, l0, l1 = quantize_dual_level(x, round_mode)
    got = dequantize_dual_level(q, l0, l1)
    assert got.dtype == torch.float32 and got.shape == x.shape
    exp_vals, exp_l0, exp_l1 = dual_level_golden(_bits(x), dtype, round_mode)
    expected = dual_level_dequantize_golden(exp_vals, exp_l0, exp_l1)
    assert_bits_equal(got.numpy(), expected, x.float().numpy(), "dequantized")
    assert_bits_equal(dequantize_dual_level(q, l0, l1.view(torch.uint8)).numpy(), expected)
    got16 = dequantize_dual_level(q, l0, l1, dtype=DTYPES[dtype])
    assert got16.dtype == DTYPES[dtype]
    assert_bits_equal(got16.float().numpy(), torch.from_numpy(expected).to(DTYPES[dtype]).float().numpy())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_error_within_half_step(dtype):
    x = torch.cat([_random_input((6, 1024), s, DTYPES[dtype], seed=13) for s in (-3, 0, 3, "mixed")])
    x = x[torch.isfinite(x).all(-1)]
    q, l0, l1 = quantize_dual_level(x)
    deq = dequantize_dual_level(q, l0, l1).double().numpy()
    xv = x.double().numpy()
    s1 = np.repeat(np.ldexp(1.0, l1.view(torch.uint8).numpy().astype(np.int64) - 127), 32, axis=-1)
    s0 = np.repeat(l0.double().numpy(), 512, axis=-1)
    scale = s1 * s0
    live = (s0 > 0) & (l1.view(torch.uint8).numpy().repeat(32, axis=-1) != 255)
    rel = 2.0**-8 if dtype == "bf16" else 2.0**-10  # x / level0 is rounded to the input dtype first
    a = np.abs(xv) / scale
    err = np.abs(deq - xv)
    sat = live & (a > 6.0 * (1 + rel))
    assert np.allclose(np.abs(deq[sat]), 6.0 * scale[sat], rtol=2.0**-22, atol=0)
    ok = live & ~sat
    bound = _half_step(np.minimum(a, 6.0), "fp4_e2m1") * scale * (1 + 2.0**-20) + np.abs(xv) * rel
    assert (err[ok] <= bound[ok]).all(), f"max excess {np.max((err - bound)[ok])}"


# -------------------------------------------------------------------------------------------- errors


def test_float32_input_rejected():
    with pytest.raises(ValueError, match="dtype"):
        quantize_dual_level(torch.ones(2, 512))


def test_odd_k_rejected():
    with pytest.raises(ValueError, match="even"):
        quantize_dual_level(torch.ones(2, 511, dtype=torch.bfloat16))


def test_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        quantize_dual_level(torch.ones(3, 0, dtype=torch.bfloat16))


def test_bad_round_mode_rejected():
    with pytest.raises(ValueError, match="round_mode"):
        quantize_dual_level(torch.ones(2, 512, dtype=torch.bfloat16), round_mode="ceil")


def test_dequantize_shape_mismatch_rejected():
    q, l0, l1 = quantize_dual_level(torch.ones(2, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="level1"):
        dequantize_dual_level(q, l0, l1[:, :-1])
    with pytest.raises(ValueError, match="level0"):
        dequantize_dual_level(q, l0.double(), l1)
