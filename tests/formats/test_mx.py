"""mxfx.formats.quantize_mx / dequantize_mx against the independent numpy oracle in golden.py, bit for bit."""

import math
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch

from mxfx.formats import dequantize_mx, quantize_mx

from .golden import (
    decode_fp4_packed,
    mx_dequantize_golden,
    mx_quantize_golden,
    round_e2m1,
    round_e4m3,
)

try:  # the optional C kernels (selected by MXFX_KERNELS); every test runs on each implementation
    from mxfx.formats import native as _native
except ImportError:  # an mxfx without native kernels: the torch code only
    _native = None

KERNELS = ["torch"] if _native is None else ["torch", "native"]


@pytest.fixture(params=KERNELS, autouse=True)
def kernels(request):
    """Run the test with mxfx's torch code, then with its native kernels (where they can be built)."""
    if _native is None:
        yield request.param
        return
    if request.param == "native" and not _native.available():
        pytest.skip(f"native MX kernels unavailable: {_native.unavailable_reason()}")
    with _native.use(request.param):
        yield request.param


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)

# every valid (fmt, scale_alg, round_mode)
COMBOS = [("fp8_e4m3", alg, "rint") for alg in ("floor", "ocp", "rceil")] + [
    ("fp4_e2m1", alg, rm) for alg in ("floor", "ocp") for rm in ("rint", "round", "floor")
]
COMBO_IDS = [f"{f}-{a}-{r}" for f, a, r in COMBOS]

SHAPES = [(32,), (4, 64), (2, 3, 96), (3, 100), (2, 2048)]
SCALES = [-30, -3, 0, 3, 30, "mixed"]


# ------------------------------------------------------------------------------------------- helpers


def _values_of_q(q: torch.Tensor, fmt: str) -> np.ndarray:
    """Element values of mxfx's q, decoded independently of mxfx (FP4: our own nibble decoder)."""
    if fmt == "fp4_e2m1":
        assert q.dtype == torch.uint8
        return decode_fp4_packed(q.numpy())
    assert q.dtype == torch.float8_e4m3fn
    return q.float().numpy()


def _describe(idx, x, exp, got):
    return f"first mismatch at {idx}: input={x!r} expected={exp!r} got={got!r}"


def assert_bits_equal(got: np.ndarray, exp: np.ndarray, x: np.ndarray | None = None, what: str = "values"):
    """float32 arrays equal bit for bit (so -0 != +0); NaN positions must agree (any NaN payload)."""
    got = np.asarray(got, dtype=np.float32)
    exp = np.asarray(exp, dtype=np.float32)
    assert got.shape == exp.shape, f"{what}: shape {got.shape} != {exp.shape}"
    both_nan = np.isnan(got) & np.isnan(exp)
    same = (got.view(np.uint32) == exp.view(np.uint32)) | both_nan
    same_sign = (np.signbit(got) == np.signbit(exp)) | both_nan
    if not (same.all() and same_sign.all()):
        bad = np.argwhere(~(same & same_sign))
        i = tuple(bad[0])
        xi = None if x is None or x.shape != got.shape else x[i]
        raise AssertionError(f"{what}: {len(bad)} mismatches; " + _describe(i, xi, exp[i], got[i]))


def assert_bytes_equal(got: np.ndarray, exp: np.ndarray, x_blocks_note: str = ""):
    assert got.dtype == np.uint8 and exp.dtype == np.uint8
    assert got.shape == exp.shape, f"scale shape {got.shape} != {exp.shape}"
    if not np.array_equal(got, exp):
        bad = np.argwhere(got != exp)
        i = tuple(bad[0])
        raise AssertionError(
            f"scale bytes: {len(bad)} mismatches; first at block {i}: expected {exp[i]} got {got[i]} {x_blocks_note}"
        )


def _random_input(shape, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if scale == "mixed":  # every element on its own power-of-two scale: many distinct block bytes
        x = x * torch.exp2(torch.randint(-40, 40, shape, generator=g).double())
    else:
        x = x * 10.0**scale
    return x.to(dtype)


def check_against_golden(x: torch.Tensor, fmt, block_size=32, scale_alg="floor", round_mode="rint"):
    q, scale = quantize_mx(x, fmt, block_size=block_size, scale_alg=scale_alg, round_mode=round_mode)
    k = x.shape[-1]
    nb = math.ceil(k / block_size)
    assert scale.dtype == torch.float8_e8m0fnu
    assert tuple(scale.shape) == (*x.shape[:-1], nb)
    if fmt == "fp4_e2m1":
        assert tuple(q.shape) == (*x.shape[:-1], k // 2)
    else:
        assert tuple(q.shape) == tuple(x.shape)
    x_np = x.float().numpy()
    exp_vals, exp_bytes = mx_quantize_golden(x_np, fmt, block_size, scale_alg, round_mode, _name(x.dtype))
    got_bytes = scale.view(torch.uint8).numpy()
    got_vals = _values_of_q(q, fmt)
    assert_bytes_equal(got_bytes, exp_bytes)
    assert_bits_equal(got_vals, exp_vals, x_np)
    return q, scale, exp_vals, exp_bytes


# ---------------------------------------------------------------------------------- oracle self-checks


def test_golden_e4m3_rounding_matches_ml_dtypes_on_every_bf16():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits >> 7) & 0xFF != 0xFF]  # finite patterns only
    v = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    ours = round_e4m3(v).astype(np.float32)
    ref = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_golden_e2m1_spec_examples():
    v = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, 7.0, -np.inf])
    assert round_e2m1(v, "rint").tolist() == [0, 1, 1, 2, 2, 4, 4, -0.0, 6, -6]
    assert np.signbit(round_e2m1(np.array([-0.1]), "rint"))[0]
    assert round_e2m1(np.array([-0.3, -5.0, 0.3, 5.0]), "floor").tolist() == [-0.5, -6, 0, 4]
    assert round_e2m1(np.array([0.25, 5.0, -2.5]), "round").tolist() == [0.5, 6, -3]


# ------------------------------------------------------------------------------------ random data


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"1e{s}" if s != "mixed" else s)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_random_matches_golden(fmt, scale_alg, round_mode, dtype, scale, shape):
    seed = zlib.crc32(repr((fmt, scale_alg, round_mode, dtype, scale, shape)).encode())
    x = _random_input(shape, scale, DTYPES[dtype], seed)
    check_against_golden(x, fmt, 32, scale_alg, round_mode)


@pytest.mark.parametrize("block_size,k", [(64, 100), (64, 256), (128, 300), (256, 512), (1024, 1030)])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_block_sizes_match_golden(fmt, scale_alg, round_mode, dtype, block_size, k):
    x = _random_input((3, k), "mixed", DTYPES[dtype], seed=block_size + k)
    check_against_golden(x, fmt, block_size, scale_alg, round_mode)


@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_non_contiguous_input(fmt, scale_alg, round_mode):
    x = _random_input((96, 6), 0, torch.bfloat16, seed=7).t()  # [6, 96], non-contiguous
    assert not x.is_contiguous()
    check_against_golden(x, fmt, 32, scale_alg, round_mode)


# ---------------------------------------------------------------------------------- hand-built edges

BLOCK = 32


def _block(*values, fill=0.0):
    b = np.full(BLOCK, fill, dtype=np.float64)
    b[: len(values)] = values
    return b


def _edge_blocks(fmt):
    mx = 6.0 if fmt == "fp4_e2m1" else 448.0
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(BLOCK)
    blocks = {
        "zeros": _block(0.0, -0.0, 0.0, -0.0, fill=-0.0),
        # next to zeros and an inf block only, so no shifted block mixes it with tiny values
        "normal_big": normal * 2.0**100,
        "one_inf": _block(1.0, np.inf, -2.0, 3.5),
        "one_neg_inf": _block(1.0, -np.inf, -2.0, 3.5, -0.0),
        "one_nan": _block(np.nan, 1.0, -2.0, -0.0),
        "inf_and_nan": _block(np.inf, -np.inf, np.nan),
        "pow2_max": _block(4.0, -1.0, 0.75, 3.0) if fmt == "fp4_e2m1" else _block(256.0, -1.0, 0.75, 3.0),
        "pow2_neg_max": _block(-(2.0**-20), 2.0**-22, 1.5 * 2.0**-24),
        "saturate": _block(7.5, -7.9, 6.5, 1.0) if fmt == "fp4_e2m1" else _block(500.0, -510.0, 460.0, 1.0),
        "at_max": _block(mx, -mx, mx / 2),
        "normal": normal,
        "bf16_subnormals": _block(2.0**-130, -3 * 2.0**-133, 2.0**-133, -(2.0**-127)),
        "fp16_subnormals": _block(2.0**-20, -3 * 2.0**-24, 2.0**-24, -(2.0**-15)),
        "fp32_subnormals": _block(2.0**-140, -(2.0**-149), 3 * 2.0**-145),
        # kept away from "normal_big": a block straddling both is the case of test_floor_mode_underflow
        "normal_small": normal * 2.0**-100,
    }
    if fmt == "fp4_e2m1":
        ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
        blocks["ties"] = _block(*ties, *[-t for t in ties[1:]])
        blocks["ties_scaled"] = blocks["ties"] * 2.0**-40
        blocks["tiny_byte0"] = _block(1.5 * 2.0**-125, -(2.0**-126), 2.0**-127, -0.0)
        blocks["tiny_byte1"] = _block(2.0**-124, -(2.0**-126), 2.0**-127)
    else:
        ties = [448.0, 1 + 1 / 16, 1 + 3 / 16, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 7 * 2.0**-10, 248.0, 464.0, 0.0001]
        blocks["ties"] = _block(*ties, *[-t for t in ties[1:]])
        blocks["ties_scaled"] = blocks["ties"] * 2.0**20
        blocks["tiny_byte0"] = _block(1.5 * 2.0**-119, -(2.0**-120), 2.0**-126, 2.0**-127, -0.0)
        blocks["tiny_byte1"] = _block(2.0**-118, -(2.0**-120), 2.0**-127)
    return blocks


def _edge_tensor(fmt, dtype):
    blocks = _edge_blocks(fmt)
    names = list(blocks)
    x = torch.from_numpy(np.stack([blocks[n] for n in names])).to(dtype)
    return names, x


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_edge_blocks_match_golden(fmt, scale_alg, round_mode, dtype):
    names, x = _edge_tensor(fmt, DTYPES[dtype])
    q, scale = quantize_mx(x, fmt, scale_alg=scale_alg, round_mode=round_mode)
    exp_vals, exp_bytes = mx_quantize_golden(x.float().numpy(), fmt, 32, scale_alg, round_mode, dtype)
    got_bytes = scale.view(torch.uint8).numpy()
    got_vals = _values_of_q(q, fmt)
    for i, name in enumerate(names):
        assert got_bytes[i] == exp_bytes[i], f"{name}: scale byte expected {exp_bytes[i]} got {got_bytes[i]}"
        assert_bits_equal(got_vals[i], exp_vals[i], x[i].float().numpy(), what=f"{name} ({dtype})")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_edge_blocks_flat_with_tail(fmt, scale_alg, round_mode, dtype):
    """The same edge blocks laid end to end on one row, shifted by 6 so blocks straddle, plus a tail."""
    _, x = _edge_tensor(fmt, DTYPES[dtype])
    flat = torch.cat([torch.zeros(6, dtype=x.dtype), x.flatten(), torch.ones(4, dtype=x.dtype)])
    check_against_golden(flat.reshape(1, -1), fmt, 32, scale_alg, round_mode)
    check_against_golden(flat.reshape(1, -1), fmt, 64, scale_alg, round_mode)


# literal expectations (written by hand from the spec, not from the oracle)


def _q1(values, fmt, dtype=torch.bfloat16, scale_alg="floor", round_mode="rint"):
    x = torch.from_numpy(_block(*values)[None, :]).to(dtype)
    q, s = quantize_mx(x, fmt, scale_alg=scale_alg, round_mode=round_mode)
    return _values_of_q(q, fmt)[0], int(s.view(torch.uint8)[0, 0])


FP4_TIES = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.3]
FP4_TIES_EXPECTED = {
    "rint": [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -1, -2, -2, -4, -4, -0.5],
    "round": [6, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, -0.5],
    "floor": [6, 0, 0.5, 1, 1.5, 2, 3, 4, -0.5, -1, -1.5, -2, -3, -4, -6, -0.5],
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("round_mode", ["rint", "round", "floor"])
def test_fp4_ties_literal(round_mode, dtype):
    vals, byte = _q1(FP4_TIES, "fp4_e2m1", DTYPES[dtype], round_mode=round_mode)
    assert byte == 127
    exp = np.array(FP4_TIES_EXPECTED[round_mode] + [0.0] * (BLOCK - len(FP4_TIES)), dtype=np.float32)
    assert_bits_equal(vals, exp)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_fp8_ties_literal(dtype):
    src = [448.0, 1 + 1 / 16, 1 + 3 / 16, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 7 * 2.0**-10, 248.0, 464.0, -0.0001]
    exp = [448.0, 1.0, 1.25, 0.0, 2.0**-8, 2.0**-8, 2.0**-7, 256.0, 448.0, -0.0]
    vals, byte = _q1(src, "fp8_e4m3", DTYPES[dtype])
    assert byte == 127
    assert_bits_equal(vals, np.array(exp + [0.0] * (BLOCK - len(exp)), dtype=np.float32))


@pytest.mark.parametrize("scale_alg", ["floor", "ocp", "rceil"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_nonfinite_block_literal(fmt, scale_alg):
    if fmt == "fp4_e2m1" and scale_alg == "rceil":
        pytest.skip("rceil is FP8 only")
    x = torch.from_numpy(
        np.stack([_block(1.0, -2.0), _block(1.0, np.inf, -0.0), _block(-np.inf), _block(np.nan, -3.0)]))
    q, s = quantize_mx(x.to(torch.bfloat16), fmt, scale_alg=scale_alg)
    bytes_ = s.view(torch.uint8).numpy()
    assert bytes_[1:, 0].tolist() == [255, 255, 255]
    vals = _values_of_q(q, fmt)
    assert (vals[1:].view(np.uint32) == 0).all(), "inf/NaN blocks must be all +0"
    assert vals[0, 0] != 0


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
@pytest.mark.parametrize("scale_alg", ["floor", "ocp"])
def test_pow2_max_and_saturation_literal(fmt, scale_alg):
    if fmt == "fp4_e2m1":
        vals, byte = _q1([4.0, 1.0], fmt, scale_alg=scale_alg)
        assert (byte, vals[0], vals[1]) == (127, 4.0, 1.0)
        vals, byte = _q1([7.5, -7.9], fmt, scale_alg=scale_alg)  # exponent 2 -> byte 127 -> saturates to 6
        assert (byte, vals[0], vals[1]) == (127, 6.0, -6.0)
        vals, byte = _q1([8.0, 1.0], fmt, scale_alg=scale_alg)
        assert (byte, vals[0], vals[1]) == (128, 4.0, 0.5)
    else:
        vals, byte = _q1([256.0, 1.0], fmt, scale_alg=scale_alg)
        assert (byte, vals[0], vals[1]) == (127, 256.0, 1.0)
        vals, byte = _q1([500.0, -510.0], fmt, scale_alg=scale_alg)
        assert (byte, vals[0], vals[1]) == (127, 448.0, -448.0)
        vals, byte = _q1([512.0, 1.0], fmt, scale_alg=scale_alg)
        assert (byte, vals[0], vals[1]) == (128, 256.0, 0.5)


def test_rceil_literal():
    # amax 448 -> 448 * fp32(1/448) = 1.0 exactly? fp32(1/448)*448 rounds to 1 -> byte 127, no saturation
    vals, byte = _q1([448.0, 1.0], "fp8_e4m3", scale_alg="rceil")
    assert byte == 127 and vals[0] == 448.0
    # amax 449 -> just above 1 -> rounded up to 2 -> byte 128, element 224.5 -> 224
    vals, byte = _q1([449.0], "fp8_e4m3", torch.float32, scale_alg="rceil")
    assert byte == 128 and vals[0] == 224.0
    vals, byte = _q1([0.0, -0.0], "fp8_e4m3", scale_alg="rceil")
    assert byte == 0 and np.signbit(vals[1]) and not np.signbit(vals[0])


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_tiny_byte0_block_flushed_under_floor_only(fmt, dtype):
    if fmt == "fp8_e4m3":  # amax in [2**-119, 2**-118) -> biased exponent 8 -> byte 0
        src, ocp_first, one_up, one_up_first = [1.5 * 2.0**-119, -(2.0**-120)], 384.0, 2.0**-118, 256.0
    else:  # amax in [2**-125, 2**-124) -> biased exponent 2 -> byte 0
        src, ocp_first, one_up, one_up_first = [1.5 * 2.0**-125, -(2.0**-126)], 6.0, 2.0**-124, 4.0
    vals, byte = _q1(src, fmt, DTYPES[dtype], "floor")
    assert byte == 0
    assert (vals == 0).all() and np.signbit(vals[1]) and not np.signbit(vals[0])
    vals, byte = _q1(src, fmt, DTYPES[dtype], "ocp")
    assert byte == 0 and vals[0] == ocp_first and vals[1] < 0
    # one binade up the byte is 1 and nothing is flushed
    vals, byte = _q1([one_up], fmt, DTYPES[dtype], "floor")
    assert byte == 1 and vals[0] == one_up_first


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("scale_alg", ["floor", "ocp"])
def test_floor_mode_underflow(scale_alg, dtype):
    """The kernel scales in bf16 (bf16 input) or fp32: a negative element 2**200 below its block max
    (v = -2**-198) underflows to -0 there before the floor rounding, so it stays -0 instead of -0.5."""
    vals, byte = _q1([2.0**100, -(2.0**-100), 2.0**-100], "fp4_e2m1", DTYPES[dtype], scale_alg, "floor")
    assert byte == 227 - 2
    assert vals[0] == 4.0
    assert vals[1] == 0.0 and np.signbit(vals[1]), f"-2**-100 under a block max of 2**100: got {vals[1]}"
    assert vals[2] == 0.0 and not np.signbit(vals[2])


@pytest.mark.parametrize("scale_alg", ["floor", "ocp"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_zero_block_keeps_signs(fmt, scale_alg):
    x = torch.tensor([[0.0, -0.0] * 16], dtype=torch.bfloat16)
    q, s = quantize_mx(x, fmt, scale_alg=scale_alg)
    vals = _values_of_q(q, fmt)[0]
    assert int(s.view(torch.uint8)[0, 0]) == 0
    assert (vals == 0).all()
    assert np.signbit(vals).tolist() == [False, True] * 16


# ---------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("fmt,scale_alg,round_mode", COMBOS, ids=COMBO_IDS)
def test_dequantize_matches_golden(fmt, scale_alg, round_mode, dtype):
    _, xe = _edge_tensor(fmt, DTYPES[dtype])
    xr = _random_input((xe.shape[0], 64), "mixed", DTYPES[dtype], seed=3)
    x = torch.cat([xe.repeat(1, 2), xr], dim=0)[:, :-4]  # K = 60: a short last block
    q, s = quantize_mx(x, fmt, scale_alg=scale_alg, round_mode=round_mode)
    got = dequantize_mx(q, s, fmt)
    assert got.dtype == torch.float32 and got.shape == x.shape
    exp_vals, exp_bytes = mx_quantize_golden(x.float().numpy(), fmt, 32, scale_alg, round_mode, dtype)
    expected = mx_dequantize_golden(exp_vals, exp_bytes)
    assert_bits_equal(got.numpy(), expected, x.float().numpy(), "dequantized")
    # uint8 scales are accepted too, and dtype= casts the fp32 result
    assert_bits_equal(dequantize_mx(q, s.view(torch.uint8), fmt).numpy(), expected)
    got_bf16 = dequantize_mx(q, s, fmt, dtype=torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert_bits_equal(got_bf16.float().numpy(), torch.from_numpy(expected).to(torch.bfloat16).float().numpy())


def _half_step(a, fmt):
    """Half the grid spacing around element magnitude a (a <= max_normal)."""
    if fmt == "fp4_e2m1":
        return np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
    _, e = np.frexp(np.maximum(a, 2.0**-20))
    return np.ldexp(1.0, np.maximum(e - 1, -6) - 3) / 2


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("scale_alg", ["floor", "ocp", "rceil"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_dequantize_error_within_half_step(fmt, scale_alg, dtype):
    if fmt == "fp4_e2m1" and scale_alg == "rceil":
        pytest.skip("rceil is FP8 only")
    mx = 6.0 if fmt == "fp4_e2m1" else 448.0
    emax = 2 if fmt == "fp4_e2m1" else 8
    x = torch.cat([_random_input((8, 256), s, DTYPES[dtype], seed=11) for s in (-3, 0, 3, "mixed")])
    x = x[torch.isfinite(x).all(-1)]
    q, s = quantize_mx(x, fmt, scale_alg=scale_alg)
    deq = dequantize_mx(q, s, fmt).double().numpy().reshape(x.shape[0], -1, 32)
    xv = x.double().numpy().reshape(x.shape[0], -1, 32)
    byte = s.view(torch.uint8).numpy().astype(np.int64)
    scale = np.ldexp(1.0, byte - 127)[..., None]
    err = np.abs(deq - xv)
    flushed = np.broadcast_to((byte == 0)[..., None], xv.shape) if scale_alg == "floor" else np.zeros(xv.shape, bool)
    if flushed.any():  # flushed blocks: output 0, and their values were tiny
        assert (deq[flushed] == 0).all()
        assert (np.abs(xv[flushed]) < 2.0 ** (emax + 1 - 126)).all()
    a = np.abs(xv) / scale
    saturated = (a > mx) & ~flushed
    assert (np.abs(deq[saturated]) == (mx * np.broadcast_to(scale, xv.shape))[saturated]).all()
    ok = ~flushed & ~saturated
    bound = _half_step(np.minimum(a, mx), fmt) * scale
    assert (err[ok] <= np.broadcast_to(bound, xv.shape)[ok]).all(), f"max excess {np.max((err - bound)[ok])}"


# -------------------------------------------------------------------------------------------- errors


def test_fp4_odd_k_rejected():
    with pytest.raises(ValueError, match="even"):
        quantize_mx(torch.ones(2, 33, dtype=torch.bfloat16), "fp4_e2m1")


def test_rceil_fp4_rejected():
    with pytest.raises(ValueError, match="rceil"):
        quantize_mx(torch.ones(2, 32, dtype=torch.bfloat16), "fp4_e2m1", scale_alg="rceil")


def test_floor_round_mode_fp8_rejected():
    with pytest.raises(ValueError, match="round_mode"):
        quantize_mx(torch.ones(2, 32, dtype=torch.bfloat16), "fp8_e4m3", round_mode="floor")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_empty_rejected(fmt):
    with pytest.raises(ValueError, match="empty"):
        quantize_mx(torch.ones(0, 32, dtype=torch.bfloat16), fmt)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_block_size_48_rejected(fmt):
    with pytest.raises(ValueError, match="block_size"):
        quantize_mx(torch.ones(2, 96, dtype=torch.bfloat16), fmt, block_size=48)
    with pytest.raises(ValueError, match="block_size"):
        dequantize_mx(torch.zeros(2, 48, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8), fmt, block_size=48)


def test_unknown_format_and_scale_alg_rejected():
    x = torch.ones(2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="format"):
        quantize_mx(x, "fp6_e3m2")
    with pytest.raises(ValueError, match="scale_alg"):
        quantize_mx(x, "fp8_e4m3", scale_alg="ceil")
