"""Single-level MX quantization (OCP MX v1.0, block 32 by default) as torch_npu's npu_dynamic_mx_quant
computes it on the last axis: E8M0 scale per block, FP8 E4M3 or FP4 E2M1 elements."""

from typing import NamedTuple

import torch

from . import native
from ._checks import check_input, check_last_dim_even
from .blocks import block_abs_max, merge_blocks, split_blocks
from .e8m0 import E8M0_NAN, as_e8m0_bytes, e8m0_decode, flushes_byte0, pow2_reciprocal, shared_scale_bytes
from .elements import (
    E2M1_EMAX,
    E2M1_MAX,
    E4M3_EMAX,
    E4M3_MAX,
    check_round_mode,
    e2m1_decode,
    e2m1_encode,
    e4m3_encode,
)
from .packing import pack_fp4, unpack_fp4


class ElementFormat(NamedTuple):
    emax: int
    max_normal: float


MX_FORMATS = {"fp8_e4m3": ElementFormat(E4M3_EMAX, E4M3_MAX), "fp4_e2m1": ElementFormat(E2M1_EMAX, E2M1_MAX)}


def _element_format(fmt: str) -> ElementFormat:
    if fmt not in MX_FORMATS:
        raise ValueError(f"unknown MX element format {fmt!r}; supported: {', '.join(MX_FORMATS)}")
    return MX_FORMATS[fmt]


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 32 or block_size > 1024:
        raise ValueError(f"block_size must be a multiple of 32 in [32, 1024] (aclnn rule), got {block_size!r}")


def check_scale_args(fmt: str, block_size: int, scale_alg: str, dst_type_max: float, max_low_bound: float) -> None:
    """aclnnDynamicMxQuantV3's rules (ops-nn dynamic_mx_quant_tiling_arch35.cpp, aclnnDynamicMxQuantV3.md)."""
    if scale_alg == "rceil" and fmt == "fp4_e2m1":
        raise ValueError("scale_alg='rceil' is only defined for FP8 (the Ascend kernel rejects it for FP4)")
    if scale_alg == "dyn_range":
        if fmt != "fp4_e2m1" or block_size != 32:
            raise ValueError(f"scale_alg='dyn_range' (torch_npu scale_alg=2) is FP4 E2M1 with block_size 32 only, "
                             f"got {fmt} with block_size {block_size}")
        if not (dst_type_max == 0.0 or 6.0 <= dst_type_max <= 12.0):
            raise ValueError(f"dst_type_max must be 0.0 or in [6.0, 12.0], got {dst_type_max!r}")
    elif dst_type_max != 0.0:
        raise ValueError(f"dst_type_max={dst_type_max!r} applies to scale_alg='dyn_range' (torch_npu 2) only")
    if not max_low_bound >= 0.0 or max_low_bound == float("inf"):
        raise ValueError(f"max_low_bound must be a finite number >= 0, got {max_low_bound!r}")
    if max_low_bound != 0.0 and scale_alg != "rceil":
        raise ValueError(f"max_low_bound={max_low_bound!r} applies to scale_alg='rceil' (torch_npu 1) only")


def quantize_mx(
    x: torch.Tensor,
    fmt: str,
    block_size: int = 32,
    scale_alg: str = "floor",
    round_mode: str = "rint",
    dst_type_max: float = 0.0,
    max_low_bound: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX-quantize the last axis of a bf16/fp16/fp32 tensor.

    Returns (q, scale): q is float8_e4m3fn [..., K] for "fp8_e4m3" or packed uint8 [..., K/2] for
    "fp4_e2m1"; scale is float8_e8m0fnu [..., ceil(K/block_size)] (a short last block is allowed).

    scale_alg: "floor" (default; torch_npu scale_alg=0) is the OCP exponent rule with the Ascend kernel's
    one departure: a block whose scale byte is 0 (abs-max below 2**(emax - 126)) is flushed to zero. "ocp"
    is the specification as written (such blocks are scaled by 2**127). "rceil" (torch_npu scale_alg=1,
    FP8 only) rounds max(amax, max_low_bound)/max_normal up to a power of two. "dyn_range" (torch_npu
    scale_alg=2, FP4, block 32) takes dst_type_max: 0/6/7 round the floor exponent up where the block max
    would pass 6/7; other values in [6, 12] (7.25: vllm-omni's UOS, msmodelslim's Ceil_X) are RCEIL
    against dst_type_max. The rules are the A5 kernel's, which the ops-nn golden does not model
    (see e8m0.shared_scale_bytes and the README's numerics section).
    A block holding inf/NaN gets scale 0xFF (NaN) and all-zero elements. Elements are rounded by
    round_mode ("rint" half-to-even; FP4 also "round" half-away and "floor" toward -inf) and
    saturated to the format's max.
    """
    spec = _element_format(fmt)
    check_input(x, f"quantize_mx({fmt})")
    _check_block_size(block_size)
    check_round_mode(round_mode)
    if fmt == "fp4_e2m1":
        check_last_dim_even(x, "quantize_mx(fp4_e2m1)")
    elif round_mode != "rint":
        raise ValueError(f"FP8 MX quantization supports only round_mode='rint', got {round_mode!r}")
    check_scale_args(fmt, block_size, scale_alg, dst_type_max, max_low_bound)
    # the C kernels implement the three plain rules; the others take the torch code
    if dst_type_max == max_low_bound == 0.0 and scale_alg != "dyn_range":
        if (result := native.try_quantize_mx(x, fmt, block_size, scale_alg, round_mode)) is not None:
            return result

    blocks = split_blocks(x, block_size)
    amax = block_abs_max(blocks)
    byte = shared_scale_bytes(amax, spec.emax, spec.max_normal, scale_alg, dst_type_max, max_low_bound)
    # bf16 and fp32 multiply by a power of two exactly in their own dtype; fp16 has too little range.
    compute_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    reciprocal = pow2_reciprocal(byte, compute_dtype)
    if flushes_byte0(scale_alg, dst_type_max):
        reciprocal = reciprocal.masked_fill(byte == 0, 0.0)
    scaled = merge_blocks(blocks * reciprocal.unsqueeze(-1), x.shape[-1])
    if fmt == "fp4_e2m1":
        q = pack_fp4(e2m1_encode(scaled, round_mode))  # NaN (inf/NaN blocks) encodes as 0
    else:
        q = e4m3_encode(scaled)
        if (byte == E8M0_NAN).any():
            # masked_fill has no float8 kernel: zero the bytes (0x00 is +0)
            q = q.view(torch.uint8).masked_fill(scaled.isnan(), 0).view(torch.float8_e4m3fn)
    return q, byte.view(torch.float8_e8m0fnu)


def dequantize_mx(
    q: torch.Tensor, scale: torch.Tensor, fmt: str, block_size: int = 32, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_mx: element value times 2**(byte - 127), in `dtype` (NaN for scale 0xFF)."""
    _element_format(fmt)
    _check_block_size(block_size)
    if fmt == "fp4_e2m1":
        values = e2m1_decode(unpack_fp4(q))
    elif q.dtype == torch.float8_e4m3fn:
        values = q.float()
    else:
        raise ValueError(f"dequantize_mx(fp8_e4m3): q must be float8_e4m3fn, got {q.dtype}")
    k = values.shape[-1]
    blocks = split_blocks(values, block_size)
    scales = e8m0_decode(as_e8m0_bytes(scale))
    if scales.shape != blocks.shape[:-1]:
        raise ValueError(f"scale shape {list(scale.shape)} does not match {k} elements in blocks of {block_size}")
    return merge_blocks(blocks * scales.unsqueeze(-1), k).to(dtype)
