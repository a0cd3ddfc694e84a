"""Independent numpy oracle for the two Ascend MX quantizers, written from their specification (not from
mxfx's code). Everything here works on numpy arrays only; mxfx and torch are never imported.

- mx_quantize_golden: npu_dynamic_mx_quant (single level, E8M0 scale per block, FP8 E4M3 or FP4 E2M1).
- dual_level_golden: npu_dynamic_dual_level_mx_quant (fp32 level-0 scale per 512, E8M0 per 32, FP4).

Element values are returned as float32 arrays already on the element grid; scale bytes as uint8.
"""

import math

import ml_dtypes
import numpy as np

# E2M1 magnitudes in code order: code & 7 indexes this table, bit 3 is the sign.
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)

FORMATS = {
    # fmt: (emax, max_normal)
    "fp8_e4m3": (8, 448.0),
    "fp4_e2m1": (2, 6.0),
}

FP32_MIN_NORMAL = 2.0**-126
INV6_FP32 = np.array([0x3E2AAAAB], dtype=np.uint32).view(np.float32)[0]  # fp32(1/6)


# --------------------------------------------------------------------------------------------- helpers


def fp32_exponent_field(a):
    """Biased exponent field (0..255) of float32(a), elementwise, as int64."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.int64)
    return (bits >> 23) & 0xFF


def fp32_mantissa_field(a):
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.int64)
    return bits & 0x7FFFFF


def floor_log2_biased(amax):
    """floor(log2 amax) + 127 for normal fp32 amax via frexp; 0 for zero / fp32 subnormal amax."""
    a = np.asarray(amax, dtype=np.float64)
    _, e = np.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    biased = e.astype(np.int64) - 1 + 127
    return np.where(a < FP32_MIN_NORMAL, 0, biased)


def pad_blocks(x, block):
    """[..., K] -> [..., ceil(K/block), block], zero padded (x any numeric numpy array)."""
    k = x.shape[-1]
    n = -(-k // block)
    pad = n * block - k
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (n, block))


def unblock(x, k):
    return x.reshape(x.shape[:-2] + (-1,))[..., :k]


def round_e2m1(v, round_mode="rint"):
    """Round float64 values to the E2M1 grid (saturating to +-6, zero keeps its sign, NaN -> +0).

    Nearest-grid-point search: lower = largest grid magnitude <= |v|, upper = the next one.
    rint: ties go to the even code index; round: ties go away from zero; floor: toward -inf on the
    signed value (magnitude down for positives, up for negatives).
    """
    v = np.asarray(v, dtype=np.float64)
    nan = np.isnan(v)
    v = np.where(nan, 0.0, v)
    neg = np.signbit(v)
    a = np.abs(v)
    g = E2M1_MAGNITUDES
    lo = np.clip(np.searchsorted(g, a, side="right") - 1, 0, 7)  # g[lo] <= a
    hi = np.minimum(lo + 1, 7)
    d_lo = a - g[lo]
    d_hi = g[hi] - a
    if round_mode == "rint":
        take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    elif round_mode == "round":
        take_hi = d_hi <= d_lo
    elif round_mode == "floor":
        take_hi = neg & (d_lo > 0)
    else:
        raise ValueError(round_mode)
    idx = np.where(take_hi & (a < 6.0), hi, lo)
    idx = np.where(a >= 6.0, 7, idx)  # saturation (inf included)
    mag = g[idx]
    return np.where(neg, -mag, mag)


def round_e4m3(v):
    """Round float64 values to FP8 E4M3 (fn) half-to-even, saturating to +-448; zero keeps its sign."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    with np.errstate(divide="ignore"):
        _, e = np.frexp(a)
    e = np.maximum(e.astype(np.int64) - 1, -6)  # floor(log2 a), subnormal binade -6 (spacing 2**-9)
    step = np.ldexp(1.0, e - 3)
    q = np.rint(v / step) * step  # quotient in [8, 16) for normals: even integer <-> even mantissa
    return np.clip(q, -448.0, 448.0)


def decode_fp4_packed(packed):
    """uint8 [..., K/2] -> float32 [..., K]: element 2i in the low nibble, bit 3 sign, bits 0-2 index."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    mag = E2M1_MAGNITUDES[codes & 7]
    return np.where(codes & 8, -mag, mag).astype(np.float32)


def e8m0_value(byte):
    """2**(byte - 127) as float64, NaN for 0xFF."""
    byte = np.asarray(byte).astype(np.int64)
    return np.where(byte == 255, np.nan, np.ldexp(1.0, byte - 127))


# --------------------------------------------------------------------------------- single level (MX)


def to_bf16_precision(a, input_dtype):
    """The block max as the A5 scale_alg=2 kernel sees it: bf16 values as they are, fp16 rounded to the
    nearest bf16 (ties to even), fp32 truncated to bf16 (its low 16 bits dropped)."""
    a32 = np.asarray(a, dtype=np.float32)
    if input_dtype == "fp32":
        return (a32.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    return a32.astype(ml_dtypes.bfloat16).astype(np.float64)


def rceil_biased(s32, subnormal_up=True):
    """Biased exponent of fp32 s, plus one unless s is a power of two (subnormal s: past 2**-127 only)."""
    e = fp32_exponent_field(s32)
    m = fp32_mantissa_field(s32)
    up = (e > 0) & (e < 254) & (m > 0)
    if subnormal_up:
        up |= (e == 0) & (m > 2**22)
    return e + up


def mx_scale_bytes(amax, fmt, scale_alg, dst_type_max=0.0, max_low_bound=0.0, input_dtype="fp32"):
    """E8M0 byte from a block abs-max (float64 array holding values of the input dtype, or inf/NaN).

    dyn_range is aclnnDynamicMxQuantV3's scene 3 (scale_alg=2, FP4): for dstTypeMax 0/6/7
    shared_exp = ceil(log2 amax) - emax when the block max passes dstTypeMax (6 for 0) times
    2**(floor(log2 amax) - emax), else floor(log2 amax) - emax, on the bf16-precision max; for other
    dstTypeMax, S = amax / dstTypeMax (an fp32 product with fp32(1/dstTypeMax)) and its exponent is
    rounded up unless S is a power of two. rceil takes amax = max(amax, maxLowBound) for nonzero blocks.
    """
    emax, max_normal = FORMATS[fmt]
    amax = np.asarray(amax, dtype=np.float64)
    finite = np.isfinite(amax)
    a = np.where(finite, amax, 0.0)
    if scale_alg in ("floor", "ocp"):
        byte = np.maximum(floor_log2_biased(a) - emax, 0)
    elif scale_alg == "rceil":
        bounded = np.maximum(a.astype(np.float32), np.float32(max_low_bound))
        byte = np.where(a == 0, 0, rceil_biased(bounded * np.float32(1.0 / max_normal)))  # fp32 multiply
    elif scale_alg == "dyn_range" and dst_type_max in (0.0, 6.0, 7.0):
        limit = 6.0 if dst_type_max in (0.0, 6.0) else 7.0
        ab = to_bf16_precision(a, input_dtype)
        biased = floor_log2_biased(ab)
        floor_scale = np.ldexp(1.0, biased - 127 - emax)
        byte = np.maximum(biased + (ab > limit * floor_scale) - emax, 0)
    elif scale_alg == "dyn_range":
        inv = np.float32(1.0 / np.float64(np.float32(dst_type_max)))
        byte = np.where(a == 0, 0, rceil_biased(a.astype(np.float32) * inv, subnormal_up=False))
    else:
        raise ValueError(scale_alg)
    return np.where(finite, byte, 255).astype(np.uint8)


def mx_quantize_golden(x, fmt, block_size=32, scale_alg="floor", round_mode="rint", input_dtype="fp32",
                       dst_type_max=0.0, max_low_bound=0.0):
    """x: float32 (or float64 holding values of the input dtype) numpy array [..., K].

    The kernel multiplies x by 2**(127 - byte) in bf16 for bf16 input and in fp32 otherwise: exact, except
    that a product below that dtype's smallest subnormal becomes a signed zero before the rounding.

    Returns (element values float32 [..., K] on the element grid, scale bytes uint8 [..., ceil(K/bs)]).
    """
    emax, max_normal = FORMATS[fmt]
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[-1]
    blocks = pad_blocks(x, block_size)
    nonfinite = ~np.isfinite(blocks).all(axis=-1)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)
    amax = np.where(nonfinite, np.nan, amax)
    byte = mx_scale_bytes(amax, fmt, scale_alg, dst_type_max, max_low_bound, input_dtype)

    mult = np.ldexp(1.0, 127 - byte.astype(np.int64))  # exact 2**(127-byte), float64
    if scale_alg == "floor" or (scale_alg == "dyn_range" and dst_type_max in (0.0, 6.0, 7.0)):
        mult = np.where(byte == 0, 0.0, mult)  # the floor-exponent kernels flush byte-0 blocks
    safe = np.where(nonfinite[..., None], 0.0, blocks)
    v = (safe * mult[..., None]).astype(ml_dtypes.bfloat16 if input_dtype == "bf16" else np.float32)
    v = v.astype(np.float64)
    if fmt == "fp4_e2m1":
        y = round_e2m1(v, round_mode)
    else:
        assert round_mode == "rint"
        y = round_e4m3(v)
    y = np.where(nonfinite[..., None], 0.0, y)  # +0 for every element of an inf/NaN block
    return unblock(y, k).astype(np.float32), byte


def mx_dequantize_golden(values, scale_bytes, block_size=32):
    """values float32 [..., K], bytes uint8 -> float32 (NaN for 0xFF), computed exactly in float64."""
    k = values.shape[-1]
    blocks = pad_blocks(np.asarray(values, dtype=np.float64), block_size)
    out = blocks * e8m0_value(scale_bytes)[..., None]
    return unblock(out, k).astype(np.float32)


# ------------------------------------------------------------------------------------------ dual level


def bits_to_float32(bits, dtype):
    bits = np.asarray(bits, dtype=np.uint16)
    if dtype == "bf16":
        return bits.view(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == "fp16":
        return bits.view(np.float16).astype(np.float32)
    raise ValueError(dtype)


def round_to_input_dtype(x32, dtype):
    """RNE of float32 values to bf16/fp16 (no saturation: overflow -> inf), returned as float32."""
    if dtype == "bf16":
        return x32.astype(ml_dtypes.bfloat16).astype(np.float32)
    with np.errstate(over="ignore"):
        return x32.astype(np.float16).astype(np.float32)


def dual_level_golden(x_bits, dtype="bf16", round_mode="rint"):
    """x_bits: uint16 bit patterns [..., K] of bf16 or fp16 values.

    Returns (element values float32 [..., K], level0 float32 [..., ceil(K/512)], level1 uint8 [..., ceil(K/32)]).
    """
    x = bits_to_float32(x_bits, dtype)
    k = x.shape[-1]
    b0 = pad_blocks(x, 512)  # float32 [..., G0, 512]
    finite = np.isfinite(b0)
    amax0 = np.max(np.where(finite, np.abs(b0), np.float32(0)), axis=-1).astype(np.float32)
    level0 = (amax0 * INV6_FP32).astype(np.float32)  # fp32 multiply
    level0 = np.where(level0 < np.float32(FP32_MIN_NORMAL), np.float32(0), level0).astype(np.float32)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (b0 / level0[..., None]).astype(np.float32)  # IEEE fp32 division
    temp = round_to_input_dtype(q, dtype)
    temp = np.where(b0 == 0, b0, temp)  # keep x (and its sign) where x == 0

    n1 = -(-k // 32)
    b1 = temp.reshape(temp.shape[:-2] + (-1, 32))[..., :n1, :]  # [..., n1, 32]
    has_nonfinite = ~np.isfinite(b1).all(axis=-1)
    with np.errstate(invalid="ignore"):
        amax1 = np.max(np.abs(np.where(np.isfinite(b1), b1, 0)), axis=-1).astype(np.float32)
    e = np.where(has_nonfinite, 255, fp32_exponent_field(amax1))
    byte = np.where(e == 255, 255, np.maximum(e - 2, 0)).astype(np.uint8)

    r = np.ldexp(1.0, 127 - byte.astype(np.int64))
    r = np.where(e == 0, 0.0, r)
    safe = np.where(has_nonfinite[..., None], 0.0, b1.astype(np.float64))
    y = round_e2m1(safe * r[..., None], round_mode)
    y = np.where(has_nonfinite[..., None], 0.0, y)  # +0 codes for 0xFF blocks
    values = y.reshape(y.shape[:-2] + (-1,))[..., :k].astype(np.float32)
    return values, level0, byte


def dual_level_dequantize_golden(values, level0, level1_bytes):
    """(code value * 2**(level1 - 127)) * level0 in float32, left to right as the spec writes it
    (the first product is exact for every byte a quantizer produces)."""
    k = values.shape[-1]
    with np.errstate(over="ignore", invalid="ignore"):
        s1 = e8m0_value(level1_bytes).astype(np.float32)
        v = pad_blocks(np.asarray(values, dtype=np.float32), 32) * s1[..., None]
        v = unblock(v, k)
        v = pad_blocks(v, 512) * np.asarray(level0, dtype=np.float32)[..., None]
    return unblock(v, k).astype(np.float32)


def num_blocks(k, block):
    return math.ceil(k / block)


# ------------------------------------------------------------------------------------------ matmuls


def mx_matmul_golden(a, a_scale_bytes, b, b_scale_bytes, level0=None):
    """The MX matmuls in the ops-nn golden's order (dual_level_quant_batch_matmul golden.py,
    aclnnQuantMatmulV5's MX formula): a [M, K] and b [N, K] element values (K a multiple of 32, zero
    padded), E8M0 scale bytes [M, K/32] and [N, K/32]; level0 (fp32 [M, K/512], fp32 [K/512, N]) for the
    dual level. Each group's 32 products are summed exactly (float64) and rounded once to fp32: the
    golden's value for FP4 x FP4, whose sums are exact in any order. Then, in fp32: acc += p * sa * sb per
    group in order (dual level: per level-0 group, then acc += l0a * l0b * acc0). Returns fp32 [M, N]."""
    m, k = a.shape
    n, groups = b.shape[0], k // 32
    partial = np.einsum("mgi,ngi->gmn", a.reshape(m, groups, 32).astype(np.float64),
                        b.reshape(n, groups, 32).astype(np.float64)).astype(np.float32)
    sa = e8m0_value(a_scale_bytes).astype(np.float32)
    sb = e8m0_value(b_scale_bytes).astype(np.float32)
    acc = np.zeros((m, n), np.float32)
    with np.errstate(all="ignore"):
        for g0 in range(math.ceil(groups / 16)):
            acc0 = np.zeros((m, n), np.float32)
            for g in range(16 * g0, min(groups, 16 * g0 + 16)):
                term = partial[g] * sa[:, g, None] * sb[None, :, g]
                if level0 is None:
                    acc = acc + term
                else:
                    acc0 = acc0 + term
            if level0 is not None:
                acc = acc + level0[0][:, g0, None] * level0[1][None, g0, :] * acc0
    return acc
