"""torch_npu's extra MX scale rules (scale_alg=2 with dst_type_max, max_low_bound with scale_alg=1) against
the oracle in golden.py, written from aclnnDynamicMxQuantV3's formulas at the A5 kernel's precision."""

import numpy as np
import pytest
import torch

from mxfx.formats import quantize_mx

from .golden import mx_quantize_golden
from .test_mx import DTYPES, _name, _random_input, _values_of_q, assert_bits_equal, assert_bytes_equal, kernels  # noqa: F401

DYN_MAXES = [0.0, 6.0, 7.0, 7.25, 6.5, 12.0, 9.3]


def check(x, fmt, scale_alg, dst_type_max=0.0, max_low_bound=0.0, round_mode="rint"):
    q, scale = quantize_mx(x, fmt, scale_alg=scale_alg, round_mode=round_mode, dst_type_max=dst_type_max,
                           max_low_bound=max_low_bound)
    exp_vals, exp_bytes = mx_quantize_golden(x.float().numpy(), fmt, 32, scale_alg, round_mode, _name(x.dtype),
                                             dst_type_max, max_low_bound)
    assert_bytes_equal(scale.view(torch.uint8).numpy(), exp_bytes)
    assert_bits_equal(_values_of_q(q, fmt), exp_vals, x.float().numpy())
    return scale.view(torch.uint8), exp_vals


def _blocks(rows, dtype):
    """One 32-block per row: the listed value as the block max, the rest small filler."""
    x = torch.full((len(rows), 32), 0.0, dtype=torch.float64)
    for i, v in enumerate(rows):
        x[i, 0] = v
        x[i, 1:] = torch.linspace(-1, 1, 31, dtype=torch.float64) * (abs(v) if np.isfinite(v) else 1.0) * 0.3
    return x.to(dtype)


def _edge_maxima():
    out = []
    for k in (-130, -126, -124, -120, -3, 0, 5, 60, 120):
        p = 2.0**k
        out += [p, 1.5 * p, (1.5 + 2**-7) * p, 1.75 * p, (1.75 + 2**-7) * p, (2 - 2**-7) * p, 7.25 * p / 4,
                (1.8125 + 2**-7) * p, 1.3 * p, -(1.5 + 2**-7) * p]
    return out + [0.0, 6.0, 7.0, 7.25, 7.3, 8.0, 12.0, 3.3e38, float("inf"), float("nan"), 1e-40, 2**-149]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("dst_type_max", DYN_MAXES)
@pytest.mark.parametrize("round_mode", ["rint", "round", "floor"])
def test_dyn_range_matches_golden(dst_type_max, dtype, round_mode):
    dt = DTYPES[dtype]
    check(_blocks(_edge_maxima(), dt), "fp4_e2m1", "dyn_range", dst_type_max, round_mode=round_mode)
    for scale in (-30, 0, 3, "mixed"):
        check(_random_input((6, 256), scale, dt, 7), "fp4_e2m1", "dyn_range", dst_type_max, round_mode=round_mode)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("max_low_bound", [0.0, 1e-30, 2.0**-20, 0.5, 448.0, 1000.0, 3.0])
def test_rceil_max_low_bound_matches_golden(max_low_bound, dtype):
    dt = DTYPES[dtype]
    check(_blocks(_edge_maxima(), dt), "fp8_e4m3", "rceil", max_low_bound=max_low_bound)
    check(_random_input((6, 256), "mixed", dt, 3), "fp8_e4m3", "rceil", max_low_bound=max_low_bound)


def _one_block_byte(v, dtype=torch.bfloat16, **kw):
    return quantize_mx(torch.full((32,), v, dtype=dtype), "fp4_e2m1", scale_alg="dyn_range",
                       **kw)[1].view(torch.uint8).item()


def test_dyn_range_literal():
    # 6.0 = 1.5 * 4: floor scale 1 keeps it at 6; just above 1.5 * 2**e the exponent goes up
    assert _one_block_byte(6.0) == 127 and _one_block_byte(6.0 + 2**-5) == 128
    assert _one_block_byte(7.0, dst_type_max=7.0) == 127 and _one_block_byte(7.0 + 2**-5, dst_type_max=7.0) == 128
    assert _one_block_byte(7.0) == 128, "with 6 the block max 7 needs the next exponent"
    # 7.25 (UOS): S = amax / 7.25 rounded up to a power of two; exactly 7.25 * 2**k keeps 2**k
    assert _one_block_byte(7.25, dst_type_max=7.25) == 127 and _one_block_byte(7.5, dst_type_max=7.25) == 128
    assert _one_block_byte(3.625, dst_type_max=7.25) == 126
    # fp32 is truncated to bf16 before the carry: 6 + 2**-20 keeps the floor exponent (and saturates to 6)
    q, s = quantize_mx(torch.full((32,), 6.0 + 2**-20), "fp4_e2m1", scale_alg="dyn_range")
    assert s.view(torch.uint8)[0] == 127 and (q == 0x77).all()
    # fp16 is rounded to bf16: 1.5078125 - 2**-10 (fp16) rounds to the bf16 above 1.5 and carries
    assert _one_block_byte(1.5078125 - 2**-10, torch.float16) == 126


def test_dyn_range_byte0_block_flushed_only_for_the_carry_rule():
    x = torch.full((32,), 2.0**-126, dtype=torch.float32)
    q0, s0 = quantize_mx(x, "fp4_e2m1", scale_alg="dyn_range")
    q3, s3 = quantize_mx(x, "fp4_e2m1", scale_alg="dyn_range", dst_type_max=7.25)
    assert s0.view(torch.uint8)[0] == 0 and (q0 == 0).all(), "floor-exponent kernel: reciprocal 0"
    assert s3.view(torch.uint8)[0] == 0 and (q3 == 0x44).all(), "RCEIL kernel: 2**-126 * 2**127 = 2 (code 4)"


def test_max_low_bound_literal():
    x = torch.full((32,), 1.0, dtype=torch.bfloat16)
    s = quantize_mx(x, "fp8_e4m3", scale_alg="rceil", max_low_bound=448.0)[1].view(torch.uint8)
    assert s[0] == 127, "amax raised to 448: scale 1"
    zeros = quantize_mx(torch.zeros(32), "fp8_e4m3", scale_alg="rceil", max_low_bound=448.0)[1]
    assert zeros.view(torch.uint8)[0] == 0, "an all-zero block keeps byte 0"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"fmt": "fp8_e4m3", "scale_alg": "dyn_range"}, "FP4 E2M1"),
     ({"fmt": "fp4_e2m1", "scale_alg": "dyn_range", "block_size": 64}, "block_size 32"),
     ({"fmt": "fp4_e2m1", "scale_alg": "dyn_range", "dst_type_max": 5.0}, r"\[6.0, 12.0\]"),
     ({"fmt": "fp4_e2m1", "scale_alg": "dyn_range", "dst_type_max": 12.5}, r"\[6.0, 12.0\]"),
     ({"fmt": "fp4_e2m1", "scale_alg": "floor", "dst_type_max": 7.0}, "dyn_range"),
     ({"fmt": "fp8_e4m3", "scale_alg": "floor", "max_low_bound": 1.0}, "rceil"),
     ({"fmt": "fp8_e4m3", "scale_alg": "rceil", "max_low_bound": -1.0}, ">= 0")],
)
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_mx(torch.ones(2, 64), **kwargs)


@pytest.mark.parametrize("fmt, emax", [("fp8_e4m3", 8), ("fp4_e2m1", 2)])
def test_fp32_max_takes_the_exponent_field_not_a_float32_log2(fmt, emax):
    """The ops-nn golden's float32 log2 rounds up to 128 here; the kernel's exponent field is 254."""
    amax = np.array([0x7F7FFFE0], np.uint32).view(np.float32)
    assert np.floor(np.log2(amax))[0] == 128, "the golden's computation, for the record"
    s = quantize_mx(torch.full((32,), float(amax[0])), fmt)[1].view(torch.uint8)
    assert s[0] == 254 - emax
