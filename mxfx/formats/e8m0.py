"""E8M0 scales: an exponent only (bias 127), no zero, byte 0xFF is NaN; and the MX shared-exponent rules."""

import torch

E8M0_NAN = 0xFF
E8M0_BIAS = 127

SCALE_ALGS = ("floor", "ocp", "rceil", "dyn_range")
# dyn_range with these dst_type_max values rounds the bf16 block max (kernel "CublasFp4Opti"); any other
# value in [6, 12] takes the RCEIL rule against dst_type_max ("CublasFp4")
DYN_RANGE_CARRY = {0.0: 0x3F, 6.0: 0x3F, 7.0: 0x1F}


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(torch.int32)


def biased_exponent(x: torch.Tensor) -> torch.Tensor:
    """The fp32 exponent field of each value (0 for zero and subnormals, 255 for inf/NaN), as int32.

    It equals floor(log2|x|) + 127 for every normal fp32 value: all fp16 values and all normal bf16
    values (bf16 shares fp32's exponent field; fp16 is read through fp32 so one rule serves every dtype).
    """
    return (_float_bits(x) >> 23) & 0xFF


def e8m0_decode(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2**(byte - 127) for E8M0 bytes (uint8 or float8_e8m0fnu); byte 0xFF decodes to NaN."""
    byte = as_e8m0_bytes(scale).to(torch.int32)
    bits = byte << 23
    bits = torch.where(byte == 0, 0x00400000, bits)  # 2**-127 is an fp32 subnormal
    bits = torch.where(byte == E8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32).to(dtype)


def as_e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    if scale.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8 or float8_e8m0fnu, got {scale.dtype}")
    return scale


def _rceil_byte(amax: torch.Tensor, inv_max: float, subnormal_up: bool) -> torch.Tensor:
    """Biased exponent of the fp32 product amax * fp32(inv_max), plus one unless it is a power of two
    (a subnormal product rounds up only past half the smallest normal, and only where subnormal_up)."""
    scaled = amax.float() * torch.tensor(inv_max, dtype=torch.float32)
    bits = scaled.view(torch.int32)
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    round_up = (exponent > 0) & (exponent < 254) & (mantissa > 0)
    if subnormal_up:
        round_up |= (exponent == 0) & (mantissa > 1 << 22)
    return exponent + round_up.to(torch.int32)


def _bf16_max_bits(amax: torch.Tensor) -> torch.Tensor:
    """The bf16 bit pattern the A5 dyn-range kernel takes the block max as: bf16 as is, fp16 rounded to
    bf16 (RINT cast), fp32 truncated to its top 16 bits."""
    if amax.dtype == torch.float32:
        return (amax.view(torch.int32) >> 16) & 0x7FFF
    return amax.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0x7FFF


def shared_scale_bytes(amax: torch.Tensor, emax: int, max_normal: float, scale_alg: str,
                       dst_type_max: float = 0.0, max_low_bound: float = 0.0) -> torch.Tensor:
    """E8M0 byte of each block from its abs-max (any float dtype; inf/NaN allowed), as uint8.

    "floor" and "ocp": OCP MX v1.0, shared_exp = floor(log2 amax) - emax clamped to >= -127, i.e.
    byte = max(biased_exp(amax) - emax, 0). "rceil" (torch_npu scale_alg=1, torchao RCEIL): the fp32
    product max(amax, fp32(max_low_bound)) * fp32(1/max_normal) rounded up to a power of two, exactly as
    the Ascend kernel computes it; an all-zero block keeps byte 0 whatever max_low_bound is.
    "dyn_range" (torch_npu scale_alg=2, FP4): with dst_type_max 0/6 (7) the floor exponent of the bf16
    block max, plus one where that max exceeds 6 (7) times the floor scale's 2**emax, i.e. where its
    7-bit mantissa is above 0x40 (0x60); with another dst_type_max, RCEIL against dst_type_max (product
    with fp32(1/dst_type_max), no subnormal rounding). Any inf/NaN in the block gives byte 0xFF.
    """
    if scale_alg not in SCALE_ALGS:
        raise ValueError(f"scale_alg must be one of {SCALE_ALGS}, got {scale_alg!r}")
    finite = torch.isfinite(amax)
    if scale_alg == "rceil":
        bounded = torch.clamp(amax.float(), min=float(torch.tensor(max_low_bound, dtype=torch.float32)))
        byte = torch.where(amax == 0, 0, _rceil_byte(bounded, 1.0 / max_normal, subnormal_up=True))
    elif scale_alg == "dyn_range" and float(dst_type_max) in DYN_RANGE_CARRY:
        carried = (_bf16_max_bits(amax) + DYN_RANGE_CARRY[float(dst_type_max)]) >> 7  # biased exponent, maybe +1
        byte = torch.clamp(carried - emax, min=0)
    elif scale_alg == "dyn_range":
        limit = float(torch.tensor(dst_type_max, dtype=torch.float32))
        byte = _rceil_byte(amax, 1.0 / limit, subnormal_up=False)
    else:
        byte = torch.clamp(biased_exponent(amax) - emax, min=0)
    return torch.where(finite, byte, E8M0_NAN).to(torch.uint8)


def flushes_byte0(scale_alg: str, dst_type_max: float = 0.0) -> bool:
    """Whether the kernel zeroes the elements of a block whose scale byte is 0 (its reciprocal is set to
    0) rather than scaling them by 2**127: the floor-exponent kernels do, the RCEIL ones do not."""
    return scale_alg == "floor" or (scale_alg == "dyn_range" and float(dst_type_max) in DYN_RANGE_CARRY)


def pow2_reciprocal(byte: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**(127 - byte): the exact multiplier that maps a block onto the element grid (NaN for 0xFF)."""
    exponent = 2 * E8M0_BIAS - byte.to(torch.int32)  # biased exponent of 2**(127 - byte), in 0..254
    bits = torch.where(exponent > 0, exponent << 23, 0x00400000)  # byte 254 -> 2**-127, subnormal
    bits = torch.where(byte == E8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32).to(dtype)
