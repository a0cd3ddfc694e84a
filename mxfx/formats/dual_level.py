"""Dual-level MX quantization as Ascend's npu_dynamic_dual_level_mx_quant computes it (bf16/fp16 input,
last axis): an FP32 level-0 scale per 512 values, an E8M0 level-1 scale per 32, FP4 E2M1 elements.

The arithmetic follows the A5 kernel (ops-nn dynamic_dual_level_mx_quant_base.h), not the prose formula:
level-0 is amax * fp32(1/6) (not amax / 6), inf/NaN are left out of that amax, and the quotient
x / level0 is rounded back to the input dtype before the level-1 exponent is taken.
"""

import math

import torch

from . import native
from ._checks import check_input, check_last_dim_even
from .blocks import block_abs_max, merge_blocks, split_blocks
from .e8m0 import as_e8m0_bytes, biased_exponent, e8m0_decode, pow2_reciprocal, shared_scale_bytes
from .elements import E2M1_EMAX, E2M1_MAX, check_round_mode, e2m1_decode, e2m1_encode
from .packing import pack_fp4, unpack_fp4

LEVEL0_BLOCK = 512
LEVEL1_BLOCK = 32
# The kernel's constant 0x3e2aaaab: fp32(1/6) = 0.16666667163...
INV_E2M1_MAX = torch.tensor(0x3E2AAAAB, dtype=torch.int32).view(torch.float32)
FP32_MIN_NORMAL = 2.0**-126


def quantize_dual_level(x: torch.Tensor, round_mode: str = "rint") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q, level0, level1): q packed FP4 uint8 [..., K/2], level0 float32 [..., ceil(K/512)],
    level1 float8_e8m0fnu [..., ceil(K/32)]. K must be even; short tail blocks are zero padded.

    Edge cases as the kernel handles them: a 512-block whose level-0 scale would be zero or an fp32
    subnormal gets level0 = 0, so its non-zero values become inf; a 32-block holding inf/NaN (after
    the level-0 division) gets level1 0xFF and zero codes; an all-zero or subnormal 32-block gets
    level1 0 and zero codes; zeros keep their sign.
    """
    check_input(x, "quantize_dual_level", (torch.bfloat16, torch.float16))
    check_last_dim_even(x, "quantize_dual_level")
    check_round_mode(round_mode)
    if (result := native.try_quantize_dual_level(x, round_mode)) is not None:  # MXFX_KERNELS, see native
        return result
    k = x.shape[-1]

    blocks0 = split_blocks(x, LEVEL0_BLOCK)
    amax0 = block_abs_max(blocks0)
    if not torch.isfinite(amax0).all():  # the level-0 max skips inf/NaN
        amax0 = block_abs_max(blocks0.masked_fill(~torch.isfinite(blocks0), 0))
    level0 = amax0.float() * INV_E2M1_MAX
    level0 = level0.masked_fill(level0 < FP32_MIN_NORMAL, 0.0)
    temp = (blocks0.float() / level0.unsqueeze(-1)).to(x.dtype)
    if (level0 == 0).any():  # where x == 0 the kernel keeps x (no 0/0)
        temp = torch.where(blocks0 == 0, blocks0, temp)

    blocks1 = temp.reshape(*temp.shape[:-2], -1, LEVEL1_BLOCK)[..., : math.ceil(k / LEVEL1_BLOCK), :]
    amax1 = block_abs_max(blocks1)
    level1 = shared_scale_bytes(amax1, E2M1_EMAX, E2M1_MAX, "floor")
    # bf16 multiplies by a power of two exactly; the kernel's fp16 path multiplies in fp32.
    compute_dtype = torch.float32 if x.dtype == torch.float16 else torch.bfloat16
    reciprocal = pow2_reciprocal(level1, compute_dtype)
    # Only a block with no normal value gets a zero multiplier (unlike npu_dynamic_mx_quant, which
    # zeroes every block whose byte is 0).
    reciprocal = reciprocal.masked_fill(biased_exponent(amax1) == 0, 0.0)
    scaled = merge_blocks(blocks1.to(compute_dtype) * reciprocal.unsqueeze(-1), k)
    q = pack_fp4(e2m1_encode(scaled, round_mode))
    return q, level0, level1.view(torch.float8_e8m0fnu)


def dequantize_dual_level(
    q: torch.Tensor, level0: torch.Tensor, level1: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """code * 2**(level1 - 127) * level0, computed in fp32 (the first product is exact), cast to dtype."""
    values = e2m1_decode(unpack_fp4(q))
    k = values.shape[-1]
    blocks1 = split_blocks(values, LEVEL1_BLOCK)
    scale1 = e8m0_decode(as_e8m0_bytes(level1))
    if scale1.shape != blocks1.shape[:-1]:
        raise ValueError(f"level1 shape {list(level1.shape)} does not match {k} elements in blocks of 32")
    values = merge_blocks(blocks1 * scale1.unsqueeze(-1), k)
    blocks0 = split_blocks(values, LEVEL0_BLOCK)
    if level0.shape != blocks0.shape[:-1] or level0.dtype != torch.float32:
        raise ValueError(f"level0 must be float32 {list(blocks0.shape[:-1])}, got {level0.dtype} {list(level0.shape)}")
    return merge_blocks(blocks0 * level0.unsqueeze(-1), k).to(dtype)
